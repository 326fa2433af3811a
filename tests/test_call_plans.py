"""Per-call plans (``runtime/api.py``): a repeat call with the same key is served by the plan its
first call made (``launch._FwdPlan`` rebuilds only tensors and captured values).  These tests pin
that a plan is really used, and that nothing a user can change between calls is served stale:
block-mask objects, fields and contents, lengths, strides, GQA, captured values, grad mode; and
that bad input still raises after a plan exists."""

from __future__ import annotations

import gc

import pytest
import torch

import attnforge as af
from attnforge.runtime import api
from attnforge.runtime.reference import reference_attention


def _qkv(B=1, H=2, L=64, S=64, D=16, Hkv=None, grad=False):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, L, D, generator=g)
    k = torch.randn(B, Hkv or H, S, D, generator=g)
    v = torch.randn(B, Hkv or H, S, D, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _check(out, q, k, v, **kw):
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, **kw)
    torch.testing.assert_close(out.detach().double(), ref, atol=2e-5, rtol=1e-4)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@pytest.fixture
def full_path_calls(monkeypatch):
    """Counts calls that take the full path (the geometry check runs only there)."""
    calls = []
    original = api._geometry

    def geometry(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    monkeypatch.setattr(api, "_geometry", geometry)
    api._plans.clear()
    return calls


def test_repeat_call_is_served_by_its_plan(full_path_calls):
    q, k, v = _qkv()
    bm = af.create_block_mask(_causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=32)
    for _ in range(3):
        out = af.flex_attention(q, k, v, block_mask=bm)
        _check(out, q, k, v, block_mask=bm)
    assert len(full_path_calls) == 1
    # new tensors with the same shapes/strides: same plan, their own values
    q2, k2, v2 = (t * 2 for t in (q, k, v))
    _check(af.flex_attention(q2, k2, v2, block_mask=bm), q2, k2, v2, block_mask=bm)
    assert len(full_path_calls) == 1
    out, lse = af.flex_attention(q, k, v, block_mask=bm, return_lse=True)  # another key
    ref_out, ref_lse = reference_attention(
        *(t.double() for t in (q, k, v)), block_mask=bm, return_lse=True
    )
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-4)
    assert len(full_path_calls) == 2


def test_block_mask_object_fields_and_contents(full_path_calls):
    q, k, v = _qkv()
    bm = af.create_block_mask(_causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=32)
    _check(af.flex_attention(q, k, v, block_mask=bm), q, k, v, block_mask=bm)
    # in-place edit of the lists: the kernels read them, the plan stays
    bm.kv_num_blocks.zero_()
    if bm.full_kv_num_blocks is not None:
        bm.full_kv_num_blocks.zero_()
    out = af.flex_attention(q, k, v, block_mask=bm)
    assert torch.count_nonzero(out) == 0  # every block skipped: rows of zeros
    # a reassigned field: a new plan
    other = af.create_block_mask(lambda b, h, i, j: i >= j + 8, None, None, 64, 64,
                                 device="cpu", BLOCK_SIZE=32)  # fmt: skip
    bm.kv_num_blocks, bm.kv_indices = other.kv_num_blocks, other.kv_indices
    bm.full_kv_num_blocks, bm.full_kv_indices = other.full_kv_num_blocks, other.full_kv_indices
    bm.mask_mod = other.mask_mod
    _check(af.flex_attention(q, k, v, block_mask=bm), q, k, v, block_mask=other)
    # a new block mask object
    _check(af.flex_attention(q, k, v, block_mask=other), q, k, v, block_mask=other)
    assert len(full_path_calls) == 3


def test_plans_go_with_their_block_mask():
    q, k, v = _qkv()
    api._plans.clear()
    bm = af.create_block_mask(_causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=32)
    af.flex_attention(q, k, v, block_mask=bm)
    assert any(key[13] == id(bm) for key in api._plans)
    del bm
    gc.collect()
    assert not api._plans


