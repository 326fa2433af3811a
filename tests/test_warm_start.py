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
                      binary_saves=info.binary_saves,
                      gluon="triton.experimental.gluon" in sys.modules)))
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
    # fwd + bwd kernels kept (compile helpers, ATTNFORGE_COMPILE_WORKERS, may have compiled
    # some of them: those never reach this process's triton.compile)
    assert cold["binary_saves"] >= max(2, len(cold["compiles"])), cold
    assert cold["err"] < 5e-2, cold
    warm = _child(env)
    assert warm["compiles"] == [], warm  # nothing reaches triton.compile
    assert not warm["gluon"], warm  # launch-index hits on stand-ins (loader.load_stand_ins)
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
    # (the knob first: monkeypatch restores the value it read, which the env var would set)
    monkeypatch.setattr(knobs.compilation, "always_compile", True)
    monkeypatch.setenv("TRITON_ALWAYS_COMPILE", "1")
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


# -- CPU: the launch index (a new process launches a kept binary without Triton's binder) ------

_SRC2 = """
import triton
import triton.language as tl


@triton.jit
def kernel(X, Y, n, scale, flag, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i) * scale, mask=(i < n) & flag)
"""


class _Kernel:
    """A CompiledKernel stand-in whose launcher records its arguments."""

    launches: list = []

    def __init__(self, src, metadata_group, hash):
        self.src, self.metadata_group, self.hash, self.name = src, metadata_group, hash, "kernel"
        self.function, self.packed_metadata, self._run = object(), "packed", None

    def _init_handles(self):
        self._run = lambda *a: _Kernel.launches.append(("direct", self.hash, a))

    @property
    def run(self):
        if self._run is None:
            self._init_handles()
        return self._run


@pytest.fixture
def indexed(tmp_path, monkeypatch):
    """``load(n)``: a fresh module of one kernel file ("a new process") over one store, with a
    fake driver; its Triton path (``jit.run``/``jit.warmup``) binds and keys with Triton's real
    binder and records ``("triton", key, bound args)`` in ``_Kernel.launches``."""
    import triton.compiler
    from triton import knobs
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    try:
        from triton.experimental.gluon._runtime import GluonASTSource
    except ImportError:  # pragma: no cover - a triton without Gluon
        GluonASTSource = ASTSource

    from attnforge.runtime import cache, loader

    if "nvidia" not in backends:
        pytest.skip("triton has no CUDA backend here")
    monkeypatch.setattr(triton.compiler, "CompiledKernel", _Kernel)
    monkeypatch.delenv("ATTNFORGE_DIRECT_LAUNCH", raising=False)
    _Kernel.launches = []
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    store = cache.BinaryStore(tmp_path / "bin")

    def load(n, src=_SRC2):
        path = tmp_path / f"k2_{abs(hash(src))}.py"
        path.write_text(src)
        mod = loader.load_module(path, f"attnforge_test.index_{id(tmp_path)}_{n}", interpret=False)
        loader.install_launchers(mod, store)
        launcher = mod.kernel
        jit = launcher.jit
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        jit.device_caches[0] = ({}, {}, target, backend, binder)
        jit.ASTSource = GluonASTSource if jit.is_gluon() else ASTSource
        launcher._device, launcher._stream = (lambda: 0), (lambda device: 1234)
        kernel_cache, key_cache = jit.device_caches[0][:2]

        def run(*args, grid, warmup, **kwargs):
            kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            bound, spec, opts = binder(*args, **kwargs)
            key = compute_cache_key(key_cache, spec, opts)
            kernel = kernel_cache.get(key)
            if kernel is None:  # "compile": real specialisation, fake binary files
                options, sig, consts, attrs = jit._pack_args(backend, kwargs, bound, spec, opts)
                files = {}
                for name, data in (("kernel.json", key.encode()), ("kernel.cubin", b"\x7f" * 8)):
                    p = tmp_path / f"{abs(hash(key))}-{name}"
                    p.write_bytes(data)
                    files[name] = str(p)
                kernel = _Kernel(jit.ASTSource(jit, sig, consts, attrs), files, key)
                kernel_cache[key] = kernel
                launcher._options[key] = options
            if not warmup:
                kernel.run  # noqa: B018 - loads the binary, as Triton's launch does
                _Kernel.launches.append(("triton", key, tuple(bound.values())))
            return kernel

        jit.run = run
        return launcher

    return types.SimpleNamespace(load=load, store=store, tmp=tmp_path)


def _launch(launcher, *args, **kw):
    _Kernel.launches.clear()
    launcher[(3,)](*args, **{"BLOCK": 128, "num_warps": 4, **kw})
    assert len(_Kernel.launches) == 1
    return _Kernel.launches[0]


