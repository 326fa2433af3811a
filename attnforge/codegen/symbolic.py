"""Interval analysis of a mask IR over block boxes: always true, always false, or unknown.

A *box* is ``q in [ql, qh]``, ``kv in [kl, kh]`` (inclusive, already clipped to the lengths).
:func:`analyze` evaluates a mask over N boxes at once (numpy arrays of shape [N]) and returns a
:class:`Bool3`: per box, may the mask be True somewhere (``can_t``), False somewhere (``can_f``),
and is it *known* to be True somewhere (``has_t``) / False somewhere (``has_f``).  ``can_*`` are
sound over-approximations and ``has_*`` sound under-approximations, so a box is

    EMPTY    when not can_t         FULL     when not can_f
    PARTIAL  when has_t and has_f   unknown  otherwise (the caller evaluates it exactly)

Numbers are abstracted as ``cq*q + ck*kv + r`` with ``r`` in ``[rlo, rhi]`` (all per box):
an exact affine form when ``rlo == rhi`` (then its extremes are at the box corners, so
comparisons of affine forms are decided exactly, keeping the q/kv correlation that plain
interval arithmetic loses in ``q - kv``), an interval otherwise.  Each value also records
whether its bounds are attained (``ends``) and whether every integer between them is attained
(``dense``), and which of q / kv it depends on: two values over disjoint variables combine
freely, which is what proves PARTIAL for ``abs(clamp(q) - kv) <= k`` or ``doc[q] == doc[kv]``.

Floor-div and mod by a constant are exact (affine) in boxes where the quotient is constant,
and sound intervals elsewhere.  Float arithmetic is never trusted to the last bit: float
comparisons are decided only with a relative margin, so boundary boxes stay unknown.

:func:`specialize` first substitutes b, h and captured scalars, and folds every load whose
indices are then constant (``lengths[b]``, ``windows[h]``): the result is one IR per distinct
(b, h) behaviour, which the block planner analyses once and shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..dsl.evaluate import evaluate
from ..dsl.ir import DType, Node, Op, const, node, toposort

__all__ = ["Bool3", "Num", "Boxes", "analyze", "specialize", "TensorFacts"]

_INF = float("inf")
# relative margin for float comparisons (our corner arithmetic may round differently from torch)
_FLOAT_TOL = 1e-9
# integers beyond this are not exact in float64 arithmetic: treat them like floats
_EXACT_LIMIT = 2.0**50


# -- specialization ------------------------------------------------------------------------------


def _py_value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"scalar parameter has {v.numel()} elements; expected a number")
        return v.item()
    if isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"scalar parameter value {v!r} ({type(v).__name__}) is not a number")


def _fold(n: Node, params: Sequence[Any]) -> Node:
    """``n`` (all of whose operands are constants) as a constant, or ``n`` when it can't fold."""
    try:
        v = evaluate(n, {}, params)
    except (RuntimeError, ValueError, ZeroDivisionError, IndexError):
        return n  # e.g. integer division by zero: left for the exact evaluator to report
    item = v.item()
    if n.dtype is DType.BOOL:
        return const(bool(item))
    if n.dtype is DType.INT:
        return const(int(item))
    return const(float(item))


def _simplify(n: Node) -> Node:
    """Boolean identities with a constant operand (only where the dtype is unchanged)."""
    if n.dtype is not DType.BOOL:
        return n
    if n.op in (Op.AND, Op.OR):
        absorbing = n.op is Op.OR
        for a, b in (n.src, n.src[::-1]):
            if a.op is Op.CONST and b.dtype is DType.BOOL:
                return const(absorbing) if bool(a.arg) is absorbing else b
    if n.op is Op.WHERE and n.src[0].op is Op.CONST:
        pick = n.src[1] if n.src[0].arg else n.src[2]
        if pick.dtype is DType.BOOL:
            return pick
    return n


