"""Does compiling a new variant's kernels on threads overlap (GIL), without a GPU?

Compiles the compile bench's kernels (bench_attention's cold snippet: softcap + causal-via-where
score mod, D=64 bf16, H100 default tiles: forward 128x64 w4 s4 with TMA, dQ 64x64 and dK/dV 64x64
w4 s3) for sm_90 with ``triton.compile`` in a fresh process and an empty Triton cache, either
one after another, all at once on a thread pool (``launch.precompile``), or all at once in
helper processes started at the same time (``runtime.compile_pool``; their start is timed):

    python bench/exp/compile_concurrency.py        # serial, threads, helpers; 3 rounds each

Each child prints the wall time of the compiles (``triton_key()`` included: a cold process pays
it too; ``--warm-key`` computes it first) and per kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

D = 64
TILES = {  # kernel -> (BLOCK_M, BLOCK_N, num_warps, num_stages, descriptor rows)
    "_attn_fwd": (128, 64, 4, 4, None),
    "_attn_bwd_dq": (64, 64, 4, 3, 64),
    "_attn_bwd_dkdv": (64, 64, 4, 3, None),
}
MODES = ("serial", "threads", "helpers")
PTRS = {"Q", "K", "V", "DO", "OUT", "DQ", "DK", "DV"}
F32 = {"LSE", "DELTA", "DLSE", "DQ_ACC"}


def _mod(score, b, h, q_idx, kv_idx):
    import torch

    return torch.where(q_idx >= kv_idx, 31.5 * torch.tanh(score / 31.5) + 0.125 * h, -float("inf"))


def jobs():
    """``[(name, ASTSource, options)]`` with Triton's specialisation of the bench's launch:
    16-divisible pointers, strides and lengths, unit feature strides as constexpr 1."""
    from aot_sm90 import slot_types
    from triton.compiler import ASTSource

    from attnforge.codegen import lower
    from attnforge.dsl.api import as_mod
    from attnforge.runtime import loader

    low = lower(as_mod(_mod, "score"), None)
    slots = slot_types(low)
    tmp = Path(tempfile.mkdtemp(prefix="cc"))
    out = []
    for kind in ("fwd", "bwd"):
        (tmp / f"{kind}.py").write_text(low.files[f"{kind}.py"])
        mod = loader.load_module(tmp / f"{kind}.py", f"cc_{kind}", interpret=False)
        for name, (bm, bn, w, st, rows) in TILES.items():
            if not hasattr(mod, name):
                continue
            fn = getattr(mod, name)
            const = dict(HEAD_DIM=D, HEAD_DIM_V=D, HEAD_DIM_PAD=D, HEAD_DIM_V_PAD=D,
                         SPARSE_Q_BLOCK=128, SPARSE_KV_BLOCK=128, EVEN_Q=True, EVEN_KV=True,
                         HAS_FULL_BLOCKS=True, DOT_PRECISION="tf32", TENSOR_GRADS=0,
                         HAS_DLSE=False, DQ_ATOMIC=False, POS_F32=True, SCALE_FOLDED=False,
                         BLOCK_M=bm, BLOCK_N=bn, USE_TMA=name != "_attn_bwd_dkdv")  # fmt: skip
            sig, consts, attrs = {}, {}, {}
            for j, arg in enumerate(fn.arg_names):
                if arg.endswith("_DESC"):
                    if const["USE_TMA"]:
                        r = bm if arg == "Q_DESC" else (rows or bn)
                        sig[arg] = f"tensordesc<bf16[1,1,{r},{D}]>"
                    else:
                        sig[arg], consts[(j,)] = "constexpr", None
                elif arg in const:
                    sig[arg], consts[(j,)] = "constexpr", const[arg]
                elif arg.startswith("stride_") and arg.endswith("k") and arg[-2] in "oqkvdhaibf":
                    sig[arg], consts[(j,)] = "constexpr", 1
                else:
                    sig[arg] = (
                        "*bf16" if arg in PTRS else "*fp32" if arg in F32
                        else "*i32" if "NUM_BLKS" in arg or arg.endswith("_IDX")
                        else "fp32" if arg == "sm_scale" else slots.get(arg, "i32")
                    )  # fmt: skip
                    if sig[arg].startswith("*") or arg.startswith("stride_") or "_LEN" in arg:
                        attrs[(j,)] = [["tt.divisibility", 16]]
            opts = {"num_warps": w, "num_stages": st}
            out.append((name, ASTSource(fn, sig, consts, attrs), opts, tmp / f"{kind}.py"))
    return out


def child(mode: str, warm_key: bool) -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    if warm_key:
        from triton.runtime.cache import triton_key

        triton_key()
    todo = jobs()
    target = GPUTarget("cuda", 90, 32)
    times = {}

    def one(job):
        name, src, opts, _ = job
        t = time.perf_counter()
        triton.compile(src, target=target, options=opts)
        times[name] = round(time.perf_counter() - t, 3)

    def helper(job):  # what loader.Launcher._remote sends
        import hashlib

        from triton._C.libtriton import get_cache_invalidating_env_vars

        from attnforge.runtime import compile_pool

        name, src, opts, path = job
        backend = triton.compiler.make_backend(target)
        t = time.perf_counter()
        reply = compile_pool.compile({
            "path": str(path), "digest": hashlib.sha256(path.read_bytes()).hexdigest(),
            "kernel": name, "signature": src.signature, "constexprs": src.constants,
            "attrs": src.attrs, "options": backend.parse_options(opts).__dict__,
            "binary_ext": backend.binary_ext, "target": (target.backend, target.arch, 32),
            "env": dict(get_cache_invalidating_env_vars()),
            "triton": (triton.__file__, triton.__version__)}, wait=True)  # fmt: skip
        assert "files" in reply, reply
        times[name] = round(time.perf_counter() - t, 3)

    t0 = time.perf_counter()
    if mode == "serial":
        for job in todo:
            one(job)
    elif mode == "threads":
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(todo)) as pool:
            list(pool.map(one, todo))
    else:  # helper processes, started now (as compile_pool.prestart does)
        from concurrent.futures import ThreadPoolExecutor

        from attnforge.runtime import compile_pool

        os.environ["ATTNFORGE_COMPILE_WORKERS"] = str(len(todo))
        compile_pool.prestart()
        with ThreadPoolExecutor(len(todo)) as pool:
            list(pool.map(helper, todo))
    print(json.dumps({"mode": mode, "total_s": round(time.perf_counter() - t0, 3), **times}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=MODES)
    ap.add_argument("--modes", nargs="*", default=list(MODES))
    ap.add_argument("--warm-key", action="store_true", help="compute triton_key() before timing")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.warm_key)
    for _ in range(a.rounds):
        for mode in a.modes:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TRITON_CACHE_DIR=cache)
                cmd = [sys.executable, __file__, "--child", mode] + (["--warm-key"] * a.warm_key)
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                print(r.stdout.strip() or r.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
