"""Host (Python) overhead of one ``af.flex_attention`` call, with the kernel launch stubbed out.

Runs on CPU: every generated kernel (``_attn_fwd``, ``_attn_bwd_*``) is replaced by a no-op
that still takes ``kernel[grid](*args, **kwargs)``, so what is timed is exactly the work
attnforge does around the launch (argument checks, mod lookup, lowering/cache lookups, config,
argument lists, autograd).  Triton's own launch cost (``JITFunction.run`` binding and
specialising the arguments) comes on top on a GPU and is not measured here.

    PYTHONPATH=. python bench/bench_host_overhead.py            # table of µs per call
    PYTHONPATH=. python bench/bench_host_overhead.py --profile "causal grad"   # cProfile a row
    PYTHONPATH=. python bench/bench_host_overhead.py --fake-gpu [--profile same]  # GPU path, CPU

``--fake-gpu`` (CPU) runs the ``--gpu`` case (1x1x128x64 bf16, cached causal block mask, no
grad) down the path a GPU call takes: compiled-kernel modules with ``loader.Launcher``, the TMA
forward (descriptors), the per-call plan's ``Launcher.launch_planned`` and Triton's real
``CudaLauncher`` + ``wrap_handle_tensordesc`` (so ``tma_launch``'s raw launch), with a fake
driver (device 0, stream 1234), a fake ``fill_tma_descriptor`` and a no-op C launcher; the first
launch binds with Triton's real binder.  Not measured: the C launcher's argument parsing and
``cuLaunchKernelEx`` (~5 µs on the H100 host), CUDA ``torch.empty`` (~5 µs each there).

Cases: no mods; causal block mask (cached); ALiBi score mod reading a captured slopes tensor;
a text-spec variant ``attn(q, k, v)`` (softcap + causal); each with and without
``requires_grad`` on q, k, v (forward only; ``fwd+bwd`` rows also run the stubbed backward).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import pstats
import sys
import time
from pathlib import Path

import torch

import attnforge as af
from attnforge.runtime import cache

_KERNELS = ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq")


class _NoLaunch:
    """Stands in for a Triton kernel: ``k[grid](...)`` does nothing."""

    @staticmethod
    def _run(*args, **kwargs):
        return None

    def __getitem__(self, grid):
        return self._run


def _inputs(B, H, L, D, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, D, generator=g, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]  # fmt: skip


def _cases(B, H, L, D, dtype):
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    slopes = torch.exp2(-torch.arange(1, H + 1, dtype=torch.float32) * 8.0 / H)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    bm = af.create_block_mask(causal, None, None, L, L, device="cpu")
    spec = af.parse_spec(
        "variant softcap_causal(cap = 30.0):\n"
        "    score = cap * tanh(score / cap)\n"
        "    mask = q_idx >= kv_idx\n"
    )["softcap_causal"]
    return {
        "noop": lambda q, k, v: af.flex_attention(q, k, v),
        "causal": lambda q, k, v: af.flex_attention(q, k, v, block_mask=bm),
        "alibi+causal": lambda q, k, v: af.flex_attention(q, k, v, score_mod=alibi, block_mask=bm),
        "spec attn(q,k,v)": lambda q, k, v: spec(q, k, v),
    }


def time_call(fn, n: int, repeats: int = 7) -> float:
    """Best over ``repeats`` of the mean µs per call of ``n`` calls (the minimum: the machine
    is shared, and interference only ever adds time)."""
    for _ in range(min(n, 50)):
        fn()
    samples = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter_ns() - t0) / n / 1e3)
    return min(samples)


def _fwd_bwd(run, q, k, v):
    d_out = torch.ones(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)

    def go():
        # autograd.grad, not backward: no accumulation into .grad (CPU math, not host work)
        torch.autograd.grad(run(q, k, v), (q, k, v), d_out)

    return go


def _runners(args) -> dict:
    """Row label -> zero-argument callable, for every case with and without requires_grad."""
    cases = _cases(args.B, args.H, args.L, args.D, args.dtype)
    rows = {}
    for grad in (False, True):
        q, k, v = _inputs(args.B, args.H, args.L, args.D, args.dtype, grad)
        for name, run in cases.items():
            rows[f"{name}{' grad' if grad else ''}"] = functools.partial(run, q, k, v)
            if grad and args.backward:
                rows[f"{name} fwd+bwd"] = _fwd_bwd(run, q, k, v)
    return rows


def measure(args) -> list[tuple[str, float]]:
    return [(label, time_call(fn, args.n // 4 if "bwd" in label else args.n))
            for label, fn in _runners(args).items()]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # small tensors: on CPU, allocating out/lse (and dq/dk/dv) is real work, on a GPU it is not
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--L", type=int, default=512)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("-n", type=int, default=1000, help="calls per sample")
    p.add_argument("--no-backward", dest="backward", action="store_false")
    p.add_argument("--profile", metavar="ROW", help="cProfile one row (its label) instead")
    p.add_argument("--gpu", action="store_true", help="real launches on CUDA (see gpu_overhead)")
    p.add_argument("--fake-gpu", action="store_true", help="the --gpu case's GPU path on CPU")
    args = p.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if args.gpu:
        return gpu_overhead(args)
    if args.fake_gpu:
        return fake_gpu_overhead(args)
    _patch_loader()  # before the first call: kernels are loaded, stubbed, never run
    if args.profile:
        return profile(args)
    rows = measure(args)
    print(f"host overhead per call, kernel launch stubbed (torch {torch.__version__}, "
          f"B={args.B} H={args.H} L=S={args.L} D={args.D} {args.dtype})")  # fmt: skip
    for label, us in rows:
        print(f"  {label:<26} {us:8.1f} µs")


def _patch_loader() -> None:
    """Stub the kernels of every module as soon as the cache loads it, so nothing really runs."""
    original = cache._load_or_build

    def load(lowered, device_kind):
        modules = original(lowered, device_kind)
        for mod in modules.values():
            for name in _KERNELS:
                if hasattr(mod, name):
                    setattr(mod, name, _NoLaunch())
        return modules

    cache._load_or_build = load


def profile(args, fn=None) -> None:
    """cProfile ``args.n`` calls of ``fn`` (default: the row ``args.profile``)."""
    fn = fn or _runners(args)[args.profile]
    for _ in range(100):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.n):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def gpu_overhead(args) -> None:
    """Real launches on CUDA, bench_attention's ``host_overhead`` case (B=1 H=1 S=128 D=64 bf16
    causal block mask, no grad): wall µs per call minus the kernel's GPU time, with
    ``ATTNFORGE_DIRECT_LAUNCH`` and ``ATTNFORGE_FAST_TMA_LAUNCH`` on and off (one process), and
    the split of one call (cProfile, both on)."""
    import os

    import triton.testing

    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bm = af.create_block_mask(lambda b, h, i, j: i >= j, None, None, 128, 128, device="cuda")

    def fn():
        return af.flex_attention(q, k, v, block_mask=bm)

    def wall_us(n=2000) -> float:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
        return best

    # (ATTNFORGE_DIRECT_LAUNCH, ATTNFORGE_FAST_TMA_LAUNCH): default, no raw TMA launch, no
    # direct launch, default again (the machine drifts: the repeat shows how much)
    settings = (("1", "1"), ("1", "0"), ("0", "1"), ("1", "1"))

    def use(setting) -> str:
        os.environ["ATTNFORGE_DIRECT_LAUNCH"], os.environ["ATTNFORGE_FAST_TMA_LAUNCH"] = setting
        return f"DIRECT_LAUNCH={setting[0]} FAST_TMA_LAUNCH={setting[1]}"

    with torch.no_grad():
        gpu_us = float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3
        outs = {}
        for setting in settings:
            label = use(setting)
            w = wall_us()
            outs[setting] = fn().clone()
            print(f"{label}: wall {w:.1f} us/call, gpu {gpu_us:.1f} us, "
                  f"overhead {max(w - gpu_us, 0):.1f} us", flush=True)  # fmt: skip
        same = all(torch.equal(o, outs[settings[0]]) for o in outs.values())
        print(f"outputs bit-identical across settings: {same}; forward launched by: "
              f"{_fwd_launch_kind()}", flush=True)  # fmt: skip
        # new tensors (new addresses, fresh TMA maps) every call: the same bits as Triton's path
        pool = [[torch.randn_like(q) for _ in range(3)] for _ in range(8)]
        fresh = []
        for setting in (("1", "1"), ("0", "1")):
            use(setting)
            fresh.append([af.flex_attention(*t, block_mask=bm).clone() for t in pool * 3])
        print(f"new tensors every call, bit-identical to Triton's launch path: "
              f"{all(map(torch.equal, *fresh))}", flush=True)  # fmt: skip
        _alloc_costs(q)
        # CPU time per call: bursts short enough that the launch queue never fills
        for setting in settings:
            label = use(setting)
            best = float("inf")
            for _ in range(30):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(200):
                    fn()
                best = min(best, (time.perf_counter() - t0) / 200 * 1e6)
            torch.cuda.synchronize()
            print(f"{label}: host time {best:.1f} us/call (enqueue, best of 30 bursts of 200)",
                  flush=True)  # fmt: skip
        use(settings[0])
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            torch.cuda.synchronize()
            for _ in range(200):
                fn()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def _alloc_costs(q) -> None:
    """Host µs of the forward's two output allocations, and of alternatives."""
    out_shape, lse_shape, dev = q.shape, q.shape[:-1], q.device
    f32 = torch.float32
    n_out = q.numel()

    def split():  # one allocation, two views (out in q's dtype, lse fp32)
        buf = torch.empty(n_out + 2 * lse_shape.numel(), dtype=q.dtype, device=dev)
        return buf[:n_out].view(out_shape), buf[n_out:].view(f32).view(lse_shape)

    out_size, lse_size = tuple(out_shape), tuple(lse_shape)
    out_stride, lse_stride = q.stride(), torch.empty(lse_shape, dtype=f32, device=dev).stride()
    ways = {
        "torch.empty x2": lambda: (torch.empty(out_shape, dtype=q.dtype, device=dev),
                                   torch.empty(lse_shape, dtype=f32, device=dev)),
        "empty_strided x2 (plans)": lambda: (
            torch.empty_strided(out_size, out_stride, dtype=q.dtype, device=dev),
            torch.empty_strided(lse_size, lse_stride, dtype=f32, device=dev)),
        "q.new_empty x2": lambda: (q.new_empty(out_shape), q.new_empty(lse_shape, dtype=f32)),
        "one empty + views": split,
    }  # fmt: skip
    for label, fn in ways.items():
        best = float("inf")
        for _ in range(20):
            t0 = time.perf_counter()
            for _ in range(500):
                fn()
            best = min(best, (time.perf_counter() - t0) / 500 * 1e6)
        print(f"  out+lse allocation, {label}: {best:.2f} us", flush=True)