def specialize(root: Node, params: Sequence[Any], b: int | None = 0, h: int | None = 0) -> Node:
    """``root`` with b, h and scalar parameters substituted and constant subtrees folded.

    ``b=None`` / ``h=None`` keep that index symbolic.

    Loads whose indices become constant are read (``lengths[b]`` -> a number), so the result
    only mentions q_idx, kv_idx, constants and loads indexed by q_idx / kv_idx.  Semantics are
    the evaluator's (folding runs :func:`attnforge.dsl.evaluate.evaluate`).
    """
    done: dict[int, Node] = {}
    for n in toposort([root]):
        if n.op is Op.B and b is not None:
            m = const(int(b))
        elif n.op is Op.H and h is not None:
            m = const(int(h))
        elif n.op is Op.SCALAR:
            m = const(_py_value(params[n.arg[0]]))
        elif not n.src:
            m = n
        else:
            src = tuple(done[id(s)] for s in n.src)
            m = n if src == n.src else node(n.op, *src, arg=n.arg)
            operands = src[1:] if m.op is Op.LOAD else src
            if all(s.op is Op.CONST for s in operands):
                m = _fold(m, params)
            else:
                m = _simplify(m)
        done[id(n)] = m
    return done[id(root)]


# -- abstract values -----------------------------------------------------------------------------


@dataclass
class Boxes:
    """N boxes, inclusive bounds, float64 arrays (exact for indices below 2**50).

    ``b`` and ``h`` are each box's batch and head (a box lies in one (b, h) slice).
    """

    ql: np.ndarray
    qh: np.ndarray
    kl: np.ndarray
    kh: np.ndarray
    b: Any = 0.0
    h: Any = 0.0

    @classmethod
    def of(cls, ql, qh, kl, kh, b=0, h=0) -> Boxes:
        ql, qh, kl, kh, b, h = np.broadcast_arrays(*(np.asarray(v, np.float64)
                                                     for v in (ql, qh, kl, kh, b, h)))  # fmt: skip
        return cls(ql, qh, kl, kh, b, h)

    def __len__(self) -> int:
        return len(self.ql)


@dataclass
class Num:
    """``cq*q + ck*kv + r``, ``r in [rlo, rhi]``; arrays over boxes (or broadcastable scalars)."""

    cq: Any
    ck: Any
    rlo: Any
    rhi: Any
    ends: Any  # the bounds are attained by some point of the box
    dense: Any  # every integer between the bounds is attained
    deps: frozenset  # of "q", "kv": the index variables the value may depend on
    flt: bool = False  # float-valued: compared with a margin, attainment unused
    nan: bool = False  # may be NaN


@dataclass
class Bool3:
    can_t: Any
    can_f: Any
    has_t: Any
    has_f: Any
    deps: frozenset = frozenset()

    def __post_init__(self):
        # numpy bools throughout: ``~`` on a Python bool is an int
        for f in ("can_t", "can_f", "has_t", "has_f"):
            setattr(self, f, np.asarray(getattr(self, f), bool))

    def normalized(self) -> Bool3:
        ct, cf = self.can_t, self.can_f
        return Bool3(ct, cf, (self.has_t | ~cf) & ct, (self.has_f | ~ct) & cf, self.deps)


def _bconst(v: bool) -> Bool3:
    return Bool3(v, not v, v, not v)


def _nconst(v: float, flt: bool) -> Num:
    return Num(0.0, 0.0, float(v), float(v), True, True, frozenset(), flt, v != v)


def _sel(mask, a: Any, b: Any) -> Any:
    return np.where(mask, a, b)


