"""Direct launch (``loader.Launcher``): a kernel already run with the same specialisation
inputs is relaunched without ``JITFunction.run``; anything that could change Triton's
specialisation (alignment, int values, dtypes, constexprs, options) takes Triton's path."""

from __future__ import annotations

import math

import pytest
import torch

import attnforge as af
from attnforge.runtime import cache, loader


def _reference(q, k, v, causal=True):
    qq, kk, vv = (t.detach().double() for t in (q, k, v))
    s = (qq @ kk.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        L, S = s.shape[-2:]
        i, j = torch.arange(L, device=s.device), torch.arange(S, device=s.device)
        s = s.masked_fill(i[:, None] < j[None, :], -float("inf"))
    return torch.softmax(s, -1) @ vv


def _count_triton_runs(launcher):
    """Count how often the wrapped JITFunction's own ``run`` is entered."""
    jit = launcher.jit
    counter = {"n": 0}
    original = type(jit).run

    def run(*args, **kwargs):
        counter["n"] += 1
        return original(jit, *args, **kwargs)

    jit.run = run
    return counter


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@pytest.mark.gpu
def test_gpu_direct_launch_tracks_specialisation(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNFORGE_FWD_WS", "0")  # these look at the Triton forward kernel
    cache.cache_clear()
    dev = "cuda"
    torch.manual_seed(0)
    D = 64

    def inputs(L, misaligned=False):
        if misaligned:  # a sliced tensor: base address off by one element, row stride D + 1
            return [torch.randn(1, 2, L, D + 1, device=dev, dtype=torch.bfloat16)[..., 1:]
                    for _ in range(3)]  # fmt: skip
        return [torch.randn(1, 2, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3)]

    masks = {L: af.create_block_mask(_causal, None, None, L, L, device=dev) for L in (1000, 1024)}
    q, k, v = inputs(1000)
    af.flex_attention(q, k, v, block_mask=masks[1000])
    mods = next(iter(cache._memory.values()))
    launcher = mods["fwd"]._attn_fwd
    assert isinstance(launcher, loader.Launcher)
    runs = _count_triton_runs(launcher)
    seq = [(1000, False), (1000, False), (1024, False), (1000, True), (1024, False),
           (1000, True), (1000, False)]  # fmt: skip
    expect_triton = [0, 0, 1, 1, 0, 0, 0]  # first sight of a specialisation only
    for (L, mis), want in zip(seq, expect_triton):
        q, k, v = inputs(L, mis)
        before = runs["n"]
        out = af.flex_attention(q, k, v, block_mask=masks[L])
        torch.cuda.synchronize()
        assert runs["n"] - before == want, (L, mis)
        err = (out.double() - _reference(q, k, v)).abs().max().item()
        assert err < 2e-2, (L, mis, err)


@pytest.mark.gpu
def test_gpu_direct_launch_forward_backward_vs_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNFORGE_FWD_WS", "0")  # these look at the Triton forward kernel
    cache.cache_clear()
    torch.manual_seed(1)
    for L in (1000, 1024, 1000, 1024):
        q, k, v = (torch.randn(1, 2, L, 64, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))  # fmt: skip
        bm = af.create_block_mask(_causal, None, None, L, L, device="cuda")
        out = af.flex_attention(q, k, v, block_mask=bm)
        out.float().pow(2).sum().backward()
        qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = _reference(qq, kk, vv)
        s = (qq @ kk.transpose(-1, -2)) / 8.0
        i = torch.arange(L, device="cuda")
        s = s.masked_fill(i[:, None] < i[None, :], -float("inf"))
        ref = torch.softmax(s, -1) @ vv
        ref.pow(2).sum().backward()
        assert (out.double() - ref).abs().max().item() < 2e-2
        for a, b in ((q, qq), (k, kk), (v, vv)):
            assert (a.grad.double() - b.grad).abs().max().item() < 5e-2


@pytest.mark.gpu
def test_gpu_launch_hook_takes_tritons_path(tmp_path, monkeypatch):
    from triton import knobs

    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNFORGE_FWD_WS", "0")  # these look at the Triton forward kernel
    cache.cache_clear()
    q = torch.randn(1, 1, 256, 64, device="cuda", dtype=torch.bfloat16)
    af.flex_attention(q, q, q)
    af.flex_attention(q, q, q)
    seen = []
    hook = seen.append
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        af.flex_attention(q, q, q)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert seen, "the launch hook must see the launch"


# -- CPU: the mechanics, with Triton's CUDA backend but no GPU (fake driver and binaries) ------

_KERNEL_SRC = """
import triton
import triton.language as tl


@triton.jit
def helper(x):
    return x + 1


@triton.jit
def kernel(X, Y, n, scale, flag, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, helper(tl.load(X + i)) * scale, mask=i < n)
"""


def _cuda_backend():
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    if "nvidia" not in backends:
        pytest.skip("triton has no CUDA backend here")
    target = GPUTarget("cuda", 90, 32)
    return target, make_backend(target)


class _FakeDriver:
    def __init__(self):
        self.launches = []

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234


def _compiled_module(tmp_path, store=None):
    from triton.runtime.jit import create_function_from_signature

    path = tmp_path / "k.py"
    path.write_text(_KERNEL_SRC)
    mod = loader.load_module(path, f"attnforge_test.direct_{id(tmp_path)}", interpret=False)
    raw_helper = mod.helper
    assert loader.install_launchers(mod, store) == ["kernel"]
    assert mod.helper is raw_helper  # called by another jit function: never wrapped
    launcher = mod.kernel
    target, backend = _cuda_backend()
    jit = launcher.jit
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    jit.device_caches[0] = ({}, {}, target, backend, binder)
    drv = _FakeDriver()
    launcher._device, launcher._stream = drv.get_current_device, drv.get_current_stream
    return mod, launcher, binder


def _fake_triton_run(launcher, binder, ran):
    """Stand-in for JITFunction.run: Triton's real binder and key, a fake CompiledKernel."""
    from triton import knobs
    from triton.compiler import CompiledKernel
    from triton.runtime.jit import compute_cache_key

    jit = launcher.jit
    kernel_cache, key_cache = jit.device_caches[0][:2]

    def run(*args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound, spec, options = binder(*args, **kwargs)
        key = compute_cache_key(key_cache, spec, options)
        kernel = kernel_cache.get(key)
        if kernel is None:
            kernel = object.__new__(CompiledKernel)
            kernel.function, kernel.packed_metadata, kernel.key = object(), object(), key

            def launch(*a, _k=kernel):
                ran.append(("direct", _k.key, a))

            kernel._run = launch
            kernel_cache[key] = kernel
        ran.append(("triton", key, tuple(bound.values())))
        return kernel

    jit.run = run


def _args(x, y, n=100, scale=0.5, flag=True):
    return (x, y, n, scale, flag)


def _fake_setup(tmp_path, monkeypatch):
    """A fake-compiled launcher, its run log, a buffer with two aligned halves, keywords."""
    monkeypatch.delenv("ATTNFORGE_DIRECT_LAUNCH", raising=False)
    mod, launcher, binder = _compiled_module(tmp_path)
    ran = []
    _fake_triton_run(launcher, binder, ran)
    base = torch.zeros(4096, dtype=torch.float32)
    return launcher, ran, base, base[:1024], base[1024:2048], dict(BLOCK=128, num_warps=4)


def test_direct_launch_mechanics_follow_tritons_specialisation(tmp_path, monkeypatch):
    launcher, ran, base, x, y, kw = _fake_setup(tmp_path, monkeypatch)

    def call(*args, **extra):
        ran.clear()
        launcher[(3,)](*args, **{**kw, **extra})
        assert len(ran) == 1
        return ran[0]

    first = call(*_args(x, y))
    assert first[0] == "triton"
    again = call(*_args(x, y))
    assert again[0] == "direct" and again[1] == first[1]
    grid_and_meta = again[2][:9]
    assert grid_and_meta[:4] == (3, 1, 1, 1234) and grid_and_meta[6:9] == (None, None, None)
    assert again[2][9:] == first[2]  # every argument in signature order, constexprs included
    # a float's value is never specialised: still direct
    assert call(*_args(x, y, scale=2.0))[0] == "direct"
    # each of these changes (or may change) Triton's specialisation: Triton's path first
    changes = [
        _args(base[1:1025], y),  # 4-byte offset: not 16-byte aligned
        _args(x, y, n=1),  # an int equal to 1
        _args(x, y, n=96),  # divisible by 16
        _args(x, y, flag=False),
        _args(x.double(), y),  # another dtype
        _args(x, y, n=2**40),  # i64
    ]
    for args in changes:
        assert call(*args)[0] == "triton", args
        assert call(*args)[0] == "direct", args
    assert call(*_args(x, y), BLOCK=64)[0] == "triton"  # a constexpr
    assert call(*_args(x, y), num_stages=2)[0] == "triton"  # an option
    assert call(*_args(x, y))[0] == "direct"
    # the same kernel whenever the spec key matches Triton's
    for args in changes:
        r = call(*args)
        ran.clear()
        launcher.jit.run(*args, grid=(1,), warmup=False, **kw)
        assert ran[0][1] == r[1]


def test_direct_launch_yields_to_hooks_knob_and_odd_calls(tmp_path, monkeypatch):
    from triton import knobs

    mod, launcher, binder = _compiled_module(tmp_path)
    ran = []
    _fake_triton_run(launcher, binder, ran)
    x = torch.zeros(256)
    args = _args(x, x)
    launcher[(1,)](*args, BLOCK=128)
    launcher[(1,)](*args, BLOCK=128)
    assert ran[-1][0] == "direct"

    def kinds(grid=(1,)):
        ran.clear()
        launcher[grid](*args, BLOCK=128)
        return ran[0][0]

    hook = lambda *a: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert kinds() == "triton"
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    launcher.jit.pre_run_hooks.append(lambda *a, **k: None)
    assert kinds() == "triton"
    launcher.jit.pre_run_hooks.clear()
    monkeypatch.setenv("ATTNFORGE_DIRECT_LAUNCH", "0")
    assert kinds() == "triton"
    monkeypatch.setenv("ATTNFORGE_DIRECT_LAUNCH", "1")
    assert kinds(lambda meta: (1,)) == "triton"  # a callable grid
    assert kinds() == "direct"
    # attribute access and identity of the JITFunction look-alike
    assert launcher.fn is launcher.jit.fn and launcher.arg_names == launcher.jit.arg_names
    assert mod.kernel is launcher


def test_float_values_never_change_tritons_specialisation():
    """The direct-launch key leaves float values out: pin that Triton agrees."""
    from triton.runtime.jit import JITFunction, create_function_from_signature

    _, backend = _cuda_backend()

    def k(a, b, c):
        pass

    jit = JITFunction(k)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    specs = {str(binder(v, 1.0, -3.5)[1]) for v in (0.0, 1.0, 16.0, -1.0, 1e30, float("nan"))}
    assert len(specs) == 1


def test_direct_launch_rechecks_the_kernels_globals(tmp_path):
    """Triton refuses to launch when a global the kernel read at compile time has changed; the
    direct path notices (identity check) and leaves the decision to Triton's path."""
    mod, launcher, binder = _compiled_module(tmp_path)
    ran = []
    _fake_triton_run(launcher, binder, ran)
    scope = {"G": 1.5}
    launcher.jit.used_global_vals = {("G", id(scope)): (1.5, scope)}
    x = torch.zeros(256)

    def kind():
        ran.clear()
        launcher[(1,)](*_args(x, x), BLOCK=128)
        return ran[0][0]

    assert kind() == "triton"
    assert kind() == "direct"
    scope["G"] = 1.5 + 0.0  # an equal value (another object): still fine
    assert kind() == "direct"
    scope["G"] = 2.0
    assert kind() == "triton"
    scope["G"] = 1.5
    assert kind() == "direct"


def test_installed_triton_has_the_launch_convention_direct_launch_repeats():
    """If a triton upgrade changes how JITFunction.run launches, direct launch switches itself
    off (Triton's path for everything); this pins that the installed triton is supported."""
    pytest.importorskip("triton.knobs")
    assert loader._same_launch_convention()


def test_unknown_launch_convention_takes_tritons_path(tmp_path, monkeypatch):
    mod, launcher, binder = _compiled_module(tmp_path)
    ran = []
    _fake_triton_run(launcher, binder, ran)
    monkeypatch.setattr(loader, "_knobs_module", None)
    x = torch.zeros(256)
    for _ in range(3):
        ran.clear()
        launcher[(1,)](*_args(x, x), BLOCK=128)
        assert ran[0][0] == "triton"


def test_planned_launch_passes_addresses_and_follows_specialisation(tmp_path, monkeypatch):
    """``Launcher.launch_planned`` (per-call plans): the direct launcher gets the tensors as
    addresses; a new alignment class or ``extra`` value takes the full path once, hooks and the
    knob take Triton's path, and the kernel is always the one Triton's key picks."""
    from triton import knobs

    launcher, ran, base, x, y, kw = _fake_setup(tmp_path, monkeypatch)
    memo: dict = {}

    def planned(args, extra=()):
        ran.clear()
        launcher.launch_planned((3,), args, kw, memo, extra)
        assert len(ran) == 1
        return ran[0]

    assert planned(_args(x, y))[0] == "triton"  # nothing known yet: Triton's path, remembered
    first = planned(_args(x, y))
    assert first[0] == "direct"
    assert first[2][9:11] == (x.data_ptr(), y.data_ptr())  # addresses, not tensors
    ran.clear()
    launcher[(3,)](*_args(x, y), **kw)  # the Launcher's own direct launch: tensors
    assert ran[0][:2] == first[:2] and ran[0][2][9] is x and ran[0][2][10] is y
    assert first[2][:9] == ran[0][2][:9] and first[2][11:] == ran[0][2][11:]
    # other tensors of the same alignment class: direct, their own addresses
    x2 = base[2048:3072]
    assert planned(_args(x2, y))[2][9] == x2.data_ptr()
    # a new alignment class: the full path once, then direct with the right kernel
    odd = base[1:1025]
    r1, r2 = planned(_args(odd, y)), planned(_args(odd, y))
    assert r1[0] == "triton" and r2 == ("direct", r1[1], r2[2])
    assert r1[1] != first[1]
    # the caller's ``extra`` carries the other changing values (here n)
    r1 = planned(_args(x, y, n=96), extra=(96,))
    assert r1[0] == "triton" and r1[1] != first[1]
    assert planned(_args(x, y, n=96), extra=(96,))[:2] == ("direct", r1[1])
    # hooks, pre-run hooks and the knob: Triton's path
    hook = lambda *a: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert planned(_args(x, y))[0] == "triton"
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    monkeypatch.setenv("ATTNFORGE_DIRECT_LAUNCH", "0")
    assert planned(_args(x, y))[0] == "triton"
    monkeypatch.setenv("ATTNFORGE_DIRECT_LAUNCH", "1")
    assert planned(_args(x, y))[:2] == ("direct", first[1])


def test_fast_current_device_answers_as_torch_cuda_current_device(monkeypatch):
    """``loader._fast_current_device`` skips torch.cuda.current_device's Python frames only while
    CUDA is initialised and this is no bad fork; otherwise torch's own function runs (and raises
    as it would).  Faked here on any build: a C getter, the initialised flag, the fork check."""
    cuda = torch.cuda
    current = [3]
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: current[0], raising=False)
    monkeypatch.setattr(cuda, "_initialized", True)
    bad_fork = [False]
    monkeypatch.setattr(cuda, "_is_in_bad_fork", lambda: bad_fork[0])
    fast = loader._fast_current_device(cuda.current_device)
    assert fast is not cuda.current_device  # torch's source reads as known
    for device in (3, 0, 5):
        current[0] = device
        assert fast() == cuda.current_device() == device
    monkeypatch.setattr(cuda, "_initialized", False)
    calls = []
    monkeypatch.setattr(cuda, "_lazy_init", lambda: calls.append("init"))
    # a _lazy_init that does not read as known: no fast path made
    assert loader._fast_current_device(cuda.current_device) is cuda.current_device
    # not initialised: torch's own function (its _lazy_init) answers
    assert fast() == 5 and calls == ["init"]
    monkeypatch.setattr(cuda, "_initialized", True)
    bad_fork[0] = True
    assert fast() == 5 and calls == ["init", "init"]
    bad_fork[0] = False
    assert fast() == 5 and calls == ["init", "init"]

    def other():
        return 0

    assert loader._fast_current_device(other) is other  # another driver's function: itself
