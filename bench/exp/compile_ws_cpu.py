"""Cold compile of the compile bench's forward for sm_90 on a machine without a GPU: time every
step of ``triton.compile`` (cache key, frontend, each stage, cache writes), optionally under
cProfile, and keep the TTGIR / PTX / ptxas report for before/after diffs.

    PYTHONPATH=. python bench/exp/compile_ws_cpu.py [--kernel ws|triton] [--profile N]
                                                     [--dump DIR] [--rounds 3] [--key attnforge]

The variant is ``bench_attention._COLD_SNIPPET``'s (B=1 H=4 S=1024 D=64 bf16, softcap + causal
via ``where`` + 0.125*h, no block mask); the arguments are the ones ``runtime.launch`` passes
(CPU tensors of the same shapes), specialised by Triton's own binder, so signature, constexprs
and divisibility attributes are what the GPU host compiles.  Each round runs in a fresh process
with an empty Triton cache (``triton_key()`` is timed apart: it is once per process; with
``--key attnforge`` the value ``runtime/triton_key.py`` kept beside Triton's default cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.profile_compile import STAGE_HOOKS  # noqa: E402

CHILD = r"""
import cProfile, functools, io, json, os, pstats, sys, tempfile, time
from pathlib import Path
t_start = time.perf_counter()
sys.path.insert(0, {root!r})
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import compiler as tcc, make_backend
from triton.runtime.jit import create_function_from_signature
from attnforge.codegen import lower
from attnforge.dsl.api import as_mod
from attnforge.runtime import launch, loader
kernel, dump, prof_n = {kernel!r}, {dump!r}, {profile!r}
T = {{}}
def timed(name, f):
    @functools.wraps(f)
    def g(*a, **kw):
        t = time.perf_counter()
        try:
            return f(*a, **kw)
        finally:
            T[name] = T.get(name, 0.0) + (time.perf_counter() - t) * 1e3
    return g
t = time.perf_counter()
if {key!r} == "attnforge":  # runtime/triton_key.py: the value kept by an earlier process
    from attnforge.runtime import triton_key
    triton_key.wait()
else:
    from triton.runtime.cache import triton_key
    triton_key()
T["triton_key (once per process)"] = (time.perf_counter() - t) * 1e3
cap = 31.5
def mod(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, cap * torch.tanh(score / cap) + 0.125 * h, -float("inf"))
B, H, L, D = 1, 4, 1024, 64
q, k, v = (torch.randn(B, H, L, D, dtype=torch.bfloat16) for _ in range(3))
low = lower(as_mod(mod, "score"), as_mod(None, "mask"))
tmp = Path(tempfile.mkdtemp())
from attnforge.runtime import api
bm = api._full_plan(L, L, torch.device("cpu"))
lists, bm_strides, has_full = launch._block_args(bm, launch.kv_block_lists)
params = [cap for s in low.slots]  # the one captured value: cap (a float scalar)
assert [s.kind for s in low.slots] == ["scalar"], low.slots
out = torch.empty(B, H, L, D, dtype=torch.bfloat16)
lse = torch.empty(B, H, L)
if kernel == "ws":
    name, fname = "fwd_ws.py", "_attn_fwd_ws"
    args = (launch._ws_descriptor(q, launch._WS_ROWS), launch._ws_descriptor(k, launch._WS_BLOCK_N),
            launch._ws_descriptor(v, launch._WS_BLOCK_N), out, lse,
            torch.zeros(1, dtype=torch.int32), *lists, 0, *out.stride()[:3],
            *bm_strides, H, 1, L, L, 0.125, 1, B * H, *params)
    kw = dict(BLOCK_M=128, SPARSE_Q_BLOCK=128, SPARSE_KV_BLOCK=128, EVEN_KV=True,
              HAS_FULL_BLOCKS=has_full, SCALE_FOLDED=False, POS_F32=True, NUM_STAGES=3,
              PINGPONG=False, PERSISTENT=True, DYNAMIC=False, num_warps=4)
