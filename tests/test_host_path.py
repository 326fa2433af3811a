"""The per-call host path memoises geometry checks, lowering, tile configs and block-list
arguments (``bench/bench_host_overhead.py``).  These tests pin that nothing a user can change
between two calls is served stale: captured scalars and tensors, baked flags (re-trace),
scale, kernel_options, shapes, block-mask fields."""

from __future__ import annotations

import pytest
import torch

import attnforge as af
from attnforge.runtime import launch
from attnforge.runtime.reference import reference_attention


def _qkv(B=1, H=2, L=64, S=64, D=16, Hkv=None):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, L, D, generator=g)
    k = torch.randn(B, Hkv or H, S, D, generator=g)
    v = torch.randn(B, Hkv or H, S, D, generator=g)
    return q, k, v


def _check(out, q, k, v, **kw):
    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, **kw)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def _softcap_with_setter():
    cap = 20.0

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    def set_cap(value):
        nonlocal cap
        cap = value

    return softcap, set_cap


def test_captured_scalar_is_reread_on_the_same_function_object():
    q, k, v = _qkv()
    softcap, set_cap = _softcap_with_setter()
    first = af.flex_attention(q, k, v, score_mod=softcap)
    _check(first, q, k, v, score_mod=softcap)
    set_cap(0.5)  # same function object, new captured value
    second = af.flex_attention(q, k, v, score_mod=softcap)
    _check(second, q, k, v, score_mod=softcap)
    assert not torch.allclose(first, second, atol=1e-3)


_BIAS = torch.zeros(64)


def _global_bias(score, b, h, q_idx, kv_idx):
    return score + _BIAS[kv_idx]


def test_captured_tensor_rebound_and_edited_in_place():
    global _BIAS
    q, k, v = _qkv()
    outs = []
    for step in range(3):
        if step == 1:
            _BIAS = torch.linspace(-2.0, 2.0, 64)  # rebound global: a new tensor
        if step == 2:
            _BIAS.mul_(-1.0)  # edited in place
        out = af.flex_attention(q, k, v, score_mod=_global_bias)
        _check(out, q, k, v, score_mod=_global_bias)
        outs.append(out)
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)
    assert not torch.allclose(outs[1], outs[2], atol=1e-3)
    _BIAS = torch.zeros(64)


def test_baked_flag_flip_retraces_through_the_memos():
    q, k, v = _qkv()
    use_bias = True

    def maybe_bias(score, b, h, q_idx, kv_idx):
        if use_bias:  # Python branches on it: baked into the structure and guarded
            return score + (q_idx - kv_idx) * 0.05
        return score

    with_bias = af.flex_attention(q, k, v, score_mod=maybe_bias)
    _check(with_bias, q, k, v, score_mod=maybe_bias)
    use_bias = False
    plain = af.flex_attention(q, k, v, score_mod=maybe_bias)
    _check(plain, q, k, v)
    assert not torch.allclose(with_bias, plain, atol=1e-3)


def test_variant_mask_scalar_is_reread():
    q, k, v = _qkv()
    window = 8

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    attn = af.variant(mask_mod=sliding, block_size=16)
    for w in (8, 40):
        window = w
        out = attn(q, k, v)
        bm = af.create_block_mask(sliding, None, None, 64, 64, BLOCK_SIZE=16)
        _check(out, q, k, v, block_mask=bm)


def test_scale_and_kernel_options_change_between_calls():
    q, k, v = _qkv()
    _check(af.flex_attention(q, k, v), q, k, v)
    _check(af.flex_attention(q, k, v, scale=0.3), q, k, v, scale=0.3)
    out = af.flex_attention(q, k, v, kernel_options={"BLOCK_M": 32, "BLOCK_N": 16})
    _check(out, q, k, v)
    with pytest.raises(ValueError, match="BLOCK_M"):
        af.flex_attention(q, k, v, kernel_options={"BLOCK_M": 48})


def test_shape_errors_after_a_good_call():
    q, k, v = _qkv(H=4, Hkv=2)
    _check(af.flex_attention(q, k, v, enable_gqa=True), q, k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        af.flex_attention(q, k, v)  # same tensors, memoised geometry: still rejected
    with pytest.raises(ValueError, match="head dim"):
        af.flex_attention(q, k[..., :8], v, enable_gqa=True)
    bm = af.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 64, 64)
    af.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    q2, k2, v2 = _qkv(H=4, Hkv=2, L=32, S=32)
    with pytest.raises(ValueError, match="create a block mask"):
        af.flex_attention(q2, k2, v2, block_mask=bm, enable_gqa=True)


def test_block_list_arguments_follow_reassigned_fields():
    causal = af.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None,
                                  256, 256)  # fmt: skip
    tensors, strides, has_full = launch._block_args(causal, launch.kv_block_lists)
    assert tensors[0] is causal.kv_num_blocks and has_full
    assert launch._block_args(causal, launch.kv_block_lists)[0] is tensors  # memoised
    causal.full_kv_num_blocks = causal.full_kv_indices = None
    tensors, strides, has_full = launch._block_args(causal, launch.kv_block_lists)
    assert not has_full and tensors[2] is causal.kv_num_blocks  # PARTIAL lists as dummies


@pytest.mark.parametrize("L, S", [(1, 1), (100, 300), (256, 128), (1000, 1024)])
def test_full_plan_transposes_equal_the_lazy_ones(L, S):
    """The all-FULL plan ships its transposed lists (no GPU sort/search and no sync on the first
    backward); they must be exactly what BlockMask computes from the kv lists."""
    from attnforge.runtime import api
    from attnforge.runtime.blockmask import BlockMask

    plan = api._full_plan(L, S, torch.device("cpu"))
    lazy = BlockMask(
        plan.seq_lengths, plan.kv_num_blocks, plan.kv_indices, plan.full_kv_num_blocks,
        plan.full_kv_indices, BLOCK_SIZE=plan.BLOCK_SIZE, _ascending=True,
    )  # fmt: skip
    for name in ("q_num_blocks", "q_indices"):
        assert torch.equal(getattr(plan, name), getattr(lazy, name)), name
    assert plan.q_indices.dtype == torch.int32
    # every block listed once, in the PARTIAL lists (no FULL lists: one block loop to compile)
    assert plan.full_kv_num_blocks is None and plan.full_q_num_blocks is None
    assert lazy.full_q_num_blocks is None


def test_full_plan_backward_matches_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 100, 16, requires_grad=True) for _ in range(3))
    out = af.flex_attention(q, k, v)
    ref = reference_attention(*(t.double() for t in (q, k, v)))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)
