"""``runtime.tma_launch``: direct launches of kernels with tensor-descriptor arguments reuse the
encoded TMA maps and call Triton's C launcher with exactly the arguments Triton's own wrapper
would pass.  CPU only: Triton's real ``CudaLauncher.__call__`` and ``wrap_handle_tensordesc``
around a fake C launcher, a fake ``fill_tma_descriptor``."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from attnforge.runtime import tma_launch

pytest.importorskip("triton")
nv = pytest.importorskip("triton.backends.nvidia.driver")
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402


class _Map:
    """A fake CUtensorMap: equal when encoded from equal inputs."""

    def __init__(self, args):
        self.args = args

    def __eq__(self, other):
        return type(other) is _Map and other.args == self.args

    def __repr__(self):
        return f"_Map{self.args}"


class _Utils:
    def __init__(self):
        self.encoded = 0

    def fill_tma_descriptor(self, ptr, swizzle, elem, dtype, block, shape, strides, padding):
        self.encoded += 1
        return _Map((ptr, swizzle, elem, dtype, tuple(block), tuple(shape), tuple(strides),
                     padding))  # fmt: skip

    fill_tma_descriptor_tiled = fill_tma_descriptor  # triton >= 3.7


class _Driver:
    def __init__(self):
        self.utils = _Utils()


@pytest.fixture
def utils(monkeypatch):
    import triton

    fake = _Driver()
    monkeypatch.setattr(triton.runtime.driver, "_active", fake)  # what the expansion reads
    monkeypatch.delenv("ATTNFORGE_FAST_TMA_LAUNCH", raising=False)
    return fake.utils


def _meta(rows, swizzle=3):
    return {"swizzle": swizzle, "elem_size": 2, "elem_type": 10, "block_size": [1, 1, rows, 64],
            "fp4_padded": False}  # fmt: skip


# a kernel (X, descQ, n, descK, scale, BLOCK: constexpr, descV)
_SIG = {0: "*bf16", 1: "tensordesc<bf16[1,1,128,64]>", 2: "i32", 3: "tensordesc<bf16[1,1,64,64]>",
        4: "fp32", 5: "constexpr", 6: "tensordesc<bf16[1,1,64,64]>"}  # fmt: skip


def _launcher(calls, metas=None, sig=_SIG, **attrs):
    """Triton's CudaLauncher (real ``__call__`` and descriptor wrapper) over a fake C launcher."""
    metas = [_meta(128), _meta(64), _meta(64, swizzle=2)] if metas is None else metas

    def c_launch(*args):
        calls.append(args)

    run = nv.CudaLauncher.__new__(nv.CudaLauncher)
    if hasattr(nv, "expand_signature"):  # triton >= 3.7: the launcher gets the kernel's types
        run.gsan_enabled = False
        run.arg_annotations, run.kernel_signature = object(), object()
    run.num_ctas, run.launch_cooperative_grid, run.launch_pdl = 1, False, False
    run.global_scratch_size = run.profile_scratch_size = 0
    run.global_scratch_align = run.profile_scratch_align = 1
    for name, value in attrs.items():
        setattr(run, name, value)
    run.launch = nv.wrap_handle_tensordesc(c_launch, dict(sig), metas)
    return run


def _desc(t, rows):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, 64])


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 256, 64, generator=g).to(torch.bfloat16) for _ in range(3)]


def _call(run, x, q, k, v, n=100, packed=(4, 1, 0)):
    return run(2, 1, 1, 1234, 5678, packed, None, None, None,
               x.data_ptr(), _desc(q, 128), n, _desc(k, 64), 0.5, 64, _desc(v, 64))  # fmt: skip


def test_raw_launch_passes_what_tritons_wrapper_passes_and_reuses_maps(utils):
    calls = []
    run = _launcher(calls)
    fast = tma_launch.fast_run(SimpleNamespace(run=run))
    assert fast is not run and type(fast).__name__ in ("_Fast36", "_Fast39")
    q, k, v = _tensors()

    def both(*tensors, **kw):
        calls.clear()
        before = utils.encoded
        _call(run, *tensors, **kw)
        triton_encoded = utils.encoded - before
        before = utils.encoded
        _call(fast, *tensors, **kw)
        assert len(calls) == 2 and calls[0] == calls[1]  # Triton's expansion, argument for argument
        assert triton_encoded == 3
        return utils.encoded - before, calls[1]

    assert both(q, q, k, v)[0] == 3  # first launch: every descriptor encoded
    encoded, args = both(q, q, k, v)
    assert encoded == 0  # the same descriptors: nothing encoded again
    assert _kernel_args(args)[:2] == [q.data_ptr(), _kernel_args(calls[0])[1]]
    assert isinstance(_kernel_args(args)[1], _Map)
    assert both(q, q, k, v, n=7)[0] == 0  # other arguments do not matter
    # a new address of one input: that descriptor (and only it) is encoded anew
    k2 = k.clone()
    assert both(q, q, k2, v)[0] == 1
    assert both(q, q, k2, v)[0] == 0
    # a new shape, new strides (same address)
    encoded, args = both(q, q, k[:, :, :128], v)
    assert encoded == 1
    assert both(q, q, k.transpose(1, 2), v)[0] == 1
    # swapped inputs: each descriptor argument keeps its own maps (block, swizzle differ)
    assert both(q, v, q, k)[0] == 3


