"""Sliding-window attention: each query sees itself and the WINDOW keys before it.

The window is a captured scalar: another size reuses the same compiled kernel.

    python examples/sliding_window.py
"""

from _common import DEVICE, SHAPE, run

import attnforge as af
from attnforge.library import generate_sliding_window

WINDOW = 1024 if DEVICE == "cuda" else 48

attn = af.variant(mask_mod=generate_sliding_window(WINDOW))

if __name__ == "__main__":
    print(attn.block_mask(SHAPE.L, SHAPE.S))  # a diagonal band: FULL inside, PARTIAL at edges
    run(f"sliding window {WINDOW}", attn)
