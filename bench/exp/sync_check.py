"""Does a forward+backward step block the host on the GPU (a hidden synchronisation)?

    PYTHONPATH=. python bench/exp/sync_check.py --variants alibi causal

Per implementation: torch's sync debug mode over one step (warns at every synchronising call,
with its stack), the host time of 10 unsynchronised steps (a host that never waits runs far
ahead of the ~8 ms of GPU work per step), and a cProfile of those steps.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "exp"))

from bench_attention import allow_recompiles  # noqa: E402
from prof_bwd import make_step  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--S", type=int, default=8192)
    ap.add_argument("--variants", nargs="+", default=["alibi", "causal"])
    ap.add_argument("--impls", nargs="+", default=["attnforge", "flex"])
    args = ap.parse_args(argv)
    allow_recompiles()
    for variant in args.variants:
        for impl in args.impls:
            step = make_step(variant, impl, 4, 16, args.S, args.D)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                step()
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            syncs = [str(w.message).splitlines()[0] for w in got if "synchroniz" in str(w.message)]
            t0 = time.perf_counter()
            for _ in range(10):
                step()
            host = (time.perf_counter() - t0) / 10 * 1e3
            torch.cuda.synchronize()
            gpu = (time.perf_counter() - t0) / 10 * 1e3
            print(f"== {variant} {impl}: host {host:.2f} ms/step unsynchronised, wall {gpu:.2f} "
                  f"ms/step; sync warnings: {len(syncs)} {syncs[:3]}", flush=True)  # fmt: skip
            if impl == "attnforge":
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(10):
                    step()
                prof.disable()
                torch.cuda.synchronize()
                pstats.Stats(prof).sort_stats("cumulative").print_stats(22)


if __name__ == "__main__":
    main()
