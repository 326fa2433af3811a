"""A/B of backward configs (kernel_options) on the GPU, same process: the bench's backward time
(do_bench of forward+backward minus forward) and each config's gradients against the default
config's (relative max error).

    PYTHONPATH=. python bench/exp/bwd_configs.py --D 128 --variants noop causal \
        --configs default tma128 [--out DIR]

Configs are named below; ``default`` is attnforge's own choice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.bench_attention import VARIANTS, bench_ms, flops  # noqa: E402
from bench.exp.prof_bwd import make_inputs  # noqa: E402

CONFIGS = {
    "default": {},
    "hg2": dict(HEAD_GROUP=2),  # program order: heads per group
    "hg4": dict(HEAD_GROUP=4),
    "hg8": dict(HEAD_GROUP=8),
    "hg16": dict(HEAD_GROUP=16),
    "notma": dict(DQ_TMA=False),  # the default config, dQ by element-wise atomics if atomic
    "sep": dict(DQ_ATOMIC=False),  # the default config, dQ in its own kernel
    # dQ-kernel tiles (BLOCK_M2 x BLOCK_N2; num_stages also sets the forward's)
    "dq128x128s2": dict(BLOCK_M2=128, BLOCK_N2=128, num_stages=2),
    "dq128x32": dict(BLOCK_M2=128, BLOCK_N2=32),
    "dq64x64": dict(BLOCK_M2=64, BLOCK_N2=64),
    "dq128x64s2": dict(BLOCK_M2=128, BLOCK_N2=64, num_stages=2),
    # dK/dV tiles (BLOCK_M1 queries per step x BLOCK_N1 keys)
    "kv32x64": dict(BLOCK_M1=32, BLOCK_N1=64),
    "kv128x64": dict(BLOCK_M1=128, BLOCK_N1=64),
    "kv64x128w8": dict(BLOCK_M1=64, BLOCK_N1=128, num_warps1=8),
    "kv64x64s3": dict(BLOCK_M1=64, BLOCK_N1=64, num_stages1=3),
    # dQ by TMA bulk reduce-adds inside dK/dV (FlashAttention-3's 5-matmul scheme)
    "tma128": dict(DQ_ATOMIC=True, BLOCK_M1=64, BLOCK_N1=128, num_warps1=8, num_stages1=2),
    "tma128s1": dict(DQ_ATOMIC=True, BLOCK_M1=64, BLOCK_N1=128, num_warps1=8, num_stages1=1),
    "tma128s3": dict(DQ_ATOMIC=True, BLOCK_M1=64, BLOCK_N1=128, num_warps1=8, num_stages1=3),
    "tma64": dict(DQ_ATOMIC=True, BLOCK_M1=64, BLOCK_N1=64, num_warps1=4, num_stages1=2),
    "tma64s1": dict(DQ_ATOMIC=True, BLOCK_M1=64, BLOCK_N1=64, num_warps1=4, num_stages1=1),
    "tma128m32": dict(DQ_ATOMIC=True, BLOCK_M1=32, BLOCK_N1=128, num_warps1=8, num_stages1=2),
    "tma128m128": dict(DQ_ATOMIC=True, BLOCK_M1=128, BLOCK_N1=128, num_warps1=8, num_stages1=2),
    "elem128": dict(
        DQ_ATOMIC=True, DQ_TMA=False, BLOCK_M1=64, BLOCK_N1=128, num_warps1=8, num_stages1=2
    ),
    "tma128dp": dict(
        DQ_ATOMIC=True, BLOCK_M1=64, BLOCK_N1=128, num_warps1=8, num_stages1=2, DP_FIRST=True
    ),
}


def one_case(af, D: int, variant: str, a, rows: list) -> None:
    B, H, S = a.B, a.H, a.S
    q, k, v, do, score_mod, mask_mod = make_inputs(variant, B, H, S, D)
    Hkv = k.shape[1]
    bm = af.create_block_mask(mask_mod, None, None, S, S, device="cuda") if mask_mod else None
    density = 1.0 - bm.sparsity() / 100.0 if bm is not None else 1.0
    bwd_flops = flops(B, H, S, D, density)[1]
    ref = None
    for name in a.configs:
        opts = CONFIGS[name]

        def fwd(opts=opts):
            return af.flex_attention(
                q,
                k,
                v,
                score_mod=score_mod,
                block_mask=bm,
                enable_gqa=Hkv != H,
                kernel_options=opts or None,
            )

        def fb(fwd=fwd):
            for t in (q, k, v):
                t.grad = None
            fwd().backward(do)

        t0 = time.perf_counter()
        try:
            fb()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a config that does not fit
            msg = str(e).splitlines()[0][:150] if str(e) else ""
            print(f"D={D} {variant:15s} {name:10s} failed: {type(e).__name__}: {msg}", flush=True)
            continue
        first = time.perf_counter() - t0
        grads = [t.grad.float().clone() for t in (q, k, v)]
        ref = grads if ref is None else ref
        err = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()
                  for g, r in zip(grads, ref))  # fmt: skip
        bad = " NONFINITE" if any(not torch.isfinite(g).all() for g in grads) else ""
        with torch.no_grad():
            f_ms = bench_ms(fwd)
        fb_ms = bench_ms(fb)
        row = dict(D=D, variant=variant, config=name, fwd_ms=f_ms, fwdbwd_ms=fb_ms,
                   bwd_ms=fb_ms - f_ms, bwd_tflops=bwd_flops / (fb_ms - f_ms) / 1e9,
                   rel_err_vs_first=err, nonfinite=bool(bad), first_call_s=first)  # fmt: skip
        rows.append(row)
        print(f"D={D} {variant:15s} {name:10s} bwd {row['bwd_ms']:7.3f} ms "
              f"{row['bwd_tflops']:6.1f} TF/s  rel err {err:.2e}{bad}  (first call {first:.1f} s)",
              flush=True)  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--D", type=int, nargs="+", default=[128])
    ap.add_argument("--S", type=int, default=8192)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--configs", nargs="+", default=["default", "tma128"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import attnforge as af

    rows: list = []
    for D in a.D:
        for variant in a.variants:
            one_case(af, D, variant, a, rows)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "bwd_configs.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