def _fake_gpu() -> list:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import fake_gpu

    return fake_gpu.install()


def fake_gpu_overhead(args) -> None:
    """``--fake-gpu``: µs per call of the ``--gpu`` case on CPU (see the module docstring), with
    the knobs unset and set to 1 (the ``--gpu`` run sets them: a set knob is parsed per read),
    same tensors every call and new tensors (new addresses) every call."""
    import os
    import tempfile

    os.environ.setdefault("ATTNFORGE_CACHE_DIR", tempfile.mkdtemp(prefix="af-fake-gpu-"))
    launches = _fake_gpu()
    L, D = 128, 64
    q, k, v = (torch.randn(1, 1, L, D, dtype=torch.bfloat16) for _ in range(3))
    pool = [[torch.randn(1, 1, L, D, dtype=torch.bfloat16) for _ in range(3)] for _ in range(8)]
    bm = af.create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L, device="cpu")
    turn = iter(range(1 << 62))

    def same():
        return af.flex_attention(q, k, v, block_mask=bm)

    def fresh():
        return af.flex_attention(*pool[next(turn) % 8], block_mask=bm)

    with torch.no_grad():
        same()
        for _ in range(10):
            same()
        print(f"fake GPU path (torch {torch.__version__}): forward launched by "
              f"{_fwd_launch_kind()}")  # fmt: skip
        if args.profile:
            return profile(args, same)
        for knob in (None, "1"):
            for name in ("ATTNFORGE_DIRECT_LAUNCH", "ATTNFORGE_FAST_TMA_LAUNCH"):
                os.environ.pop(name, None) if knob is None else os.environ.__setitem__(name, knob)
            for label, fn in (("same tensors", same), ("new tensors", fresh)):
                n0 = len(launches)
                us = time_call(fn, args.n, repeats=25)
                assert len(launches) > n0  # really launched (the fake C launcher ran)
                launches.clear()
                print(f"  knobs {'unset' if knob is None else 'set=1'}, {label:<13} {us:7.1f} µs")


def _fwd_launch_kind() -> str:
    """What the forward's direct launches call: Triton's launcher or the raw TMA launch."""
    from attnforge.runtime import api, loader

    raw = 0
    for plan in api._plans.values():
        raws = getattr(plan.memo.get("fwd"), "memo", {}).get(loader.RAW_PLANNED)
        raw += len(getattr(raws, "by", ()))
    for mods in cache._memory.values():
        launcher = getattr(mods.get("fwd"), "_attn_fwd", None)
        runs = getattr(launcher, "_runs", None)
        if runs:
            kinds = ", ".join(sorted({type(fast).__name__ for _, fast in runs.values()}))
            return f"{kinds} (raw planned launches recorded: {raw})"
    return "unknown (no direct launch recorded)"


if __name__ == "__main__":
    main()
