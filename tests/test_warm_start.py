"""Warm start: GPU binaries kept in the kernel cache entry (``cache.BinaryStore``) load in a new
process without ``triton.compile``; damaged binaries are recompiled, never served."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, time, torch
import triton, triton.compiler.compiler as tcc
import attnforge as af
from attnforge.runtime import cache
calls = []
_compile = tcc.compile
def compile(*a, **kw):
    calls.append(getattr(getattr(a[0], "fn", None), "__name__", "?"))
    return _compile(*a, **kw)
triton.compiler.compile = tcc.compile = compile
torch.manual_seed(0)
L = int(sys.argv[1])
q, k, v = (torch.randn(1, 2, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
cap = 20.0
def mod(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, cap * torch.tanh(score / cap), -float("inf"))
t0 = time.perf_counter()
out = af.flex_attention(q, k, v, score_mod=mod)
out.float().pow(2).sum().backward()
torch.cuda.synchronize()
dt = time.perf_counter() - t0
qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
s = (qq @ kk.transpose(-1, -2)) / 8.0
i = torch.arange(L, device="cuda")
s = torch.where(i[:, None] >= i[None, :], cap * torch.tanh(s / cap), -float("inf"))
ref = torch.softmax(s, -1) @ vv
ref.pow(2).sum().backward()
err = max((out.double() - ref).abs().max().item(),
          *((a.grad.double() - b.grad).abs().max().item() for a, b in ((q, qq), (k, kk), (v, vv))))
info = cache.cache_info()
print(json.dumps(dict(compiles=calls, seconds=dt, err=err, binary_loads=info.binary_loads,
                      binary_saves=info.binary_saves)))
"""


def _child(env: dict, L: int = 1000) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(L)], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.gpu
def test_gpu_warm_process_loads_kept_binaries_without_triton_compile(tmp_path):
    env = dict(os.environ, ATTNFORGE_CACHE_DIR=str(tmp_path / "af"),
               TRITON_CACHE_DIR=str(tmp_path / "tr"), PYTHONPATH=str(ROOT))  # fmt: skip
    cold = _child(env)
    assert cold["compiles"], cold  # first process compiles (fwd, bwd kernels)
    assert cold["binary_saves"] == len(cold["compiles"]) >= 2, cold  # fwd + bwd kernels
    assert cold["err"] < 5e-2, cold
    warm = _child(env)
    assert warm["compiles"] == [], warm  # nothing reaches triton.compile
    assert warm["binary_loads"] == cold["binary_saves"], warm
    assert warm["err"] < 5e-2, warm
    # a different specialisation (length 1024: divisible by 16) compiles, then is kept too
    other = _child(env, L=1024)
    assert other["compiles"], other
    assert other["err"] < 5e-2, other
    # a damaged binary is never served: it warns, recompiles and results stay right
    bins = sorted((tmp_path / "af").rglob("*.cubin"))
    assert bins
    for b in bins:
        b.write_bytes(b.read_bytes()[:-64] + b"\0" * 64)
    damaged = _child(env)
    assert damaged["compiles"], damaged
    assert damaged["err"] < 5e-2, damaged


@pytest.mark.gpu
def test_gpu_warm_start_off_with_knob(tmp_path):
    env = dict(os.environ, ATTNFORGE_CACHE_DIR=str(tmp_path / "af"),
               TRITON_CACHE_DIR=str(tmp_path / "tr"), PYTHONPATH=str(ROOT),
               ATTNFORGE_DIRECT_LAUNCH="0")  # fmt: skip
    first = _child(env)
    second = _child(env)
    assert first["binary_saves"] == 0 and second["binary_loads"] == 0
    assert second["compiles"], second  # Triton's own path (a Triton cache hit)
    assert second["err"] < 5e-2


def test_cpu_modules_are_not_wrapped(tmp_path, monkeypatch):
    """The interpreter path is unchanged: CPU kernels stay Triton's interpreted functions."""
    import attnforge as af
    from attnforge.runtime import cache, loader

    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path))
    cache.cache_clear()
    q = torch.randn(1, 1, 32, 16)
    af.flex_attention(q, q, q)
    mods = next(iter(cache._memory.values()))
    assert not isinstance(mods["fwd"]._attn_fwd, loader.Launcher)
    assert not (Path(mods["fwd"].__file__).parent / "bin").exists()
    cache.cache_clear()


# -- CPU: the store lookup inside Triton's compile step, with a fake CompiledKernel ------------

_SRC = """
import triton
import triton.language as tl


@triton.jit
def kernel(X, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(X + i, i, mask=i < n)
"""


class _FakeCompiled:
    fail = None

    def __init__(self, src, metadata_group, hash):
        self.src, self.metadata_group, self.hash, self.name = src, metadata_group, hash, "kernel"

    def _init_handles(self):
        if _FakeCompiled.fail is not None:
            raise _FakeCompiled.fail