elif kernel == "triton":
    name, fname = "fwd.py", "_attn_fwd"
    d = lambda t, r: launch._descriptor(t, r)
    args = (q, k, v, out, lse, d(q, 128), d(k, 64), d(v, 64), *lists, *q.stride(), *k.stride(),
            *v.stride(), *out.stride(), *bm_strides, H, 1, L, L, 0.125, 1, *params)
    kw = dict(HEAD_DIM=64, HEAD_DIM_V=64, HEAD_DIM_PAD=64, HEAD_DIM_V_PAD=64, BLOCK_M=128,
              BLOCK_N=64, SPARSE_Q_BLOCK=128, SPARSE_KV_BLOCK=128, EVEN_KV=True,
              HAS_FULL_BLOCKS=has_full, DOT_PRECISION="tf32", SCALE_FOLDED=False, USE_TMA=True,
              POS_F32=True, num_warps=4, num_stages=4)
else:
    raise SystemExit("kernel: ws | triton")
path = tmp / name
path.write_text(low.files[name])
os.environ["TRITON_INTERPRET"] = "0"
m = loader.load_module(path, "compile_ws_cpu_k", interpret=False)
jit = getattr(m, fname)
jit = getattr(jit, "jit", jit)
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
from triton import knobs
binder = create_function_from_signature(jit.signature, jit.params, backend)
from triton.experimental.gluon._runtime import GluonASTSource
from triton.compiler import ASTSource
jit.ASTSource = GluonASTSource if jit.is_gluon() else ASTSource
kw = dict(kw, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
bound, spec, opts = binder(*args, **kw)
options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, spec, opts)
src = jit.ASTSource(jit, signature, constexprs, attrs)
# instrument triton.compile's steps
{stage_hooks}
from triton.runtime import cache as tcache
tcache.FileCacheManager.put = timed("cache writes (IR text of every stage)",
                                    tcache.FileCacheManager.put)
prof = cProfile.Profile() if prof_n else None
t = time.perf_counter()
if prof: prof.enable()
c = tcc.compile(src, target=target, options=options.__dict__)
if prof: prof.disable()
T["triton.compile total"] = (time.perf_counter() - t) * 1e3
T["process until compiled"] = (time.perf_counter() - t_start) * 1e3
if dump:
    d = Path(dump); d.mkdir(parents=True, exist_ok=True)
    for ext in ("ttgir", "llir", "ptx"):
        (d / f"{{kernel}}.{{ext}}").write_text(c.asm[ext])
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    p = d / f"{{kernel}}.ptx"
    r = __import__("subprocess").run(
        [str(ptxas), "-arch=sm_90a", "-v", str(p), "-o", str(p) + ".cubin"],
        capture_output=True, text=True)
    (d / f"{{kernel}}.ptxas.txt").write_text(r.stderr)
    meta = dict(signature=signature, constexprs={{str(k): repr(v) for k, v in constexprs.items()}},
                attrs={{str(k): v for k, v in attrs.items()}}, shared=c.metadata.shared,
                num_warps=c.metadata.num_warps)
    (d / f"{{kernel}}.meta.json").write_text(json.dumps(meta, indent=1, default=str))
if prof:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(prof_n)
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(prof_n)
    sys.stderr.write(s.getvalue())
print(json.dumps({{k: round(v, 1) for k, v in T.items()}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="ws", choices=["ws", "triton"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, help="cProfile: print the top N")
    ap.add_argument("--dump", default="", help="write TTGIR / LLIR / PTX / ptxas -v here")
    ap.add_argument(
        "--key",
        default="triton",
        choices=["triton", "attnforge"],
        help="triton_key(): Triton's (hash) or attnforge's (kept value, if any)",
    )
    a = ap.parse_args()
    code = CHILD.format(
        root=str(ROOT),
        kernel=a.kernel,
        dump=a.dump,
        profile=a.profile,
        key=a.key,
        stage_hooks=STAGE_HOOKS,
    )
    rows = []
    for _ in range(a.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, TRITON_CACHE_DIR=tmp, TRITON_INTERPRET="0",
                       PYTHONPATH=str(ROOT))  # fmt: skip
            if a.key == "attnforge":  # an earlier process kept the value (no kernel cached)
                seed = "from attnforge.runtime import triton_key; triton_key.wait()"
                subprocess.run([sys.executable, "-c", seed], env=env, check=True)
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                               text=True)  # fmt: skip
        if r.returncode != 0:
            sys.exit(r.stderr[-4000:])
        if a.profile:
            sys.stderr.write(r.stderr)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    for key in rows[0]:
        vals = sorted(row[key] for row in rows)
        print(f"{vals[len(vals) // 2]:9.1f} ms  (min {vals[0]:7.1f})  {key}")


if __name__ == "__main__":
    main()
