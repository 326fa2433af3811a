"""Symbolic derivatives of a score mod, as IR, for the backward kernels.

A score mod maps the scaled logit ``score`` (and the indices, captured scalars and captured
tensors) to the logit ``T`` that enters the softmax.  The backward kernel knows ``dL/dT`` per
element (``dT = P * (dP - delta)``) and needs

* ``d_score = dT/dscore``, to form ``dS = dT * d_score`` for dQ and dK, and
* for every read ``tensor[i0, i1, ...]`` of a captured float tensor, ``d_load = dT/d(read)``:
  the kernel scatters ``dT * d_load`` into ``grad_tensor[i0, i1, ...]`` with atomics.

Both are float IR in terms of the same leaves as the mod, built by reverse-mode accumulation over
the DAG with a table of local partials per :class:`Op`, then simplified while being built
(constant folding, ``x*1``, ``x*0 -> 0``, ``x+0``).  Reads of the same tensor at different indices
are different ``LOAD`` nodes, so each gets its own contribution; the same read used twice is one
node and its uses are summed.

Non-differentiable parts (comparisons, floor/ceil, integer arithmetic, masks) contribute nothing.
``where`` routes the adjoint with a select, never a multiplication by a 0/1 mask, so a branch
holding ``-inf`` (``where(cond, score, -inf)``) yields an exact zero instead of ``0 * inf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..dsl.ir import DType, Node, Op, const, node, toposort

__all__ = ["ScoreGrad", "differentiate", "float_loads"]

_LN2 = math.log(2.0)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


@dataclass(frozen=True)
class ScoreGrad:
    """Derivatives of one score mod.

    ``d_score``: dT/dscore.  ``d_loads``: ``(load_node, dT/d(load))`` for each distinct read of a
    captured float tensor, in topological order of the mod (deterministic).
    """

    d_score: Node
    d_loads: tuple[tuple[Node, Node], ...]

    def tensor_indices(self) -> list[int]:
        """Parameter indices of the tensors that receive gradients (sorted, unique)."""
        return sorted({load.src[0].arg[0] for load, _ in self.d_loads})


# -- simplifying constructors ------------------------------------------------------------------


def _is_const(n: Node, value=None) -> bool:
    return n.op is Op.CONST and (value is None or n.arg == value)


def _fold(op: Op, *src: Node) -> Node:
    """Evaluate an op whose operands are all constants, keeping the IR dtype of the result."""
    import torch

    from ..dsl.evaluate import evaluate

    n = node(op, *src)
    v = evaluate(n, {}, (), float_dtype=torch.float64).item()
    if n.dtype is DType.FLOAT:
        return const(float(v))
    if n.dtype is DType.INT:
        return const(int(v))
    return const(bool(v))


def _to_float(n: Node) -> Node:
    if n.dtype is DType.FLOAT:
        return n
    if n.op is Op.CONST:
        return const(float(n.arg))
    return node(Op.CAST, n, arg=DType.FLOAT)


def f(x: float | Node) -> Node:
    return x if isinstance(x, Node) else const(float(x))


def add(a: Node, b: Node) -> Node:
    if _is_const(a, 0):
        return _to_float(b)
    if _is_const(b, 0):
        return _to_float(a)
    if a.op is Op.CONST and b.op is Op.CONST:
        return _fold(Op.ADD, a, b)
    if b.op is Op.NEG:
        return sub(a, b.src[0])
    return node(Op.ADD, a, b)


def sub(a: Node, b: Node) -> Node:
    if _is_const(b, 0):
        return _to_float(a)
    if _is_const(a, 0):
        return neg(b)
    if a.op is Op.CONST and b.op is Op.CONST:
        return _fold(Op.SUB, a, b)
    if b.op is Op.NEG:
        return add(a, b.src[0])
    return node(Op.SUB, a, b)


def neg(a: Node) -> Node:
    if a.op is Op.CONST:
        return _fold(Op.NEG, a)
    if a.op is Op.NEG:
        return a.src[0]
    return node(Op.NEG, a)


def mul(a: Node, b: Node) -> Node:
    # x*0 -> 0 on purpose: a structurally zero partial must stay zero even where x is inf.
    if _is_const(a, 0) or _is_const(b, 0):
        return const(0.0)
    if _is_const(a, 1):
        return _to_float(b)
    if _is_const(b, 1):
        return _to_float(a)
    if _is_const(a, -1):
        return neg(_to_float(b))
    if _is_const(b, -1):
        return neg(_to_float(a))
    if a.op is Op.CONST and b.op is Op.CONST:
        return _fold(Op.MUL, a, b)
    if b.op is Op.CONST:  # constants first: c * x reads better and folds with c2 * (c * x)
        a, b = b, a
    if a.op is Op.CONST and b.op is Op.MUL and b.src[0].op is Op.CONST:
        return mul(_fold(Op.MUL, a, b.src[0]), b.src[1])
    if a.op is Op.NEG and b.op is Op.NEG:
        return mul(a.src[0], b.src[0])
    return node(Op.MUL, a, b)


def div(a: Node, b: Node) -> Node:
    if _is_const(a, 0):
        return const(0.0)
    if _is_const(b, 1):
        return _to_float(a)
    if a.op is Op.CONST and b.op is Op.CONST:
        return _fold(Op.DIV, a, b)
    return node(Op.DIV, a, b)


def where(c: Node, a: Node, b: Node) -> Node:
    a, b = _to_float(a), _to_float(b)
    if a is b:
        return a
    if c.op is Op.CONST:
        return a if c.arg else b
    return node(Op.WHERE, c, a, b)


def pow_(a: Node, b: Node) -> Node:
    if _is_const(b, 1):
        return _to_float(a)
    if _is_const(b, 0):
        return const(1.0)
    return bin_(Op.POW, a, b)


def un(op: Op, a: Node) -> Node:
    if a.op is Op.CONST:
        return _fold(op, a)
    return node(op, a)


def bin_(op: Op, a: Node, b: Node) -> Node:
    if a.op is Op.CONST and b.op is Op.CONST:
        return _fold(op, a, b)
    return node(op, a, b)


# -- local partials ------------------------------------------------------------------------------
# Each rule takes the node ``n`` (its operands in ``n.src``) and the adjoint ``g`` of ``n`` and
# returns the adjoint contribution for each operand (``None`` where there is none).

Rule = Callable[[Node, Node], tuple]


def _sign(x: Node) -> Node:
    # torch's abs backward uses sign(x): 0 at 0
    return where(bin_(Op.GT, x, const(0)), f(1), where(bin_(Op.LT, x, const(0)), f(-1), f(0)))


def _pow_rule(n: Node, g: Node) -> tuple:
    a, b = n.src
    # a ** b: d/da = b * a ** (b - 1) (0 where b == 0, as torch); d/db = a ** b * log(a)
    # (0 where a == 0 and b >= 0, as torch, so 0 ** b does not give 0 * -inf).
    if _is_const(b):
        da = mul(g, mul(b, pow_(a, _fold(Op.SUB, b, const(1)))))
    else:
        da = where(bin_(Op.EQ, b, const(0)), f(0), mul(g, mul(b, pow_(a, sub(b, const(1))))))
    zero_base = bin_(Op.AND, bin_(Op.EQ, a, const(0)), bin_(Op.GE, b, const(0)))
    db = where(zero_base, f(0), mul(g, mul(n, un(Op.LOG, a))))
    return da, db


def _minmax_rule(n: Node, g: Node) -> tuple:
    # torch.minimum / maximum: the winner gets the gradient, a tie splits it in half
    a, b = n.src
    wins = Op.LT if n.op is Op.MIN else Op.GT
    half = mul(f(0.5), g)
    da = where(bin_(wins, a, b), g, where(bin_(Op.EQ, a, b), half, f(0)))
    db = where(bin_(wins, b, a), g, where(bin_(Op.EQ, a, b), half, f(0)))
    return da, db


_RULES: dict[Op, Rule] = {
    Op.ADD: lambda n, g: (g, g),
    Op.SUB: lambda n, g: (g, neg(g)),
    Op.MUL: lambda n, g: (mul(g, n.src[1]), mul(g, n.src[0])),
    Op.DIV: lambda n, g: (div(g, n.src[1]), neg(div(mul(g, n), n.src[1]))),
    Op.NEG: lambda n, g: (neg(g),),
    Op.POW: _pow_rule,
    Op.WHERE: lambda n, g: (None, where(n.src[0], g, f(0)), where(n.src[0], f(0), g)),
    Op.EXP: lambda n, g: (mul(g, n),),
    Op.EXP2: lambda n, g: (mul(g, mul(f(_LN2), n)),),
    Op.LOG: lambda n, g: (div(g, n.src[0]),),
    Op.LOG2: lambda n, g: (div(g, mul(f(_LN2), n.src[0])),),
    Op.TANH: lambda n, g: (mul(g, sub(f(1), mul(n, n))),),
    Op.SIGMOID: lambda n, g: (mul(g, mul(n, sub(f(1), n))),),
    Op.ABS: lambda n, g: (mul(g, _sign(n.src[0])),),
    Op.SQRT: lambda n, g: (div(mul(f(0.5), g), n),),
    Op.RSQRT: lambda n, g: (mul(mul(f(-0.5), g), mul(n, mul(n, n))),),
    Op.SIN: lambda n, g: (mul(g, un(Op.COS, n.src[0])),),
    Op.COS: lambda n, g: (neg(mul(g, un(Op.SIN, n.src[0]))),),
    Op.ERF: lambda n, g: (
        mul(mul(f(_TWO_OVER_SQRT_PI), g), un(Op.EXP, neg(mul(n.src[0], n.src[0])))),
    ),
    Op.MIN: _minmax_rule,
    Op.MAX: _minmax_rule,
    Op.CAST: lambda n, g: (g,),  # only float -> float casts are active (see _active)
}

# Piecewise-constant or non-float ops: their partials are zero, so they stop the chain.
_ZERO = frozenset({Op.FLOOR, Op.CEIL})


def _active(root: Node) -> set[int]:
    """ids of float nodes whose value depends on ``score`` or on a float tensor read."""
    active: set[int] = set()
    for n in toposort([root]):
        if n.dtype is not DType.FLOAT or n.op in _ZERO:
            continue
        if n.op is Op.SCORE or (n.op is Op.LOAD and n.src[0].dtype is DType.FLOAT):
            active.add(id(n))
        elif n.op is Op.CAST and n.src[0].dtype is not DType.FLOAT:
            continue
        elif n.op is not Op.LOAD and any(id(s) in active for s in n.src):
            active.add(id(n))
    return active


def differentiate(root: Node) -> ScoreGrad:
    """Reverse-mode derivatives of the score mod ``root`` (see the module docstring)."""
    if root.dtype is not DType.FLOAT:
        raise ValueError(
            f"differentiate: a score mod must return a float, got {root.dtype.value}; "
            "fix: return a float expression of score (e.g. score + bias)"
        )
    active = _active(root)
    order = [n for n in toposort([root]) if id(n) in active]
    adj: dict[int, Node] = {id(root): const(1.0)}
    for n in reversed(order):
        g = adj.get(id(n))
        if g is None or n.op in (Op.SCORE, Op.LOAD):
            continue
        rule = _RULES.get(n.op)
        if rule is None:
            raise NotImplementedError(
                f"differentiate: no derivative rule for op {n.op.value!r}; "
                "fix: add one to attnforge.codegen.grad._RULES"
            )
        for s, gs in zip(n.src, rule(n, g)):
            if gs is None or id(s) not in active:
                continue
            prev = adj.get(id(s))
            adj[id(s)] = gs if prev is None else add(prev, gs)
    zero = const(0.0)
    d_score = next((adj.get(id(n), zero) for n in order if n.op is Op.SCORE), zero)
    d_loads = tuple((n, adj.get(id(n), zero)) for n in order if n.op is Op.LOAD and id(n) in adj)
    return ScoreGrad(_to_float(d_score), d_loads)


def float_loads(root: Node) -> list[Node]:
    """Distinct reads of captured float tensors in ``root``, in topological order."""
    return [n for n in root.walk() if n.op is Op.LOAD and n.src[0].dtype is DType.FLOAT]
