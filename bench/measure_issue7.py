"""The three host-side figures of issue 7 on a GPU, this tree's defaults against the previous
paths (switched back by knobs), in one call:

    PYTHONPATH=. python bench/measure_issue7.py --out $OUT      # ~3-5 min on an H100 host

1. host overhead per forward call: ``bench_attention.host_overhead`` (1x1x128x64 bf16, causal
   block mask, no grad; wall per call minus kernel time; flex in the same run);
2. warm-disk first call (fwd+bwd of a variant compiled by an earlier process, imports excluded):
   launch index with stand-ins (default: no kernel module executed, no Gluon import) vs
   ``ATTNFORGE_STAND_INS=0`` (modules executed) vs ``ATTNFORGE_LAUNCH_INDEX=0`` (Triton's binder
   once per kernel);
3. cold first call: the default (backward on threads, forward alone), the same with
   ``triton_key()``'s kept value removed first (``runtime/triton_key.py``: hashed on a thread
   instead), and compile helpers (``ATTNFORGE_COMPILE_WORKERS=3``), each round a new variant
   (a literal in the score mod changes, so Triton's kernel cache misses while its launcher /
   cuda_utils builds stay cached, as in the release bench, which runs after the kernel
   benchmarks).  Every process checks out, dq, dk, dv
   against a float64 reference.  Also runs ``bench_attention.compile_times`` as defined.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

SNIPPET = r"""
import sys, time, json, torch
sys.path.insert(0, {root!r})
q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
cap = 31.5
def mod(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, cap * torch.tanh(score / cap) + {c!r} * h, -float("inf"))
t0 = time.perf_counter()
import triton
import attnforge as af
import attnforge.runtime.api
t1 = time.perf_counter()
out = af.flex_attention(q, k, v, score_mod=mod)
out.sum().backward()
torch.cuda.synchronize()
t2 = time.perf_counter()
qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
s = (qq @ kk.transpose(-1, -2)) / 8.0
i = torch.arange(1024, device="cuda")
s = torch.where(i[:, None] >= i[None, :], cap * torch.tanh(s / cap) + {c!r} * torch.arange(4,
                device="cuda").view(1, 4, 1, 1), -float("inf"))
ref = torch.softmax(s, -1) @ vv
ref.sum().backward()
err = max((out.double() - ref).abs().max().item(),
          *((a.grad.double() - b.grad).abs().max().item() for a, b in ((q, qq), (k, kk), (v, vv))))
from attnforge.runtime import cache
info = cache.cache_info()
print(json.dumps(dict(first_call_s=t2 - t1, import_s=t1 - t0, err=err,
                      binary_loads=info.binary_loads, binary_saves=info.binary_saves,
                      gluon="triton.experimental.gluon" in sys.modules,
                      stand_ins=sum("__attnforge_stand_ins__" in vars(m)
                                    for m in next(iter(cache._memory.values())).values()))))
"""


def first_call(env: dict, c: float) -> dict:
    code = SNIPPET.format(root=str(ROOT), c=c)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr[-1500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def compile_figures(rounds: int, log) -> dict:
    res: dict = {"cold": {}, "warm": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(os.environ, ATTNFORGE_CACHE_DIR=f"{tmp}/af", TRITON_CACHE_DIR=f"{tmp}/tr")
        first_call(base, 0.0625)  # primes Triton's launcher and cuda_utils builds (gcc)
        c = 0.125
        kept_key = Path(tmp, "tr", "attnforge-triton-key")  # runtime/triton_key.py's value
        modes = (
            ("threads", {}),  # the default: backward on threads, forward alone
            ("threads, triton_key hashed", {}),  # its kept value removed first (hashed ahead)
            ("helpers", {"ATTNFORGE_COMPILE_WORKERS": "3"}),
        )
        for _ in range(rounds):
            for name, extra in modes:
                c += 1 / 1024  # a new variant: nothing in either cache compiles it
                if "hashed" in name:
                    shutil.rmtree(kept_key, ignore_errors=True)
                cold = first_call({**base, **extra}, c)
                res["cold"].setdefault(name, []).append(cold)
                log(f"cold {name}: {cold}")
                for wname, wextra in (("index", {}), ("no stand-ins", {"ATTNFORGE_STAND_INS": "0"}),
                                      ("no-index", {"ATTNFORGE_LAUNCH_INDEX": "0"})):  # fmt: skip
                    warm = first_call({**base, **wextra}, c)
                    res["warm"].setdefault(f"{wname} (after {name})", []).append(warm)
                    log(f"warm {wname}: {warm}")
    return res


def summary(res: dict) -> dict:
    out = {}
    for phase, runs in res.items():
        for name, rs in runs.items():
            ts = [r["first_call_s"] for r in rs if "first_call_s" in r]
            errs = [r.get("err", float("nan")) for r in rs]
            if ts:
                out[f"{phase} {name}"] = dict(median_s=round(statistics.median(ts), 3),
                                              all_s=[round(t, 3) for t in ts],
                                              max_err=max(errs))  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-bench", action="store_true", help="skip bench_attention's own figures")
    a = ap.parse_args()
    log = lambda *x: print(*x, flush=True)  # noqa: E731
    report: dict = {}
    report["compile"] = compile_figures(a.rounds, log)
    report["compile_summary"] = summary(report["compile"])
    log(json.dumps(report["compile_summary"], indent=1))
    if not a.skip_bench:
        import bench_attention as ba

        report["bench_compile_times"] = ba.compile_times(log)
        report["bench_host_overhead"] = ba.host_overhead(log)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "issue7.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