class TensorFacts:
    """Per captured tensor (and constant-index slice): numpy copy, range, sortedness. Cached."""

    def __init__(self, params: Sequence[Any]):
        self.params = params
        self._cache: dict = {}

    def get(self, pidx: int, fixed: tuple) -> dict:
        key = (pidx, fixed)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        t = self.params[pidx]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"parameter {pidx} is used as a tensor but its value is {t!r}")
        t = t.detach()
        if t.is_floating_point():
            t = t.to(torch.float64)
        idx = tuple(slice(None) if f is None else f for f in fixed)
        a = t[idx].cpu().numpy() if idx else t.cpu().numpy()
        facts: dict = {"a": a, "bool": a.dtype == np.bool_}
        if a.size == 0:
            facts.update(lo=_INF, hi=-_INF, nan=False, inc=False, dec=False)
        elif facts["bool"]:
            facts.update(any=bool(a.any()), all=bool(a.all()))
        else:
            af = a.astype(np.float64)
            nan = bool(np.isnan(af).any())
            facts.update(lo=float(np.nanmin(af)) if not nan else -_INF,
                         hi=float(np.nanmax(af)) if not nan else _INF, nan=nan)  # fmt: skip
            steps = [np.diff(af, axis=d) for d in range(a.ndim)] if not nan else []
            facts.update(inc=[bool((d >= 0).all()) for d in steps] or [False] * a.ndim,
                         dec=[bool((d <= 0).all()) for d in steps] or [False] * a.ndim)  # fmt: skip
        self._cache[key] = facts
        return facts


