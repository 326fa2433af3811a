"""Interval analysis (codegen.symbolic): specialization, soundness on random expressions and
boxes (checked element by element), and exactness where the analysis promises it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnforge.codegen.symbolic import Boxes, analyze, specialize
from attnforge.dsl import ir
from attnforge.dsl.evaluate import evaluate

O, Q, K, c, N = ir.Op, ir.Q_IDX, ir.KV_IDX, ir.const, ir.node


def truth(mask, params, boxes) -> torch.Tensor:
    """The mask on a grid covering every box (evaluated once)."""
    q = torch.arange(max(b[1] for b in boxes) + 1)[:, None]
    kv = torch.arange(max(b[3] for b in boxes) + 1)[None, :]
    out = evaluate(mask, {"q_idx": q, "kv_idx": kv, "b": 0, "h": 0}, params).bool()
    return torch.broadcast_to(out, (q.shape[0], kv.shape[1])).numpy()


def check_sound(mask, params, boxes, *, exact=False):
    """Every claim of the analysis holds on the elements; with ``exact`` it decides every box."""
    r = analyze(specialize(mask, params), Boxes.of(*zip(*boxes)), params)
    dense = truth(mask, params, boxes)
    for i, (ql, qh, kl, kh) in enumerate(boxes):
        t = dense[ql : qh + 1, kl : kh + 1]
        some_t, some_f = bool(t.any()), bool((~t).any())
        ctx = (ir.pretty(mask), (ql, qh, kl, kh), some_t, some_f, r.can_t[i], r.can_f[i],
               r.has_t[i], r.has_f[i])  # fmt: skip
        assert some_t <= r.can_t[i] and some_f <= r.can_f[i], ctx
        assert r.has_t[i] <= some_t and r.has_f[i] <= some_f, ctx
        if exact:
            assert r.has_t[i] == some_t and r.has_f[i] == some_f, ctx


def grid_boxes(n=40, step=7, size=(1, 5, 13)):
    return [(q, min(q + s - 1, n), k, min(k + t - 1, n)) for q in range(0, n, step)
            for k in range(0, n, step) for s in size for t in size]  # fmt: skip


def sub(a, b):
    return N(O.SUB, a, b)


CAUSAL = N(O.GE, Q, K)
WINDOW = N(O.AND, CAUSAL, N(O.LT, sub(Q, K), c(9)))
CLAMPED = N(O.MIN, N(O.MAX, Q, c(3)), c(30))
NATTEN = N(O.LE, N(O.ABS, sub(CLAMPED, K)), c(3))
CHUNKED = N(O.EQ, N(O.FLOORDIV, Q, c(6)), N(O.FLOORDIV, K, c(6)))
DILATED = N(O.EQ, N(O.MOD, sub(Q, K), c(3)), c(0))
COORD = N(O.LE, N(O.ABS, sub(N(O.MOD, Q, c(5)), N(O.MOD, K, c(5)))), c(1))


@pytest.mark.parametrize("mask", [CAUSAL, N(O.GT, Q, K), N(O.EQ, Q, K), N(O.NE, sub(Q, K), c(4)),
                                  N(O.LE, N(O.ADD, N(O.MUL, Q, c(2)), K), c(50)), NATTEN, CHUNKED,
                                  DILATED, COORD])  # fmt: skip
def test_single_conditions_are_decided_exactly(mask):
    check_sound(mask, [], grid_boxes(), exact=True)


@pytest.mark.parametrize(
    "mask",
    [
        WINDOW,
        N(O.OR, N(O.LT, K, c(5)), CAUSAL),
        N(O.NOT, WINDOW),
        N(O.XOR, CAUSAL, DILATED),
        N(O.AND, CHUNKED, CAUSAL),
    ],
)
def test_combinations_are_sound(mask):
    check_sound(mask, [], grid_boxes())


def test_causal_is_partial_on_the_diagonal_and_decided_elsewhere():
    r = analyze(CAUSAL, Boxes.of([0, 128, 0], [127, 255, 127], [0, 0, 128], [127, 127, 255]))
    assert r.has_t[0] and r.has_f[0]  # diagonal: mixed
    assert not r.can_f[1]  # below: full
    assert not r.can_t[2]  # above: empty


def test_specialize_substitutes_b_h_scalars_and_constant_loads():
    lengths = ir.tensor(1, 1, "int64")
    mask = N(O.AND, N(O.LT, K, N(O.LOAD, lengths, ir.B)), N(O.LT, sub(Q, K), ir.scalar(0, "int")))
    params = [7, torch.tensor([10, 20, 10])]
    s0, s1, s2 = (specialize(mask, params, b=b) for b in range(3))
    assert s0 is s2 and s0 is not s1  # equal behaviour, same interned IR
    assert not any(n.op in (O.B, O.H, O.SCALAR, O.LOAD) for n in s1.walk())
    assert s0 is N(O.AND, N(O.LT, K, c(10)), N(O.LT, sub(Q, K), c(7)))


def test_specialize_simplifies_decided_head_terms():
    even = N(O.EQ, N(O.MOD, ir.H, c(2)), c(0))
    mask = N(O.WHERE, even, CAUSAL, N(O.LE, Q, K))
    assert specialize(mask, [], h=2) is CAUSAL
    assert specialize(mask, [], h=3) is N(O.LE, Q, K)
    assert specialize(N(O.OR, even, CAUSAL), [], h=4) is ir.TRUE


def test_sorted_tensor_loads_decide_document_blocks():
    doc = torch.tensor([0] * 10 + [1] * 7 + [2] * 3 + [5] * 20)
    t = ir.tensor(0, 1, "int64")
    mask = N(O.EQ, N(O.LOAD, t, Q), N(O.LOAD, t, K))
    boxes = grid_boxes(n=39, step=5, size=(1, 4, 12))
    check_sound(mask, [doc], boxes)
    r = analyze(mask, Boxes.of([0, 0, 8], [9, 9, 11], [0, 10, 0], [9, 19, 9]), [doc])
    assert not r.can_f[0] and not r.can_t[1]  # same document: full; other documents: empty
    assert r.has_t[2] and r.has_f[2]  # straddles a boundary: partial, without evaluation


def test_unsorted_and_multi_dim_loads_are_sound():
    gen = torch.Generator().manual_seed(0)
    doc = torch.randint(0, 3, (41,), generator=gen)
    table = torch.rand(41, 41, generator=gen) > 0.5
    bias = torch.randn(41, generator=gen)
    t1, t2, t3 = ir.tensor(0, 1, "int64"), ir.tensor(1, 2, "bool"), ir.tensor(2, 1, "float32")
    params = [doc, table, bias]
    for mask in (N(O.EQ, N(O.LOAD, t1, Q), N(O.LOAD, t1, K)), N(O.LOAD, t2, Q, K),
                 N(O.LOAD, t2, N(O.FLOORDIV, Q, c(8)), N(O.FLOORDIV, K, c(8))),
                 N(O.GT, N(O.LOAD, t3, K), c(0.3))):  # fmt: skip
        check_sound(mask, params, grid_boxes())


def test_float_comparisons_are_sound_at_the_boundary():
    half = N(O.MUL, sub(Q, K), c(0.5))
    for mask in (N(O.LE, half, c(3.0)), N(O.LT, N(O.DIV, Q, c(3)), N(O.DIV, K, c(3))),
                 N(O.GE, N(O.EXP, N(O.NEG, N(O.CAST, N(O.ABS, sub(Q, K)), arg=ir.DType.FLOAT))),
                   c(0.01)),
                 N(O.EQ, N(O.CAST, Q, arg=ir.DType.FLOAT), c(7.0))):  # fmt: skip
        check_sound(mask, [], grid_boxes())


def test_boxes_far_from_a_float_boundary_are_decided():
    mask = N(O.LE, N(O.MUL, sub(Q, K), c(0.5)), c(3.0))
    r = analyze(mask, Boxes.of([0, 100], [3, 110], [0, 0], [10, 10]))
    assert not r.can_f[0] and not r.can_t[1]


# -- random expressions --------------------------------------------------------------------------

SMALL = st.integers(-6, 6)


@st.composite
def int_expr(draw, depth=3):
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from([Q, K, Q, K, c(draw(SMALL))]))
    op = draw(st.sampled_from(["add", "sub", "mulc", "div", "mod", "min", "max", "abs", "neg",
                               "where"]))  # fmt: skip
    a = draw(int_expr(depth - 1))
    if op in ("abs", "neg"):
        return N(O.ABS if op == "abs" else O.NEG, a)
    if op in ("mulc", "div", "mod"):
        k = draw(st.integers(-5, 5).filter(lambda v: v != 0))
        return N({"mulc": O.MUL, "div": O.FLOORDIV, "mod": O.MOD}[op], a, c(k))
    b = draw(int_expr(depth - 1))
    if op == "where":
        return N(O.WHERE, draw(bool_expr(depth - 1)), a, b)
    return N({"add": O.ADD, "sub": O.SUB, "min": O.MIN, "max": O.MAX}[op], a, b)


@st.composite
def bool_expr(draw, depth=3):
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        op = draw(st.sampled_from([O.LT, O.LE, O.GT, O.GE, O.EQ, O.NE]))
        return N(op, draw(int_expr(2)), draw(int_expr(1)))
    op = draw(st.sampled_from([O.AND, O.OR, O.XOR, O.NOT]))
    a = draw(bool_expr(depth - 1))
    return N(op, a) if op is O.NOT else N(op, a, draw(bool_expr(depth - 1)))


@st.composite
def boxes(draw):
    out = []
    for _ in range(draw(st.integers(1, 6))):
        ql, kl = draw(st.integers(0, 40)), draw(st.integers(0, 40))
        out.append((ql, ql + draw(st.integers(0, 12)), kl, kl + draw(st.integers(0, 12))))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bool_expr(), boxes())
def test_random_expressions_are_sound(mask, bxs):
    check_sound(mask, [], bxs)


@settings(max_examples=150, deadline=None)
@given(st.integers(-3, 3), st.sampled_from([-1, 1]), st.integers(-20, 20),
       st.sampled_from([O.LT, O.LE, O.GT, O.GE, O.EQ, O.NE]), boxes())  # fmt: skip
def test_random_affine_conditions_are_exact(a, b, d, op, bxs):
    """Inequalities of an affine form are decided at the corners; (in)equalities too when the
    form's values are contiguous (unit coefficients)."""
    form = N(O.ADD, N(O.ADD, N(O.MUL, Q, c(a)), N(O.MUL, K, c(b))), c(d))
    check_sound(N(op, form, c(0)), [], bxs, exact=op not in (O.EQ, O.NE) or abs(a) <= 1)


