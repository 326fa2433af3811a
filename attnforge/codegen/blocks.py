"""Block plans: which (q block, kv block) pairs are EMPTY, PARTIAL or FULL, without O(L*S) work.

:func:`plan_blocks` works per distinct (b, h) behaviour of the mask (see
:func:`attnforge.codegen.symbolic.specialize`) in three steps:

1. **Quadtree over the block grid.**  Start from the whole grid as one box and classify boxes
   with the interval analysis (:func:`attnforge.codegen.symbolic.analyze`), all boxes of a level
   at once.  A box that is all True is a FULL rectangle, all False is dropped, anything else is
   split in four.  A causal mask costs O(nQ log nQ) box evaluations, a sliding window O(blocks
   in the band): never O(nQ * nKV), and the FULL part is kept as rectangles, not cells.
2. **Exact fallback.**  Single blocks the analysis proves neither full, empty nor mixed (masks
   reading captured tensors in irregular ways, intersections of several boundaries) are
   evaluated element by element with :func:`attnforge.dsl.evaluate.evaluate`, in chunks of
   blocks on the requested device, so the plan is exact, never merely safe.
3. **Compact lists.**  Rectangles become per-row sorted kv ranges, merged, then written into
   ``[nQ, W]`` int32 index tables with one scatter and one cumulative sum (no per-cell
   temporaries), ``W`` the widest row.

Index tables are padded after each row's count with the row's last valid index (0 for an
empty row), so every entry is a valid kv block.  Tables for a mask that does not depend on b
or h are computed once and returned as expanded (stride-0) views over B and H.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..dsl.evaluate import evaluate
from ..dsl.ir import FALSE, TRUE, DType, Node, Op, const, node
from .symbolic import Boxes, TensorFacts, analyze, specialize

__all__ = ["BlockPlan", "plan_blocks", "brute_force_classes", "mask_from_score", "EMPTY",
           "PARTIAL", "FULL"]  # fmt: skip

EMPTY, PARTIAL, FULL = 0, 1, 2
_CHUNK_ELEMS = 1 << 22  # elements per exact-evaluation chunk (bounded memory)
_LEAF = 16  # sub-boxes up to this many elements a side are evaluated exactly when undecided


@dataclass
class BlockPlan:
    """Per (b, h, q block): PARTIAL kv blocks and FULL kv blocks, ascending (int32).

    ``kv_num_blocks [B, H, nQ]``, ``kv_indices [B, H, nQ, W]`` (entries past the count repeat
    the row's last valid index, 0 for an empty row), and the same for ``full_*``.
    ``stats`` counts the work done (boxes analysed, blocks evaluated exactly, groups).
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    stats: dict = field(default_factory=dict)

    def to_classes(self) -> torch.Tensor:
        """The dense ``int8 [B, H, nQ, nKV]`` class map (0 empty, 1 partial, 2 full); tests."""
        B, H, n_q = self.kv_num_blocks.shape
        n_kv = 1 + max(int(self.kv_indices.max()), int(self.full_kv_indices.max()), 0)
        n_kv = max(n_kv, self.stats.get("n_kv", 0))
        out = torch.zeros(B, H, n_q, n_kv, dtype=torch.int8)
        for num, idx, cls in ((self.kv_num_blocks, self.kv_indices, PARTIAL),
                              (self.full_kv_num_blocks, self.full_kv_indices, FULL)):  # fmt: skip
            num, idx = num.cpu().long(), idx.cpu().long()
            keep = torch.arange(idx.shape[-1]) < num[..., None]
            b, h, r, j = keep.nonzero(as_tuple=True)
            k = idx[b, h, r, j]
            if bool((out[b, h, r, k] != EMPTY).any()):
                raise AssertionError("a kv block is listed twice in one row")
            out[b, h, r, k] = cls
        return out


@dataclass(frozen=True)
class _Grid:
    L: int
    S: int
    QB: int
    KB: int

    @property
    def nq(self) -> int:
        return math.ceil(self.L / self.QB)

    @property
    def nkv(self) -> int:
        return math.ceil(self.S / self.KB)

    def boxes(self, bq0, bq1, bk0, bk1, b=0, h=0) -> Boxes:
        return Boxes.of(bq0 * self.QB, np.minimum(bq1 * self.QB, self.L) - 1,
                        bk0 * self.KB, np.minimum(bk1 * self.KB, self.S) - 1, b, h)  # fmt: skip


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"plan_blocks: {name}={value!r} must be a positive int")
    return int(value)