class _Analyzer:
    def __init__(self, bx: Boxes, facts: TensorFacts):
        self.bx = bx
        self.nq = bx.qh - bx.ql
        self.nk = bx.kh - bx.kl
        self.facts = facts

    # -- numbers ---------------------------------------------------------------------------------

    def bounds(self, x: Num):
        bx = self.bx
        a, b = x.cq * bx.ql, x.cq * bx.qh
        c, d = x.ck * bx.kl, x.ck * bx.kh
        with np.errstate(invalid="ignore"):
            lo = np.minimum(a, b) + np.minimum(c, d) + x.rlo
            hi = np.maximum(a, b) + np.maximum(c, d) + x.rhi
        return lo, hi

    def finish(self, x: Num) -> Num:
        """Exact attainment facts where the value is an exact affine form."""
        if x.flt or x.nan:
            x.ends = x.dense = False
            return x
        exact = np.asarray(x.rlo == x.rhi)
        if not exact.any():
            return x
        a = np.where(self.nq > 0, np.abs(x.cq), 0.0)
        c = np.where(self.nk > 0, np.abs(x.ck), 0.0)
        integral = (np.floor(x.cq) == x.cq) & (np.floor(x.ck) == x.ck)
        dense = integral & (
            ((a == 0) & (c <= 1))
            | ((c == 0) & (a <= 1))
            | ((a == 1) & (c <= self.nq + 1))
            | ((c == 1) & (a <= self.nk + 1))
        )
        x.ends = np.where(exact, True, x.ends)
        x.dense = np.where(exact, dense, x.dense)
        return x

    def interval(self, lo, hi, ends, dense, deps, flt, nan=False) -> Num:
        return self.finish(Num(0.0, 0.0, lo, hi, ends, dense, deps, flt, nan))

    def top(self, deps, flt, nan=True) -> Num:
        return Num(0.0, 0.0, -_INF, _INF, False, False, deps, flt, nan)

    def select(self, mask, a: Num, b: Num) -> Num:
        mask = np.asarray(mask, bool)
        if mask.all():
            return a
        if not mask.any():
            return b
        return Num(_sel(mask, a.cq, b.cq), _sel(mask, a.ck, b.ck), _sel(mask, a.rlo, b.rlo),
                   _sel(mask, a.rhi, b.rhi), _sel(mask, a.ends, b.ends),
                   _sel(mask, a.dense, b.dense), a.deps | b.deps, a.flt or b.flt,
                   a.nan or b.nan)  # fmt: skip

    def add(self, x: Num, y: Num) -> Num:
        free = not (x.deps & y.deps)
        return self.finish(Num(
            x.cq + y.cq, x.ck + y.ck, x.rlo + y.rlo, x.rhi + y.rhi,
            np.logical_and(x.ends, y.ends) & free, np.logical_and(x.dense, y.dense) & free,
            x.deps | y.deps, x.flt or y.flt, x.nan or y.nan,
        ))  # fmt: skip

    def neg(self, x: Num) -> Num:
        return Num(-x.cq, -x.ck, -x.rhi, -x.rlo, x.ends, x.dense, x.deps, x.flt, x.nan)

    def scale(self, x: Num, s) -> Num:
        """``x * s`` for a per-box constant ``s``."""
        pos = np.asarray(s) >= 0
        with np.errstate(invalid="ignore"):
            lo, hi = x.rlo * s, x.rhi * s
        return self.finish(Num(
            x.cq * s, x.ck * s, np.where(pos, lo, hi), np.where(pos, hi, lo),
            x.ends, np.logical_and(x.dense, np.abs(s) == 1), x.deps, x.flt, x.nan,
        ))  # fmt: skip

    def is_point(self, x: Num):
        return (np.asarray(x.cq) == 0) & (np.asarray(x.ck) == 0) & np.asarray(x.rlo == x.rhi)

    def mul(self, x: Num, y: Num, flt: bool) -> Num:
        px, py = self.is_point(x), self.is_point(y)
        xl, xh = self.bounds(x)
        yl, yh = self.bounds(y)
        with np.errstate(invalid="ignore"):
            prods = [xl * yl, xl * yh, xh * yl, xh * yh]
        lo = np.minimum(np.minimum(prods[0], prods[1]), np.minimum(prods[2], prods[3]))
        hi = np.maximum(np.maximum(prods[0], prods[1]), np.maximum(prods[2], prods[3]))
        nan = x.nan or y.nan or bool(np.isnan(lo).any() or np.isnan(hi).any())
        out = self.interval(lo, hi, False, False, x.deps | y.deps, flt, nan)
        if np.any(py):
            out = self.select(py, self.scale(x, np.where(py, y.rlo, 0.0)), out)
        if np.any(px & ~py):
            out = self.select(px & ~py, self.scale(y, np.where(px, x.rlo, 0.0)), out)
        out.flt = flt
        return self.finish(out) if not flt else out

    def floordiv(self, x: Num, y: Num, flt: bool) -> Num:
        k = self._box_const(y)
        if k is None:
            return self.top(x.deps | y.deps, flt, nan=True)
        lo, hi = self.bounds(x)
        with np.errstate(invalid="ignore"):
            a, b = np.floor(lo / k), np.floor(hi / k)
        pos = k > 0
        return self.interval(np.where(pos, a, b), np.where(pos, b, a), x.ends, x.dense, x.deps,
                             flt, x.nan)  # fmt: skip

    def mod(self, x: Num, y: Num, flt: bool) -> Num:
        """Python ``%`` (sign of the divisor): ``x % k == -((-x) % -k)`` for ``k < 0``."""
        k = self._box_const(y)
        if k is None:
            return self.top(x.deps | y.deps, flt, nan=True)
        pos = k > 0
        if pos.all():
            return self._mod_pos(x, k, flt)
        neg = self.neg(self._mod_pos(self.neg(x), np.abs(k), flt))
        return neg if not pos.any() else self.select(pos, self._mod_pos(x, np.abs(k), flt), neg)

    def _mod_pos(self, x: Num, k, flt: bool) -> Num:
        lo, hi = self.bounds(x)
        with np.errstate(invalid="ignore"):
            qa, qb = np.floor(lo / k), np.floor(hi / k)
        same = qa == qb
        shift = np.where(same, -k * qa, 0.0)
        exact = Num(x.cq, x.ck, x.rlo + shift, x.rhi + shift, x.ends, x.dense, x.deps, flt, x.nan)
        covers = np.logical_and(x.dense, hi - lo + 1 >= k)
        wraps = self.interval(0.0, k - 1.0, np.logical_or(covers, np.logical_and(x.dense, ~same)),
                              covers, x.deps, flt, x.nan)  # fmt: skip
        return self.select(same, exact, wraps)

    def _box_const(self, y: Num):
        """``y`` as a per-box array when it is a nonzero constant in every box, else None."""
        if y.nan or not np.all(self.is_point(y)):
            return None
        k = np.broadcast_to(np.asarray(y.rlo, np.float64), self.nq.shape)
        return None if np.any(k == 0) or not np.all(np.isfinite(k)) else k

    def minmax(self, x: Num, y: Num, is_min: bool, flt: bool) -> Num:
        xl, xh = self.bounds(x)
        yl, yh = self.bounds(y)
        if is_min:
            x_wins, y_wins = xh <= yl, yh <= xl
            lo, hi = np.minimum(xl, yl), np.minimum(xh, yh)
        else:
            x_wins, y_wins = xl >= yh, yl >= xh
            lo, hi = np.maximum(xl, yl), np.maximum(xh, yh)
        # against a constant c, min/max clips the value set: attainment survives
        px, py = self.is_point(x), self.is_point(y)
        ends = (py & x.ends) | (px & y.ends)
        dense = (py & x.dense) | (px & y.dense)
        hull = self.interval(lo, hi, ends, dense, x.deps | y.deps, flt, x.nan or y.nan)
        return self.select(x_wins, x, self.select(y_wins, y, hull))

    def abs(self, x: Num) -> Num:
        lo, hi = self.bounds(x)
        cross = self.interval(0.0, np.maximum(-lo, hi), x.dense, x.dense, x.deps, x.flt, x.nan)
        return self.select(lo >= 0, x, self.select(hi <= 0, self.neg(x), cross))

    def monotone(self, x: Num, fn, flt: bool, domain_lo: float = -_INF) -> Num:
        lo, hi = self.bounds(x)
        with np.errstate(all="ignore"):
            a, b = fn(lo), fn(hi)
        ok = lo >= domain_lo
        nan = x.nan or not bool(np.all(ok))
        a, b = np.where(ok, a, -_INF), np.where(ok, b, _INF)
        return self.interval(a, b, False, False, x.deps, flt, nan)

    # -- booleans --------------------------------------------------------------------------------

    def to_num(self, c: Bool3) -> Num:
        c = c.normalized()
        both = c.has_t & c.has_f
        lo = np.where(c.can_f, 0.0, 1.0)
        hi = np.where(c.can_t, 1.0, 0.0)
        return self.interval(lo, hi, both, both, c.deps, False)

    def cmp(self, op: Op, x: Num, y: Num) -> Bool3:
        flt = x.flt or y.flt
        d = self.add(x, self.neg(y))
        lo, hi = self.bounds(d)
        if not flt:
            xl, xh = self.bounds(x)
            yl, yh = self.bounds(y)
            big = np.maximum(np.maximum(np.abs(xl), np.abs(xh)), np.maximum(np.abs(yl), np.abs(yh)))
            flt = bool(np.any(big > _EXACT_LIMIT))
        deps = x.deps | y.deps
        if flt or d.nan:
            return self._cmp_margin(op, x, y, lo, hi, deps, x.nan or y.nan or d.nan)
        ends, dense = np.asarray(d.ends, bool), np.asarray(d.dense, bool)
        if op in (Op.GE, Op.GT, Op.LE, Op.LT):
            if op in (Op.LE, Op.LT):
                lo, hi = -hi, -lo
            t = 0.0 if op in (Op.GE, Op.LE) else 1.0  # d >= t, integers
            return Bool3(hi >= t, lo < t, ends & (hi >= t), ends & (lo < t), deps).normalized()
        in_range = (lo <= 0) & (hi >= 0)
        zero = (lo == 0) & (hi == 0)
        has_t = in_range & (dense | (ends & ((lo == 0) | (hi == 0))))
        has_f = ends & ~zero
        eq = Bool3(in_range, ~zero, has_t, has_f, deps).normalized()
        return eq if op is Op.EQ else self.not_(eq)

    def _cmp_margin(self, op, x, y, lo, hi, deps, nan) -> Bool3:
        xl, xh = self.bounds(x)
        yl, yh = self.bounds(y)
        with np.errstate(invalid="ignore"):
            mag = np.maximum(np.maximum(np.abs(xl), np.abs(xh)), np.maximum(np.abs(yl), np.abs(yh)))
            tol = _FLOAT_TOL * (1.0 + mag)
            pos = lo > tol  # surely d > 0
            neg = hi < -tol  # surely d < 0
        surely = {Op.GT: (pos, ~pos & ~neg), Op.GE: (pos, ~pos & ~neg),
                  Op.LT: (neg, ~pos & ~neg), Op.LE: (neg, ~pos & ~neg)}  # fmt: skip
        if op in surely:
            yes, maybe = surely[op]
            no = ~yes & ~maybe
        elif op is Op.EQ:
            yes, no = np.zeros_like(pos), pos | neg
        else:  # NE
            yes, no = pos | neg, np.zeros_like(pos)
        can_t, can_f = ~no, ~yes
        if nan:
            can_f = np.ones_like(can_f) if op is not Op.NE else can_f
            can_t = np.ones_like(can_t) if op is Op.NE else can_t
        return Bool3(can_t, can_f, False, False, deps).normalized()

    def not_(self, x: Bool3) -> Bool3:
        return Bool3(x.can_f, x.can_t, x.has_f, x.has_t, x.deps)

    def and_(self, x: Bool3, y: Bool3) -> Bool3:
        free = not (x.deps & y.deps)
        has_t = (x.has_t & ~y.can_f) | (y.has_t & ~x.can_f) | (x.has_t & y.has_t & free)
        return Bool3(x.can_t & y.can_t, x.can_f | y.can_f, has_t, x.has_f | y.has_f,
                     x.deps | y.deps).normalized()  # fmt: skip

    def or_(self, x: Bool3, y: Bool3) -> Bool3:
        return self.not_(self.and_(self.not_(x), self.not_(y)))

    def xor(self, x: Bool3, y: Bool3) -> Bool3:
        return self.or_(self.and_(x, self.not_(y)), self.and_(self.not_(x), y))

    def where_bool(self, c: Bool3, x: Bool3, y: Bool3) -> Bool3:
        return self.or_(self.and_(c, x), self.and_(self.not_(c), y))

    # -- loads -----------------------------------------------------------------------------------

    def load(self, n: Node, idx: list) -> Num | Bool3:
        """``t[i0, i1, ...]``: exact where every index is a point in the box; the values at the
        ends of the index range where one index ranges along a sorted axis; else ``t``'s range.
        """
        t = n.src[0]
        fixed = tuple(s.arg if s.op is Op.CONST else None for s in n.src[1:])
        facts = self.facts.get(t.arg[0], fixed)
        free = [v for s, v in zip(n.src[1:], idx) if s.op is not Op.CONST]
        deps = frozenset().union(*(v.deps for v in free)) if free else frozenset()
        flt = n.dtype is DType.FLOAT
        a = facts["a"]
        if facts["bool"]:
            out: Any = Bool3(facts["any"], not facts["all"], False, False, deps).normalized()
        else:
            out = self.interval(facts["lo"], facts["hi"], False, False, deps, flt, facts["nan"])
        if not free or a.size == 0:
            return out
        bnds = [self.bounds(v) for v in free]
        points = [lo == hi for lo, hi in bnds]
        inside = np.ones(len(self.bx), bool)
        for (lo, hi), size in zip(bnds, a.shape):
            inside &= (lo >= 0) & (hi <= size - 1) & (np.floor(lo) == lo) & (np.floor(hi) == hi)
        lo_idx = tuple(np.where(inside, lo, 0).astype(np.int64) for lo, _ in bnds)
        hi_idx = tuple(np.where(inside, hi, 0).astype(np.int64) for _, hi in bnds)
        vlo, vhi = a[lo_idx], a[hi_idx]
        exact = inside & np.logical_and.reduce(points)
        if facts["bool"]:
            return self._sel_bool(exact, Bool3(vlo, ~vlo, vlo, ~vlo, deps), out)
        vlo, vhi = vlo.astype(np.float64), vhi.astype(np.float64)
        for d, v in enumerate(free):
            inc, dec = facts["inc"][d], facts["dec"][d]
            only_d = inside & ~points[d]
            for e in range(len(free)):
                only_d &= points[e] | (e == d)
            if (inc or dec) and only_d.any():
                # sorted along d: over an index interval the range is the values at its ends
                lo, hi = (vlo, vhi) if inc else (vhi, vlo)
                ranged = self.interval(lo, hi, np.asarray(v.ends, bool), False, deps, flt)
                out = self.select(only_d, ranged, out)
        return self.select(exact, self.interval(vlo, vlo, True, True, deps, flt), out)

    def _sel_bool(self, mask, a: Bool3, b: Bool3) -> Bool3:
        return Bool3(*(np.where(mask, getattr(a, f), getattr(b, f))
                       for f in ("can_t", "can_f", "has_t", "has_f")), a.deps | b.deps)  # fmt: skip


