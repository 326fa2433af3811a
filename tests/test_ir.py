"""The IR: interning, structural keys, printing and dtype rules."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

import attnforge as af
from attnforge.dsl import ir
from attnforge.dsl.evaluate import evaluate
from attnforge.dsl.ir import DType, Node, Op, const, node

ROOT = __file__.rsplit("/tests/", 1)[0]


def softcap_causal_expr(cap_index: int = 0) -> Node:
    capped = node(Op.MUL, ir.SCORE, ir.scalar(cap_index, DType.FLOAT))
    return node(Op.WHERE, node(Op.GE, ir.Q_IDX, ir.KV_IDX), capped, const(float("-inf")))


# -- interning and identity ----------------------------------------------------------------------


def test_structurally_equal_nodes_are_the_same_object():
    a, b = softcap_causal_expr(), softcap_causal_expr()
    assert a is b and a == b and hash(a) == hash(b)
    assert node(Op.ADD, ir.Q_IDX, const(1)) is not node(Op.ADD, ir.Q_IDX, const(2))


def test_constants_are_distinguished_by_type_and_bits():
    assert const(1) is not const(1.0) and const(1) is not const(True)
    assert const(0.0) is not const(-0.0)
    assert const(float("nan")) is const(float("nan"))
    assert const(1).dtype is DType.INT and const(1.0).dtype is DType.FLOAT
    assert const(True).dtype is DType.BOOL


def test_nodes_are_immutable_and_pickle_to_the_interned_node():
    e = softcap_causal_expr()
    with pytest.raises(AttributeError):
        e.op = Op.ADD
    assert pickle.loads(pickle.dumps(e)) is e


def test_parameter_indices_and_tensor_types_are_structure():
    assert ir.scalar(0, DType.INT) is not ir.scalar(1, DType.INT)
    assert ir.scalar(0, DType.INT) is not ir.scalar(0, DType.FLOAT)
    assert ir.tensor(0, 2, "float32") is not ir.tensor(0, 2, "bfloat16")
    assert ir.tensor(0, 2, "float32") is not ir.tensor(0, 1, "float32")
    assert ir.tensor(0, 1, "int32").dtype is DType.INT
    assert ir.tensor(0, 1, "bool").dtype is DType.BOOL
    assert ir.tensor(0, 1, "bfloat16").dtype is DType.FLOAT


# -- keys ----------------------------------------------------------------------------------------

# The key format is part of the on-disk cache layout: a change here invalidates every cache entry,
# so it must be deliberate.
EXPECTED_KEY = "e0f9de60ab6f9b6bfaddc29441cc4d28"


def test_key_is_hex_and_hard_coded():
    key = softcap_causal_expr().key
    assert len(key) == 32 and int(key, 16) >= 0
    assert key == EXPECTED_KEY


def test_key_is_stable_across_processes():
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_ir import softcap_causal_expr;"
        "print(softcap_causal_expr().key)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": ROOT, "PYTHONHASHSEED": "123", "PATH": ""},
        check=True,
    )
    assert out.stdout.strip() == softcap_causal_expr().key


def test_key_ignores_names_and_captured_values_but_not_structure():
    def make(cap):
        return lambda score, b, h, q_idx, kv_idx: cap * torch.tanh(score / cap)

    def softcap_named_differently(s, bb, hh, qi, ki):
        return 30.0 * torch.tanh(s / 30.0)

    a, b = af.trace(make(30.0), "score"), af.trace(make(50.0), "score")
    assert a.ir.key == b.ir.key
    c = af.trace(softcap_named_differently, "score")
    assert c.ir.key != a.ir.key  # literals are structure, captured values are not
    assert c.ir.key == af.trace(lambda s, *_: 30.0 * torch.tanh(s / 30.0), "score").ir.key
    assert ir.scalar(0, DType.FLOAT).key != ir.scalar(1, DType.FLOAT).key


def test_operand_order_is_structure():
    assert node(Op.SUB, ir.Q_IDX, ir.KV_IDX).key != node(Op.SUB, ir.KV_IDX, ir.Q_IDX).key
    assert node(Op.LT, ir.Q_IDX, ir.KV_IDX).key != node(Op.GT, ir.Q_IDX, ir.KV_IDX).key


# -- printing ------------------------------------------------------------------------------------


def test_pretty_prints_one_node_per_line():
    assert ir.pretty(softcap_causal_expr()) == "\n".join(
        [
            "%0 = q_idx : int",
            "%1 = kv_idx : int",
            "%2 = ge %0, %1 : bool",
            "%3 = score : float",
            "%4 = scalar[0] : float",
            "%5 = mul %3, %4 : float",
            "%6 = where %2, %5, -inf : float",
            "return %6",
        ]
    )


def test_mod_pretty_names_parameters():
    table = torch.zeros(4, 8)
    window = 5

    def mod(score, b, h, q_idx, kv_idx):
        return score + table[h, (q_idx - kv_idx) % window]

    text = af.trace(mod, "score").pretty()
    assert "scalar[0]  # window : int" in text
    assert "tensor[1] ndim=2 float32  # table : float" in text
    assert "load %" in text and text.splitlines()[-1].startswith("return %")


def test_pretty_of_a_constant_root():
    assert ir.pretty(ir.TRUE) == "%0 = const True : bool\nreturn True"


def test_walk_is_topological_and_shares_subexpressions():
    d = node(Op.SUB, ir.Q_IDX, ir.KV_IDX)
    e = node(Op.AND, node(Op.GE, d, const(0)), node(Op.LT, d, const(8)))
    order = e.walk()
    assert order[-1] is e and order.count(d) == 1
    pos = {id(n): i for i, n in enumerate(order)}
    assert all(pos[id(s)] < pos[id(n)] for n in order for s in n.src)


# -- dtype rules (torch promotion over bool < int < float) ---------------------------------------


@pytest.mark.parametrize(
    "expr, dtype",
    [
        (lambda: node(Op.ADD, ir.Q_IDX, ir.KV_IDX), DType.INT),
        (lambda: node(Op.ADD, ir.Q_IDX, ir.SCORE), DType.FLOAT),
        (lambda: node(Op.DIV, ir.Q_IDX, const(2)), DType.FLOAT),
        (lambda: node(Op.FLOORDIV, ir.Q_IDX, const(2)), DType.INT),
        (lambda: node(Op.MOD, ir.SCORE, const(2)), DType.FLOAT),
        (lambda: node(Op.LT, ir.SCORE, ir.Q_IDX), DType.BOOL),
        (lambda: node(Op.AND, ir.TRUE, ir.FALSE), DType.BOOL),
        (lambda: node(Op.AND, ir.Q_IDX, const(3)), DType.INT),
        (lambda: node(Op.TANH, ir.Q_IDX), DType.FLOAT),
        (lambda: node(Op.ABS, ir.Q_IDX), DType.INT),
        (lambda: node(Op.FLOOR, ir.SCORE), DType.FLOAT),
        (lambda: node(Op.WHERE, ir.TRUE, ir.Q_IDX, ir.SCORE), DType.FLOAT),
        (lambda: node(Op.WHERE, ir.TRUE, ir.Q_IDX, const(0)), DType.INT),
        (lambda: node(Op.MAX, ir.Q_IDX, const(0.5)), DType.FLOAT),
        (lambda: node(Op.CAST, ir.SCORE, arg=DType.INT), DType.INT),
        (lambda: node(Op.LOAD, ir.tensor(0, 1, "int64"), ir.Q_IDX), DType.INT),
    ],
)
def test_dtype_rules(expr, dtype):
    n = expr()
    assert n.dtype is dtype
    env = {
        "score": torch.tensor([0.5, -1.5], dtype=torch.float64),
        "q_idx": torch.tensor([3, 4]),
        "kv_idx": torch.tensor([1, 7]),
    }
    value = evaluate(n, env, [torch.arange(10)])
    kind = {torch.bool: DType.BOOL, torch.int64: DType.INT, torch.float64: DType.FLOAT}
    assert kind[value.dtype] is dtype  # the evaluator agrees with the declared dtype


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, kv: q / 2,
        lambda q, kv: q // 2,
        lambda q, kv: (q > 1) + kv,
        lambda q, kv: q**2,
        lambda q, kv: abs(q - kv),
        lambda q, kv: q * 1.0,
        lambda q, kv: torch.where(q > kv, q, 0),
        lambda q, kv: torch.clamp(q, max=2.5),
    ],
)
def test_traced_dtypes_agree_with_torch(fn):
    traced = af.trace(lambda s, b, h, q, kv: fn(q, kv), "score").ir
    inner = traced.src[0] if traced.op is Op.CAST else traced
    eager = fn(torch.tensor(5), torch.tensor(3))
    kind = {torch.bool: DType.BOOL, torch.int64: DType.INT}.get(eager.dtype, DType.FLOAT)
    assert inner.dtype is kind


def test_builder_checks_arity_and_loads():
    with pytest.raises(ValueError, match="takes 2 operand"):
        node(Op.ADD, ir.Q_IDX)
    with pytest.raises(ValueError, match="1 dim"):
        node(Op.LOAD, ir.tensor(0, 1, "float32"), ir.Q_IDX, ir.KV_IDX)
    with pytest.raises(ValueError, match="tensor parameter"):
        node(Op.LOAD, ir.Q_IDX, ir.KV_IDX)
    with pytest.raises(TypeError, match="not an IR node"):
        node(Op.NEG, 3)


def test_params_of_orders_by_index():
    t, s = ir.tensor(1, 1, "float32"), ir.scalar(0, DType.INT)
    e = node(Op.ADD, node(Op.LOAD, t, ir.Q_IDX), s)
    assert ir.params_of(e) == [s, t]
    assert ir.uses(e, Op.LOAD) and not ir.uses(e, Op.EXP)


def test_locations_are_not_part_of_identity():
    a = af.trace(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, "mask")
    b = af.trace(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, "mask")
    assert a.ir is b.ir
    assert a.locs[a.ir].line != b.locs[b.ir].line