@pytest.fixture
def fake_triton(tmp_path, monkeypatch):
    """A compiled-mode module whose Triton compile is a stub (counts calls), CUDA target."""
    import triton.compiler
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from attnforge.runtime import cache, loader

    if "nvidia" not in backends:
        pytest.skip("triton has no CUDA backend here")
    compiled = []

    def fake_do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        compiled.append(key)
        return "compiled-by-triton"

    monkeypatch.setattr(JITFunction, "_do_compile", fake_do_compile)
    monkeypatch.setattr(triton.compiler, "CompiledKernel", _FakeCompiled)
    monkeypatch.delenv("ATTNFORGE_DIRECT_LAUNCH", raising=False)
    _FakeCompiled.fail = None
    path = tmp_path / "k.py"
    path.write_text(_SRC)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)

    def load(n):
        mod = loader.load_module(path, f"attnforge_test.warm_{id(tmp_path)}_{n}", interpret=False)
        loader.install_launchers(mod, cache.BinaryStore(tmp_path / "bin"))
        jit = mod.kernel.jit
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        jit.device_caches[0] = ({}, {}, target, backend, binder)
        return mod.kernel

    def compile_args(launcher, x, n=100, **kw):
        from triton import knobs
        from triton.runtime.jit import compute_cache_key

        jit = launcher.jit
        kernel_cache, key_cache, _, backend, binder = jit.device_caches[0]
        kw = dict(kw, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
        bound, spec, opts = binder(x, n, **kw)
        key = compute_cache_key(key_cache, spec, opts)
        options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, spec, opts)
        return key, signature, 0, constexprs, options, attrs, False

    return types.SimpleNamespace(load=load, compile_args=compile_args, compiled=compiled,
                                 tmp=tmp_path)  # fmt: skip


def _keep(fake, launcher, args):
    """What happens after a first-process compile + launch: the binary goes into the store."""
    key = args[0]
    files = {}
    for name, data in (("kernel.json", b'{"name": "kernel"}'), ("kernel.cubin", b"\x7fELF" * 64)):
        p = fake.tmp / name
        p.write_bytes(data)
        files[name] = str(p)
    kernel = _FakeCompiled(None, files, "triton-hash")
    kernel_cache = launcher.jit.device_caches[0][0]
    kernel_cache[key] = kernel
    launcher._options[key] = args[4]
    launcher._save(kernel, 0)


def test_warm_process_builds_kernel_from_store_without_compiling(fake_triton):
    x = torch.zeros(128)
    first = fake_triton.load(1)
    args = fake_triton.compile_args(first, x, BLOCK=128, num_warps=4)
    assert first.jit._do_compile(*args) == "compiled-by-triton"
    _keep(fake_triton, first, args)
    assert len(list((fake_triton.tmp / "bin").rglob("manifest.json"))) == 1
    # "a new process": a fresh module of the same file
    second = fake_triton.load(2)
    args2 = fake_triton.compile_args(second, x, BLOCK=128, num_warps=4)
    assert args2[0] == args[0]
    fake_triton.compiled.clear()
    kernel = second.jit._do_compile(*args2)
    assert isinstance(kernel, _FakeCompiled) and fake_triton.compiled == []
    assert kernel.hash == "triton-hash"
    assert second.jit.device_caches[0][0][args2[0]] is kernel
    assert {Path(p).name for p in kernel.metadata_group.values()} == {"kernel.json", "kernel.cubin"}
    assert kernel.src.fn is second.jit and kernel.src.signature == args2[1]
    # another specialisation / option is another binary: Triton compiles it
    for other in (dict(BLOCK=64, num_warps=4), dict(BLOCK=128, num_warps=8)):
        a = fake_triton.compile_args(second, x, **other)
        assert second.jit._do_compile(*a) == "compiled-by-triton"
    a = fake_triton.compile_args(second, x, n=96, BLOCK=128, num_warps=4)  # n % 16 == 0
    assert second.jit._do_compile(*a) == "compiled-by-triton"


def test_store_is_skipped_or_rejected_when_it_must_be(fake_triton, monkeypatch):
    from triton import knobs

    x = torch.zeros(128)
    first = fake_triton.load(1)
    args = fake_triton.compile_args(first, x, BLOCK=128, num_warps=4)
    _keep(fake_triton, first, args)

    def compiles(n) -> bool:
        launcher = fake_triton.load(n)
        a = fake_triton.compile_args(launcher, x, BLOCK=128, num_warps=4)
        return launcher.jit._do_compile(*a) == "compiled-by-triton"

    assert not compiles(2)
    monkeypatch.setenv("ATTNFORGE_DIRECT_LAUNCH", "0")
    assert compiles(3)
    monkeypatch.delenv("ATTNFORGE_DIRECT_LAUNCH")
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda *a, **k: None)
    assert compiles(4)  # a user's compile hook must see the compile
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", None)
    monkeypatch.setenv("TRITON_ALWAYS_COMPILE", "1")
    monkeypatch.setattr(knobs.compilation, "always_compile", True)
    assert compiles(5)
    monkeypatch.setattr(knobs.compilation, "always_compile", False)
    # a binary the driver rejects is discarded and compiled instead
    _FakeCompiled.fail = RuntimeError("CUDA_ERROR_INVALID_IMAGE")
    assert compiles(6)
    _FakeCompiled.fail = None
    assert compiles(7)  # its manifest was discarded
    _keep(fake_triton, first, args)
    assert not compiles(8)
    # OutOfResources is kept, as after a compile: the launch raises it and the caller shrinks
    from triton.runtime.errors import OutOfResources

    _FakeCompiled.fail = OutOfResources(300000, 232448, "shared memory")
    assert not compiles(9)
    _FakeCompiled.fail = None
    # a different kernel source (edited file) never matches
    (fake_triton.tmp / "k.py").write_text(_SRC + "\n# edited\n")
    assert compiles(10)


def test_compile_env_tracks_invalidating_env_vars(monkeypatch):
    from attnforge.runtime import loader

    before = loader._compile_env()
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    after = loader._compile_env()
    assert before is not None and after is not None
    if "TRITON_DEFAULT_FP_FUSION" in after:
        assert before != after
