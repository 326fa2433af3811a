"""Prefix-LM: the first PREFIX tokens attend bidirectionally, the rest causally.

python examples/prefix_lm.py
"""

from _common import SHAPE, run

import attnforge as af
from attnforge.library import generate_prefix_lm_mask

PREFIX = SHAPE.S // 4

attn = af.variant(mask_mod=generate_prefix_lm_mask(PREFIX))

if __name__ == "__main__":
    run(f"prefix-LM (prefix {PREFIX})", attn)
