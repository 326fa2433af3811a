"""Raw planned launches (``loader._RawPlanned``): a repeat call of a per-call plan on the GPU path
is one call of Triton's C launcher with an argument template.  CPU only, through the fake GPU of
``tests/fake_gpu.py`` (Triton's real binder, ``CudaLauncher`` and descriptor wrapper around a
recording C launcher): every raw launch must pass exactly what Triton's own launch path
(``ATTNFORGE_DIRECT_LAUNCH=0``) passes for the same call, and the raw launch must step aside
whenever something its template fixed may have changed."""

from __future__ import annotations

import pytest
import torch

import attnforge as af
from attnforge.runtime import api, cache, loader

_driver = pytest.importorskip("triton.backends.nvidia.driver")
fake_gpu = pytest.importorskip("fake_gpu")
if getattr(_driver, "_BASE_ARGS_FORMAT_LEN", None) != 13:  # the raw launch is Triton 3.5-3.6's
    pytest.skip("this Triton's C launcher has no raw planned launch (Triton 3.5-3.6 only)",
                allow_module_level=True)  # fmt: skip

_OUT, _LSE = 13 + 3, 13 + 4  # C-launcher positions of out and lse (after 13 base arguments)


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """``(launches, raw)``: the C launcher's calls and the raw launches that launched."""
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path))
    for knob in ("ATTNFORGE_DIRECT_LAUNCH", "ATTNFORGE_FAST_TMA_LAUNCH", "ATTNFORGE_FWD_WS"):
        monkeypatch.delenv(knob, raising=False)
    cache.cache_clear()
    api._plans.clear()
    launches = fake_gpu.install(monkeypatch.setattr, aligned=True)
    raw = []
    launch = loader._RawPlanned.launch

    def counted(self, *a):
        done = launch(self, *a)
        raw.append(done)
        return done

    monkeypatch.setattr(loader._RawPlanned, "launch", counted)
    yield launches, raw
    cache.cache_clear()
    api._plans.clear()


def _plain(args: tuple) -> list:
    return [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]


def _qkv(seed=0, L=128, D=64, offset=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3 * L * D + offset, generator=g).to(torch.bfloat16)
    return [base[offset + i * L * D :][: L * D].view(1, 1, L, D) for i in range(3)]


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _warm(call) -> None:
    """The full path, the plan's first launch (Triton's key looked up), its first direct launch
    (which makes the raw launch)."""
    with torch.no_grad():
        for _ in range(3):
            call()


def _check(gpu, monkeypatch, call, *, raw: bool, times: int = 4):
    """Run ``call`` (returns out, lse) ``times`` times, each the default way and then through
    Triton's launch path: the C launcher must get the same arguments (out/lse: the ones each
    returned).  ``raw``: some default call (True) or none (False) was a raw launch."""
    launches, raws = gpu
    raws.clear()
    for _ in range(times):
        with torch.no_grad():
            out, lse = call()
        got = _plain(launches[-1])
        assert got[_OUT] == out.data_ptr() and got[_LSE] == lse.data_ptr()
        monkeypatch.setenv("ATTNFORGE_DIRECT_LAUNCH", "0")
        with torch.no_grad():
            out, lse = call()
        monkeypatch.delenv("ATTNFORGE_DIRECT_LAUNCH")
        want = _plain(launches[-1])
        assert want[_OUT] == out.data_ptr() and want[_LSE] == lse.data_ptr()
        got[_OUT], got[_LSE], want[_OUT], want[_LSE] = 0, 0, 0, 0
        assert got == want
    assert (True in raws) == raw, raws


def test_raw_launch_passes_what_tritons_launch_passes(gpu, monkeypatch):
    bm = af.create_block_mask(_causal, None, None, 128, 128, device="cpu")

    def call(q, k, v):
        return lambda: af.flex_attention(q, k, v, block_mask=bm, return_lse=True)

    q, k, v = _qkv()
    _warm(call(q, k, v))
    launcher = next(iter(cache._memory.values()))["fwd"]._attn_fwd
    assert {type(f).__name__ for _, f in launcher._runs.values()} == {"_Fast36"}
    _check(gpu, monkeypatch, call(q, k, v), raw=True)
    # new tensors, new addresses (new descriptor maps): raw, with their own addresses
    for seed in (1, 2, 3):
        _check(gpu, monkeypatch, call(*_qkv(seed)), raw=True)
    # another alignment class (64 bytes off, still TMA-aligned): a new specialisation key, so
    # launch_planned, then raw; 8 bytes off: the kernel without TMA (no descriptors), raw too
    for offset in (32, 4):
        _check(gpu, monkeypatch, call(*_qkv(4, offset=offset)), raw=True, times=6)
    _check(gpu, monkeypatch, call(q, k, v), raw=True)


