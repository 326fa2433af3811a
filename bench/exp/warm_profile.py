"""Where the warm-disk first call's time goes (a new process, kernels compiled by an earlier
one): cProfile of the first forward+backward, top entries by cumulative and own time.

    PYTHONPATH=. python bench/exp/warm_profile.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SNIPPET = r"""
import sys, time, torch, cProfile, pstats
sys.path.insert(0, {root!r})
q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
cap = 31.5
def mod(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, cap * torch.tanh(score / cap) + 0.375 * h, -float("inf"))
import triton, attnforge as af, attnforge.runtime.api
prof = cProfile.Profile()
t0 = time.perf_counter()
prof.enable()
out = af.flex_attention(q, k, v, score_mod=mod)
out.sum().backward()
torch.cuda.synchronize()
prof.disable()
print("first call", time.perf_counter() - t0)
if {show}:
    st = pstats.Stats(prof)
    st.sort_stats("cumulative").print_stats(45)
    st.sort_stats("tottime").print_stats(25)
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, ATTNFORGE_CACHE_DIR=f"{tmp}/af", TRITON_CACHE_DIR=f"{tmp}/tr")
        for show in (False, False, True):
            code = SNIPPET.format(root=str(ROOT), show=show)
            cmd = [sys.executable, "-c", code]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            print(r.stdout[-12000:] if show else r.stdout.strip())
            if r.returncode:
                print(r.stderr[-800:])


if __name__ == "__main__":
    main()
