"""GPU idle time inside one forward+backward step: kernel timeline of attnforge vs flex.

    PYTHONPATH=. python bench/exp/gaps.py --D 128 --variants alibi causal

The bench's backward time (do_bench of fwd+bwd minus fwd) was ~0.45 ms above the sum of
attnforge's kernel times while flex's matched its kernels.  This prints, per implementation, the
span of each step's kernels on the GPU, their summed time, and every gap over 5 µs between two
kernels (with the host-side time of the step, measured without synchronising), to show whether
the GPU waits on the host or on something else.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "exp"))

from bench_attention import allow_recompiles  # noqa: E402
from prof_bwd import make_step  # noqa: E402


def timeline(step, iters=4, sync=True):
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    host = []
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            if sync:
                flush.zero_()  # as do_bench: L2 flushed before each timed call
            t0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - t0) * 1e6)
            if sync:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    ks = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    return ks, host


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--S", type=int, default=8192)
    ap.add_argument("--variants", nargs="+", default=["alibi", "causal"])
    ap.add_argument("--impls", nargs="+", default=["attnforge", "flex"])
    ap.add_argument("--nosync", action="store_true", help="steps back to back, no flush")
    args = ap.parse_args(argv)
    allow_recompiles()
    for variant in args.variants:
        for impl in args.impls:
            step = make_step(variant, impl, 4, 16, args.S, args.D)
            ks, host = timeline(step, sync=not args.nosync)
            print(f"== {variant} D={args.D} {impl}: host µs per step (no sync) "
                  f"{', '.join(f'{h:.0f}' for h in host)}")  # fmt: skip
            prev = None
            for e in ks:
                name = e.name[:60]
                if prev is not None:
                    gap = (e.time_range.start - prev.time_range.end) / 1.0
                    if gap > 5:
                        print(f"   gap {gap:9.1f} µs  {prev.name[:40]} -> {name}")
                print(f"   {e.time_range.elapsed_us():9.1f} µs  {name}")
                prev = e


if __name__ == "__main__":
    main()