def test_key_has_every_descriptor_field(utils):
    calls = []
    run = _launcher(calls)
    fast = tma_launch.fast_run(SimpleNamespace(run=run))
    q, k, v = _tensors()
    x = q
    _call(fast, x, q, k, v)

    def launch_with(dq):
        """Maps the raw launch encoded for these arguments (Triton's launch must agree)."""
        calls.clear()
        before = utils.encoded
        fast(2, 1, 1, 0, 0, (4, 1, 0), None, None, None, 0, dq, 1, _desc(k, 64), 0.5, 64,
             _desc(v, 64))  # fmt: skip
        encoded = utils.encoded - before
        run(2, 1, 1, 0, 0, (4, 1, 0), None, None, None, 0, dq, 1, _desc(k, 64), 0.5, 64,
            _desc(v, 64))  # fmt: skip
        assert calls[0] == calls[1]
        return encoded

    assert launch_with(_desc(q, 128)) == 0
    d = _desc(q, 128)
    d.padding = "nan"
    assert launch_with(d) == 1
    d = _desc(q, 128)
    d.block_shape = [1, 1, 64, 64]
    assert launch_with(d) == 1
    assert launch_with(_desc(q.view(torch.int16), 128)) == 1  # another dtype, same bytes
    assert launch_with(_desc(q, 128)) == 0
    # and a bounded cache: many addresses never grow it past _MAX_MAPS
    big = torch.zeros(200 * 256 * 64 * 2, dtype=torch.bfloat16)
    for i in range(tma_launch._MAX_MAPS + 5):
        t = big[i * 256 * 64 :].view(-1)[: 2 * 256 * 64].view(1, 2, 256, 64)
        launch_with(_desc(t, 128))
    assert all(len(m.maps) <= tma_launch._MAX_MAPS for m in _maps(fast))


def _kernel_args(call: tuple) -> list:
    """The kernel's (expanded) arguments of one C-launcher call: after the 13 base arguments on
    triton 3.6, the last argument (a sequence) on triton >= 3.7."""
    return list(call[-1]) if hasattr(nv, "expand_signature") else list(call[13:])


def _maps(fast):
    maps = fast.maps
    return list(maps.values()) if isinstance(maps, dict) else maps


def test_knob_off_uses_tritons_launcher(utils, monkeypatch):
    calls = []
    run = _launcher(calls)
    fast = tma_launch.fast_run(SimpleNamespace(run=run))
    q, k, v = _tensors()
    _call(fast, q, q, k, v)
    monkeypatch.setenv("ATTNFORGE_FAST_TMA_LAUNCH", "0")
    before = utils.encoded
    _call(fast, q, q, k, v)
    assert utils.encoded == before + 3  # Triton's expansion ran
    monkeypatch.setenv("ATTNFORGE_FAST_TMA_LAUNCH", "1")
    _call(fast, q, q, k, v)
    assert utils.encoded == before + 3


@pytest.mark.parametrize(
    "case", ["global_scratch", "profile_scratch", "no_meta", "im2col", "not_cuda", "plain",
             "changed_source"],
)  # fmt: skip
def test_fallback_keeps_tritons_launcher(utils, monkeypatch, case):
    calls = []
    attrs, metas = {}, None
    if case == "global_scratch":
        attrs["global_scratch_size"] = 16
    elif case == "profile_scratch":
        attrs["profile_scratch_size"] = 16
    elif case == "no_meta":
        metas = []
    elif case == "im2col":
        metas = [_meta(128), _meta(64), dict(_meta(64), is_im2col=True)]
    run = _launcher(calls, metas, **attrs)
    if case == "not_cuda":
        run = lambda *a: calls.append(a)  # noqa: E731
    elif case == "plain":
        run.launch = lambda *a: calls.append(a)
    elif case == "changed_source":
        monkeypatch.setattr(tma_launch, "_V36_INNER", ("something else",))
        monkeypatch.setattr(tma_launch, "_V39_INNER", ("something else",))
    assert tma_launch.fast_run(SimpleNamespace(run=run)) is run


