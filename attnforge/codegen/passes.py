"""IR -> IR passes run before rendering, each a small named step with a one-line reason.

Every pass preserves the value *and* the IR dtype of every node it rewrites (``x + 0`` becomes
``x`` only when ``x`` already has the sum's dtype), so a rewritten mod means exactly what the
eager evaluator (:mod:`attnforge.dsl.evaluate`) says the original means.  Because nodes are
hash-consed, rebuilding a DAG also shares equal subexpressions (CSE for free).

``lower`` in :mod:`attnforge.codegen` runs :data:`PASSES` in order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..dsl.evaluate import evaluate
from ..dsl.ir import (
    COMMUTATIVE,
    LEAVES,
    PARAMS,
    DType,
    Node,
    Op,
    const,
    node,
    toposort,
)

__all__ = [
    "Pass",
    "PASSES",
    "run_passes",
    "fold_constants",
    "canonicalize",
    "split_mask",
    "rewrite",
    "is_nonnegative",
]


@dataclass(frozen=True)
class Pass:
    name: str
    why: str
    fn: Callable[[Node], Node]


def rewrite(root: Node, rule: Callable[[Node], Node | None]) -> Node:
    """Rebuild ``root`` bottom-up, applying ``rule`` to each rebuilt node until it declines.

    ``rule(n)`` returns a replacement (same dtype) or None.  Leaves, constants and parameters
    are passed to ``rule`` too but are usually left alone.
    """
    done: dict[int, Node] = {}
    for n in toposort([root]):
        if n.src:
            new_src = tuple(done[id(s)] for s in n.src)
            m = n if new_src == n.src else node(n.op, *new_src, arg=n.arg)
        else:
            m = n
        for _ in range(64):  # rules strictly simplify; the bound only guards against a bad rule
            r = rule(m)
            if r is None or r is m:
                break
            if r.dtype is not m.dtype:
                raise AssertionError(f"pass changed dtype: {m!r} -> {r!r}")
            m = r
        done[id(n)] = m
    return done[id(root)]


# -- fold constants --------------------------------------------------------------------------


def _py(value: torch.Tensor, dtype: DType) -> bool | int | float:
    item = value.item()
    if dtype is DType.BOOL:
        return bool(item)
    if dtype is DType.INT:
        return int(item)
    return float(item)


def _fold_rule(n: Node) -> Node | None:
    if not n.src or n.op in PARAMS or n.op is Op.LOAD:
        return None
    if not all(s.op is Op.CONST for s in n.src):
        return None
    if n.op in (Op.FLOORDIV, Op.MOD) and n.dtype is not DType.FLOAT and n.src[1].arg == 0:
        return None  # integer division by zero raises in torch: leave it for the kernel
    try:
        value = evaluate(n, {}, (), float_dtype=torch.float64)
    except (RuntimeError, ValueError, ZeroDivisionError):
        return None
    return const(_py(value, n.dtype))


def fold_constants(root: Node) -> Node:
    return rewrite(root, _fold_rule)


# -- canonicalize ------------------------------------------------------------------------------

_SWAP = {Op.GT: Op.LT, Op.GE: Op.LE}  # a > b == b < a; a >= b == b <= a
_NEGATE_INT = {Op.LT: Op.LE, Op.LE: Op.LT}  # not(a < b) == b <= a, exact for ints and bools


def _is(n: Node, value) -> bool:
    return n.op is Op.CONST and type(n.arg) is type(value) and n.arg == value


def _is_num(n: Node, value) -> bool:
    """``n`` is the numeric constant ``value`` (int or float, not bool)."""
    return n.op is Op.CONST and not isinstance(n.arg, bool) and n.arg == value


def _order_key(n: Node) -> tuple:
    return (n.op is Op.CONST, n.key)


def _same(n: Node, x: Node) -> Node | None:
    """``x`` may replace ``n`` only if it has ``n``'s dtype."""
    return x if x.dtype is n.dtype else None


def _canon_rule(n: Node) -> Node | None:
    op, src = n.op, n.src
    if op in COMMUTATIVE and len(src) == 2 and _order_key(src[0]) > _order_key(src[1]):
        return node(op, src[1], src[0], arg=n.arg)
    if op in _SWAP:
        return node(_SWAP[op], src[1], src[0])
    simpler = _IDENTITIES.get(op)
    return simpler(n) if simpler is not None else None


def _add(n):
    a, b = n.src
    return _same(n, a) if _is_num(b, 0) else None


def _sub(n):
    a, b = n.src
    if _is_num(b, 0):
        return _same(n, a)
    return None


def _mul(n):
    a, b = n.src
    if _is_num(b, 1):
        return _same(n, a)
    if n.dtype is DType.INT and _is_num(b, 0) and a.dtype is not DType.FLOAT:
        return const(0)  # exact for ints (no inf/nan)
    return None


def _div(n):
    a, b = n.src
    return _same(n, a) if _is_num(b, 1) and a.dtype is DType.FLOAT else None


def _neg(n):
    (a,) = n.src
    return _same(n, a.src[0]) if a.op is Op.NEG else None


