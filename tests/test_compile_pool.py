"""Compile helpers (``runtime.compile_pool``): a kernel compiled for sm_90 in a helper process is
the binary Triton compiles in this one, reaches the launcher through the kept-binary store, and
anything unexpected falls back to compiling here.  Runs on CPU (Triton compiles for a GPU target
without a GPU; nothing is launched)."""

from __future__ import annotations

import os
import types

import pytest
import torch

_SRC = """
import triton
import triton.language as tl


@triton.jit
def kernel(X, Y, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n) * 2.0, mask=i < n)
"""

_SRC_GLUON = """
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def kernel(X, Y, n, BLOCK: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    i = gl.arange(0, BLOCK, layout=layout)
    gl.store(Y + i, gl.load(X + i, mask=i < n) * 2.0, mask=i < n)
"""

pytestmark = pytest.mark.skipif(os.name != "posix", reason="helpers are POSIX-only")


@pytest.fixture
def setup(tmp_path, monkeypatch, request):
    """A compiled-mode module with a Launcher over a store, Triton's CUDA backend for sm_90 and
    the real binder; ``compile_args`` gives ``_do_compile``'s arguments for a launch."""
    from triton import knobs
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    from attnforge.runtime import cache, compile_pool, loader

    if "nvidia" not in backends:
        pytest.skip("triton has no CUDA backend here")
    monkeypatch.delenv("ATTNFORGE_DIRECT_LAUNCH", raising=False)
    monkeypatch.setenv("ATTNFORGE_COMPILE_WORKERS", "1")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    path = tmp_path / "k.py"
    src = getattr(request, "param", _SRC)
    if src is _SRC_GLUON:  # imported as the rest of triton was (Gluon asserts it)
        pytest.importorskip("triton.experimental.gluon")
    path.write_text(src)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    mod = loader.load_module(path, f"attnforge_test.pool_{id(tmp_path)}", interpret=False)
    loader.install_launchers(mod, cache.BinaryStore(tmp_path / "bin"))
    launcher = mod.kernel
    jit = launcher.jit
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    jit.device_caches[0] = ({}, {}, target, backend, binder)
    jit.create_binder = None  # never called again: device_caches[0] exists
    from triton.compiler import ASTSource, compile

    if jit.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    jit.ASTSource, jit.compile = ASTSource, compile

    def compile_args(x, n=100, **kw):
        kernel_cache, key_cache = jit.device_caches[0][:2]
        kw = dict(kw, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
        bound, spec, opts = binder(x, x, n, **kw)
        key = compute_cache_key(key_cache, spec, opts)
        options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, spec, opts)
        return key, signature, 0, constexprs, options, attrs, True

    yield types.SimpleNamespace(launcher=launcher, jit=jit, compile_args=compile_args,
                                target=target, tmp=tmp_path)  # fmt: skip
    compile_pool._shutdown()
    with compile_pool._lock:
        compile_pool._idle.clear()
        compile_pool._count = 0


def _wait_ready():
    from attnforge.runtime import compile_pool

    compile_pool.prestart()
    for w in compile_pool._idle:
        assert w.wait_ready(120), "helper did not start"


def test_helper_compiles_the_binary_triton_compiles_here(setup):
    import triton
    from triton.compiler import ASTSource

    x = torch.zeros(128)
    args = setup.compile_args(x, BLOCK=128, num_warps=4)
    _wait_ready()
    kernel = setup.jit._do_compile(*args)  # the hooked compile: store miss -> helper
    assert type(kernel).__name__ == "CompiledKernel"
    assert kernel.module is None  # not loaded here (the launch loads it on its device)
    assert setup.jit.device_caches[0][0][args[0]] is kernel
    assert kernel.src.fn is setup.jit and kernel.src.signature == args[1]
    here = triton.compile(ASTSource(setup.jit, args[1], args[3], args[5]), target=setup.target,
                          options=args[4].__dict__)  # fmt: skip
    assert kernel.hash == here.hash
    assert kernel.asm["cubin"] == here.asm["cubin"]
    assert kernel.metadata == here.metadata
    # kept: a new launcher (process) loads it from the store without any compile
    saved = setup.launcher._saved[id(kernel)]
    assert saved[1] is not None and setup.launcher.store.has(saved[1])


@pytest.mark.parametrize("setup", [_SRC_GLUON], indirect=True)
def test_helper_compiles_gluon_kernels_with_gluons_frontend(setup):
    """fwd_ws.py's kernel is Gluon: the helper builds it as this process would."""
    import triton

    x = torch.zeros(128)
    args = setup.compile_args(x, BLOCK=128, num_warps=4)
    _wait_ready()
    kernel = setup.jit._do_compile(*args)
    assert setup.launcher._saved[id(kernel)][1] is not None  # came from the helper
    here = triton.compile(setup.jit.ASTSource(setup.jit, args[1], args[3], args[5]),
                          target=setup.target, options=args[4].__dict__)  # fmt: skip
    assert kernel.hash == here.hash and kernel.asm["cubin"] == here.asm["cubin"]


def test_async_compile_goes_to_a_helper(setup):
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    x = torch.zeros(128)
    args = setup.compile_args(x, BLOCK=64, num_warps=4)
    with ThreadPoolExecutor(2) as pool, AsyncCompileMode(pool):
        future = setup.jit._do_compile(*args)  # waits for a helper to start
    kernel = future.result()
    assert type(kernel).__name__ == "CompiledKernel"
    assert setup.jit.device_caches[0][0][args[0]] is kernel
    assert setup.launcher._saved[id(kernel)][1] is not None  # came from the helper


def test_no_ready_helper_or_a_failing_one_compiles_here(setup, monkeypatch):
    from attnforge.runtime import compile_pool, loader

    x = torch.zeros(128)
    calls = []
    original = type(setup.jit)._do_compile

    def here(self, *a):
        calls.append(a[0])
        return "compiled-here"

    monkeypatch.setattr(type(setup.jit), "_do_compile", here)
    del setup.jit._do_compile  # the hook over Triton's compile, re-made over the stand-in
    loader._hook_compile(setup.launcher)
    args = setup.compile_args(x, BLOCK=32, num_warps=4)
    # nothing started: the launching thread never waits for a helper
    assert setup.jit._do_compile(*args) == "compiled-here"
    # a helper that answers with an error
    _wait_ready()
    monkeypatch.setitem(os.environ, "TRITON_DEFAULT_FP_FUSION", "0")  # parent env changed
    args = setup.compile_args(x, BLOCK=16, num_warps=4)
    assert setup.jit._do_compile(*args) == "compiled-here"
    assert len(calls) == 2
    monkeypatch.undo()
    assert original is type(setup.jit)._do_compile
    # the knob
    monkeypatch.setenv("ATTNFORGE_COMPILE_WORKERS", "0")
    assert compile_pool.workers() == 0 and compile_pool.compile({}, wait=True) is None