def test_raw_launch_steps_aside(gpu, monkeypatch):
    from triton import knobs

    bm = af.create_block_mask(_causal, None, None, 128, 128, device="cpu")
    q, k, v = _qkv()

    def call():
        return af.flex_attention(q, k, v, block_mask=bm, return_lse=True)

    _warm(call)
    _check(gpu, monkeypatch, call, raw=True)
    monkeypatch.setenv("ATTNFORGE_FAST_TMA_LAUNCH", "0")  # Triton's descriptor expansion
    _check(gpu, monkeypatch, call, raw=False)
    monkeypatch.setenv("ATTNFORGE_FAST_TMA_LAUNCH", "1")
    _check(gpu, monkeypatch, call, raw=True)
    hook = lambda *a: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        _check(gpu, monkeypatch, call, raw=False)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    # a block list's storage moved under the same tensor object (its address is in the template)
    bm.kv_indices.set_(bm.kv_indices.clone())
    _check(gpu, monkeypatch, call, raw=False, times=1)
    _check(gpu, monkeypatch, call, raw=True)
    # moved within its alignment class (as CUDA's 512-byte allocations always are): the same
    # launch key, so the raw launch kept for it must be made anew, not kept failing
    old = bm.kv_indices
    buf = torch.empty(old.numel() + 64, dtype=old.dtype)
    skip = ((old.data_ptr() - buf.data_ptr()) % 128) // old.element_size()
    same = buf[skip : skip + old.numel()].view(old.shape).copy_(old)
    assert same.data_ptr() & 127 == old.data_ptr() & 127 and same.data_ptr() != old.data_ptr()
    old.set_(same)
    _check(gpu, monkeypatch, call, raw=False, times=1)
    _check(gpu, monkeypatch, call, raw=True)
    monkeypatch.setattr(loader, "_knobs_module", None)  # unknown launch convention
    _check(gpu, monkeypatch, call, raw=False)


def test_raw_launch_with_captured_values(gpu, monkeypatch):
    slopes = torch.linspace(0.1, 1.0, 2)
    window = 32

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    bm = af.create_block_mask(_causal, None, None, 128, 128, device="cpu")
    bm.mask_mod = sliding  # partial blocks apply the mod (its window is a kernel argument)
    q, k, v = (t.expand(1, 2, 128, 64).contiguous() for t in _qkv())

    def call():
        return af.flex_attention(q, k, v, score_mod=alibi, block_mask=bm, return_lse=True)

    _warm(call)
    _check(gpu, monkeypatch, call, raw=True)
    slopes = torch.linspace(-1.0, 1.0, 2)  # a new captured tensor: its address in the tail
    _check(gpu, monkeypatch, call, raw=True)
    window = 16  # a new int (Triton specialises ints): launch_planned, then raw
    _check(gpu, monkeypatch, call, raw=False, times=1)
    _check(gpu, monkeypatch, call, raw=True)
    window = 32
    _check(gpu, monkeypatch, call, raw=True)


# C-launcher positions (after the 13 base arguments) of the tensors a backward allocates: the
# dQ kernel's dq and delta (or the preprocess kernel's delta), then the dK/dV kernel's dk, dv,
# delta and dQ accumulator
_BWD_FRESH = {"dq": (13 + 5, 13 + 7), "pre": (13 + 3,), "dkdv": (13 + 4, 13 + 5, 13 + 7, 13 + 8)}


@pytest.mark.parametrize("options", [{}, {"DQ_ATOMIC": True}])
def test_backward_plan_launches_raw(gpu, monkeypatch, options):
    # a repeat backward of a plan: one raw C-launcher call per kernel, passing what Triton's
    # launch path passes for the same backward (allocated buffers aside)
    launches, raws = gpu
    window = 32

    def mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    bm = af.create_block_mask(mask, None, None, 128, 128, device="cpu")
    q, k, v = (t.requires_grad_() for t in _qkv())

    def backward(out, d_out) -> list:
        before = len(launches)
        torch.autograd.grad(out, (q, k, v), d_out, retain_graph=True)
        assert len(launches) == before + 2
        return [_plain(a) for a in launches[before:]]

    # (the block mask as given: finer dK/dV lists depend on the window, so a new window would
    # take the full path once, tests/test_refine.py)
    options = {**options, "REFINE_BLOCKS": False}
    for step in range(7):
        out = af.flex_attention(q, k, v, block_mask=bm, kernel_options=options)
        d_out = torch.empty_like(out).normal_()  # (aligned, as CUDA allocations)
        raws.clear()
        got = backward(out, d_out)
        # replays: the first finds Triton's kernel, the second makes the raw launch; a new int
        # value (step 4) takes launch_planned twice again
        assert raws == ([True, True] if step in (3, 6) else []), step
        monkeypatch.setenv("ATTNFORGE_DIRECT_LAUNCH", "0")
        want = backward(out, d_out)
        monkeypatch.delenv("ATTNFORGE_DIRECT_LAUNCH")
        atomic = options.get("DQ_ATOMIC", False)
        kernels = ("pre" if atomic else "dq", "dkdv")  # (dQ by atomics: no dQ kernel)
        for g, w, name in zip(got, want, kernels):
            for i in _BWD_FRESH[name]:
                g[i] = w[i] = 0
            assert g == w
        window = 32 if step < 3 else 64  # a new int value: launch_planned once, then raw
