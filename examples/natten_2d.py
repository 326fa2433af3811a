"""2-D neighbourhood attention (NATTEN) on an image-like canvas in row-major token order.

Each query pixel sees the KERNEL x KERNEL window centred on it, shifted inward at the borders.

    python examples/natten_2d.py
"""

from _common import DEVICE, SMALL, run, square

import attnforge as af
from attnforge.library import generate_natten

CANVAS = (64, 64) if DEVICE == "cuda" else (8, 16) if SMALL else (16, 16)
KERNEL = 13 if DEVICE == "cuda" else 5

attn = af.variant(mask_mod=generate_natten(KERNEL, CANVAS))

if __name__ == "__main__":
    run(f"NATTEN {KERNEL}x{KERNEL} on {CANVAS[0]}x{CANVAS[1]}", attn, square(CANVAS[0] * CANVAS[1]))
