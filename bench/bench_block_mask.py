"""Benchmark ``create_block_mask`` on the CPU: attnforge's analytic plan vs dense evaluation.

Each case runs in its own subprocess so that its peak memory (the kernel's high-water mark of
resident memory, reset just before the case through /proc/self/clear_refs) is its own.  Memory is
reported in total and beyond the output (the BlockMask's tensors, transposes included).

Timings are the best and the median of ``--repeat`` runs, each from a cold cache:

    create       create_block_mask(...) (tracing, analysis, BlockMask)
    transposes   the q_* transposes the backward needs (attnforge computes them lazily)
    total        both: what FlexAttention's create_block_mask does eagerly

The brute-force rows are torch's ``create_block_mask`` on the CPU (a dense evaluation of the
mask, FlexAttention's method), at the lengths where it fits.

    python bench/bench_block_mask.py             # all cases, writes the JSON
    python bench/bench_block_mask.py --quick     # 131072-token cases only, no JSON

Writes bench/results/block_mask_cpu_<yyyymmdd>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WINDOW = 1024
NUM_DOCS = 64
BLOCK = 128
MIB = 2**20

# (mask, length, target ms for attnforge's create_block_mask) -- the acceptance table
TARGETS = [
    ("causal", 131072, 50),
    ("sliding_window", 131072, 50),
    ("causal", 1048576, 1000),
    ("sliding_window", 1048576, 1000),
    ("document", 131072, 200),
    ("document_causal", 131072, None),
]
# torch's dense path needs ~10 GiB at 32768 tokens: only causal there (the machine is shared)
DENSE_CASES = [(m, n) for n in (8192, 16384) for m in ("causal", "sliding_window", "document")]
DENSE_CASES += [("causal", 32768)]


# -- the masks (plain FlexAttention-style functions: the user's path) ----------------------------


def make_mask(name: str, length: int):

    if name == "causal":
        return lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
    if name == "sliding_window":
        w = WINDOW

        def sliding_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

        return sliding_window
    doc = document_ids(length, NUM_DOCS)
    if name == "document":
        return lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx]
    if name == "document_causal":
        return lambda b, h, q_idx, kv_idx: (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
    raise ValueError(f"unknown mask {name!r}")


def document_ids(length: int, n_docs: int):
    """Sorted document ids of random lengths (seeded), one id per token."""
    import torch

    gen = torch.Generator().manual_seed(0)
    cuts = torch.randperm(length - 1, generator=gen)[: n_docs - 1] + 1
    ids = torch.zeros(length, dtype=torch.int64)
    ids[cuts] = 1
    return ids.cumsum(0)


# -- one case, in a child process -----------------------------------------------------------------


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS


def _tensor_bytes(bm) -> int:
    if isinstance(bm, (tuple, list)):
        return sum(_tensor_bytes(x) for x in bm)
    fields = ["kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"]  # fmt: skip
    ts = [getattr(bm, f, None) for f in fields]
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _run_attnforge(mask_fn, length):
    import attnforge as af
    from attnforge.runtime import blockmask

    blockmask.block_mask_cache_clear()
    t0 = time.perf_counter()
    bm = af.create_block_mask(mask_fn, None, None, length, length, device="cpu", BLOCK_SIZE=BLOCK)
    t1 = time.perf_counter()
    bm.q_indices  # noqa: B018 -- the transposes, computed lazily
    t2 = time.perf_counter()
    return bm, t1 - t0, t2 - t1


def _run_flex(mask_fn, length):
    from torch.nn.attention.flex_attention import create_block_mask

    t0 = time.perf_counter()
    bm = create_block_mask(mask_fn, None, None, length, length, device="cpu", BLOCK_SIZE=BLOCK)
    return bm, time.perf_counter() - t0, 0.0


def child(spec: dict) -> dict:
    import gc

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    mask_fn = make_mask(spec["mask"], spec["length"])
    run = _run_attnforge if spec["impl"] == "attnforge" else _run_flex
    run(make_mask(spec["mask"], 1024), 1024)  # imports, tracing machinery, allocator warm-up
    gc.collect()
    base = _rss_bytes("VmRSS")
    _reset_peak()
    create, transposes, out_bytes = [], [], 0
    for _ in range(spec["repeat"]):
        bm = None
        gc.collect()
        bm, c, t = run(mask_fn, spec["length"])
        create.append(c)
        transposes.append(t)
        out_bytes = _tensor_bytes(bm)
    peak = _rss_bytes("VmHWM") - base
    bm = None
    gc.collect()
    tracemalloc.start()  # a separate run: tracing slows Python allocations down
    bm = run(mask_fn, spec["length"])[0]
    py_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    total = [c + t for c, t in zip(create, transposes)]
    ms = lambda xs: {
        "min": round(1e3 * min(xs), 2),
        "median": round(1e3 * statistics.median(xs), 2),
    }
    return {
        "create_ms": ms(create),
        "transposes_ms": ms(transposes),
        "total_ms": ms(total),
        "peak_rss_mib": round(peak / MIB, 1),
        "output_mib": round(out_bytes / MIB, 1),
        "peak_beyond_output_mib": round((peak - out_bytes) / MIB, 1),
        "python_alloc_peak_mib": round(py_peak / MIB, 2),
        "sparsity_pct": round(float(bm.sparsity()), 3),
        "kv_indices_shape": list(bm.kv_indices.shape),
        "full_kv_indices_shape": list(bm.full_kv_indices.shape),
    }


def run_case(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**spec, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return judge({**spec, **json.loads(proc.stdout.strip().splitlines()[-1])})


# -- driver ----------------------------------------------------------------------------------------


def cases(quick: bool, repeat: int, threads: int) -> list[dict]:
    out = []
    for mask, length, target in TARGETS:
        if quick and length > 131072:
            continue
        out.append(dict(impl="attnforge", mask=mask, length=length, target_ms=target,
                        repeat=repeat, threads=threads))  # fmt: skip
    if not quick:
        for mask, length in DENSE_CASES:
            for impl in ("attnforge", "flex_dense"):
                out.append(dict(impl=impl, mask=mask, length=length, target_ms=None,
                                repeat=repeat if impl == "attnforge" else 2,
                                threads=threads))  # fmt: skip
    return out


def judge(r: dict) -> dict:
    """Add ``meets_target``: create alone, create + transposes, and memory beyond the output."""
    if r["target_ms"] is not None:
        r["meets_target"] = {
            "create": r["create_ms"]["median"] < r["target_ms"],
            "with_transposes": r["total_ms"]["median"] < r["target_ms"],
            "memory": r["peak_beyond_output_mib"] < 1024,
        }
    return r


def verdict(r: dict) -> str:
    m = r.get("meets_target")
    if m is None:
        return ""
    return ("ok" if m["create"] else "SLOW") + ("" if m["with_transposes"] else
            " (+transposes: SLOW)") + ("" if m["memory"] else " MEM")  # fmt: skip


def print_row(r: dict) -> None:
    name = f"{r['impl']:<10} {r['mask']:<16} {r['length']:>8}"
    if "error" in r:
        print(f"{name}  {r['error']}", flush=True)
        return
    print(
        f"{name}  create {r['create_ms']['median']:>9.2f} ms  transposes "
        f"{r['transposes_ms']['median']:>8.2f} ms  total {r['total_ms']['median']:>9.2f} ms  "
        f"peak {r['peak_rss_mib']:>7.1f} MiB (out {r['output_mib']:>6.1f})  "
        f"target {r['target_ms'] or '-':>5}  {verdict(r)}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="131072-token cases only; no JSON")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine OpenMP spin-waits "
        "make 2-thread timings erratic)",
    )  # fmt: skip
    ap.add_argument("--timeout", type=float, default=600.0, help="per case, seconds")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch

    results = []
    for spec in cases(args.quick, args.repeat, args.threads):
        r = run_case(spec, args.timeout)
        print_row(r)
        results.append(r)
    if args.quick:
        return
    day = datetime.date.today().strftime("%Y%m%d")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"block_mask_cpu_{day}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "block_size": BLOCK,
        "window": WINDOW,
        "num_docs": NUM_DOCS,
        "notes": "times in ms (min/median over repeats, cold cache); peak = high-water RSS "
        "above the post-warm-up RSS; output = BlockMask tensors incl. transposes",
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