def _not(n):
    (a,) = n.src
    if a.op is Op.NOT:
        return _same(n, a.src[0])
    if n.dtype is DType.BOOL and a.op in _NEGATE_INT and a.src[0].dtype is not DType.FLOAT \
            and a.src[1].dtype is not DType.FLOAT:  # fmt: skip
        return node(_NEGATE_INT[a.op], a.src[1], a.src[0])
    return None


def _and(n):
    a, b = n.src
    if n.dtype is DType.BOOL and b.op is Op.CONST:
        return a if b.arg else const(False)
    return a if a is b else None


def _or(n):
    a, b = n.src
    if n.dtype is DType.BOOL and b.op is Op.CONST:
        return const(True) if b.arg else a
    return a if a is b else None


def _where(n):
    c, x, y = n.src
    if c.op is Op.CONST:
        return _same(n, x if c.arg else y)
    if x is y:
        return _same(n, x)
    return None


def _minmax(n):
    a, b = n.src
    return _same(n, a) if a is b else None


def _cast(n):
    (a,) = n.src
    return a if a.dtype is n.dtype else None


_IDENTITIES: dict[Op, Callable[[Node], Node | None]] = {
    Op.ADD: _add,
    Op.SUB: _sub,
    Op.MUL: _mul,
    Op.DIV: _div,
    Op.NEG: _neg,
    Op.NOT: _not,
    Op.AND: _and,
    Op.OR: _or,
    Op.WHERE: _where,
    Op.MIN: _minmax,
    Op.MAX: _minmax,
    Op.CAST: _cast,
}


def canonicalize(root: Node) -> Node:
    return rewrite(root, _canon_rule)


# -- mask split ----------------------------------------------------------------------------------


def _conjuncts(n: Node) -> list[Node]:
    if n.op is Op.AND and n.dtype is DType.BOOL:
        return _conjuncts(n.src[0]) + _conjuncts(n.src[1])
    return [n]


def _and_all(parts: list[Node]) -> Node | None:
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = node(Op.AND, out, p)
    return canonicalize(out)


def reads_memory(n: Node) -> bool:
    return any(m.op is Op.LOAD for m in n.walk())


def split_mask(mask: Node | None) -> tuple[Node | None, Node | None]:
    """``mask == index_part & data_part``: the conjuncts that read no captured tensor (block
    analysis can reason about them) and those that do (only the kernel can evaluate them)."""
    if mask is None:
        return None, None
    parts = _conjuncts(mask)
    index = [p for p in parts if not reads_memory(p)]
    data = [p for p in parts if reads_memory(p)]
    return _and_all(index), _and_all(data)


# -- facts used by the renderer ------------------------------------------------------------------


def is_nonnegative(n: Node, _memo: dict | None = None) -> bool:
    """Conservative: True only if ``n`` (an int) can never be negative, so a tensor index built
    from it needs no negative-index wrap."""
    memo = {} if _memo is None else _memo
    hit = memo.get(id(n))
    if hit is not None:
        return hit
    op = n.op
    if op in LEAVES:
        r = op is not Op.SCORE
    elif op is Op.CONST:
        r = not isinstance(n.arg, float) and n.arg >= 0
    elif op in (Op.ADD, Op.MUL, Op.MIN, Op.MAX, Op.AND):
        a, b = (is_nonnegative(s, memo) for s in n.src)
        r = (a or b) if op is Op.AND else (a and b)
        if op is Op.MAX:
            r = a or b
    elif op in (Op.FLOORDIV, Op.MOD):
        # Python semantics: both take the sign of the divisor when the dividend is >= 0 ...
        d = n.src[1]
        positive_divisor = d.op is Op.CONST and not isinstance(d.arg, float) and d.arg > 0
        r = positive_divisor and (op is Op.MOD or is_nonnegative(n.src[0], memo))
    elif op is Op.WHERE:
        r = is_nonnegative(n.src[1], memo) and is_nonnegative(n.src[2], memo)
    elif op is Op.CAST:
        r = n.src[0].dtype is DType.BOOL
    else:
        r = n.dtype is DType.BOOL
    memo[id(n)] = r
    return r


# -- the pipeline --------------------------------------------------------------------------------

PASSES: tuple[Pass, ...] = (
    Pass("fold_constants", "compute constant subtrees once, at compile time", fold_constants),
    Pass(
        "canonicalize", "one spelling per expression, so equal mods share one kernel", canonicalize
    ),  # fmt: skip
    Pass(
        "fold_constants_again", "canonicalization can expose new constant subtrees", fold_constants
    ),  # fmt: skip
)


def run_passes(root: Node | None) -> Node | None:
    if root is None:
        return None
    for p in PASSES:
        root = p.fn(root)
    return root


def is_identity_score(root: Node | None) -> bool:
    return root is None or root.op is Op.SCORE


def is_trivial_mask(root: Node | None) -> bool:
    return root is None or (root.op is Op.CONST and bool(root.arg))


def literal(value) -> str:
    """Python source for a constant (also valid inside ``@triton.jit``)."""
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value >= 0 else f"({value})"
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    text = repr(float(value))
    return text if value >= 0 else f"({text})"
