"""Logit soft-capping (Gemma 2): cap * tanh(score / cap), with a causal mask.

`approx=True` writes tanh through exp2, which the GPU computes on its fast exp2 unit.

    python examples/softcap.py
"""

from _common import run

import attnforge as af
from attnforge.library import generate_causal_mask, generate_tanh_softcap

CAP = 30.0

attn = af.variant(score_mod=generate_tanh_softcap(CAP), mask_mod=generate_causal_mask())
attn_exp2 = af.variant(
    score_mod=generate_tanh_softcap(CAP, approx=True), mask_mod=generate_causal_mask()
)

if __name__ == "__main__":
    run(f"softcap {CAP} + causal", attn)
    run(f"softcap {CAP} (exp2 form) + causal", attn_exp2)