def test_new_process_launches_indexed_binary_without_the_binder(indexed):
    base = torch.zeros(4096)
    x, y = base[:1024], base[1024:2048]
    first = indexed.load(1)
    ran = _launch(first, x, y, 100, 0.5, True)
    assert ran[0] == "triton"
    assert _launch(first, x, y, 100, 0.5, True)[0] == "direct"
    second = indexed.load(2)  # "a new process"
    triton_path = second.jit.run

    def no_binder(*a, **k):
        raise AssertionError("Triton's binder ran")

    second.jit.run = no_binder
    second.jit.device_caches[0] = (*second.jit.device_caches[0][:4], no_binder)
    got = _launch(second, x, y, 100, 0.25, True)  # floats are never specialised
    assert got[0] == "direct" and got[1] == ran[1]  # the binary Triton picked for this key
    assert got[2][:9] == (3, 1, 1, 1234, got[2][4], "packed", None, None, None)
    assert got[2][9:] == (x, y, 100, 0.25, True, 128)  # bound arguments, constexprs included
    kernel = second.jit.device_caches[0][0][ran[1]]
    first_kernel = first.jit.device_caches[0][0][ran[1]]
    assert kernel.src.fn is second.jit  # rebuilt on this module's JITFunction
    for field in ("signature", "constants", "attrs"):
        assert getattr(kernel.src, field) == getattr(first_kernel.src, field), field
    assert _launch(second, x, y, 100, 0.5, True)[0] == "direct"  # now in memory
    # anything that is (or may be) another specialisation misses the index: Triton's path
    second.jit.run = triton_path
    for args, kw in [
        ((base[1:1025], y, 100, 0.5, True), {}),  # misaligned pointer
        ((x, y, 96, 0.5, True), {}),  # another int value (divisible by 16)
        ((x, y, 1, 0.5, True), {}),  # an int equal to 1
        ((x, y, 100, 0.5, False), {}),  # a bool
        ((x.double(), y, 100, 0.5, True), {}),  # a dtype
        ((x, y, 100, 0.5, True), {"BLOCK": 64}),  # a constexpr
        ((x, y, 100, 0.5, True), {"num_warps": 8}),  # an option
    ]:
        assert _launch(second, *args, **kw)[0] == "triton", (args, kw)
    # ... and each is indexed now: a third process launches all of them directly
    third = indexed.load(3)
    third.jit.run = no_binder
    for args, kw in [((x, y, 96, 0.5, True), {}), ((x, y, 100, 0.5, True), {"BLOCK": 64})]:
        assert _launch(third, *args, **kw)[0] == "direct"


_SRC_GLUON = """
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def kernel(X_DESC, Y, n, BLOCK: gl.constexpr):
    pass
"""


def test_gluon_descriptor_launch_is_indexed(indexed):
    """The warp-specialised forward's case: a Gluon kernel with Gluon host descriptors (their
    shared layout is part of the key), launched in a new process without the binder."""
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from attnforge.runtime import launch

    x = torch.zeros(4, 64, 64, dtype=torch.bfloat16)
    y = torch.zeros(1024)
    first = indexed.load(1, _SRC_GLUON)
    ran = _launch(first, launch._ws_descriptor(x, 64), y, 100)
    assert ran[0] == "triton"
    second = indexed.load(2, _SRC_GLUON)

    def no_binder(*a, **k):
        raise AssertionError("Triton's binder ran")

    second.jit.run = no_binder
    desc = launch._ws_descriptor(x, 64)
    got = _launch(second, desc, y, 100)
    assert got[0] == "direct" and got[1] == ran[1]
    assert got[2][9:] == (desc, y, 100, 128)
    # another shared layout (or block) is another specialisation: Triton's path
    other = launch._ws_descriptor(x.transpose(-1, -2).contiguous().view(4, 64, 64), 32)
    with pytest.raises(AssertionError, match="binder"):
        _launch(second, other, y, 100)


def test_warmup_loads_indexed_binary(indexed):
    x = torch.zeros(1024)
    first = indexed.load(1)
    _launch(first, x, x, 100, 0.5, True)
    second = indexed.load(2)
    second.jit.warmup = None  # would raise if called
    second.jit.run = None
    kernel = second.warmup(x, x, 100, 0.5, True, grid=(1,), BLOCK=128, num_warps=4)
    assert isinstance(kernel, _Kernel) and _Kernel.launches[-1][0] == "triton"  # nothing ran
    assert _launch(second, x, x, 100, 0.5, True)[:2] == ("direct", kernel.hash)


