"""Where the first-call time of a new variant goes (GPU; the compile bench's workload).

    PYTHONPATH=. python bench/profile_compile.py --out DIR

Runs the snippet of ``bench_attention.compile_times`` (softcap + causal-via-where score mod,
B=1 H=4 S=1024 D=64 bf16, forward + backward) in fresh processes:

- ``cold``: empty attnforge and Triton caches (``TRITON_CACHE_DIR`` too);
- ``cold-serial``: the same with ``ATTNFORGE_PARALLEL_COMPILE=0`` (backward compiled one by one);
- ``af-cold-triton-warm``: empty attnforge cache, Triton cache kept from the runs above;
- ``warm``: both caches warm (the bench's "warm disk"), then the same under cProfile.

Each child prints the total (as the bench measures it) and the time of every instrumented step:
attnforge import, tracing, lowering, cache load, launches, each Triton compile (per stage,
cache hit or not), ptxas/cc subprocesses, launcher builds, binary loads, OutOfResources retries.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the steps of ``triton.compile`` (``timed(name, f)`` must exist): its cache key (the first compile
# of a process hashes libtriton there: ``triton_key()``), the frontend (AST -> TTIR/TTGIR, Triton
# and Gluon), each backend stage (ptxas inside ``stage cubin``)
STAGE_HOOKS = """
from triton.backends.nvidia import compiler as _nvc
from triton.compiler import code_generator as _cg, compiler as _tcc
_add = _nvc.CUDABackend.add_stages
def _add_stages(self, stages, options, *rest):
    _add(self, stages, options, *rest)
    for name in list(stages):
        stages[name] = timed("stage " + name, stages[name])
_nvc.CUDABackend.add_stages = _add_stages
_tcc.get_cache_key = timed("cache key (triton_key, src.hash)", _tcc.get_cache_key)
_cg.ast_to_ttir = timed("frontend (ast_to_ttir)", _cg.ast_to_ttir)
"""

CHILD = r"""
import sys, time, os, json, subprocess, functools, threading, cProfile, pstats, io
sys.path.insert(0, {root!r})
import torch
EV = []
_lock = threading.Lock()
def rec(name, dt, **kw):
    with _lock:
        EV.append(dict(name=name, ms=round(dt * 1e3, 2),
                       thread=threading.current_thread().name, **kw))
def timed(name, f, info=None):
    @functools.wraps(f)
    def g(*a, **kw):
        t = time.perf_counter()
        err = None
        try:
            return f(*a, **kw)
        except BaseException as e:
            err = type(e).__name__
            raise
        finally:
            extra = info(a, kw) if info else {{}}
            if err:
                extra["error"] = err
            rec(name, time.perf_counter() - t, **extra)
    return g
def cmd_name(a, kw):
    c = a[0] if a else kw.get("args")
    return dict(cmd=os.path.basename(str(c[0] if isinstance(c, (list, tuple)) else c).split()[0]))
for fn in ("run", "check_call", "check_output"):
    setattr(subprocess, fn, timed("subprocess." + fn, getattr(subprocess, fn), cmd_name))
q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
cap = 31.5
def mod(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, cap * torch.tanh(score / cap) + 0.125 * h, -float("inf"))
torch.cuda.synchronize()
prof = cProfile.Profile() if os.environ.get("PROFILE") == "1" else None
mods_before = set(sys.modules)
t0 = time.perf_counter()
if prof: prof.enable()
import attnforge as af
t_imp = time.perf_counter()
from attnforge.runtime import api, autograd, cache, launch
import triton, triton.compiler.compiler as tcc
t_imp2 = time.perf_counter()
rec("import attnforge (lazy)", t_imp - t0)
rec("import attnforge.runtime (+triton)", t_imp2 - t_imp)
def compile_info(a, kw):
    src = a[0] if a else kw.get("src")
    return dict(fn=getattr(getattr(src, "fn", None), "__name__", str(src)[:40]))
triton.compiler.compile = tcc.compile = timed("triton.compile", tcc.compile, compile_info)
CK = tcc.CompiledKernel
CK._init_handles = timed("CompiledKernel._init_handles (load binary)", CK._init_handles,
                         lambda a, kw: dict(fn=a[0].name))
try:
    from triton.backends.nvidia import driver as nvd
    nvd.compile_module_from_src = timed("compile_module_from_src (launcher/utils cc)",
                                        nvd.compile_module_from_src)
