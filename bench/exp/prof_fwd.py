"""One forward launch of the Gluon prototype and of the Triton template (D=128, noop) for ncu.

ncu --section WarpStateStats ... -k regex:attn_fwd python bench/exp/prof_fwd.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gluon_fwd  # noqa: E402

import attnforge as af  # noqa: E402

B, H, L, D = 4, 16, 8192, 128
q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
bm = af.create_block_mask(lambda b, h, qi, ki: qi >= 0, None, None, L, L, device="cuda")
for _ in range(2):
    gluon_fwd.gluon_attention(q, k, v, bm, False, stages=3)
    af.flex_attention(q, k, v)
torch.cuda.synchronize()