def _check_mask(mask_ir: Node, params: Sequence[Any]) -> None:
    if not isinstance(mask_ir, Node):
        raise TypeError(f"plan_blocks: mask_ir must be an IR Node or None, got {mask_ir!r}")
    for n in mask_ir.walk():
        if n.op is Op.SCORE:
            raise ValueError("plan_blocks: a mask cannot read `score`; for a score mod use "
                             "mask_from_score(score_ir) first")  # fmt: skip
        if n.op in (Op.SCALAR, Op.TENSOR) and n.arg[0] >= len(params):
            raise ValueError(f"plan_blocks: the mask uses parameter {n.arg[0]} but only "
                             f"{len(params)} parameter value(s) were given")  # fmt: skip


# -- the plan ------------------------------------------------------------------------------------


def plan_blocks(
    mask_ir: Node | None,
    params: Sequence[Any],
    B: int,
    H: int,
    Q_LEN: int,
    KV_LEN: int,
    Q_BLOCK: int,
    KV_BLOCK: int,
    device: torch.device | str = "cpu",
) -> BlockPlan:
    """Classify every (q block, kv block) of ``mask_ir`` exactly, in O(non-empty blocks).

    ``params[i]`` is the value of parameter ``i`` (numbers and tensors); ``mask_ir=None``
    means every block is FULL.  Blocks are clipped to the lengths: a block whose valid part is
    all True is FULL.  Example::

        from attnforge.dsl import ir
        causal = ir.node(ir.Op.GE, ir.Q_IDX, ir.KV_IDX)
        plan = plan_blocks(causal, [], 1, 1, 1000, 1000, 128, 128)
        plan.full_kv_num_blocks[0, 0, :3]   # tensor([0, 1, 2], dtype=torch.int32)
        plan.kv_indices[0, 0, :3, 0]        # tensor([0, 1, 2]): the diagonal is PARTIAL
    """
    B, H = _positive(B, "B"), _positive(H, "H")
    g = _Grid(_positive(Q_LEN, "Q_LEN"), _positive(KV_LEN, "KV_LEN"),
              _positive(Q_BLOCK, "Q_BLOCK"), _positive(KV_BLOCK, "KV_BLOCK"))  # fmt: skip
    params = list(params)
    device = torch.device(device)
    if mask_ir is None:
        mask_ir = TRUE
    _check_mask(mask_ir, params)
    facts = TensorFacts(params)
    stats = {"groups": 0, "boxes": 0, "unknown_blocks": 0, "exact_elements": 0, "n_kv": g.nkv}
    uses_b = any(n.op is Op.B for n in mask_ir.walk())
    uses_h = any(n.op is Op.H for n in mask_ir.walk())
    groups: dict[Node, list[tuple[int, int]]] = {}
    for b in range(B) if uses_b else (0,):
        for h in range(H) if uses_h else (0,):
            groups.setdefault(specialize(mask_ir, params, b, h), []).append((b, h))
    stats["groups"] = len(groups)
    members = list(groups.values())
    reps = np.array([m[0] for m in members], np.int64).reshape(-1, 2)
    # one analysis for every group at once: each box carries its group's (b, h)
    shared = specialize(mask_ir, params, None, None)
    part, full = _plan_groups(mask_ir, shared, params, facts, reps, g, device, stats)
    num, idx = _assemble(list(zip(members, part)), B, H, g.nq, uses_b, uses_h)
    fnum, fidx = _assemble(list(zip(members, full)), B, H, g.nq, uses_b, uses_h)
    return BlockPlan(num.to(device), idx.to(device), fnum.to(device), fidx.to(device), stats)


