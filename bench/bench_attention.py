"""Benchmark attnforge against FlexAttention (torch.compile) and SDPA (cuDNN, flash) on the GPU.

All implementations run side by side in one process on the same inputs.  FLOPs are counted with
the block density of the variant's block mask (the work a block-sparse kernel must do), the same
count for every implementation, so TFLOP/s ratios are time ratios.

    python bench/bench_attention.py                      # headline: S=8192, D=64,128
    python bench/bench_attention.py --S 2048 8192 32768  # the full grid (S=32768 runs with B=1)
    python bench/bench_attention.py --variants causal softcap --D 128

Writes bench/results/<gpu>_<yyyymmdd>.json and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = [
    "noop",
    "causal",
    "sliding_window",
    "alibi",
    "softcap",
    "document",
    "prefix_lm",
    "gqa_causal",
]
WINDOW, PREFIX, NUM_DOCS, CAP = 1024, 2048, 16, 30.0


# -- variant definitions (the same mods go to attnforge and to FlexAttention) --------------------


def make_variant(name: str, H: int, S: int, device: str):
    """Returns (score_mod, mask_mod, sdpa_kwargs or None). mask_mod None means no mask."""
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx  # noqa: E731
    if name == "noop":
        return None, None, {"is_causal": False}
    if name in ("causal", "gqa_causal"):
        return None, causal, {"is_causal": True}
    if name == "sliding_window":
        w = WINDOW

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= w)

        return None, sliding, None
    if name == "alibi":
        slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device=device) / H)

        def alibi(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)

        return alibi, causal, None
    if name == "softcap":
        cap = CAP

        def softcap(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

        return softcap, causal, None
    if name == "document":
        g = torch.Generator().manual_seed(0)
        cuts = torch.sort(torch.randperm(S - 1, generator=g)[: NUM_DOCS - 1] + 1).values
        lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([S])]))
        doc = torch.repeat_interleave(torch.arange(NUM_DOCS), lengths).to(device)

        def document(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        return None, document, None
    if name == "prefix_lm":
        p = PREFIX

        def prefix_lm(b, h, q_idx, kv_idx):
            return (kv_idx < p) | (q_idx >= kv_idx)

        return None, prefix_lm, None
    raise ValueError(name)


def allow_recompiles() -> None:
    """Every (variant, S, D) is a new FlexAttention compile of the same function: past dynamo's
    recompile limit (8) flex silently falls back to dense eager math (and runs out of memory at
    S=8192), so lift the limit for the benchmark."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in (
        "recompile_limit",
        "cache_size_limit",
        "accumulated_recompile_limit",
        "accumulated_cache_size_limit",
    ):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))


# -- timing --------------------------------------------------------------------------------------


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def fwd_bwd_fn(fwd, q, k, v, do):
    def run():
        for t in (q, k, v):
            t.grad = None
        out = fwd(q, k, v)
        out.backward(do)

    return run


def measure(fwd, q, k, v, do):
    with torch.no_grad():
        f_ms = bench_ms(lambda: fwd(q, k, v))
    fb_ms = bench_ms(fwd_bwd_fn(fwd, q, k, v, do))
    return f_ms, fb_ms


def flops(B, H, S, D, density):
    fwd = 4.0 * B * H * S * S * D * density
    return fwd, 2.5 * fwd  # bwd = 5 matmuls of the fwd's 2


