"""A learnable relative-position bias: score + table[h, q_idx - kv_idx + S - 1], causal.

The bias table is a captured tensor with requires_grad: the generated backward kernel
accumulates its gradient, which is checked here against the dense reference.

    python examples/learnable_bias.py
"""

import _common as ex
import torch

import attnforge as af
from attnforge.library import generate_causal_mask, generate_relative_bias

table = (0.1 * torch.randn(ex.SHAPE.H, 2 * ex.SHAPE.S - 1)).to(ex.DEVICE).requires_grad_(True)

attn = af.variant(score_mod=generate_relative_bias(table), mask_mod=generate_causal_mask())

if __name__ == "__main__":
    ex.banner("learnable relative bias + causal")
    q, k, v = ex.make_qkv(ex.check_shape(), requires_grad=True)
    ex.max_error(attn, q, k, v)
    ex.max_grad_error(attn, q, k, v, {"table": table, "q": q, "k": k, "v": v})
    ex.compare_with_flex(attn, backward=True)