_MONOTONE = {
    Op.EXP: (np.exp, -_INF),
    Op.EXP2: (np.exp2, -_INF),
    Op.LOG: (np.log, 0.0),
    Op.LOG2: (np.log2, 0.0),
    Op.TANH: (np.tanh, -_INF),
    Op.SIGMOID: (lambda v: 1.0 / (1.0 + np.exp(-v)), -_INF),
    Op.SQRT: (np.sqrt, 0.0),
    Op.FLOOR: (np.floor, -_INF),
    Op.CEIL: (np.ceil, -_INF),
}


def _erf(v):
    import math

    return np.vectorize(math.erf, otypes=[np.float64])(v)


_MONOTONE[Op.ERF] = (_erf, -_INF)


def analyze(root: Node, boxes: Boxes, params: Sequence[Any] = (), facts=None) -> Bool3:
    """Classify the (specialized) mask ``root`` over every box at once.

    b and h are each box's own (``boxes.b``, ``boxes.h``); parameters are read from ``params``.
    The result is normalized (see :class:`Bool3`).
    """
    an = _Analyzer(boxes, facts if facts is not None else TensorFacts(params))
    vals: dict[int, Any] = {}
    for n in toposort([root]):
        vals[id(n)] = _abstract(an, n, [vals[id(s)] for s in n.src])
    out = vals[id(root)]
    if isinstance(out, Num):
        out = an.cmp(Op.NE, out, _nconst(0, out.flt))
    full = np.ones(len(boxes), bool)
    fields = ("can_t", "can_f", "has_t", "has_f")
    return Bool3(*(np.asarray(getattr(out, f), bool) & full for f in fields), out.deps).normalized()