def test_launch_index_yields_to_knob_hooks_and_damage(indexed, monkeypatch):
    from triton import knobs

    x = torch.zeros(1024)
    first = indexed.load(1)
    _launch(first, x, x, 100, 0.5, True)
    records = list((indexed.tmp / "bin").rglob("index.json"))
    assert len(records) == 1
    monkeypatch.setenv("ATTNFORGE_DIRECT_LAUNCH", "0")
    assert _launch(indexed.load(2), x, x, 100, 0.5, True)[0] == "triton"
    monkeypatch.delenv("ATTNFORGE_DIRECT_LAUNCH")
    monkeypatch.setenv("ATTNFORGE_LAUNCH_INDEX", "0")
    assert _launch(indexed.load(20), x, x, 100, 0.5, True)[0] == "triton"
    monkeypatch.delenv("ATTNFORGE_LAUNCH_INDEX")
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda *a, **k: None)
    assert _launch(indexed.load(3), x, x, 100, 0.5, True)[0] == "triton"
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", None)
    assert _launch(indexed.load(4), x, x, 100, 0.5, True)[0] == "direct"
    # a damaged record warns, is dropped and Triton's path runs; the next launch re-indexes
    records[0].write_text("{}")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert _launch(indexed.load(5), x, x, 100, 0.5, True)[0] == "triton"
    assert _launch(indexed.load(6), x, x, 100, 0.5, True)[0] == "direct"
    # a record whose binary is gone: Triton's path
    for cubin in (indexed.tmp / "bin").rglob("*.cubin"):
        cubin.unlink()
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert _launch(indexed.load(7), x, x, 100, 0.5, True)[0] == "triton"


def test_launch_index_writes_are_bounded(indexed):
    from attnforge.runtime import loader

    x = torch.zeros(4096)
    first = indexed.load(1)
    for n in range(100, 100 + loader._MAX_INDEX + 8):
        _launch(first, x, x, n, 0.5, True)
    assert len(list((indexed.tmp / "bin").rglob("index.json"))) == loader._MAX_INDEX


def test_launch_key_text_is_exact():
    from attnforge.runtime import loader

    texts = {loader._plain(v) for v in (1, True, 1.0, "1", None, (1,), [1], torch.float32, int)}
    assert len(texts) == 9
    with pytest.raises(TypeError):
        loader._plain(object())


# -- CPU, fake GPU: a warm launch-index hit with stand-ins (no kernel module run, no Gluon) -----

_FAKE_CHILD = r"""
import json, sys
import torch, triton
import attnforge as af, attnforge.runtime.api
import fake_gpu
launches = fake_gpu.install(aligned=True, store=True, ws=True)
from attnforge.runtime import cache, launch
torch.manual_seed(0)
L = int(sys.argv[1])
q, k, v = (torch.empty(1, 4, L, 64, dtype=torch.bfloat16).normal_().requires_grad_()
           for _ in range(3))
cap = 31.5
def mod(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, cap * torch.tanh(score / cap) + 0.125 * h, -float("inf"))
taken = []
real = launch._launch_fwd_ws
launch._launch_fwd_ws = lambda *a: taken.append(1) or real(*a)
out, lse = af.flex_attention(q, k, v, score_mod=mod, return_lse=True)
fwd = launches[0]
out.sum().backward()
mods = next(iter(cache._memory.values()))
def norm(args, out, lse):  # (triton >= 3.7: the kernel's arguments come as one tuple)
    names = {id(out): "out", id(lse): "lse"}
    return [norm(a, out, lse) if type(a) in (tuple, list) else names.get(id(a), a.data_ptr())
            if isinstance(a, torch.Tensor) else repr(a) for a in args]
res = dict(ws=bool(taken), gluon="triton.experimental.gluon" in sys.modules,
           stand_ins={n: "__attnforge_stand_ins__" in vars(m) for n, m in mods.items()},
           n_launches=len(launches))
if sys.argv[2] == "compare":  # the same launch through Gluon's own objects and the real module
    import triton.experimental.gluon.nvidia.hopper  # noqa: F401
    ws = mods["fwd_ws"]
    ws._attn_fwd_ws.fn  # executes the module
    res["materialized"] = "__attnforge_stand_ins__" not in vars(ws)
    ws._attn_fwd_ws._layouts.clear()  # (so the launch index is read again, by real objects)
    launch._launch_fwd_ws = real
    launches.clear()
    out2, lse2 = af.flex_attention(q, k, v, score_mod=mod, return_lse=True,
                                   kernel_options={"PERSISTENT": True})  # (a new call plan)
    res["same_launch"] = norm(fwd, out, lse) == norm(launches[0], out2, lse2)
    res["real_descriptor"] = type(launch._ws_descriptor(q, 64)).__module__
print(json.dumps(res))
"""


