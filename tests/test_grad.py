"""codegen.grad: symbolic derivatives of score mods against torch autograd on dsl.evaluate."""

from __future__ import annotations

import math

import pytest
import torch
from zoo import SCORES

from attnforge.codegen.grad import differentiate
from attnforge.codegen.passes import run_passes
from attnforge.dsl import ir
from attnforge.dsl.api import trace
from attnforge.dsl.evaluate import evaluate
from attnforge.dsl.ir import KV_IDX, Q_IDX, SCORE, B, H, Op, const, node

BS, HS, LS, SS = 2, 3, 7, 9  # grid (b, h, q, kv) the derivatives are checked on


def n(op, *src):
    return node(op, *src)


def c(v):
    return const(v)


def _tensor(i, ndim, dtype="float32"):
    return ir.tensor(i, ndim, dtype)


def _load(t, *idx):
    return node(Op.LOAD, t, *idx)


def _grid():
    return {
        "b": torch.arange(BS).view(BS, 1, 1, 1),
        "h": torch.arange(HS).view(1, HS, 1, 1),
        "q_idx": torch.arange(LS).view(1, 1, LS, 1),
        "kv_idx": torch.arange(SS).view(1, 1, 1, SS),
    }


def _check(root, params=(), score=None):
    """Compare dT/dscore and the scattered captured-tensor grads with torch autograd."""
    env = _grid()
    if score is None:
        score = torch.randn(BS, HS, LS, SS, dtype=torch.float64)
    score = score.clone().requires_grad_(True)
    env["score"] = score
    leaves = [
        p.detach().clone().double().requires_grad_(True)
        if isinstance(p, torch.Tensor) and p.is_floating_point()
        else p
        for p in params
    ]
    out = evaluate(root, env, leaves).expand(BS, HS, LS, SS)
    g = torch.randn_like(out)
    finite = torch.isfinite(out)
    # where the forward is +-inf (a mask) the softmax gives dT = 0: mimic that here
    g = torch.where(finite, g, torch.zeros_like(g))
    grads = torch.autograd.grad(
        out,
        [score] + [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad],
        g,
        allow_unused=True,
    )
    sg = differentiate(root)
    plain = [p.detach() if isinstance(p, torch.Tensor) else p for p in leaves]
    d_score = evaluate(sg.d_score, env, plain).expand_as(out)
    assert torch.isfinite(d_score).all(), "d_score must be finite everywhere (masks give 0)"
    want = grads[0] if grads[0] is not None else torch.zeros_like(score)
    torch.testing.assert_close(g * d_score, want, rtol=1e-9, atol=1e-9)

    got_t = {
        i: torch.zeros_like(t)
        for i, t in enumerate(plain)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    }
    for load, d_load in sg.d_loads:
        ti = load.src[0].arg[0]
        contrib = g * evaluate(d_load, env, plain).expand_as(out)
        contrib = torch.where(g == 0, torch.zeros_like(contrib), contrib)
        idx = [
            evaluate(i, env, plain).long().expand_as(out) % got_t[ti].shape[d]
            for d, i in enumerate(load.src[1:])
        ]
        if idx:
            got_t[ti].index_put_(tuple(idx), contrib, accumulate=True)
        else:  # a 0-d tensor
            got_t[ti] += contrib.sum()
    want_t = [gr for gr in grads[1:]]
    for (ti, got), want in zip(sorted(got_t.items()), want_t):
        want = want if want is not None else torch.zeros_like(got)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"tensor param {ti}")
    return sg


def _mask_causal(x):
    return n(Op.WHERE, n(Op.GE, Q_IDX, KV_IDX), x, c(-math.inf))


# -- score-only mods: (name, ir builder) -----------------------------------------------------

