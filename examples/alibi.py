"""ALiBi: a per-head linear distance penalty, score + slope[h] * (kv_idx - q_idx), causal.

The slopes are a captured tensor (kernel argument), so they may also be learned
(generate_alibi_bias(H, learnable=True)).

    python examples/alibi.py
"""

from _common import DEVICE, SHAPE, run

import attnforge as af
from attnforge.library import generate_alibi_bias, generate_causal_mask

attn = af.variant(
    score_mod=generate_alibi_bias(SHAPE.H, device=DEVICE),
    mask_mod=generate_causal_mask(),
)

if __name__ == "__main__":
    run("alibi + causal", attn)
