"""Why bench_attention's host overhead (27-30 us) is above bench_host_overhead --gpu's (15 us):
the same attnforge call timed the bench's way before and after each thing the bench does
around it (flex imports, its block mask, torch.compile, a flex call), with a cProfile of
one state.

    PYTHONPATH=. python bench/exp/host_check.py
"""

from __future__ import annotations

import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import attnforge as af  # noqa: E402


def wall_us(fn, n=1000) -> float:
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main() -> None:
    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx  # noqa: E731
    abm = af.create_block_mask(causal, None, None, 128, 128, device="cuda")

    def fn():
        return af.flex_attention(q, k, v, block_mask=abm)

    with torch.no_grad():
        print(f"fresh: {wall_us(fn):.1f} us/call", flush=True)
        from torch.nn.attention.flex_attention import create_block_mask as t_cbm
        from torch.nn.attention.flex_attention import flex_attention as t_flex

        print(f"after flex import: {wall_us(fn):.1f}", flush=True)
        tbm = t_cbm(causal, None, None, 128, 128, device="cuda")
        print(f"after flex create_block_mask: {wall_us(fn):.1f}", flush=True)
        flex_c = torch.compile(t_flex)
        print(f"after torch.compile(): {wall_us(fn):.1f}", flush=True)
        flex_c(q, k, v, block_mask=tbm)
        print(f"after a flex call: {wall_us(fn):.1f}", flush=True)
        time.sleep(20)  # transient (Inductor's compile workers starting) or lasting?
        print(f"20 s later: {wall_us(fn):.1f}", flush=True)
        print(f"flex: {wall_us(lambda: flex_c(q, k, v, block_mask=tbm)):.1f}", flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2000):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