cap = ir.scalar(0, ir.DType.FLOAT)
UNARY_MODS = {
    "identity": lambda: SCORE,
    "softcap": lambda: n(Op.MUL, cap, n(Op.TANH, n(Op.DIV, SCORE, cap))),
    "sigmoid": lambda: n(Op.SIGMOID, SCORE),
    "exp": lambda: n(Op.EXP, n(Op.MUL, SCORE, c(0.5))),
    "exp2": lambda: n(Op.EXP2, SCORE),
    "log_abs": lambda: n(Op.LOG, n(Op.ADD, n(Op.ABS, SCORE), c(1.0))),
    "log2_sq": lambda: n(Op.LOG2, n(Op.ADD, n(Op.MUL, SCORE, SCORE), c(0.5))),
    "sqrt": lambda: n(Op.SQRT, n(Op.ADD, n(Op.MUL, SCORE, SCORE), c(1.0))),
    "rsqrt": lambda: n(Op.RSQRT, n(Op.ADD, n(Op.MUL, SCORE, SCORE), c(1.0))),
    "sin_cos": lambda: n(Op.ADD, n(Op.SIN, SCORE), n(Op.COS, n(Op.MUL, c(2.0), SCORE))),
    "erf": lambda: n(Op.ERF, SCORE),
    "pow2": lambda: n(Op.POW, SCORE, c(2)),
    "pow3_float": lambda: n(Op.POW, SCORE, c(3.0)),
    "exp_base": lambda: n(Op.POW, c(2.0), SCORE),
    "pow_both": lambda: n(Op.POW, n(Op.ADD, n(Op.ABS, SCORE), c(1.0)), n(Op.SIGMOID, SCORE)),
    "neg_sub": lambda: n(Op.SUB, c(1.0), n(Op.NEG, SCORE)),
    "div_by_score": lambda: n(Op.DIV, c(1.0), n(Op.ADD, n(Op.MUL, SCORE, SCORE), c(1.0))),
    "min_max": lambda: n(Op.MAX, n(Op.MIN, SCORE, c(1.0)), c(-0.5)),
    "max_tie": lambda: n(Op.MAX, SCORE, SCORE),
    "floor_plus": lambda: n(Op.ADD, n(Op.FLOOR, SCORE), n(Op.CEIL, SCORE)),
    "floor_only": lambda: n(Op.FLOOR, n(Op.MUL, SCORE, c(3.0))),
    "int_scaled": lambda: n(Op.MUL, SCORE, n(Op.SUB, Q_IDX, KV_IDX)),
    "int_div": lambda: n(Op.DIV, SCORE, n(Op.ADD, KV_IDX, c(1))),
    "cast": lambda: n(Op.ADD, SCORE, _cast(n(Op.FLOORDIV, Q_IDX, c(2)), ir.DType.FLOAT)),
    "leaky": lambda: n(Op.WHERE, n(Op.GT, SCORE, c(0.0)), SCORE, n(Op.MUL, c(0.1), SCORE)),
    "causal": lambda: _mask_causal(SCORE),
    "causal_softcap": lambda: _mask_causal(n(Op.MUL, cap, n(Op.TANH, n(Op.DIV, SCORE, cap)))),
    "tanh_of_masked": lambda: n(Op.TANH, _mask_causal(SCORE)),
    "exp_of_masked": lambda: n(Op.EXP, _mask_causal(SCORE)),
    "masked_plus_masked": lambda: n(Op.ADD, _mask_causal(SCORE), _mask_causal(SCORE)),
    "window": lambda: n(
        Op.WHERE,
        n(Op.AND, n(Op.GE, Q_IDX, KV_IDX), n(Op.LE, n(Op.SUB, Q_IDX, KV_IDX), c(3))),
        n(Op.MUL, SCORE, c(2.0)),
        c(-math.inf),
    ),
    "abs": lambda: n(Op.ABS, SCORE),
    "const_mod": lambda: n(Op.ADD, c(0.0), n(Op.MUL, SCORE, c(0.0))),
}


def _cast(x, dt):
    return node(Op.CAST, x, arg=dt)


@pytest.mark.parametrize("name", sorted(UNARY_MODS))
def test_score_derivative(name):
    _check(UNARY_MODS[name](), params=(7.5,))


def test_abs_at_zero_matches_torch_sign():
    score = torch.randn(BS, HS, LS, SS, dtype=torch.float64)
    score[0, 0, 0, :] = 0.0
    _check(n(Op.ABS, SCORE), score=score)


def test_pow_zero_base():
    score = torch.randn(BS, HS, LS, SS, dtype=torch.float64)
    score[0, 0, 0, :] = 0.0
    _check(n(Op.POW, n(Op.MUL, SCORE, SCORE), n(Op.ADD, n(Op.ABS, SCORE), c(1.0))), score=score)


# -- mods reading captured tensors -----------------------------------------------------------

bias_t = _tensor(0, 2)  # [H, 2 * max(L, S)]  indexed with q - kv (negative wraps)
slopes_t = _tensor(0, 1)


def _rel(t):
    return _load(t, H, n(Op.SUB, Q_IDX, KV_IDX))


def _params_rel():
    return (torch.randn(HS, LS + SS),)


