"""Sliding-window attention: each query sees itself and the WINDOW keys before it.

The window is a captured scalar: another size reuses the same compiled kernel.

    python examples/sliding_window.py
"""

from _common import DEVICE, run

import attnforge as af
from attnforge.library import generate_sliding_window

WINDOW = 1024 if DEVICE == "cuda" else 48

attn = af.variant(mask_mod=generate_sliding_window(WINDOW))

if __name__ == "__main__":
    print(attn.block_mask(4096))  # a diagonal band of blocks (the analysis is O(blocks))
    run(f"sliding window {WINDOW}", attn)
