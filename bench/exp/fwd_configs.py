"""A/B of forward configs (kernel_options) on the GPU, same process, with cuDNN's SDPA beside
them where it expresses the variant: forward TF/s (do_bench, block density), rounds in rotating
order (median per config), and each config's output against the first config's.

    PYTHONPATH=. python bench/exp/fwd_configs.py --D 128 64 --variants noop causal gqa_causal \
        --configs default nopersist [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.bench_attention import bench_ms, flops  # noqa: E402
from bench.exp.prof_bwd import make_inputs  # noqa: E402

CONFIGS = {
    "default": {},
    "nopersist": dict(PERSISTENT=False),
    "persist": dict(PERSISTENT=True),
    "triton": dict(FWD_WS=False),
    # program order: heads per group
    "hg2": dict(HEAD_GROUP=2),
    "hg8": dict(HEAD_GROUP=8),
    "hg16": dict(HEAD_GROUP=16),
    # the warp-specialised kernel where the default picks the Triton one (D=64 with a mask)
    "ws": dict(FWD_WS=True),
    "wsp": dict(FWD_WS=True, PERSISTENT=True),
    "wsp64": dict(FWD_WS=True, PERSISTENT=True, HEAD_GROUP=64),
    "wsp16": dict(FWD_WS=True, PERSISTENT=True, HEAD_GROUP=16),
    "wshg64": dict(FWD_WS=True, HEAD_GROUP=64),
    # the Triton kernel's tiles (any of these also turns the warp-specialised kernel off)
    "w8": dict(num_warps=8),
    "s3": dict(num_stages=3),
    "m64": dict(BLOCK_M=64),
    "n128w8": dict(BLOCK_N=128, num_warps=8, num_stages=3),
    "n32": dict(BLOCK_N=32),
}
_CUDNN = {"noop": False, "causal": True, "gqa_causal": True}  # variant -> is_causal


def cudnn_fn(variant, q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    causal, gqa = _CUDNN[variant], k.shape[1] != q.shape[1]

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)

    return run


def one_case(af, D: int, variant: str, a) -> None:
    q, k, v, _, score_mod, mask_mod = make_inputs(variant, a.B, a.H, a.S, D)
    gqa = k.shape[1] != q.shape[1]
    bm = af.create_block_mask(mask_mod, None, None, a.S, a.S, device="cuda") if mask_mod else None
    density = 1.0 - bm.sparsity() / 100.0 if bm is not None else 1.0
    fwd_flops = flops(a.B, a.H, a.S, D, density)[0]
    fns = {}
    for name in a.configs:
        kw = dict(score_mod=score_mod, block_mask=bm, enable_gqa=gqa,
                  kernel_options=CONFIGS[name] or None)  # fmt: skip
        fns[name] = lambda kw=kw: af.flex_attention(q, k, v, **kw)
    if variant in _CUDNN:
        fns["cudnn"] = cudnn_fn(variant, q, k, v)
    with torch.no_grad():
        ref = fns[a.configs[0]]().float()
        errs = {n: (f().float() - ref).abs().max().item() for n, f in fns.items()}
        times: dict = {n: [] for n in fns}
        names = list(fns)
        for r in range(a.rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                times[n].append(bench_ms(fns[n]))
    for n in names:
        ms = statistics.median(times[n])
        print(f"D={D} {variant:11s} {n:10s} {fwd_flops / ms / 1e9:7.1f} TF/s  {ms:.3f} ms  "
              f"err {errs[n]:.1e}", flush=True)  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--D", nargs="+", type=int, default=[128])
    ap.add_argument("--variants", nargs="+", default=["noop", "causal"])
    ap.add_argument("--configs", nargs="+", default=["default", "nopersist"])
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--S", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    import attnforge as af

    for D in a.D:
        for variant in a.variants:
            one_case(af, D, variant, a)


if __name__ == "__main__":
    main()