def _plan_groups(mask_ir, shared, params, facts, reps, g: _Grid, device, stats):
    """Per group: (partial ranges, full ranges), each ``(rows, k0, k1)``."""
    full, part, unknown = _quadtree(shared, params, facts, reps, g, stats)
    gid, uq, uk = unknown
    if gid.size:
        b, h = reps[gid, 0], reps[gid, 1]
        box = g.boxes(uq, uq + 1, uk, uk + 1, b, h)
        exact = functools.partial(_exact_flags, mask_ir, params, device=device)
        cls = _refine(shared, params, facts, box, exact, stats)
        stats["unknown_blocks"] += len(cls)
        for want, into in ((PARTIAL, part), (FULL, full)):
            sel = cls == want
            into.append((gid[sel], uq[sel], uq[sel] + 1, uk[sel], uk[sel] + 1))
    n = len(reps)
    return _by_group(part, n), _by_group(full, n)


def _by_group(rects: list, n_groups: int) -> list:
    """Rectangles ``(gid, q0, q1, k0, k1)`` -> per group, merged per-row ranges."""
    cols = [np.concatenate([r[i] for r in rects]) for i in range(5)]
    order = np.argsort(cols[0], kind="stable")
    cuts = np.searchsorted(cols[0][order], np.arange(1, n_groups))
    return [_row_ranges([tuple(c[sel] for c in cols[1:])]) for sel in np.split(order, cuts)]


def _quadtree(spec: Node, params, facts, reps: np.ndarray, g: _Grid, stats):
    """Rectangles (block units, half-open, with their group) of FULL and PARTIAL blocks, and
    the undecided blocks ``(gid, q block, kv block)``."""
    i64 = np.int64
    n = len(reps)
    gid = np.arange(n, dtype=i64)
    bq0, bq1 = np.zeros(n, i64), np.full(n, g.nq, i64)
    bk0, bk1 = np.zeros(n, i64), np.full(n, g.nkv, i64)
    full, part, unknowns = [], [], []
    while bq0.size:
        stats["boxes"] += bq0.size
        boxes = g.boxes(bq0, bq1, bk0, bk1, reps[gid, 0], reps[gid, 1])
        r = analyze(spec, boxes, params, facts)
        is_full, is_empty = ~r.can_f, ~r.can_t
        single = (bq1 - bq0 == 1) & (bk1 - bk0 == 1)
        mixed = single & r.has_t & r.has_f
        unknown = single & ~is_full & ~is_empty & ~mixed
        split = ~single & ~is_full & ~is_empty
        full.append((gid[is_full], bq0[is_full], bq1[is_full], bk0[is_full], bk1[is_full]))
        part.append((gid[mixed], bq0[mixed], bq1[mixed], bk0[mixed], bk1[mixed]))
        unknowns.append((gid[unknown], bq0[unknown], bk0[unknown]))
        gid, bq0, bq1, bk0, bk1 = _split(gid[split], bq0[split], bq1[split], bk0[split],
                                         bk1[split])  # fmt: skip
    return full, part, tuple(np.concatenate([u[i] for u in unknowns]) for i in range(3))


