"""Index checks for captured tensors, at a call's full path.

The kernels mask every read of a captured tensor to its bounds (a padded row or column past
the lengths must never fault, ``codegen/render.py``), so an index that leaves the tensor at a
real position reads 0.  Where that 0 reaches the output, the answer is silently wrong; torch's
eager flex raises IndexError.  Here the same happens before any kernel runs, for a read that:

- is not guarded: reached from the mod's result without passing through a ``where`` branch,
  ``&``, ``|``, ``min`` or ``max`` (which can make the value irrelevant, as in
  ``torch.where(q_idx < n, valid[q_idx], False)``), and, in a score mod, only where the call
  has no mask_mod (a masked position's score is never used);
- has indices affine in the positions: ``c_b*b + c_h*h + c_q*q_idx + c_kv*kv_idx + c`` with
  integer coefficients from constants and captured ints.  The positions are independent, so
  such an index takes its extremes at corners of the call's domain ``[0, B) x [0, H) x
  [0, L) x [0, S)``, which are real positions: an extreme outside ``[-size, size)`` is a read
  torch refuses and the kernel would answer with 0.

Anything else (floor-div, a loaded index such as ``doc[q_idx]``, a float) is left to the
kernels' masking: an over-estimate of its range would refuse valid mods.  Repeat calls served
by a per-call plan (``runtime.api``) are not checked again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..dsl.ir import DType, Node, Op
from .launch import mod_param

__all__ = ["check_index_bounds"]

_POSITIONS = (Op.B, Op.H, Op.Q_IDX, Op.KV_IDX)
_NAMES = {Op.B: "b", Op.H: "h", Op.Q_IDX: "q_idx", Op.KV_IDX: "kv_idx"}


def check_index_bounds(
    kind: str, ir: Node | None, params: Sequence[Any], extents: dict[Op, int]
) -> None:
    """Raise IndexError where ``ir`` (a ``kind`` mod) indexes a captured tensor out of its
    bounds at some position; ``params``: the mod's parameter table (``Param.current()``);
    ``extents``: the number of values of each position (B, H, L, S of the call)."""
    if ir is None or any(n <= 0 for n in extents.values()):
        return
    values: dict[int, Any] = {}
    for n in _unguarded_loads(ir):
        tensor = _value(params, n.src[0].arg[0], values)
        shape = getattr(tensor, "shape", None)
        if shape is None:
            continue
        for dim, index in enumerate(n.src[1:]):
            form = _affine(index, params, values)
            if form is None or dim >= len(shape):
                continue
            lo, hi = _extremes(form, extents)
            size = int(shape[dim])
            if lo < -size or hi >= size:
                name = mod_param(params, n.src[0].arg[0]).name
                bad = hi if hi >= size else lo
                raise IndexError(
                    f"{kind}_mod indexes the captured tensor {name!r} (shape {tuple(shape)}) "
                    f"with {_describe(form)} along dimension {dim}, which reaches {bad} for "
                    f"this call ({_domain(form, extents)}); index {bad} is out of bounds for "
                    f"dimension {dim} with size {size} (as in torch).  Size the tensor for "
                    "the call's lengths, or clamp the index in the mod"
                )


_GUARDS = frozenset({Op.AND, Op.OR, Op.MIN, Op.MAX})


def _unguarded_loads(root: Node) -> list[Node]:
    """The loads reached from ``root`` through no where-branch, ``&``, ``|``, min or max."""
    seen, todo, loads = set(), [root], []
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.op is Op.LOAD:
            loads.append(n)
        if n.op in _GUARDS:
            continue
        todo.extend(n.src[:1] if n.op is Op.WHERE else n.src)
    return loads


def _value(params: Sequence[Any], index: int, memo: dict) -> Any:
    if index not in memo:
        memo[index] = mod_param(params, index).current()
    return memo[index]


def _affine(n: Node, params: Sequence[Any], memo: dict) -> dict | None:
    """``{position op or 1: int coefficient}`` of an integer index, or None."""
    op = n.op
    if n.dtype is not DType.INT:
        return None
    if op in _POSITIONS:
        return {op: 1}
    if op is Op.CONST:
        return {1: int(n.arg)}
    if op is Op.SCALAR:
        v = _value(params, n.arg[0], memo)
        try:
            return {1: int(v)}
        except (TypeError, ValueError, RuntimeError):
            return None
    if op is Op.CAST:
        return _affine(n.src[0], params, memo)
    if op is Op.NEG:
        a = _affine(n.src[0], params, memo)
        return None if a is None else {k: -c for k, c in a.items()}
    if op in (Op.ADD, Op.SUB):
        a, b = (_affine(s, params, memo) for s in n.src)
        if a is None or b is None:
            return None
        sign = 1 if op is Op.ADD else -1
        out = dict(a)
        for k, c in b.items():
            out[k] = out.get(k, 0) + sign * c
        return out
    if op is Op.MUL:
        a, b = (_affine(s, params, memo) for s in n.src)
        if a is None or b is None:
            return None
        if set(a) <= {1}:
            a, b = b, a
        if not set(b) <= {1}:
            return None  # a product of positions: not affine
        k = b.get(1, 0)
        return {key: c * k for key, c in a.items()}
    return None


def _extremes(form: dict, extents: dict[Op, int]) -> tuple[int, int]:
    lo = hi = form.get(1, 0)
    for op, c in form.items():
        if op == 1 or c == 0:
            continue
        top = c * (extents[op] - 1)
        lo += min(0, top)
        hi += max(0, top)
    return lo, hi


def _describe(form: dict) -> str:
    terms = [(c, _NAMES[op]) for op in _POSITIONS if (c := form.get(op, 0))]
    if form.get(1, 0) or not terms:
        terms.append((form.get(1, 0), ""))
    text = ""
    for i, (c, name) in enumerate(terms):
        mag = abs(c)
        body = name if name and mag == 1 else f"{mag}*{name}" if name else str(mag)
        text += ("-" if c < 0 else "") + body if i == 0 else (" - " if c < 0 else " + ") + body
    return text


def _domain(form: dict, extents: dict[Op, int]) -> str:
    used = [op for op in _POSITIONS if form.get(op, 0)]
    return ", ".join(f"{_NAMES[op]} in [0, {extents[op] - 1}]" for op in used) or "any position"