TENSOR_MODS = {
    "rel_bias": (lambda: n(Op.ADD, SCORE, _rel(bias_t)), _params_rel),
    "alibi": (
        lambda: n(Op.ADD, SCORE, n(Op.MUL, _load(slopes_t, H), n(Op.SUB, KV_IDX, Q_IDX))),
        lambda: (torch.randn(HS),),
    ),
    "three_tensors": (
        lambda: n(
            Op.ADD,
            n(Op.ADD, SCORE, _rel(_tensor(0, 2))),
            n(Op.MUL, _load(_tensor(1, 2), B, Q_IDX), _load(_tensor(2, 1), H)),
        ),
        lambda: (torch.randn(HS, LS + SS), torch.randn(BS, LS), torch.randn(HS)),
    ),
    "same_tensor_two_indices": (
        lambda: n(
            Op.ADD, SCORE, n(Op.SUB, _load(_tensor(0, 1), Q_IDX), _load(_tensor(0, 1), KV_IDX))
        ),
        lambda: (torch.randn(max(LS, SS)),),
    ),
    "same_read_twice": (
        lambda: n(Op.ADD, SCORE, n(Op.MUL, _load(_tensor(0, 1), H), _load(_tensor(0, 1), H))),
        lambda: (torch.randn(HS),),
    ),
    "graphormer": (
        lambda: n(
            Op.ADD, SCORE, _load(_tensor(0, 2), H, _load(_tensor(1, 3, "int64"), B, Q_IDX, KV_IDX))
        ),
        lambda: (torch.randn(HS, 5), torch.randint(0, 5, (BS, LS, SS))),
    ),
    "scale_times_score": (
        lambda: n(Op.ADD, n(Op.MUL, SCORE, _load(_tensor(0, 1), H)), _rel(_tensor(1, 2))),
        lambda: (torch.randn(HS), torch.randn(HS, LS + SS)),
    ),
    "masked_bias": (
        lambda: _mask_causal(n(Op.ADD, SCORE, _rel(bias_t))),
        _params_rel,
    ),
    "bias_mask_data": (
        # data-dependent mask with a learnable bias inside; a float mask tensor compared
        lambda: n(
            Op.WHERE,
            n(Op.GT, _load(_tensor(1, 1), KV_IDX), c(0.0)),
            n(Op.ADD, SCORE, _rel(bias_t)),
            c(-math.inf),
        ),
        lambda: (torch.randn(HS, LS + SS), torch.randn(SS)),
    ),
    "softcap_bias": (
        lambda: n(Op.MUL, c(5.0), n(Op.TANH, n(Op.DIV, n(Op.ADD, SCORE, _rel(bias_t)), c(5.0)))),
        _params_rel,
    ),
    "div_by_tensor": (
        lambda: n(Op.DIV, SCORE, n(Op.ADD, n(Op.ABS, _load(_tensor(0, 1), H)), c(1.0))),
        lambda: (torch.randn(HS),),
    ),
    "max_with_tensor": (
        lambda: n(Op.MAX, SCORE, _load(_tensor(0, 2), B, KV_IDX)),
        lambda: (torch.randn(BS, SS),),
    ),
    "pow_tensor_exponent": (
        lambda: n(Op.POW, n(Op.ADD, n(Op.ABS, SCORE), c(1.0)), _load(_tensor(0, 1), H)),
        lambda: (torch.randn(HS),),
    ),
    "exp_tensor_gate": (
        lambda: n(Op.MUL, SCORE, n(Op.SIGMOID, _load(_tensor(0, 2), H, Q_IDX))),
        lambda: (torch.randn(HS, LS),),
    ),
    "bias_mod_index": (
        lambda: n(Op.ADD, SCORE, _load(_tensor(0, 1), n(Op.MOD, n(Op.SUB, KV_IDX, Q_IDX), c(4)))),
        lambda: (torch.randn(4),),
    ),
    "half_tensor": (
        lambda: n(Op.ADD, SCORE, _load(_tensor(0, 1, "bfloat16"), H)),
        lambda: (torch.randn(HS).bfloat16(),),
    ),
}


@pytest.mark.parametrize("name", sorted(TENSOR_MODS))
def test_tensor_derivative(name):
    build, params = TENSOR_MODS[name]
    _check(build(), params())


def test_three_tensors_have_three_grads():
    sg = differentiate(TENSOR_MODS["three_tensors"][0]())
    assert sg.tensor_indices() == [0, 1, 2]
    assert len(sg.d_loads) == 3


def test_two_reads_two_contributions():
    sg = differentiate(TENSOR_MODS["same_tensor_two_indices"][0]())
    assert len(sg.d_loads) == 2
    assert sorted(dl.arg if dl.op is Op.CONST else None for _, dl in sg.d_loads) == [-1.0, 1.0]


def test_int_tensor_gets_no_grad():
    sg = differentiate(TENSOR_MODS["graphormer"][0]())
    assert sg.tensor_indices() == [0]


def test_simplified_forms():
    assert differentiate(SCORE).d_score is const(1.0)
    assert differentiate(n(Op.ADD, SCORE, _rel(bias_t))).d_score is const(1.0)
    assert differentiate(n(Op.MUL, c(0.0), SCORE)).d_score is const(0.0)
    assert differentiate(n(Op.FLOOR, SCORE)).d_score is const(0.0)
    causal = differentiate(_mask_causal(SCORE)).d_score
    assert causal.op is Op.WHERE and causal.src[1] is const(1.0) and causal.src[2] is const(0.0)
    pow2 = differentiate(n(Op.POW, SCORE, c(2))).d_score
    assert pow2 is node(Op.MUL, const(2.0), SCORE) or pow2 is node(Op.MUL, const(2), SCORE)


def test_non_float_mod_rejected():
    with pytest.raises(ValueError, match="float"):
        differentiate(n(Op.GE, Q_IDX, KV_IDX))


# -- every score mod of the shared zoo (tests/zoo.py), traced and canonicalized as lower() does --


@pytest.mark.parametrize("name", sorted(SCORES))
def test_zoo_score_derivatives(name):
    mod = trace(SCORES[name].fn, "score")
    root = run_passes(mod.ir)
    if root.dtype is not ir.DType.FLOAT:
        pytest.skip("mod returns a non-float value")
    _check(root, list(mod.param_values()))