def run_config(variant, B, H, S, D, dtype, impls, rows, log, rounds=3):
    from torch.nn.attention.flex_attention import create_block_mask as t_cbm
    from torch.nn.attention.flex_attention import flex_attention as t_flex

    import attnforge as af

    device = "cuda"
    Hkv = 4 if variant == "gqa_causal" else H
    gqa = Hkv != H
    torch.manual_seed(0)
    q = torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn_like(q)
    score_mod, mask_mod, sdpa_kw = make_variant(variant, H, S, device)

    bm = af.create_block_mask(mask_mod, None, None, S, S, device=device) if mask_mod else None
    density = 1.0
    if bm is not None:
        density = 1.0 - bm.sparsity() / 100.0
    fwd_flops, bwd_flops = flops(B, H, S, D, density)
    base = dict(
        variant=variant,
        B=B,
        H=H,
        S=S,
        D=D,
        dtype=str(dtype).replace("torch.", ""),
        density=round(density, 4),
    )

    def af_fwd(q_, k_, v_):
        return af.flex_attention(q_, k_, v_, score_mod=score_mod, block_mask=bm, enable_gqa=gqa)

    flex_c = torch.compile(t_flex, dynamic=False)
    tbm = t_cbm(mask_mod, None, None, S, S, device=device) if mask_mod else None

    def flex_fwd(q_, k_, v_):
        return flex_c(q_, k_, v_, score_mod=score_mod, block_mask=tbm, enable_gqa=gqa)

    outs = {}
    cands = {"attnforge": af_fwd, "flex": flex_fwd}
    if sdpa_kw is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for impl, backend in (
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("flash", SDPBackend.FLASH_ATTENTION),
        ):

            def sdpa_fwd(q_, k_, v_, backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q_, k_, v_, enable_gqa=gqa, **sdpa_kw
                    )

            cands[impl] = sdpa_fwd
    # Every implementation is timed in each of ``rounds`` rounds, the order rotating from round
    # to round, and keeps its median: the H100's clock follows its power and temperature
    # (1.5-1.9 GHz within one run, bench/NOTES.md session 8), so one pass in a fixed order
    # would hand whoever runs first (or after the lightest kernel) a faster clock
    runnable, times = {}, {}
    for impl, fn in cands.items():
        if impls and impl not in impls:
            continue
        try:
            with torch.no_grad():
                outs[impl] = fn(q, k, v).float()
            fwd_bwd_fn(fn, q, k, v, do)()
        except Exception as e:  # an SDPA backend that cannot express the case, say
            log(f"  {impl}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        runnable[impl], times[impl] = fn, []
    order = list(runnable)
    for r in range(rounds if order else 0):
        first = r % len(order)
        for impl in order[first:] + order[:first]:
            times[impl].append(measure(runnable[impl], q, k, v, do))
    for impl in order:
        f_ms = statistics.median(t[0] for t in times[impl])
        fb_ms = statistics.median(t[1] for t in times[impl])
        row = dict(
            base,
            impl=impl,
            fwd_ms=round(f_ms, 4),
            fwdbwd_ms=round(fb_ms, 4),
            fwd_tflops=round(fwd_flops / f_ms / 1e9, 1),
            bwd_tflops=round(bwd_flops / max(fb_ms - f_ms, 1e-6) / 1e9, 1),
            rounds=rounds,
        )
        rows.append(row)
    if "attnforge" in outs and "flex" in outs:
        err = (outs["attnforge"] - outs["flex"]).abs().max().item()
        for r in rows:
            if r["impl"] == "attnforge" and r["variant"] == variant and r["S"] == S and r["D"] == D:
                r["max_abs_err_vs_flex"] = err
    for r in rows:
        if r["variant"] == variant and r["S"] == S and r["D"] == D:
            log(
                f"  {r['impl']:10s} fwd {r['fwd_ms']:8.3f} ms {r['fwd_tflops']:6.1f} TF/s | "
                f"bwd {r['bwd_tflops']:6.1f} TF/s"
                + (f" | err {r['max_abs_err_vs_flex']:.2e}" if "max_abs_err_vs_flex" in r else "")
            )


# -- compile time and host overhead --------------------------------------------------------------

_COLD_SNIPPET = r"""
import sys, time, torch
sys.path.insert(0, {root!r})
impl, cap = sys.argv[1], float(sys.argv[2])
q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
def mod(score, b, h, q_idx, kv_idx):
    # the literal: a new value is a new variant (new kernels for both libraries)
    return torch.where(q_idx >= kv_idx, cap * torch.tanh(score / cap) + {c!r} * h, -float("inf"))
# imports (triton, the library) are timed apart from the first call
t0 = time.perf_counter()
import triton
if impl == "attnforge":
    import attnforge as af
    attention = af.flex_attention
    import attnforge.runtime.api  # attnforge imports lazily: what the first call would import
else:
    from torch.nn.attention.flex_attention import flex_attention
    attention = torch.compile(flex_attention)
t1 = time.perf_counter()
out = attention(q, k, v, score_mod=mod)
out.sum().backward()
torch.cuda.synchronize()
print("import", t1 - t0)
print(time.perf_counter() - t1)
"""


def _first_call(impl: str, c: float, env: dict, log) -> tuple:
    """(first call s, import s) of a new process, or (None, None) if it failed."""
    code = _COLD_SNIPPET.format(root=str(ROOT), c=c)
    out = subprocess.run([sys.executable, "-c", code, impl, "31.5"], env=env,
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        log(f"  compile {impl}: failed: {out.stderr[-400:]}")
        return None, None
    lines = out.stdout.strip().splitlines()
    return float(lines[-1]), float(lines[-2].split()[1])


def compile_times(log, rounds: int = 3):
    """First forward+backward of a new variant in a new process, imports timed apart, for both
    libraries, each with its own empty caches (attnforge's, Inductor's, Triton's):

    - ``cold_s``: a new variant (the mod's literal changes, so every kernel is new) after one
      other variant of the same argument types ran, as on any machine in use: Triton's C
      launchers (gcc, one per argument-type signature) and its cuda_utils are built;
    - ``cold_empty_triton_s``: the very first call, with those gcc builds too;
    - ``warm_disk_s``: the same variant again in a new process (compiled kernels on disk).

    Each figure is the median of ``rounds`` rounds, every round with fresh caches (a single
    sample of a multi-process compile swings by +-0.3 s on the H100 host); ``samples`` keeps
    them all.
    """
    res = {}
    for impl in ("attnforge", "flex"):
        samples: dict = {"cold_s": [], "warm_disk_s": [], "import_s": [],
                         "cold_empty_triton_s": []}  # fmt: skip
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, ATTNFORGE_CACHE_DIR=cache + "/af",
                           TORCHINDUCTOR_CACHE_DIR=cache + "/ind",
                           TRITON_CACHE_DIR=cache + "/tr")  # fmt: skip
                empty, _ = _first_call(impl, 0.0625, env, log)
                cold, _ = _first_call(impl, 0.125, env, log)
                warm, imports = _first_call(impl, 0.125, env, log)
            for name, value in (("cold_s", cold), ("warm_disk_s", warm), ("import_s", imports),
                                ("cold_empty_triton_s", empty)):  # fmt: skip
                if value is not None:
                    samples[name].append(value)
        res[impl] = {k: (statistics.median(v) if v else None) for k, v in samples.items()}
        res[impl]["samples"] = samples
        r = res[impl]
        log(f"  compile {impl} (median of {rounds}): cold {r['cold_s']} s (empty Triton cache "
            f"{r['cold_empty_triton_s']} s), warm disk {r['warm_disk_s']} s, imports "
            f"{r['import_s']} s; samples {samples}")  # fmt: skip
    return res


def host_overhead(log, fresh: bool = True, only: str | None = None):
    """Per-call wall time for a tiny problem (host-bound) minus its GPU kernel time, in us, for
    each library in a process of its own (``fresh``; else both in this one), so neither is
    timed in a process the other's compile machinery (Inductor's worker pool, dynamo) has
    been loaded into."""
    if fresh:
        res = {}
        for impl in ("attnforge", "flex"):
            code = f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'bench')!r}]; " + (
                "import json, bench_attention as b; "
                f"print(json.dumps(b.host_overhead(lambda m: None, fresh=False, only={impl!r})))"
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if out.returncode != 0:
                log(f"  host {impl}: failed: {out.stderr[-400:]}")
                continue
            res.update(json.loads(out.stdout.strip().splitlines()[-1]))
            log(f"  host {impl} (own process): {res[impl]}")
        return res
    return _host_overhead(log, only)