def test_analyze_reads_b_h_per_box_and_refuses_score():
    windows = ir.tensor(0, 1, "int64")
    mask = N(O.AND, CAUSAL, N(O.LT, sub(Q, K), N(O.LOAD, windows, ir.H)))
    r = analyze(mask, Boxes.of([100] * 3, [103] * 3, [90] * 3, [93] * 3, h=[0, 1, 2]),
                [torch.tensor([4, 20, 10])])  # fmt: skip
    assert r.can_t.tolist() == [False, True, True] and r.can_f.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="score"):
        analyze(N(O.LT, ir.SCORE, c(0.0)), Boxes.of([0], [1], [0], [1]))


def test_vectorized_over_many_boxes():
    n = 10_000
    rng = np.random.default_rng(0)
    ql = rng.integers(0, 1_000_000, n)
    kl = rng.integers(0, 1_000_000, n)
    r = analyze(CAUSAL, Boxes.of(ql, ql + 127, kl, kl + 127))
    below, above = ql >= kl + 127, ql + 127 < kl
    assert np.array_equal(~r.can_f, below) and np.array_equal(~r.can_t, above)
    assert np.all(r.has_t & r.has_f | below | above)


# -- regressions found by hypothesis -------------------------------------------------------------


def test_regression_where_with_a_folded_constant_condition():
    """``~`` on a Python bool is an int (``~True == -2``): a constant condition picked the wrong
    branch of an integer ``where``."""
    pick = N(O.WHERE, N(O.LT, c(0), c(0)), Q, K)
    check_sound(N(O.LT, pick, K), [], [(0, 0, 0, 1)], exact=True)
    check_sound(N(O.LT, pick, Q), [], [(0, 1, 0, 0)], exact=True)