def test_launcher_direct_path_uses_the_raw_launch(tmp_path, monkeypatch, utils):
    """Through ``loader.Launcher``: the first launch takes Triton's path, repeat launches (the
    Launcher's own direct launch and ``launch_planned``) go through the raw launch."""
    import test_direct_launch as tdl

    launcher, ran, base, x, y, kw = tdl._fake_setup(tmp_path, monkeypatch)
    calls = []
    fast_kernels = []
    jit_run = launcher.jit.run

    def run(*args, grid, warmup, **kwargs):  # Triton's path: a kernel with a CudaLauncher
        kernel = jit_run(*args, grid=grid, warmup=warmup, **kwargs)
        if not isinstance(kernel._run, nv.CudaLauncher):
            kernel._run = _launcher(calls, [_meta(128)], sig)
            fast_kernels.append(kernel)
        return kernel

    # the test kernel (X, Y, n, scale, flag, BLOCK) with Y a descriptor
    sig = {0: "*fp32", 1: "tensordesc<bf16[1,1,128,64]>", 2: "i32", 3: "fp32", 4: "i1",
           5: "constexpr"}  # fmt: skip
    launcher.jit.run = run
    q = _tensors()[0]
    args = (x, _desc(q, 128), 100, 0.5, True)
    launcher[(2,)](*args, BLOCK=128)
    assert ran[-1][0] == "triton" and not calls
    kernel = fast_kernels[0]
    before = utils.encoded
    launcher[(2,)](*args, BLOCK=128)  # direct
    assert len(calls) == 1 and utils.encoded == before + 1  # first raw launch: map encoded
    memo: dict = {}
    launcher.launch_planned((2,), args, {"BLOCK": 128}, memo)  # full path once (new memo)
    launcher.launch_planned((2,), args, {"BLOCK": 128}, memo)  # planned: addresses as ints
    assert len(calls) == 3 and utils.encoded == before + 1  # reused: nothing encoded
    planned = _kernel_args(calls[-1])
    assert planned[0] == x.data_ptr() and planned[1] == _kernel_args(calls[0])[1]
    assert len(planned) == 5 + 8 + 1  # the descriptor expanded to map, shape, strides
    # Triton's own wrapper passes the same
    function, packed = kernel.function, kernel.packed_metadata
    kernel._run(2, 1, 1, 1234, function, packed, None, None, None, x.data_ptr(), *args[1:], 128)
    assert calls[-1] == calls[-2]
    assert type(launcher._run_of(kernel)).__name__ in ("_Fast36", "_Fast39")


@pytest.mark.gpu
def test_gpu_raw_launch_matches_tritons_and_never_goes_stale(tmp_path, monkeypatch):
    """H100: the forward's direct launches use the raw launch (TMA descriptors), its outputs
    equal the knob-off launches bit for bit, also when freed inputs' addresses are reused for
    other data and when the plan's inputs change shape (new descriptors)."""
    import attnforge as af
    from attnforge.runtime import cache

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a TMA GPU (sm_90+)")
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNFORGE_FWD_WS", "0")  # these look at the Triton forward kernel
    monkeypatch.delenv("ATTNFORGE_FAST_TMA_LAUNCH", raising=False)
    cache.cache_clear()
    masks = {L: af.create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L, device="cuda")
             for L in (256, 384)}  # fmt: skip

    def run(seed, L, fast):
        monkeypatch.setenv("ATTNFORGE_FAST_TMA_LAUNCH", "1" if fast else "0")
        g = torch.Generator(device="cuda").manual_seed(seed)
        q, k, v = (torch.randn(2, 4, L, 64, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))  # fmt: skip
        return af.flex_attention(q, k, v, block_mask=masks[L]).clone()

    for seed, L in [(0, 256), (1, 256), (2, 256), (3, 384), (4, 256), (5, 384)] * 2:
        assert torch.equal(run(seed, L, True), run(seed, L, False)), (seed, L)
    launcher = next(iter(cache._memory.values()))["fwd"]._attn_fwd
    kinds = {type(fast).__name__ for _, fast in launcher._runs.values()}
    assert kinds & {"_Fast36", "_Fast39"}, kinds


def test_fast_environ_read_agrees_with_os_environ(monkeypatch):
    from attnforge.runtime import knobs

    get = knobs.environ_get_fast("ATTNFORGE_TEST_FAST_READ")
    monkeypatch.delenv("ATTNFORGE_TEST_FAST_READ", raising=False)
    assert get() is None
    for text in ("0", "1", " on ", "é"):
        monkeypatch.setenv("ATTNFORGE_TEST_FAST_READ", text)
        assert get() == os.environ.get("ATTNFORGE_TEST_FAST_READ") == text
    monkeypatch.delenv("ATTNFORGE_TEST_FAST_READ")
    assert get() is None


def test_knob_reader_agrees_with_knobs_get(monkeypatch):
    from attnforge.runtime import knobs

    name = "ATTNFORGE_FAST_TMA_LAUNCH"
    read = knobs.reader(name)
    monkeypatch.delenv(name, raising=False)
    assert read() is knobs.get(name) is True
    for text in ("0", "1", " on ", "off", "", "0", "yes"):
        monkeypatch.setenv(name, text)
        assert read() is knobs.get(name), text
    monkeypatch.setenv(name, "maybe")
    for get in (read, lambda: knobs.get(name)):
        with pytest.raises(ValueError, match="not a boolean"):
            get()