def _as_bool(an: _Analyzer, v) -> Bool3:
    return v if isinstance(v, Bool3) else an.cmp(Op.NE, v, _nconst(0, v.flt))


def _as_num(an: _Analyzer, v) -> Num:
    return v if isinstance(v, Num) else an.to_num(v)


_BOOL_LOGIC = {Op.AND: "and_", Op.OR: "or_", Op.XOR: "xor"}


def _abstract(an: _Analyzer, n: Node, a: list):
    op = n.op
    flt = n.dtype is DType.FLOAT
    if op is Op.CONST:
        if n.dtype is DType.BOOL:
            return _bconst(bool(n.arg))
        return _nconst(n.arg, flt)
    if op is Op.Q_IDX:
        return Num(1.0, 0.0, 0.0, 0.0, True, True, frozenset({"q"}))
    if op is Op.KV_IDX:
        return Num(0.0, 1.0, 0.0, 0.0, True, True, frozenset({"kv"}))
    if op is Op.B:
        return Num(0.0, 0.0, an.bx.b, an.bx.b, True, True, frozenset())
    if op is Op.H:
        return Num(0.0, 0.0, an.bx.h, an.bx.h, True, True, frozenset())
    if op is Op.SCALAR:
        v = _py_value(an.facts.params[n.arg[0]])
        return _bconst(bool(v)) if n.dtype is DType.BOOL else _nconst(v, flt)
    if op is Op.SCORE:
        raise ValueError("analyze: a mask cannot read `score` (see blocks.mask_from_score)")
    if op is Op.TENSOR:
        return None
    if op is Op.LOAD:
        return an.load(n, a[1:])
    if n.dtype is DType.BOOL and op in _BOOL_LOGIC:
        return getattr(an, _BOOL_LOGIC[op])(_as_bool(an, a[0]), _as_bool(an, a[1]))
    if op is Op.NOT and n.dtype is DType.BOOL:
        return an.not_(_as_bool(an, a[0]))
    if op in (Op.EQ, Op.NE) and all(s.dtype is DType.BOOL for s in n.src):
        x = an.xor(a[0], a[1])
        return an.not_(x) if op is Op.EQ else x
    if op in (Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE):
        return an.cmp(op, _as_num(an, a[0]), _as_num(an, a[1]))
    if op is Op.WHERE:
        c = _as_bool(an, a[0])
        if n.dtype is DType.BOOL:
            return an.where_bool(c, _as_bool(an, a[1]), _as_bool(an, a[2]))
        return _where_num(an, c, _as_num(an, a[1]), _as_num(an, a[2]), flt)
    if op is Op.CAST:
        return _cast(an, n, a[0])
    return _arith(an, n, [_as_num(an, v) for v in a], flt)


