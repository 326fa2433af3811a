"""Why the bench's times sit above the kernel sums: one variant, attnforge and flex
alternately, timed four ways in one process.

    PYTHONPATH=. python bench/exp/timing_check.py --D 128 --variant noop [--rounds 2]

- ``do_bench``: bench_attention's method (L2 flush before every call, median of ~100 ms);
- ``loop``: CUDA events around 20 back-to-back calls, no flush;
- ``loop+flush``: the same with do_bench's L2 flush before each call;
- ``kernels``: torch.profiler's sum of GPU kernel time per call (flush excluded);
plus the SM clock (nvml) after each measurement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_attention import allow_recompiles, bench_ms  # noqa: E402
from exp.prof_bwd import kernel_times, make_step  # noqa: E402


def loop_ms(fn, n=20, flush=False) -> float:
    import triton

    cache = triton.runtime.driver.active.get_empty_cache_for_benchmark()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    total = 0.0
    start.record()
    for _ in range(n):
        if flush:
            cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    total = start.elapsed_time(end)
    if flush:  # take the flushes out again
        s2, e2 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s2.record()
        for _ in range(n):
            cache.zero_()
        e2.record()
        torch.cuda.synchronize()
        total -= s2.elapsed_time(e2)
    return total / n


def clock() -> str:
    try:
        return f"{torch.cuda.clock_rate()} MHz"
    except Exception:  # noqa: BLE001
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--variant", default="noop")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    allow_recompiles()
    steps = {impl: make_step(a.variant, impl, 4, 16, 8192, a.D) for impl in ("attnforge", "flex")}
    fwds = {impl: step.forward_only for impl, step in steps.items()}
    for r in range(a.rounds):
        order = ("attnforge", "flex") if r % 2 == 0 else ("flex", "attnforge")
        for impl in order:
            fb, fwd = steps[impl], fwds[impl]
            with torch.no_grad():
                f_bench = bench_ms(fwd)
                f_loop = loop_ms(fwd)
                f_loopf = loop_ms(fwd, flush=True)
            fb_bench = bench_ms(fb)
            fb_loop = loop_ms(fb)
            fb_loopf = loop_ms(fb, flush=True)
            with torch.no_grad():
                f_k = sum(kernel_times(fwd).values())
            fb_k = sum(kernel_times(fb).values())
            print(f"round {r} {impl:9s} fwd: do_bench {f_bench:.3f} loop {f_loop:.3f} "
                  f"loop+flush {f_loopf:.3f} kernels {f_k:.3f} | fwd+bwd: do_bench {fb_bench:.3f} "
                  f"loop {fb_loop:.3f} loop+flush {fb_loopf:.3f} kernels {fb_k:.3f} | "
                  f"bwd (do_bench) {fb_bench - f_bench:.3f} (kernels) {fb_k - f_k:.3f} | "
                  f"clock {clock()}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