except Exception as e:
    print("no nvidia launcher hook:", e)
{stage_hooks}
api.current_mod = timed("trace (current_mod)", api.current_mod)
api._lower = timed("lower (codegen, memo)", api._lower)
cache.load_kernels = timed("cache.load_kernels", cache.load_kernels)
cache._generate = timed("cache._generate (codegen files)", cache._generate)
cache._import_entry = timed("cache._import_entry", cache._import_entry)
cache.compiler_fingerprint.cache_clear()
cache.compiler_fingerprint = functools.cache(
    timed("compiler_fingerprint", cache.compiler_fingerprint.__wrapped__))
autograd.launch_fwd = timed("launch_fwd", autograd.launch_fwd)
autograd.launch_bwd = timed("launch_bwd", autograd.launch_bwd)
BWD_PROF = []
if prof:  # the backward runs on autograd's device thread: profile it there
    _bwd = autograd.launch_bwd
    def launch_bwd(*a, **kw):
        p = cProfile.Profile()
        p.enable()
        try:
            return _bwd(*a, **kw)
        finally:
            p.disable()
            BWD_PROF.append(p)
    autograd.launch_bwd = launch_bwd
launch.precompile = timed("precompile (threads)", launch.precompile)
try:  # Triton's build hash, got ahead (kept value or hashed on a thread): compiles join it
    from attnforge.runtime import triton_key as tkey
    tkey.wait = timed("triton_key.wait (join before a compile)", tkey.wait)
except ImportError:
    pass
from attnforge.runtime import loader
if hasattr(loader, "Launcher"):
    loader.Launcher._load = timed("Launcher._load (kept binary, no triton.compile)",
                                  loader.Launcher._load,
                                  lambda a, kw: dict(fn=a[0].jit.__name__))
launch.launch_shrinking = timed("launch_shrinking", launch.launch_shrinking,
    lambda a, kw: dict(kernel=getattr(getattr(a[0], "fn", None), "__name__", "?"), cfg=str(a[1])))
t1 = time.perf_counter()
out = af.flex_attention(q, k, v, score_mod=mod)
torch.cuda.synchronize()
t2 = time.perf_counter()
if prof: prof.disable()  # one profiler at a time (python 3.12): the backward thread gets its own
out.sum().backward()
torch.cuda.synchronize()
t3 = time.perf_counter()
if prof: prof.disable()
rec("first forward call", t2 - t1)
rec("backward", t3 - t2)
rec("TOTAL (bench definition, minus ~hook install)", t3 - t0 - (t1 - t_imp2))
rec("FIRST CALL fwd+bwd, imports excluded", t3 - t1)
new = sorted(m for m in set(sys.modules) - mods_before if m.split(".")[0] in
             ("sympy", "lark", "numpy", "torch", "triton") and m.count(".") < 2)
# correctness vs a float64 reference
qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
s = (qq @ kk.transpose(-1, -2)) / 8.0
i = torch.arange(1024, device="cuda")
h = torch.arange(4, device="cuda").view(1, 4, 1, 1)
s = torch.where(i[:, None] >= i[None, :], cap * torch.tanh(s / cap) + 0.125 * h, -float("inf"))
ref = torch.softmax(s, -1) @ vv
ref.sum().backward()
errs = dict(out=(out.double() - ref).abs().max().item(),
            dq=(q.grad.double() - qq.grad).abs().max().item(),
            dk=(k.grad.double() - kk.grad).abs().max().item(),
            dv=(v.grad.double() - vv.grad).abs().max().item())
print(json.dumps(dict(events=EV, new_modules=new, errors=errs, total=t3 - t0 - (t1 - t_imp2),
                      first_call=t3 - t1,
                      cache=af.cache_info()._asdict())))
if prof:
    sio = io.StringIO()
    pstats.Stats(prof, stream=sio).sort_stats("cumulative").print_stats(60)
    pstats.Stats(prof, stream=sio).sort_stats("tottime").print_stats(25)
    for p in BWD_PROF:
        sio.write("\n== backward thread (launch_bwd)\n")
        pstats.Stats(p, stream=sio).sort_stats("cumulative").print_stats(50)
        pstats.Stats(p, stream=sio).sort_stats("tottime").print_stats(20)
    sys.stderr.write(sio.getvalue())