def test_lengths_strides_gqa_and_dtypes(full_path_calls):
    bm = af.create_block_mask(_causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=32)
    q, k, v = _qkv()
    _check(af.flex_attention(q, k, v, block_mask=bm), q, k, v, block_mask=bm)
    # non-contiguous inputs of the same shape (other strides): another plan, right values
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert qt.stride() != q.stride()
    for _ in range(2):
        _check(af.flex_attention(qt, kt, vt, block_mask=bm), qt, kt, vt, block_mask=bm)
    # a new length
    q3, k3, v3 = _qkv(L=40, S=40)
    for _ in range(2):
        _check(af.flex_attention(q3, k3, v3), q3, k3, v3)
    # GQA (4 query heads on 2 kv heads)
    qg, kg, vg = _qkv(H=4, Hkv=2)
    for _ in range(2):
        out = af.flex_attention(qg, kg, vg, block_mask=bm, enable_gqa=True)
        _check(out, qg, kg, vg, block_mask=bm, enable_gqa=True)
    # another dtype
    qh, kh, vh = (t.to(torch.float64) for t in (q, k, v))
    with pytest.raises(ValueError, match="dtype"):
        af.flex_attention(qh, kh, vh, block_mask=bm)
    assert len(full_path_calls) == 5


def test_plan_outputs_are_laid_out_as_the_full_paths(full_path_calls):
    """A repeat call allocates out/lse from the recorded sizes and strides (``empty_strided``):
    fresh tensors every call, laid out exactly as the full path's, never shared."""
    bm = af.create_block_mask(_causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=32)
    cases = (
        dict(B=2, H=3, L=64, S=64, D=16),
        dict(B=1, H=4, L=1, S=64, D=8, Hkv=2),  # size-1 dims (strides torch.empty picks)
    )
    for shape in cases:
        q, k, v = _qkv(**shape)
        kw = dict(block_mask=bm if shape["L"] == 64 else None, return_lse=True)
        kw["enable_gqa"] = "Hkv" in shape
        first, first_lse = kept = af.flex_attention(q, k, v, **kw)
        for _ in range(2):
            out, lse = af.flex_attention(q, k, v, **kw)
            for new, ref in ((out, first), (lse, first_lse)):
                assert (new.shape, new.stride(), new.dtype, new.device) == (
                    ref.shape, ref.stride(), ref.dtype, ref.device)  # fmt: skip
                assert new.is_contiguous() and new.storage_offset() == 0
            assert torch.equal(out, first) and torch.equal(lse, first_lse)
            kept += (out, lse)
        assert len({t.data_ptr() for t in kept}) == len(kept)  # all alive: never shared
    assert len(full_path_calls) == len(cases)


def test_captured_values_reread_through_the_plan(full_path_calls):
    q, k, v = _qkv()
    bias = torch.randn(2)
    window = 16

    def score(score, b, h, q_idx, kv_idx):
        return score + bias[h]

    def mask(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx <= window) & (q_idx >= kv_idx)

    bm = af.create_block_mask(mask, None, None, 64, 64, device="cpu", BLOCK_SIZE=32)
    _check(af.flex_attention(q, k, v, score_mod=score, block_mask=bm), q, k, v,
           score_mod=score, block_mask=bm)  # fmt: skip
    bias.mul_(-3)  # in place
    _check(af.flex_attention(q, k, v, score_mod=score, block_mask=bm), q, k, v,
           score_mod=score, block_mask=bm)  # fmt: skip
    bias = torch.randn(2) * 5  # a new tensor object in the closure
    _check(af.flex_attention(q, k, v, score_mod=score, block_mask=bm), q, k, v,
           score_mod=score, block_mask=bm)  # fmt: skip
    window = 4  # the mask mod's scalar (the block lists stay: partial blocks apply the mod)
    _check(af.flex_attention(q, k, v, score_mod=score, block_mask=bm), q, k, v,
           score_mod=score, block_mask=bm)  # fmt: skip
    assert len(full_path_calls) == 1
    bias = torch.ones(2, dtype=torch.float64)  # another dtype: re-traced, as on the full path
    _check(af.flex_attention(q, k, v, score_mod=score, block_mask=bm), q, k, v,
           score_mod=score, block_mask=bm)  # fmt: skip


def test_bad_input_still_raises_once_a_plan_exists():
    q, k, v = _qkv()
    af.flex_attention(q, k, v)
    with pytest.raises(ValueError, match="4-D"):
        af.flex_attention(q[0], k, v)
    with pytest.raises(ValueError, match="same number of heads"):
        af.flex_attention(q, k[:, :1], v[:, :1])
    bm = af.create_block_mask(_causal, None, None, 32, 32, device="cpu", BLOCK_SIZE=32)
    with pytest.raises(ValueError, match="block_mask was created"):
        af.flex_attention(q, k, v, block_mask=bm)