def _where_num(an: _Analyzer, c: Bool3, x: Num, y: Num, flt: bool) -> Num:
    xl, xh = an.bounds(x)
    yl, yh = an.bounds(y)
    hull = an.interval(np.minimum(xl, yl), np.maximum(xh, yh), False, False,
                       x.deps | y.deps | c.deps, flt, x.nan or y.nan)  # fmt: skip
    x, y = _with_flt(x, flt), _with_flt(y, flt)
    return an.select(~c.can_f, x, an.select(~c.can_t, y, hull))


def _with_flt(x: Num, flt: bool) -> Num:
    if flt and not x.flt:
        return Num(x.cq, x.ck, x.rlo, x.rhi, False, False, x.deps, True, x.nan)
    return x


def _cast(an: _Analyzer, n: Node, v):
    target = n.dtype
    if target is DType.BOOL:
        return _as_bool(an, v)
    x = _as_num(an, v)
    if target is DType.FLOAT:
        return _with_flt(x, True)
    if not x.flt:
        return x
    lo, hi = an.bounds(x)  # float -> int truncates toward zero
    return an.interval(np.trunc(lo), np.trunc(hi), False, False, x.deps, False, x.nan)


def _arith(an: _Analyzer, n: Node, a: list, flt: bool) -> Num:
    op = n.op
    a = [_with_flt(x, flt) for x in a]
    if op is Op.ADD:
        return an.add(a[0], a[1])
    if op is Op.SUB:
        return an.add(a[0], an.neg(a[1]))
    if op is Op.NEG:
        return an.neg(a[0])
    if op is Op.MUL:
        return an.mul(a[0], a[1], flt)
    if op is Op.DIV:
        k = an._box_const(a[1])
        if k is not None:
            return an.scale(a[0], 1.0 / k)
        yl, yh = an.bounds(a[1])
        if np.all((yl > 0) | (yh < 0)):
            inv = an.interval(1.0 / yh, 1.0 / yl, False, False, a[1].deps, True, a[1].nan)
            return an.mul(a[0], inv, True)
        return an.top(a[0].deps | a[1].deps, True)
    if op is Op.FLOORDIV:
        return an.floordiv(a[0], a[1], flt)
    if op is Op.MOD:
        return an.mod(a[0], a[1], flt)
    if op in (Op.MIN, Op.MAX):
        return an.minmax(a[0], a[1], op is Op.MIN, flt)
    if op is Op.ABS:
        return an.abs(a[0])
    if op in _MONOTONE:
        if op in (Op.FLOOR, Op.CEIL) and not flt:
            return a[0]
        fn, dom = _MONOTONE[op]
        return an.monotone(a[0], fn, flt, dom)
    if op is Op.RSQRT:
        x = an.monotone(a[0], np.sqrt, True, 0.0)
        lo, hi = an.bounds(x)
        with np.errstate(divide="ignore"):
            return an.interval(1.0 / hi, 1.0 / lo, False, False, x.deps, True, x.nan)
    if op in (Op.SIN, Op.COS):
        return an.interval(-1.0, 1.0, False, False, a[0].deps, True, a[0].nan)
    deps = frozenset().union(*(x.deps for x in a))
    return an.top(deps, flt, nan=flt)  # pow, bitwise ints, ...: anything (sound)
