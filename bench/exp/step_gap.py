"""Where a forward+backward step's measured time goes beyond its kernels' time.

    PYTHONPATH=. python bench/exp/step_gap.py --D 128 --variants sliding_window causal

Per implementation and variant (bench_attention's shapes and mods): the bench's figure
(``do_bench`` median: L2 flushed before each step, events around each), events around 20
back-to-back steps (steady state), the sum of the step's GPU kernels (torch.profiler), and the
host time of an unsynchronised step.  A bench figure well above the kernel sum, with the
back-to-back figure near it, means time between kernels inside one step (host-bound stretch,
allocation, a hidden wait); both above it means the kernels themselves run slower there.
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

from bench_attention import allow_recompiles, bench_ms  # noqa: E402
from prof_bwd import kernel_times, make_step  # noqa: E402


def back_to_back(fn, n: int = 20) -> tuple[float, float]:
    """(GPU ms per step over n queued steps, host ms per step while queueing)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n, host


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--D", type=int, nargs="+", default=[128])
    ap.add_argument("--S", type=int, default=8192)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--variants", nargs="+", default=["sliding_window", "causal"])
    ap.add_argument("--impls", nargs="+", default=["attnforge", "flex"])
    a = ap.parse_args(argv)
    allow_recompiles()
    for D in a.D:
        for variant in a.variants:
            for impl in a.impls:
                step = make_step(variant, impl, a.B, 16, a.S, D)
                fwd = step.forward_only
                with torch.no_grad():
                    f_bench = bench_ms(fwd)
                    f_b2b, f_host = back_to_back(fwd)
                fb_bench = bench_ms(step)
                fb_b2b, fb_host = back_to_back(step)
                kern = sum(kernel_times(step).values())
                print(f"D={D} {variant:14s} {impl:9s} fwd: bench {f_bench:.3f} b2b {f_b2b:.3f} "
                      f"host {f_host:.3f} | fwd+bwd: bench {fb_bench:.3f} b2b {fb_b2b:.3f} "
                      f"kernels {kern:.3f} host {fb_host:.3f} | bwd bench {fb_bench - f_bench:.3f}"
                      f" b2b {fb_b2b - f_b2b:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