def test_grad_mode_and_gradients_through_the_plan(full_path_calls):
    q, k, v = _qkv(grad=True)
    bm = af.create_block_mask(_causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=32)
    with torch.no_grad():
        af.flex_attention(q, k, v, block_mask=bm)
    for _ in range(2):
        out = af.flex_attention(q, k, v, block_mask=bm)
        assert out.requires_grad
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = reference_attention(qq, kk, vv, block_mask=bm)
        for got, want in zip((dq, dk, dv), torch.autograd.grad(ref.sum(), (qq, kk, vv))):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-3)
    assert len(full_path_calls) == 1


def test_variant_calls_are_planned(full_path_calls):
    attn = af.variant(score_mod=lambda s, b, h, i, j: s * 0.5, mask_mod=_causal, block_size=32)
    q, k, v = _qkv()
    for _ in range(3):
        out = attn(q, k, v)
    bm = attn.block_mask(64, 64)
    _check(out, q, k, v, score_mod=lambda s, b, h, i, j: s * 0.5, block_mask=bm)
    assert len(full_path_calls) == 1


def test_tma_plan_follows_address_alignment(tma_descriptor_calls):
    # USE_TMA forced (the interpreter runs descriptors too): a plan recorded with aligned inputs
    # must not hand a misaligned view to TMA, and the reverse; values checked every time
    descs = tma_descriptor_calls
    api._plans.clear()
    g = torch.Generator().manual_seed(4)
    base = torch.randn(3 * 2 * 40 * 32 + 8, generator=g)
    opts = {"USE_TMA": True}

    def view(offset):  # same shape and strides, the base moved by `offset` floats
        return [
            base[offset + i * 2 * 40 * 32 :][: 2 * 40 * 32].view(1, 2, 40, 32) for i in range(3)
        ]

    for offset, tma in ((0, True), (1, False), (4, True), (2, False)):
        before = len(descs)
        q, k, v = view(offset)
        out = af.flex_attention(q, k, v, kernel_options=opts)
        _check(out, q, k, v)
        assert (len(descs) > before) == tma, (offset, tma)


@pytest.fixture
def full_backwards(monkeypatch):
    """Counts backwards that take the full path (launch._bwd_kernels runs only there)."""
    from attnforge.runtime import launch

    calls = []
    original = launch._bwd_kernels

    def kernels(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    monkeypatch.setattr(launch, "_bwd_kernels", kernels)
    api._plans.clear()
    return calls


def _ref_grads(q, k, v, wrt, loss, **kw):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, **kw)
    return torch.autograd.grad(loss(ref), [leaves[i] for i in wrt])


@pytest.mark.parametrize(
    "options", [{}, {"DQ_ATOMIC": True}, {"USE_TMA": True}, {"BLOCK_M1": 16, "BLOCK_N2": 16}]
)
def test_backward_plan_replays_with_new_values(full_backwards, options):
    # a repeat backward of a plan launches the recorded kernels: new tensors, a changed scalar
    # and tensor the mods capture, another loss, each checked against float64 autograd
    q, k, v = _qkv(L=40, S=72, D=24, Hkv=1, grad=True)
    slope, bias = 0.5, torch.randn(2)

    def score(s, b, h, q_idx, kv_idx):
        return s + slope * bias[h]

    bm = af.create_block_mask(_causal, None, None, 40, 72, device="cpu", BLOCK_SIZE=32)
    kw = dict(score_mod=score, block_mask=bm, enable_gqa=True)
    losses = [lambda o: o.sum(), lambda o: (o * o.detach().flip(-1)).sum(),
              lambda o: o.transpose(-1, -2).contiguous().pow(2).sum()]  # fmt: skip
    for step in range(4):
        loss = losses[step % 3]
        out = af.flex_attention(q, k, v, kernel_options=options, **kw)
        got = torch.autograd.grad(loss(out), (q, k, v))
        for g, want in zip(got, _ref_grads(q, k, v, (0, 1, 2), loss, **kw)):
            torch.testing.assert_close(g.double(), want, atol=2e-4, rtol=1e-3)
        slope, bias = slope + 0.25, bias.flip(0)  # new captured values
        q, k, v = (t.detach().mul(1.5).requires_grad_() for t in (q, k, v))
    assert len(full_backwards) == 1


