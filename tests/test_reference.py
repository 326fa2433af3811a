"""The dense reference against torch's FlexAttention (CPU eager) and against itself."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask
from torch.nn.attention.flex_attention import create_mask as torch_create_mask
from torch.nn.attention.flex_attention import flex_attention

from attnforge.dsl import ir
from attnforge.dsl.mod import Mod, Param
from attnforge.runtime.reference import create_mask, reference_attention

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:return_lse is deprecated:FutureWarning")


def _qkv(B=1, Hq=2, Hkv=2, L=17, S=17, E=16, Ev=16, Bk=None):
    q = torch.randn(B, Hq, L, E, dtype=F64)
    k = torch.randn(Bk or B, Hkv, S, E, dtype=F64)
    v = torch.randn(Bk or B, Hkv, S, Ev, dtype=F64)
    return q, k, v


# -- mods written FlexAttention-style --------------------------------------------------------------


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 5)


def alibi(score, b, h, q_idx, kv_idx):
    slope = torch.exp2(-(h + 1).to(score.dtype))
    return score - slope * (q_idx - kv_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return 2.0 * torch.tanh(score / 2.0)


DOC = torch.tensor([0] * 5 + [1] * 100 + [2] * 200)


def document(b, h, q_idx, kv_idx):
    return DOC[q_idx] == DOC[kv_idx]


CASES = {
    "noop": (None, None),
    "causal": (None, causal),
    "alibi_causal": (alibi, causal),
    "softcap": (softcap, None),
    "sliding_window": (None, sliding_window),
    "document": (softcap, document),
}


@pytest.mark.parametrize("length", [1, 17, 257])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_flex_attention(case, length):
    score_mod, mask_fn = CASES[case]
    q, k, v = _qkv(L=length, S=length)
    bm = None
    if mask_fn is not None:
        bm = torch_block_mask(mask_fn, None, None, length, length, device="cpu", BLOCK_SIZE=16)
    want, want_lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, return_lse=True)
    got, lse = reference_attention(q, k, v, score_mod=score_mod, block_mask=bm, return_lse=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lse, want_lse.to(F64))


def test_block_mask_equals_direct_mask_mod():
    q, k, v = _qkv(L=40, S=33)
    bm = torch_block_mask(sliding_window, None, None, 40, 33, device="cpu", BLOCK_SIZE=8)
    via_blocks = reference_attention(q, k, v, block_mask=bm)
    direct = reference_attention(q, k, v, mask_mod=sliding_window)
    torch.testing.assert_close(via_blocks, direct)


def test_block_lists_decide_full_and_empty_blocks():
    # Full blocks skip mask_mod and unlisted blocks are masked, whatever mask_mod says.
    q, k, v = _qkv(L=32, S=32)
    bm = torch_block_mask(causal, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    bm.mask_mod = lambda b, h, q_idx, kv_idx: q_idx < 0  # drops every partial element
    got = reference_attention(q, k, v, block_mask=bm)
    block_rule = (torch.arange(32)[:, None] // 16) > (torch.arange(32)[None, :] // 16)
    rows_alive = block_rule.any(-1)
    want = reference_attention(q, k, v, mask_mod=lambda b, h, i, j: block_rule[i, j])
    torch.testing.assert_close(got, want)
    assert (got[:, :, ~rows_alive] == 0).all()


def test_gqa_ev_and_per_head_block_mask():
    q, k, v = _qkv(B=2, Hq=4, Hkv=2, L=33, S=20, E=8, Ev=12)

    def head_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx <= 3 + 4 * h) & (kv_idx <= q_idx + b)

    bm = torch_block_mask(head_window, 2, 4, 33, 20, device="cpu", BLOCK_SIZE=8)
    want, want_lse = flex_attention(
        q, k, v, score_mod=alibi, block_mask=bm, enable_gqa=True, return_lse=True
    )
    got, lse = reference_attention(
        q, k, v, score_mod=alibi, block_mask=bm, enable_gqa=True, return_lse=True
    )
    assert got.shape == (2, 4, 33, 12)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lse, want_lse.to(F64))


def test_scale_and_kv_batch_broadcast():
    q, k, v = _qkv(B=3, Bk=1, L=9, S=11)
    got = reference_attention(q, k, v, scale=0.3)
    kk, vv = k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1)
    want = torch.softmax(q @ kk.transpose(-1, -2) * 0.3, dim=-1) @ vv
    torch.testing.assert_close(got, want)


def test_gradients_match_naive_softmax():
    # FlexAttention has no CPU backward, so compare against textbook autograd math instead.
    q, k, v = _qkv(L=19, S=23)
    keep = create_mask(causal, None, None, 19, 23) | (torch.arange(23) == 0)

    def naive(q, k, v):
        s = softcap(q @ k.transpose(-1, -2) / 4.0, None, None, None, None)
        s = s.masked_fill(~keep, -math.inf)
        return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)

    def ours(q, k, v):
        mask = lambda b, h, i, j: keep[0, 0, i, j]  # noqa: E731
        return reference_attention(q, k, v, score_mod=softcap, mask_mod=mask, return_lse=True)

    grads = []
    for fn in (naive, ours):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        (out.square().sum() + lse.sum()).backward()
        grads.append([t.grad for t in leaves])
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want)


# -- fully masked rows ---------------------------------------------------------------------------


def _late_start(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx >= 3)  # rows 0..2 see nothing


@pytest.mark.parametrize("use_lse", ["no", "raw", "guarded"])
@pytest.mark.parametrize("via", ["mask_mod", "block_mask"])
def test_fully_masked_rows(use_lse, via):
    q, k, v = (t.requires_grad_() for t in _qkv(L=9, S=9))
    kwargs = {"mask_mod": _late_start}
    if via == "block_mask":
        kwargs = {"block_mask": torch_block_mask(_late_start, None, None, 9, 9, "cpu", 4)}
    out, lse = reference_attention(q, k, v, score_mod=softcap, return_lse=True, **kwargs)
    assert (out[:, :, :3] == 0).all()
    assert torch.isneginf(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 3:]).all()
    loss = out.sum()
    if use_lse == "raw":  # the loss is -inf, yet every gradient stays finite
        loss = loss + lse.sum()
    elif use_lse == "guarded":
        loss = loss + torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum()
    loss.backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, :3] == 0).all()


def test_gradcheck_tiny():
    q, k, v = (t.requires_grad_() for t in _qkv(L=4, S=5, E=3, Ev=2))

    def f(q, k, v):
        out, lse = reference_attention(
            q, k, v, score_mod=softcap, mask_mod=_late_start, return_lse=True
        )
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(f, (q, k, v))


# -- attnforge Mod objects (IR evaluated, parameters live) ---------------------------------------


def _mod(kind, root, *params):
    return Mod(kind=kind, ir=root, params=tuple(params), name=f"test_{kind}")


def _tensor_param(index, name, value):
    node = ir.tensor(index, value.dim(), str(value.dtype).removeprefix("torch."))
    return Param(index, name, "tensor", node, value)


def test_ir_mods_match_callables():
    q, k, v = _qkv(Hq=3, Hkv=3, L=13, S=13)
    window = ir.scalar(0, ir.DType.INT)
    dist = ir.node(ir.Op.SUB, ir.Q_IDX, ir.KV_IDX)
    mask_ir = ir.node(
        ir.Op.AND,
        ir.node(ir.Op.GE, dist, ir.const(0)),
        ir.node(ir.Op.LT, dist, window),
    )
    size = {"w": 5}
    mask = _mod("mask", mask_ir, Param(0, "w", "scalar", window, 5, lambda: size["w"]))
    cap = ir.scalar(0, ir.DType.FLOAT)
    score_ir = ir.node(ir.Op.MUL, cap, ir.node(ir.Op.TANH, ir.node(ir.Op.DIV, ir.SCORE, cap)))
    score = _mod("score", score_ir, Param(0, "cap", "scalar", cap, 2.0))
    got = reference_attention(q, k, v, score_mod=score, mask_mod=mask)
    want = reference_attention(q, k, v, score_mod=softcap, mask_mod=sliding_window)
    torch.testing.assert_close(got, want)
    size["w"] = 1  # the getter is re-read: only the diagonal remains, so out == v
    torch.testing.assert_close(reference_attention(q, k, v, mask_mod=mask), v)


def test_learnable_bias_gets_gradients():
    q, k, v = _qkv(Hq=2, Hkv=2, L=7, S=7)
    bias = torch.randn(2, 13, dtype=torch.float32, requires_grad=True)
    t = ir.tensor(0, 2, "float32")
    rel = ir.node(ir.Op.ADD, ir.node(ir.Op.SUB, ir.Q_IDX, ir.KV_IDX), ir.const(6))
    score_ir = ir.node(ir.Op.ADD, ir.SCORE, ir.node(ir.Op.LOAD, t, ir.H, rel))
    mod = _mod("score", score_ir, _tensor_param(0, "bias", bias))
    reference_attention(q, k, v, score_mod=mod).sum().backward()
    got = bias.grad.clone()

    bias.grad = None
    b64 = bias.to(F64)
    reference_attention(
        q, k, v, score_mod=lambda s, b, h, i, j: s + b64[h, i - j + 6]
    ).sum().backward()
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, bias.grad)


def test_unbound_parameter_is_a_clear_error():
    cap = ir.scalar(0, ir.DType.FLOAT)
    mod = _mod("score", ir.node(ir.Op.MUL, ir.SCORE, cap), Param(0, "cap", "scalar", cap, None))
    with pytest.raises(ValueError, match="'cap'.*no value"):
        reference_attention(*_qkv(L=3, S=3), score_mod=mod)


# -- create_mask and input checks ------------------------------------------------------------------


@pytest.mark.parametrize("fn", [causal, sliding_window, document, alibi])
def test_create_mask_matches_torch(fn):
    got = create_mask(fn, 2, None, 30, 40)
    want = torch_create_mask(fn, 2, None, 30, 40, device="cpu")
    assert got.dtype == torch.bool and got.shape == (2, 1, 30, 40)
    assert torch.equal(got, want)


def test_create_mask_of_score_mod_marks_minus_inf():
    def drop_odd(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx % 2 == 1, -math.inf, score)

    got = create_mask(drop_odd, None, 3, 4, 6)
    assert got.shape == (1, 3, 4, 6)
    assert torch.equal(got[0, 1, 2], torch.tensor([True, False] * 3))


def test_input_errors():
    q, k, v = _qkv(Hq=4, Hkv=2)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        reference_attention(q, k, v)
    q3, k3, v3 = _qkv(Hq=3, Hkv=2)
    with pytest.raises(ValueError, match="Hq=3 and Hkv=2"):
        reference_attention(q3, k3, v3, enable_gqa=True)
    with pytest.raises(TypeError, match="must be boolean"):
        reference_attention(q, k, v, enable_gqa=True, mask_mod=lambda b, h, i, j: i - j)
    bm = torch_block_mask(causal, None, None, 16, 16, device="cpu", BLOCK_SIZE=8)
    with pytest.raises(ValueError, match="created for"):
        reference_attention(q, k, v, block_mask=bm, enable_gqa=True)