def _split(gid, q0, q1, k0, k1):
    """Each box into up to four: halves along every side longer than one block."""
    hq, hk = q1 - q0 > 1, k1 - k0 > 1
    qa = np.where(hq, (q0 + q1) // 2, q1)
    ka = np.where(hk, (k0 + k1) // 2, k1)
    parts = [(gid, q0, qa, k0, ka, np.ones_like(hq)), (gid, qa, q1, k0, ka, hq),
             (gid, q0, qa, ka, k1, hk), (gid, qa, q1, ka, k1, hq & hk)]  # fmt: skip
    return tuple(np.concatenate([p[i][p[5]] for p in parts]) for i in range(5))


def _refine(spec: Node, params, facts, box: Boxes, exact, stats) -> np.ndarray:
    """Classes of undecided blocks: a quadtree inside each block, exact evaluation at the leaves.

    A block is PARTIAL as soon as one sub-box is known to hold a True and one a False; sub-boxes
    of at most ``_LEAF`` x ``_LEAF`` elements that stay undecided are evaluated exactly.
    """
    n = len(box)
    own_t, own_f = np.zeros(n, bool), np.zeros(n, bool)
    owner = np.arange(n)
    ql, qh, kl, kh = box.ql, box.qh, box.kl, box.kh
    leaves = []
    while owner.size:
        stats["boxes"] += owner.size
        r = analyze(spec, Boxes(ql, qh, kl, kh, box.b[owner], box.h[owner]), params, facts)
        own_t[owner[r.has_t]] = True
        own_f[owner[r.has_f]] = True
        open_ = r.can_t & r.can_f & ~(r.has_t & r.has_f) & ~(own_t[owner] & own_f[owner])
        small = (qh - ql < _LEAF) & (kh - kl < _LEAF)
        leaf = open_ & small
        leaves.append((owner[leaf], ql[leaf], qh[leaf], kl[leaf], kh[leaf]))
        owner, ql, qh, kl, kh = _halve(open_ & ~small, owner, ql, qh, kl, kh)
    owner, ql, qh, kl, kh = (np.concatenate([lf[i] for lf in leaves]) for i in range(5))
    if owner.size:
        stats["exact_elements"] += int(((qh - ql + 1) * (kh - kl + 1)).sum())
        i64 = np.int64
        any_t, any_f = exact(box.b[owner].astype(i64), box.h[owner].astype(i64), ql.astype(i64),
                             qh.astype(i64), kl.astype(i64), kh.astype(i64))  # fmt: skip
        np.logical_or.at(own_t, owner, any_t)
        np.logical_or.at(own_f, owner, any_f)
    return np.where(own_t & own_f, PARTIAL, np.where(own_t, FULL, EMPTY)).astype(np.int8)


def _halve(keep, owner, ql, qh, kl, kh):
    """Boxes (inclusive element bounds) split in halves along each side longer than one."""
    owner, ql, qh, kl, kh = owner[keep], ql[keep], qh[keep], kl[keep], kh[keep]
    qm, km = np.floor((ql + qh) / 2), np.floor((kl + kh) / 2)
    hq, hk = qh > ql, kh > kl
    qa, ka = np.where(hq, qm, qh), np.where(hk, km, kh)
    parts = [(ql, qa, kl, ka, np.ones_like(hq)), (qa + 1, qh, kl, ka, hq),
             (ql, qa, ka + 1, kh, hk), (qa + 1, qh, ka + 1, kh, hq & hk)]  # fmt: skip
    out = [np.concatenate([p[i][p[4]] for p in parts]) for i in range(4)]
    own = np.concatenate([owner[p[4]] for p in parts])
    return (own, *out)


def _exact_flags(mask_ir, params, b, h, ql, qh, kl, kh, device):
    """Per box (inclusive element bounds): any True, any False, by evaluating every element."""
    sq, sk = int((qh - ql).max()) + 1, int((kh - kl).max()) + 1
    any_t, any_f = np.empty(len(ql), bool), np.empty(len(ql), bool)
    per = max(1, _CHUNK_ELEMS // (sq * sk))
    ar_q, ar_k = torch.arange(sq, device=device), torch.arange(sk, device=device)
    for s in range(0, len(ql), per):
        bb, hh, lo_q, hi_q, lo_k, hi_k = (torch.as_tensor(a[s : s + per], device=device)
                                          for a in (b, h, ql, qh, kl, kh))  # fmt: skip
        q = lo_q[:, None] + ar_q
        kv = lo_k[:, None] + ar_k
        env = {"b": bb[:, None, None], "h": hh[:, None, None],
               "q_idx": torch.minimum(q, hi_q[:, None])[:, :, None],
               "kv_idx": torch.minimum(kv, hi_k[:, None])[:, None, :]}  # fmt: skip
        m = evaluate(mask_ir, env, params).bool()
        vq, vk = q <= hi_q[:, None], kv <= hi_k[:, None]
        if m.device.type == "cpu":  # numpy: torch's small CPU reductions are slow on busy cores
            m, vq, vk = m.numpy(), vq.numpy(), vk.numpy()
        t, f = _any_in_box(m, vq, vk)
        any_t[s : s + per], any_f[s : s + per] = _to_numpy(t), _to_numpy(f)
    return any_t, any_f


def _any_in_box(m, vq, vk):
    """Per box: some valid element True, some valid element False (numpy or torch)."""
    n, sq, sk = vq.shape[0], vq.shape[1], vk.shape[1]
    valid = vq[:, :, None] & vk[:, None, :]
    t = (m & valid).reshape(n, sq * sk).any(1)
    f = (~m & valid).reshape(n, sq * sk).any(1)
    return t, f


def _to_numpy(x):
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else x


# -- rectangles -> compact index tables ----------------------------------------------------------


def _row_ranges(rects: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rectangles ``(q0, q1, k0, k1)`` -> sorted, merged per-row ranges ``(rows, k0, k1)``."""
    q0, q1, k0, k1 = (np.concatenate([r[i] for r in rects]).astype(np.int64) if rects
                      else np.zeros(0, np.int64) for i in range(4))  # fmt: skip
    heights = q1 - q0
    total = int(heights.sum())
    first = np.repeat(np.cumsum(heights) - heights, heights)
    rows = np.repeat(q0, heights) + (np.arange(total) - first)
    k0, k1 = np.repeat(k0, heights), np.repeat(k1, heights)
    order = np.lexsort((k0, rows))
    rows, k0, k1 = rows[order], k0[order], k1[order]
    if rows.size == 0:
        return rows, k0, k1
    starts = np.ones(rows.size, bool)
    starts[1:] = (rows[1:] != rows[:-1]) | (k0[1:] != k1[:-1])
    seg = np.flatnonzero(starts)
    ends = np.r_[seg[1:], rows.size] - 1
    return rows[seg], k0[seg], k1[ends]


def _fill(ranges, n_q: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(counts [nQ], indices [nQ, width])`` int32 from sorted, disjoint per-row ranges.

    Row ``r`` holds its ranges' indices in order; entry ``j`` is ``j + D[r, j]`` where ``D`` is
    constant on each range: scatter D's jumps at the range starts, then a cumulative sum.
    """
    rows, k0, k1 = ranges
    lens = k1 - k0
    counts = np.bincount(rows, weights=lens, minlength=n_q).astype(np.int32)
    out = np.zeros((n_q, width), np.int32)
    last = np.zeros(n_q, np.int32)
    if rows.size:
        excl = np.cumsum(lens) - lens
        first = np.ones(rows.size, bool)
        first[1:] = rows[1:] != rows[:-1]
        off = excl - np.maximum.accumulate(np.where(first, excl, 0))
        delta = k0 - off
        jump = delta - np.where(first, 0, np.r_[0, delta[:-1]])
        out[rows, off] = jump
        np.cumsum(out, axis=1, dtype=np.int32, out=out)
        out += np.arange(width, dtype=np.int32)
        final = np.r_[first[1:], True]  # the last range of each row
        last[rows[final]] = k1[final] - 1
    np.minimum(out, last[:, None], out=out)
    return counts, out


def _assemble(results, B: int, H: int, n_q: int, uses_b: bool, uses_h: bool):
    width = max([1] + [int(np.bincount(r[0], weights=r[2] - r[1], minlength=1).max())
                       for _, r in results if r[0].size])  # fmt: skip
    if len(results) == 1 and not (uses_b or uses_h):
        counts, idx = _fill(results[0][1], n_q, width)
        num = torch.from_numpy(counts).expand(B, H, n_q)
        return num, torch.from_numpy(idx).expand(B, H, n_q, width)
    num = torch.empty(B, H, n_q, dtype=torch.int32)
    idx = torch.empty(B, H, n_q, width, dtype=torch.int32)
    for members, ranges in results:
        counts, table = _fill(ranges, n_q, width)
        counts, table = torch.from_numpy(counts), torch.from_numpy(table)
        for b, h in members:
            bs = b if uses_b else slice(None)
            hs = h if uses_h else slice(None)
            num[bs, hs] = counts
            idx[bs, hs] = table
    return num, idx


# -- brute force (tests) -------------------------------------------------------------------------


def brute_force_classes(
    mask_ir: Node | None,
    params: Sequence[Any],
    B: int,
    H: int,
    Q_LEN: int,
    KV_LEN: int,
    Q_BLOCK: int,
    KV_BLOCK: int,
) -> torch.Tensor:
    """``int8 [B, H, nQ, nKV]`` block classes (0 empty, 1 partial, 2 full) by dense evaluation.

    O(B * H * Q_LEN * KV_LEN) memory: for tests at small sizes.
    """
    g = _Grid(Q_LEN, KV_LEN, Q_BLOCK, KV_BLOCK)
    env = {"b": torch.arange(B)[:, None, None, None], "h": torch.arange(H)[None, :, None, None],
           "q_idx": torch.arange(Q_LEN)[:, None], "kv_idx": torch.arange(KV_LEN)}  # fmt: skip
    root = TRUE if mask_ir is None else mask_ir
    value = evaluate(root, env, list(params)).bool().cpu().numpy()
    dense = np.broadcast_to(value.reshape((1,) * (4 - value.ndim) + value.shape),
                            (B, H, Q_LEN, KV_LEN))  # fmt: skip
    shape = (B, H, g.nq * g.QB, g.nkv * g.KB)
    pad_t, pad_f = np.zeros(shape, bool), np.ones(shape, bool)
    pad_t[..., :Q_LEN, :KV_LEN] = dense
    pad_f[..., :Q_LEN, :KV_LEN] = dense
    view = (B, H, g.nq, g.QB, g.nkv, g.KB)
    any_t = pad_t.reshape(view).any(axis=(3, 5))
    all_t = pad_f.reshape(view).all(axis=(3, 5))
    return torch.from_numpy(np.where(all_t, FULL, np.where(any_t, PARTIAL, EMPTY)).astype(np.int8))


# -- score mods ----------------------------------------------------------------------------------


def _and(a: Node, b: Node) -> Node:
    if a is FALSE or b is FALSE:
        return FALSE
    return b if a is TRUE else a if b is TRUE else node(Op.AND, a, b)


def _or(a: Node, b: Node) -> Node:
    if a is TRUE or b is TRUE:
        return TRUE
    return b if a is FALSE else a if b is FALSE else node(Op.OR, a, b)


def _not(a: Node) -> Node:
    return FALSE if a is TRUE else TRUE if a is FALSE else node(Op.NOT, a)


def _finite(n: Node, memo: dict) -> Node:
    """A bool IR that is False only where ``n`` is surely ``-inf`` (True when unsure)."""
    hit = memo.get(n)
    if hit is not None:
        return hit
    op = n.op
    if op is Op.CONST:
        out = FALSE if n.arg == -math.inf else TRUE
    elif op is Op.WHERE and not _reads_score(n.src[0]):
        c = n.src[0] if n.src[0].dtype is DType.BOOL else node(Op.NE, n.src[0], const(0))
        fx, fy = _finite(n.src[1], memo), _finite(n.src[2], memo)
        out = fx if fx is fy else _or(_and(c, fx), _and(_not(c), fy))
    elif op in (Op.ADD, Op.MIN):
        out = _and(_finite(n.src[0], memo), _finite(n.src[1], memo))
    elif op is Op.MAX:
        out = _or(_finite(n.src[0], memo), _finite(n.src[1], memo))
    elif op is Op.SUB:
        out = _finite(n.src[0], memo)  # x - y is -inf when x is (y = +inf aside)
    elif op in (Op.MUL, Op.DIV) and n.src[1].op is Op.CONST and n.src[1].arg > 0:
        out = _finite(n.src[0], memo)
    elif op is Op.CAST and n.dtype is DType.FLOAT:
        out = _finite(n.src[0], memo)
    else:
        out = TRUE
    memo[n] = out
    return out


def _reads_score(n: Node) -> bool:
    return any(m.op is Op.SCORE for m in n.walk())


def mask_from_score(score_ir: Node) -> Node | None:
    """The condition under which a score mod does not produce ``-inf``, as a mask IR.

    ``where(c, score, -inf)`` gives ``c``; sums, mins and nested wheres compose.  Wherever the
    returned mask is False the score is surely ``-inf``, so those blocks may be skipped.
    Returns None when no element is surely ``-inf`` (nothing to skip).
    """
    out = _finite(score_ir, {})
    if out is TRUE or _reads_score(out):
        return None
    return out
