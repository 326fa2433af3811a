"""Causal attention, in both alignments.

top_left (FlexAttention, torch.tril): query i sees keys 0..i.
bottom_right (FlashAttention when L != S): the last query is aligned with the last key, as when
decoding a chunk of new tokens against a longer KV cache.

    python examples/causal.py          # CPU: Triton interpreter; GPU: also times FlexAttention
"""

from dataclasses import replace

from _common import SHAPE, run

import attnforge as af
from attnforge.library import generate_causal_mask

attn = af.variant(mask_mod=generate_causal_mask())

CHUNK = replace(SHAPE, L=SHAPE.S // 4)  # a quarter as many queries as keys
attn_bottom_right = af.variant(
    mask_mod=generate_causal_mask("bottom_right", q_len=CHUNK.L, kv_len=CHUNK.S)
)

if __name__ == "__main__":
    run("causal (top-left)", attn)
    run("causal (bottom-right, L = S / 4)", attn_bottom_right, CHUNK)