"""


def run_child(label: str, env: dict, log, out_dir: Path) -> dict | None:
    import json

    code = CHILD.format(root=str(ROOT), stage_hooks=STAGE_HOOKS)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    (out_dir / f"{label}.stderr.txt").write_text(res.stderr)
    (out_dir / f"{label}.stdout.txt").write_text(res.stdout)
    if res.returncode != 0:
        log(f"== {label}: FAILED rc={res.returncode}\n{res.stderr[-2000:]}")
        return None
    data = json.loads(res.stdout.strip().splitlines()[-1])
    log(
        f"== {label}: total {data['total']:.3f} s (first call, imports excluded: "
        f"{data.get('first_call', float('nan')):.3f} s)  errors {data['errors']}"
    )
    log(f"   cache {data['cache']}")
    log(f"   new top-level modules: {data['new_modules']}")
    for ev in data["events"]:
        rest = {k: v for k, v in ev.items() if k not in ("name", "ms")}
        log(f"   {ev['ms']:9.1f} ms  {ev['name']}  {rest if rest else ''}")
    return data


def snippet_profile(log, out_dir: Path) -> None:
    """The bench's own snippet (``bench_attention._COLD_SNIPPET``), cold then warm in fresh
    processes with nothing else imported or patched, each first call under cProfile (the
    profile's cumulative list goes to ``snippet-<label>.prof.txt``)."""
    sys.path.insert(0, str(ROOT))
    from bench.bench_attention import _COLD_SNIPPET

    code = _COLD_SNIPPET.format(root=str(ROOT))
    head, call = code.split("out = attention(", 1)
    call = "out = attention(" + call
    profiled = (
        head
        + "import cProfile, pstats, io\n_p = cProfile.Profile()\n_p.enable()\n"
        + call.replace(
            'print("import", t1 - t0)',
            "_p.disable()\n_s = io.StringIO()\n"
            'pstats.Stats(_p, stream=_s).sort_stats("cumulative").print_stats(70)\n'
            'sys.stderr.write(_s.getvalue())\nprint("import", t1 - t0)',
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, ATTNFORGE_CACHE_DIR=tmp, TORCHINDUCTOR_CACHE_DIR=tmp + "/ind")
        for label, src in (("cold", code), ("warm", code), ("warm-plain", code),
                           ("warm-cprofile", profiled)):  # fmt: skip
            res = subprocess.run([sys.executable, "-c", src, "attnforge", "31.5"], env=env,
                                 capture_output=True, text=True)  # fmt: skip
            (out_dir / f"snippet-{label}.prof.txt").write_text(res.stderr)
            lines = res.stdout.strip().splitlines()
            log(f"== bench snippet {label}: first call {lines[-1] if lines else '?'} s "
                f"({lines[-2] if len(lines) > 1 else res.stderr[-500:]})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--only", nargs="*", help="run only these labels (cold runs first)")
    ap.add_argument(
        "--snippet",
        action="store_true",
        help="only the bench's own snippet: cold, warm, warm under cProfile",
    )
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    if args.snippet:
        snippet_profile(log, out_dir)
        (out_dir / "snippet.txt").write_text("\n".join(lines) + "\n")
        return

    with tempfile.TemporaryDirectory() as tmp:
        base = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tmp + "/ind")
        runs = [
            (
                "cold-serial",
                dict(
                    ATTNFORGE_CACHE_DIR=tmp + "/af1",
                    TRITON_CACHE_DIR=tmp + "/tr1",
                    ATTNFORGE_PARALLEL_COMPILE="0",
                ),
            ),
            ("cold", dict(ATTNFORGE_CACHE_DIR=tmp + "/af2", TRITON_CACHE_DIR=tmp + "/tr2")),
            (
                "af-cold-triton-warm",
                dict(ATTNFORGE_CACHE_DIR=tmp + "/af3", TRITON_CACHE_DIR=tmp + "/tr2"),
            ),
            ("warm", dict(ATTNFORGE_CACHE_DIR=tmp + "/af2", TRITON_CACHE_DIR=tmp + "/tr2")),
            ("warm-again", dict(ATTNFORGE_CACHE_DIR=tmp + "/af2", TRITON_CACHE_DIR=tmp + "/tr2")),
            (
                "warm-cprofile",
                dict(ATTNFORGE_CACHE_DIR=tmp + "/af2", TRITON_CACHE_DIR=tmp + "/tr2", PROFILE="1"),
            ),
        ]
        for label, extra in runs:
            if args.only and label not in args.only:
                continue
            run_child(label, dict(base, **extra), log, out_dir)
    (out_dir / "profile_compile.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
