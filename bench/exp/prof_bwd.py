"""Where the forward+backward time goes, per kernel, for attnforge and compiled FlexAttention.

    PYTHONPATH=. python bench/exp/prof_bwd.py --D 128 --variants noop causal alibi

Same inputs and mods as bench_attention.py (B=4 H=16 S=8192 bf16). torch.profiler records a few
forward+backward iterations of each implementation; the table lists every GPU kernel's mean
time per iteration, so the backward's split (dQ kernel, dK/dV kernel, anything else) can be
compared with flex's.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_attention import allow_recompiles, make_variant  # noqa: E402


def kernel_times(fn, iters=3):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    acc = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc[e.name] += e.device_time / iters / 1e3  # ms per iteration
    return acc


def make_inputs(variant, B, H, S, D) -> tuple:
    """q, k, v, dO (bf16, CUDA, seeded) and the variant's (score_mod, mask_mod)."""
    Hkv = 4 if variant == "gqa_causal" else H
    torch.manual_seed(0)
    q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    score_mod, mask_mod, _ = make_variant(variant, H, S, "cuda")
    return q, k, v, torch.randn_like(q), score_mod, mask_mod


def make_step(variant, impl, B, H, S, D):
    """One forward+backward of ``impl`` on fresh inputs (bench_attention's shapes and mods)."""
    from torch.nn.attention.flex_attention import create_block_mask as t_cbm
    from torch.nn.attention.flex_attention import flex_attention as t_flex

    import attnforge as af

    q, k, v, do, score_mod, mask_mod = make_inputs(variant, B, H, S, D)
    Hkv = k.shape[1]
    kw = dict(score_mod=score_mod, enable_gqa=Hkv != H)
    if impl == "attnforge":
        bm = af.create_block_mask(mask_mod, None, None, S, S, device="cuda") if mask_mod else None
        fn = af.flex_attention
    else:
        bm = t_cbm(mask_mod, None, None, S, S, device="cuda") if mask_mod else None
        fn = torch.compile(t_flex, dynamic=False)

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v, block_mask=bm, **kw).backward(do)

    step.forward_only = lambda: fn(q, k, v, block_mask=bm, **kw)  # same inputs, no backward
    return step


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--D", type=int, nargs="+", default=[128])
    ap.add_argument("--S", type=int, default=8192)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--variants", nargs="+", default=["noop", "causal", "alibi"])
    ap.add_argument("--impls", nargs="+", default=["attnforge", "flex"])
    ap.add_argument("--ncu", action="store_true", help="two plain iterations (run under ncu)")
    args = ap.parse_args(argv)
    allow_recompiles()
    B, H, S = args.B, 16, args.S
    for D in args.D:
        for variant in args.variants:
            for impl in args.impls:
                step = make_step(variant, impl, B, H, S, D)
                if args.ncu:
                    for _ in range(2):
                        step()
                    torch.cuda.synchronize()
                    continue
                acc = kernel_times(step)
                total = sum(acc.values())
                print(f"== D={D} {variant} {impl}: {total:.3f} ms per fwd+bwd", flush=True)
                for name, ms in sorted(acc.items(), key=lambda x: -x[1]):
                    if ms > 0.005:
                        print(f"   {ms:8.3f} ms  {100 * ms / total:5.1f}%  {name[:110]}")


if __name__ == "__main__":
    main()
