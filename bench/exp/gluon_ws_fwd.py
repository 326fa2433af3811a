"""A/B of the warp-specialised Hopper forward (the package's ``fwd_ws.py``, generated from
``attnforge/codegen/templates/fwd_ws.py.tmpl``) over its free knobs: K/V ring depth, key tile
(BLOCK_N, from the K/V descriptor blocks) and FA3's ping-pong, for noop and causal, against
the Triton kernel and cuDNN.  (The sm_90 build and ptxas check of the template:
``tests/test_fwd_ws.py``.)

    python bench/exp/gluon_ws_fwd.py --bench          # GPU
"""

# ruff: noqa: B023  (the bench lambdas run inside the loop iteration that makes them)
from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gluon_fwd import _desc, launch_args  # noqa: E402

from attnforge.codegen import lower  # noqa: E402
from attnforge.dsl.api import as_mod  # noqa: E402


@functools.cache
def _kernel(causal: bool):
    """The generated ``_attn_fwd_ws`` of noop or causal (the module written to a temp file)."""
    mask = (lambda b, h, q, kv: q >= kv) if causal else None
    path = Path(tempfile.mkdtemp(prefix="fwd_ws")) / "fwd_ws.py"
    path.write_text(lower(None, as_mod(mask, "mask")).files["fwd_ws.py"])
    spec = importlib.util.spec_from_file_location(f"fwd_ws_{int(causal)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._attn_fwd_ws


def ws_attention(q, k, v, bm, causal, BN=128, stages=2, pingpong=True, hg=1):
    D = q.shape[3]
    S = k.shape[2]
    L = q.shape[2]
    BM = 128
    out, lse, grid, has_full, args = launch_args(q, k, bm, BM)
    _kernel(causal)[grid](
        _desc(q, BM // 2, D),
        _desc(k, BN, D),
        _desc(v, BN, D),
        *args,
        hg,
        BLOCK_M=BM,
        SPARSE_Q_BLOCK=bm.BLOCK_SIZE[0],
        SPARSE_KV_BLOCK=bm.BLOCK_SIZE[1],
        EVEN_KV=S % bm.BLOCK_SIZE[1] == 0,
        HAS_FULL_BLOCKS=has_full,
        SCALE_FOLDED=True,
        POS_F32=max(L, S) <= 2**24,
        NUM_STAGES=stages,
        PINGPONG=pingpong,
        num_warps=4,
    )
    return out, lse


def bench(quick: bool):
    import torch.nn.functional as F
    from triton.testing import do_bench

    import attnforge as af

    torch.manual_seed(0)
    B, H, L = 4, 16, 8192
    rows = []
    cfgs = [(128, 2, True), (128, 3, True), (128, 2, False), (64, 3, True)]
    for D in (128, 64):
        for causal in (False, True):
            q, k, v = (
                torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)
            )
            mm = (lambda b, h, qi, ki: qi >= ki) if causal else (lambda b, h, qi, ki: qi >= 0)
            bm = af.create_block_mask(mm, None, None, L, L, device="cuda")
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
            res = {"D": D, "causal": causal}
            for name, fn in {
                "attnforge": lambda: af.flex_attention(q, k, v, block_mask=bm if causal else None),
                "cudnn": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            }.items():
                res[name] = round(flops / do_bench(fn) * 1e-9, 1)
            for BN, s, pp in cfgs[:2] if quick else cfgs:
                st = s + (D == 64)  # D=64 tiles are half the bytes: one more stage fits
                key = f"ws_{BN}s{st}{'pp' if pp else ''}"
                try:
                    run = lambda: ws_attention(q, k, v, bm, causal, BN, st, pp)  # noqa: E731
                    o, lse = run()
                    torch.cuda.synchronize()
                    err = (o.float() - ref.float()).abs().max().item()
                    res[key] = (round(flops / do_bench(run) * 1e-9, 1), round(err, 4))
                except Exception as e:  # noqa: BLE001
                    res[key] = f"{type(e).__name__}: {str(e)[:300]}"
            print(res, flush=True)
            rows.append(res)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.bench:
        bench(a.quick)