def _fake_child(env: dict, L: int = 1024, mode: str = "plain") -> dict:
    proc = subprocess.run([sys.executable, "-c", _FAKE_CHILD, str(L), mode], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def fake_env(tmp_path):
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from attnforge.runtime import loader

    if loader._triton_knobs() is None:
        pytest.skip("this triton launches differently: no direct launch, no launch index")
    from attnforge.runtime import standins

    if not standins._import_ws():  # (the fake sm_90 runs the Gluon forward)
        pytest.skip("this Triton's Gluon lacks the API fwd_ws.py uses (Triton 3.5-3.6)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTNFORGE_", "TRITON_"))}
    env.update(ATTNFORGE_CACHE_DIR=str(tmp_path / "af"), TRITON_CACHE_DIR=str(tmp_path / "tr"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))  # fmt: skip
    return env


def test_warm_index_hit_needs_no_kernel_module_and_no_gluon(fake_env, tmp_path):
    cold = _fake_child(fake_env)
    assert cold["ws"] and cold["gluon"], cold  # the Gluon forward, compiled ("cold")
    assert not any(cold["stand_ins"].values()), cold
    warm = _fake_child(fake_env)
    assert warm["ws"] and not warm["gluon"], warm
    assert warm["stand_ins"] == {"fwd": True, "bwd": True, "fwd_ws": True}, warm
    assert warm["n_launches"] == cold["n_launches"], warm
    # the stand-ins' launch is the real objects' launch, argument for argument
    both = _fake_child(fake_env, mode="compare")
    assert both["materialized"] and both["same_launch"], both
    assert both["real_descriptor"].startswith("triton.experimental.gluon"), both
    # a launch the index does not know (another length: another specialisation) runs the real
    # module (Gluon imported) and Triton's path
    other = _fake_child(fake_env, L=1000)
    assert other["ws"] and other["gluon"], other
    assert not other["stand_ins"]["fwd_ws"] and not other["stand_ins"]["bwd"], other
    # knob off: the modules run at once
    off = _fake_child(dict(fake_env, ATTNFORGE_STAND_INS="0"))
    assert not any(off["stand_ins"].values()) and off["gluon"], off
    # what is kept must belong to the file: an edited record is not used
    kept = sorted((tmp_path / "af").rglob("standins.json"))
    assert len(kept) == 3
    for path in kept:
        record = json.loads(path.read_text())
        path.write_text(json.dumps(dict(record, digest="0" * 64)))
    edited = _fake_child(fake_env)
    assert not any(edited["stand_ins"].values()) and edited["gluon"], edited
    again = _fake_child(fake_env)  # (the real modules kept their records again)
    assert all(again["stand_ins"].values()) and not again["gluon"], again


def test_gluon_stand_in_key_text_is_the_real_one(tmp_path, monkeypatch):
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from attnforge.runtime import launch, loader, standins

    monkeypatch.setattr(standins, "_state", {"path": tmp_path / "gluon.json", "identity": "x"})
    standins._parts.cache_clear()  # (made by an earlier test: kept in another table)
    x = torch.empty(2, 4, 256, 64, dtype=torch.bfloat16)
    real = launch._ws_descriptor(x, 64)  # Gluon is imported here: the real objects
    assert type(real).__module__.startswith("triton.experimental.gluon")
    block = tuple(real.block_shape)
    kept = standins._table()["layouts"][standins._layout_key(block, x.dtype)]
    stand_in = standins._stand_in_class(kept["descriptor"]).__new__(
        standins._stand_in_class(kept["descriptor"])
    )
    stand_in.__dict__.update({**real.__dict__, "layout": standins.LayoutStandIn(
        kept["layout"], block, x.dtype)})  # fmt: skip
    for f in (type, loader._desc_key):
        assert loader._plain(f(stand_in)) == loader._plain(f(real))
    assert loader._is_gluon_descriptor_type(type(stand_in))
    back = stand_in.real()
    assert type(back) is type(real) and back.__dict__ == real.__dict__
    args, _ = loader._real_args((stand_in, x, 3), {})
    assert type(args[0]) is type(real) and args[1:] == (x, 3)
    # a kept text that does not match: the real descriptor all the same, and the facts fixed
    stale = standins._stand_in_class(kept["descriptor"]).__new__(
        standins._stand_in_class(kept["descriptor"])
    )
    stale.__dict__.update({**real.__dict__, "layout": standins.LayoutStandIn(
        "wrong", block, x.dtype)})  # fmt: skip
    assert stale.real().__dict__ == real.__dict__
    assert standins._table()["layouts"][standins._layout_key(block, x.dtype)] == kept