def test_backward_plan_per_wanted_gradient(full_backwards):
    # which grads are wanted (dq or not, the lse's) picks the recorded plan: one per kind
    q, k, v = _qkv(L=33, S=33, D=16, grad=True)
    bm = af.create_block_mask(_causal, None, None, 33, 33, device="cpu", BLOCK_SIZE=32)
    q_frozen = q.detach()
    for _ in range(2):
        out, lse = af.flex_attention(q, k, v, block_mask=bm, return_lse=True)
        got = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, ref_lse = reference_attention(q64, k64, v64, block_mask=bm, return_lse=True)
        want = torch.autograd.grad(ref.sum() + ref_lse.sum(), (q64, k64, v64))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, atol=2e-4, rtol=1e-3)
        out = af.flex_attention(q_frozen, k, v, block_mask=bm)
        got = torch.autograd.grad(out.sum(), (k, v))
        want = _ref_grads(q_frozen, k, v, (1, 2), lambda o: o.sum(), block_mask=bm)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, atol=2e-4, rtol=1e-3)
    assert len(full_backwards) == 2


def test_backward_plan_not_used_for_captured_tensor_grads(full_backwards):
    q, k, v = _qkv(L=32, S=32, D=16, grad=True)
    bias = torch.zeros(2, requires_grad=True)

    def score(s, b, h, q_idx, kv_idx):
        return s + bias[h]

    for _ in range(2):
        out = af.flex_attention(q, k, v, score_mod=score)
        (g_bias,) = torch.autograd.grad(out.pow(2).sum(), (bias,))
        b64 = bias.detach().double().requires_grad_()
        ref = reference_attention(*(t.detach().double() for t in (q, k, v)),
                                  score_mod=lambda s, b, h, i, j, b64=b64: s + b64[h])  # fmt: skip
        (want,) = torch.autograd.grad(ref.pow(2).sum(), (b64,))
        torch.testing.assert_close(g_bias.double(), want, atol=2e-4, rtol=1e-3)
    assert len(full_backwards) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"DQ_ATOMIC": True}, {"DQ_ATOMIC": True, "DQ_TMA": False}])
@pytest.mark.parametrize("D", [64, 128, 80])
def test_gpu_backward_plan_replays(options, D):
    # the raw backward launches on the GPU: repeat backwards of one plan (new inputs, a changed
    # captured scalar and tensor each time) against float64 autograd, bf16 tolerance
    api._plans.clear()
    g = torch.Generator(device="cuda").manual_seed(5)
    L, S = 257, 300
    slope, bias = 0.5, torch.randn(4, device="cuda", generator=g)

    def score(s, b, h, q_idx, kv_idx):
        return s + slope * bias[h]

    bm = af.create_block_mask(_causal, None, None, L, S, device="cuda")
    kw = dict(score_mod=score, block_mask=bm, enable_gqa=True)
    for step in range(5):
        q = torch.randn(2, 4, L, D, device="cuda", generator=g, dtype=torch.bfloat16)
        k, v = (torch.randn(2, 2, S, D, device="cuda", generator=g, dtype=torch.bfloat16)
                for _ in range(2))  # fmt: skip
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        d_out = torch.randn(2, 4, L, D, device="cuda", generator=g, dtype=torch.bfloat16)
        out = af.flex_attention(q, k, v, kernel_options=options, **kw)
        got = torch.autograd.grad(out, (q, k, v), d_out)
        want = _ref_grads(q, k, v, (0, 1, 2), lambda o, d=d_out: (o * d.double()).sum(), **kw)
        for a, b in zip(got, want):
            err = (a.double() - b).abs().max().item()
            assert err <= 6e-2 * (1 + b.abs().max().item()), (step, err)
        slope, bias = slope + 0.25, bias.flip(0)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("masked", [True, False])
def test_gpu_planned_call_gives_the_same_out(D, masked):
    # no grad, no lse returned: the per-call plan's raw launches after the first repeats, new
    # inputs every call, bit-equal to a call that returns lse
    api._plans.clear()
    g = torch.Generator(device="cuda").manual_seed(7)
    bm = af.create_block_mask(_causal, None, None, 256, 256, device="cuda") if masked else None
    with torch.no_grad():
        for _ in range(6):
            q, k, v = (torch.randn(2, 3, 256, D, device="cuda", generator=g, dtype=torch.bfloat16)
                       for _ in range(3))  # fmt: skip
            out = af.flex_attention(q, k, v, block_mask=bm)
            ref, lse = af.flex_attention(q, k, v, block_mask=bm, return_lse=True)
            assert torch.equal(out, ref) and torch.isfinite(lse).all()