def _kernel_us(fn, n: int = 200) -> float:
    """GPU kernel time per call (torch.profiler): do_bench's events around a host-bound call
    would count the host's launch time as GPU time (flex in its own process: 80 us)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / n


def _host_overhead(log, only: str | None = None) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask as t_cbm
    from torch.nn.attention.flex_attention import flex_attention as t_flex

    import attnforge as af

    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx  # noqa: E731
    abm = af.create_block_mask(causal, None, None, 128, 128, device="cuda")
    tbm = t_cbm(causal, None, None, 128, 128, device="cuda")
    flex_c = torch.compile(t_flex)
    fns = {
        "attnforge": lambda: af.flex_attention(q, k, v, block_mask=abm),
        "flex": lambda: flex_c(q, k, v, block_mask=tbm),
    }
    res = {}
    with torch.no_grad():
        for impl, fn in fns.items():
            if only and impl != only:
                continue
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            n, wall_us = 1000, float("inf")
            for _ in range(5):  # best of 5 (both impls): the shared host's noise only adds
                gc.collect()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                torch.cuda.synchronize()
                wall_us = min(wall_us, (time.perf_counter() - t0) / n * 1e6)
            gpu_us = _kernel_us(fn)
            res[impl] = {
                "wall_us_per_call": round(wall_us, 2),
                "gpu_us": round(gpu_us, 2),
                "overhead_us": round(max(wall_us - gpu_us, 0.0), 2),
            }
            log(f"  host {impl}: {res[impl]}")
    return res


# -- output --------------------------------------------------------------------------------------


def markdown(rows) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["variant"], r["S"], r["D"]), {})[r["impl"]] = r
    lines = [
        "| variant | S | D | density | attnforge fwd/bwd TF/s | flex fwd/bwd | cuDNN fwd/bwd "
        "| af/flex fwd | af/flex bwd | af/cuDNN fwd | err vs flex |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (var, S, D), d in by.items():
        a, f, c = d.get("attnforge"), d.get("flex"), d.get("cudnn")

        def fb(r):
            return f"{r['fwd_tflops']:.0f} / {r['bwd_tflops']:.0f}" if r else "-"

        def ratio(x, y, key):
            return f"{x[key] / y[key]:.2f}" if x and y and y[key] else "-"

        err = f"{a['max_abs_err_vs_flex']:.1e}" if a and "max_abs_err_vs_flex" in a else "-"
        dens = a["density"] if a else (f or c)["density"]
        lines.append(
            f"| {var} | {S} | {D} | {dens} | {fb(a)} | {fb(f)} | {fb(c)} | "
            f"{ratio(a, f, 'fwd_tflops')} | {ratio(a, f, 'bwd_tflops')} | "
            f"{ratio(a, c, 'fwd_tflops')} | {err} |"
        )
    return "\n".join(lines)


def merge(paths: list[str], outdir: Path) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    data = {"env": runs[0]["env"], "command": [], "rows": [], "compile": {}}
    for run in runs:
        if run["env"] != data["env"]:
            sys.exit(f"cannot merge runs from different environments: {run['env']}")
        cmd = run["command"]
        data["command"] += cmd if isinstance(cmd, list) else [cmd]
        # a later run's row replaces an earlier one of the same case (a re-measured variant)
        case = lambda r: tuple(r[k] for k in ("variant", "B", "H", "S", "D", "impl"))  # noqa: E731
        again = {case(r) for r in run["rows"]}
        data["rows"] = [r for r in data["rows"] if case(r) not in again] + run["rows"]
        data["compile"] = run["compile"] or data["compile"]
    name = Path(paths[0]).stem
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{name}.json").write_text(json.dumps(data, indent=1))
    (outdir / f"{name}.md").write_text(markdown(data["rows"]) + "\n")
    print(markdown(data["rows"]))


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--S", nargs="*", type=int, default=[8192])
    ap.add_argument("--D", nargs="*", type=int, default=[64, 128])
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--impls", nargs="*", default=None)
    ap.add_argument("--no-compile-bench", action="store_true")
    ap.add_argument(
        "--compile-rounds",
        type=int,
        default=3,
        help="rounds of the compile figures (each with fresh caches; medians)",
    )
    ap.add_argument("--rounds", type=int, default=3,
                    help="timing rounds per case, implementations in rotating order; each "
                    "keeps its median")  # fmt: skip
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--merge", nargs="*", default=[],
                    help="only merge earlier JSON results (e.g. the D=128 and D=64 runs of one "
                    "session, each within one device call) into one JSON + table; a later "
                    "file's rows replace an earlier file's rows of the same case")  # fmt: skip
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU (run it through the device tool)")

    def log(msg):
        print(msg, flush=True)

    import triton

    allow_recompiles()
    rows: list[dict] = []
    for S in args.S:
        B = 1 if S >= 32768 else args.B
        for D in args.D:
            for var in args.variants:
                log(f"{var} B={B} H={args.H} S={S} D={D}")
                try:
                    run_config(
                        var, B, args.H, S, D, torch.bfloat16, args.impls, rows, log, args.rounds
                    )
                except Exception as e:
                    log(f"  FAILED: {type(e).__name__}: {e}")
                torch.cuda.empty_cache()
    comp = {}
    if not args.no_compile_bench:
        comp = compile_times(log, args.compile_rounds)
        comp["host_overhead"] = host_overhead(log)
    gpu = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    stamp = datetime.date.today().strftime("%Y%m%d")
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    data = {"env": env, "command": "python " + " ".join(sys.argv), "rows": rows, "compile": comp}
    path = outdir / f"{gpu}_{stamp}.json"
    path.write_text(json.dumps(data, indent=1))
    table = markdown(rows)
    (outdir / f"{gpu}_{stamp}.md").write_text(table + "\n")
    print(table)
    print(f"wrote {path}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(json.dumps(data, indent=1))
        Path(os.environ["OUT"], path.with_suffix(".md").name).write_text(table + "\n")


if __name__ == "__main__":
    main()
