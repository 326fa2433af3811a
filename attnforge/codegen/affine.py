"""Pass: recognise a score mod that adds a bias affine in the positions (ALiBi, linear biases).

``score_mod(score, b, h, q, kv) = score + B(b, h, q, kv)`` where ``B`` is affine in ``q`` and
``kv`` with coefficients that depend only on ``b``, ``h`` and captured values::

    B(q, kv) = B(q0, kv0) + dq * (q - q0) + dkv * (kv - kv0)

for any reference point ``(q0, kv0)``.  A kernel takes the tile's origin as the reference and
pays, per score, one FMA and one add (the row part joins the log-sum-exp row vector) instead of
the mod's arithmetic (ALiBi: a subtraction, an int->float conversion or two, a multiply, an add
and the log2(e) scaling).  Evaluating ``B`` itself at the origin keeps the user's order of
operations for the large part (``kv - q`` stays an exact integer difference); the per-score
offsets are small, so the result is as accurate as evaluating the mod per score.

The analysis is structural, on the canonical IR: ``+``, ``-``, negation, multiplication or
division by a position-free factor, and int->float casts keep a term affine; anything else
that reads ``q_idx`` or ``kv_idx`` (a ``where``, a load indexed by a position, ``//``, ...)
makes the mod ineligible, and the kernels evaluate it per score as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..dsl.ir import DType, Node, Op, const, toposort
from .grad import add, div, mul, neg, sub

__all__ = ["AffineBias", "affine_bias"]

_POSITIONS = frozenset({Op.Q_IDX, Op.KV_IDX})


@dataclass(frozen=True)
class AffineBias:
    """``score_mod == score + bias``; ``d_q`` / ``d_kv``: dbias/dq and dbias/dkv (IR free of
    positions and of ``score``)."""

    bias: Node
    d_q: Node
    d_kv: Node


def _terms(n: Node, sign: int, out: list[tuple[int, Node]]) -> None:
    # the signed terms of a sum: a - (b + c) -> [(+1, a), (-1, b), (-1, c)]
    if n.op is Op.ADD:
        _terms(n.src[0], sign, out)
        _terms(n.src[1], sign, out)
    elif n.op is Op.SUB:
        _terms(n.src[0], sign, out)
        _terms(n.src[1], -sign, out)
    elif n.op is Op.NEG:
        _terms(n.src[0], -sign, out)
    else:
        out.append((sign, n))


def _split_score(root: Node) -> Node | None:
    """``bias`` if ``root`` is a sum with ``+score`` as one term and no other term reading
    ``score`` (``score + B``, ``B - C + score``, ...)."""
    terms: list[tuple[int, Node]] = []
    _terms(root, 1, terms)
    scores = [sign for sign, t in terms if t.op is Op.SCORE]
    if scores != [1]:
        return None
    bias = None
    for sign, t in terms:
        if t.op is Op.SCORE:
            continue
        if bias is None:
            bias = t if sign > 0 else neg(t)
        else:
            bias = add(bias, t) if sign > 0 else sub(bias, t)
    return bias


def affine_bias(score: Node | None) -> AffineBias | None:
    """The affine split of a score mod, or None where it does not apply."""
    if score is None:
        return None
    bias = _split_score(score)
    if bias is None or bias.dtype is DType.BOOL:
        return None
    order = toposort([bias])
    if any(n.op is Op.SCORE for n in order):
        return None
    # positional[n]: n reads q_idx or kv_idx; slopes[n] = (dn/dq, dn/dkv) for those that do
    positional: dict[Node, bool] = {}
    slopes: dict[Node, tuple[Node, Node]] = {}
    zero = const(0)
    for n in order:
        positional[n] = n.op in _POSITIONS or any(positional[s] for s in n.src)
        if not positional[n]:
            continue
        got = _slope(n, positional, slopes, zero)
        if got is None:
            return None
        slopes[n] = got
    if not positional[bias]:
        return None  # a bias of b / h only: nothing per score to save, keep the mod as written
    d_q, d_kv = slopes[bias]
    return AffineBias(bias, d_q, d_kv)


def _slope(n: Node, positional, slopes, zero) -> tuple[Node, Node] | None:
    """(dn/dq, dn/dkv) of a positional node whose operands' slopes are known, or None."""
    if n.op is Op.Q_IDX:
        return const(1), zero
    if n.op is Op.KV_IDX:
        return zero, const(1)
    get = lambda s: slopes[s] if positional[s] else (zero, zero)  # noqa: E731
    if n.op in (Op.ADD, Op.SUB):
        (aq, akv), (bq, bkv) = get(n.src[0]), get(n.src[1])
        op = add if n.op is Op.ADD else sub
        return op(aq, bq), op(akv, bkv)
    if n.op is Op.NEG:
        aq, akv = get(n.src[0])
        return neg(aq), neg(akv)
    if n.op is Op.MUL:
        a, b = n.src
        if positional[a] and positional[b]:
            return None  # q * kv, q * q: not affine
        c, (sq, skv) = (b, slopes[a]) if positional[a] else (a, slopes[b])
        return mul(c, sq), mul(c, skv)
    if n.op is Op.DIV:  # true division by a position-free divisor
        a, b = n.src
        if positional[b]:
            return None
        sq, skv = slopes[a]
        return div(sq, b), div(skv, b)
    if n.op is Op.CAST and n.arg is DType.FLOAT:
        return slopes[n.src[0]]
    return None
