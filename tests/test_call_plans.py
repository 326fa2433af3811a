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
