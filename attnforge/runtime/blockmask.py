"""Block-sparse attention masks: `BlockMask`, `create_block_mask`, `block_mask_from_scores`.

A `BlockMask` says, for every query block row, which key/value blocks the kernels visit, in the
format of ``torch.nn.attention.flex_attention.BlockMask``::

    B, H            batch and head (1 = broadcast over that dimension)
    nQ, nKV         ceil(Q_LEN / Q_BLOCK), ceil(KV_LEN / KV_BLOCK)
    kv_num_blocks       int32 [B, H, nQ]      PARTIAL kv blocks per q block (mask_mod applied)
    kv_indices          int32 [B, H, nQ, W]   their indices, ascending; entries past the count
                                              are padding (valid indices, unspecified)
    full_kv_num_blocks  int32 [B, H, nQ]      FULL kv blocks (mask_mod skipped); may be None
    full_kv_indices     int32 [B, H, nQ, Wf]
    q_num_blocks, q_indices, full_q_num_blocks, full_q_indices
                        the transposes [B, H, nKV] / [B, H, nKV, Wq]: for each kv block, the q
                        blocks that visit it, ascending (the backward's dK/dV loop)

Unlike FlexAttention, the index tensors may be *compact*: their width is the widest row, not
nKV, so a sliding window over a million tokens stays small.  The ``q_*`` transposes are computed
lazily on first access (then cached); they cost O(non-empty blocks), never a dense grid.

Example::

    import attnforge as af
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    bm = af.create_block_mask(causal, None, None, 1000, 1000, device="cpu")
    print(bm)                      # ASCII map: full, partial and empty blocks
    bm.to_dense().shape            # (1, 1, 8, 8)
"""

from __future__ import annotations

import collections
import math
import operator
import threading
import weakref
from typing import Any

import torch

from attnforge.dsl.ir import KV_IDX, Q_IDX, TRUE, DType, Op, node
from attnforge.dsl.mod import Mod

EMPTY, PARTIAL, FULL = 0, 1, 2

_CHARS = {"full": "█", "partial": "░", "mixed": "▒", "empty": " "}
_LEGEND = "legend: █ full  ░ partial (mask applied)  ▒ mixed (downsampled cell)  ' ' empty"

__all__ = ["BlockMask", "create_block_mask", "block_mask_from_scores", "EMPTY", "PARTIAL", "FULL"]


# -- argument checking ---------------------------------------------------------------------------


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be a positive int, got {value!r}") from None
    if v <= 0:
        raise ValueError(f"{what} must be a positive int, got {v}")
    return v


def _block_size(BLOCK_SIZE: Any) -> tuple[int, int]:
    """``128`` or ``(Q_BLOCK, KV_BLOCK)`` -> ``(Q_BLOCK, KV_BLOCK)``."""
    if isinstance(BLOCK_SIZE, (tuple, list)):
        if len(BLOCK_SIZE) != 2:
            raise ValueError(
                f"BLOCK_SIZE must be an int or a (Q_BLOCK, KV_BLOCK) pair, got {BLOCK_SIZE!r}"
            )
        return (_positive_int(BLOCK_SIZE[0], "BLOCK_SIZE[0] (Q_BLOCK)"),
                _positive_int(BLOCK_SIZE[1], "BLOCK_SIZE[1] (KV_BLOCK)"))  # fmt: skip
    b = _positive_int(BLOCK_SIZE, "BLOCK_SIZE")
    return (b, b)


_NOOP: Mod | None = None


def _noop_mod() -> Mod:
    global _NOOP
    if _NOOP is None:
        _NOOP = Mod("mask", TRUE, name="noop_mask")
    return _NOOP


def _causal_mod() -> Mod:
    return Mod("mask", node(Op.GE, Q_IDX, KV_IDX), name="causal_mask")


def _as_mask_mod(mask_mod: Any) -> Mod:
    """None -> noop; a Mod passes; anything callable is traced (H1's ``as_mod``)."""
    if mask_mod is None:
        return _noop_mod()
    if isinstance(mask_mod, Mod):
        mod = mask_mod
    else:
        if not callable(mask_mod):
            raise ValueError(f"mask_mod must be a callable (b, h, q_idx, kv_idx), got {mask_mod!r}")
        from attnforge.dsl.api import as_mod

        mod = as_mod(mask_mod, "mask")
    if mod.kind != "mask":
        raise ValueError(
            f"{mod.name} is a {mod.kind} mod; a BlockMask needs a mask mod "
            "(b, h, q_idx, kv_idx) -> bool"
        )
    if mod.ir.dtype is not DType.BOOL:
        raise ValueError(
            f"mask_mod {mod.name} must return a bool, but it returns {mod.ir.dtype.value}; "
            "fix: return a comparison such as `q_idx >= kv_idx`, or `x != 0`"
        )
    return mod


# -- block lists <-> dense grids ----------------------------------------------------------------


def _valid(num: torch.Tensor, width: int) -> torch.Tensor:
    """bool [..., n, width]: which slots of an index tensor lie before the row's count."""
    return torch.arange(width, device=num.device) < num.unsqueeze(-1)


def _scatter_dense(num, idx, n_cols: int, value: int, out: torch.Tensor) -> None:
    """out[..., r, idx[..., r, j]] = value for the valid slots (out has n_cols + 1 columns)."""
    cols = torch.where(_valid(num, idx.shape[-1]), idx.long(), n_cols)
    out.scatter_(-1, cols, value)


def _dense_to_lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [..., n, m] -> (count int32 [..., n], ascending indices int32 [..., n, W]), W >= 1."""
    num = sel.sum(-1, dtype=torch.int32)
    width = max(int(num.max()), 1) if num.numel() else 1
    pos = torch.where(sel, sel.cumsum(-1, dtype=torch.int32) - 1, width).long()
    out = torch.zeros(*sel.shape[:-1], width + 1, dtype=torch.int32, device=sel.device)
    src = torch.arange(sel.shape[-1], dtype=torch.int32, device=sel.device).expand(sel.shape)
    out.scatter_(-1, pos, src.contiguous())  # extra column collects the unselected slots
    return num, out[..., :width].contiguous()


def _rows_ascending(num: torch.Tensor, idx: torch.Tensor) -> bool:
    if idx.shape[-1] < 2:
        return True
    inner = _valid(num, idx.shape[-1])[..., 1:]
    return bool(((idx[..., 1:] > idx[..., :-1]) | ~inner).all())


def _transpose(num: torch.Tensor, idx: torch.Tensor, n_cols: int, ascending: bool):
    """Row lists -> column lists: for each column, the rows containing it, ascending.

    ``num [B, H, nR]``, ``idx [B, H, nR, W]`` -> ``(int32 [B, H, n_cols], int32 [B, H, n_cols,
    Wt])``.  Cost is O(rows + non-empty entries + output); never a dense rows x cols grid.
    """
    B, H, n_rows = num.shape
    bh = B * H
    num2 = num.reshape(bh, n_rows).long()
    idx2 = idx.reshape(bh, n_rows, idx.shape[-1])
    ranges = _interval_rows(num2, idx2, n_cols) if ascending else None
    if ranges is not None:
        tnum, tidx = _transpose_intervals(*ranges, n_rows, n_cols)
    else:
        tnum, tidx = _transpose_by_sort(num2, idx2, n_rows, n_cols)
    return tnum.reshape(B, H, n_cols), tidx.reshape(B, H, n_cols, tidx.shape[-1])


def _interval_rows(num, idx, n_cols):
    """If every row is one run ``[lo, hi)`` and lo/hi never decrease down the rows (causal,
    sliding window, sorted documents), return global run bounds; else None.

    Empty rows get ``lo = hi =`` the largest ``hi`` above them, the only choice that keeps the
    bounds monotone; then every column's rows form one contiguous run too.
    """
    has = num > 0
    if idx.shape[-1] == 0:
        return None
    first = idx[..., 0].long()
    last = idx.gather(-1, (num - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1).long()
    if not bool(((last - first == num - 1) | ~has).all()):
        return None  # a row with a gap
    hi = torch.where(has, first + num, 0)
    above = torch.cummax(hi, dim=-1).values
    lo = torch.where(has, first, above)
    hi = torch.where(has, hi, above)
    if not (bool((lo[:, 1:] >= lo[:, :-1]).all()) and bool((hi[:, 1:] >= hi[:, :-1]).all())):
        return None
    stride = n_cols + 1  # row bounds live in [0, n_cols]; keeps (b, h) ranges apart
    base = torch.arange(num.shape[0], device=num.device).unsqueeze(-1) * stride
    return (lo + base).reshape(-1), (hi + base).reshape(-1)


def _transpose_intervals(lo_g, hi_g, n_rows, n_cols):
    """Column ``c`` holds the rows ``r`` with ``lo[r] <= c < hi[r]``: one searchsorted each way."""
    bh = lo_g.numel() // n_rows
    dev = lo_g.device
    stride = n_cols + 1
    keys = (
        torch.arange(bh, device=dev).unsqueeze(-1) * stride + torch.arange(n_cols, device=dev)
    ).reshape(-1)
    stop = torch.searchsorted(lo_g, keys, right=True)
    start = torch.searchsorted(hi_g, keys, right=True)
    count = (stop - start).clamp(min=0)
    first = start - torch.arange(bh, device=dev).repeat_interleave(n_cols) * n_rows
    first = torch.where(count > 0, first, 0).to(torch.int32).unsqueeze(-1)
    last = first + (count.to(torch.int32).unsqueeze(-1) - 1).clamp(min=0)
    width = max(int(count.max()), 1) if count.numel() else 1
    # The output is the big tensor (nKV x nQ for causal): two passes, padding = last index.
    tidx = first + torch.arange(width, dtype=torch.int32, device=dev)
    torch.minimum(tidx, last, out=tidx)
    return count.to(torch.int32), tidx


def _transpose_by_sort(num, idx, n_rows, n_cols):
    """General case: sort the (column, row) pairs of all non-empty entries."""
    bh = num.shape[0]
    dev = num.device
    valid = _valid(num, idx.shape[-1])
    rows = torch.arange(bh * n_rows, device=dev).reshape(bh, n_rows, 1).expand_as(valid)[valid]
    cols = idx[valid].long()
    col_key = (rows // n_rows) * n_cols + cols
    pair = torch.sort(col_key * n_rows + rows % n_rows).values
    col_key, row = pair // n_rows, pair % n_rows
    count = torch.bincount(col_key, minlength=bh * n_cols)
    width = max(int(count.max()), 1) if count.numel() else 1
    col_start = torch.cumsum(count, 0) - count
    slot = torch.arange(pair.numel(), device=dev) - col_start[col_key]
    tidx = torch.zeros(bh * n_cols, width, dtype=torch.int32, device=dev)
    tidx[col_key, slot] = row.to(torch.int32)
    return count.to(torch.int32), tidx


def _check_no_overlap(num, idx, fnum, fidx, n_cols):
    """Raise if a kv block appears twice in a row (partial and full lists together)."""
    rows = [(num, idx)] + ([(fnum, fidx)] if fnum is not None else [])
    parts = []
    for n, i in rows:
        valid = _valid(n, i.shape[-1])
        r = torch.arange(n.numel(), device=n.device).reshape(*n.shape, 1).expand_as(valid)
        parts.append(r[valid] * n_cols + i[valid].long())
    keys = torch.sort(torch.cat(parts)).values
    dup = keys[1:] == keys[:-1]
    if bool(dup.any()):
        k = int(keys[1:][dup][0])
        raise ValueError(
            f"kv block {k % n_cols} is listed twice for q-block row {k // n_cols} (flattened "
            "over B, H): a block must appear once, in either the partial or the full lists"
        )


# -- BlockMask ------------------------------------------------------------------------------------


class BlockMask:
    """Block-sparse mask in FlexAttention's format (see the module docstring for the legend).

    Build one with :func:`create_block_mask`, :meth:`from_kv_blocks` or
    :func:`block_mask_from_scores`.  ``BLOCK_SIZE`` is stored as ``(Q_BLOCK, KV_BLOCK)``;
    ``mask_mod`` is a :class:`~attnforge.dsl.mod.Mod` (callable like the original function) that
    the kernels apply inside partial blocks.  The ``q_*`` transposes are computed lazily.

    Example::

        bm = BlockMask.from_kv_blocks(
            torch.tensor([[[1, 1]]]), torch.tensor([[[[0], [1]]]]), BLOCK_SIZE=64,
            seq_lengths=(128, 128))
        bm.to_dense()        # [[[[1, 0], [0, 1]]]]: block-diagonal
        bm.q_indices[0, 0]   # [[0], [1]]
    """

    def __init__(
        self,
        seq_lengths: tuple[int, int],
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        full_kv_num_blocks: torch.Tensor | None = None,
        full_kv_indices: torch.Tensor | None = None,
        q_num_blocks: torch.Tensor | None = None,
        q_indices: torch.Tensor | None = None,
        full_q_num_blocks: torch.Tensor | None = None,
        full_q_indices: torch.Tensor | None = None,
        BLOCK_SIZE: int | tuple[int, int] = (128, 128),
        mask_mod: Any = None,
        *,
        _ascending: bool | None = None,
        _all_full: bool = False,
    ):
        self.seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))
        self.BLOCK_SIZE = _block_size(BLOCK_SIZE)
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.mask_mod = _as_mask_mod(mask_mod)
        self._ascending = _ascending  # rows known sorted (None: check when transposing)
        self._all_full = _all_full  # attnforge's own no-mask plan: equal work per tile
        given = (q_num_blocks, q_indices, full_q_num_blocks, full_q_indices)
        self._q = given if q_num_blocks is not None and q_indices is not None else None

    # -- construction --

    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        full_kv_num_blocks: torch.Tensor | None = None,
        full_kv_indices: torch.Tensor | None = None,
        BLOCK_SIZE: int | tuple[int, int] = 128,
        mask_mod: Any = None,
        seq_lengths: tuple[int, int] | None = None,
    ) -> BlockMask:
        """Build a BlockMask from kv block lists, validating them (the transposes follow lazily).

        ``kv_num_blocks [B, H, nQ]`` / ``kv_indices [B, H, nQ, W]`` (leading B, H may be
        omitted: they become 1).  Without ``seq_lengths`` the lengths are ``nQ * Q_BLOCK`` and
        ``W * KV_BLOCK`` (FlexAttention's rule), so pass ``seq_lengths`` when ``kv_indices`` is
        compact (W < nKV).  Rows may be in any order but must not repeat a block, in either list
        or across the two.
        """
        bs = _block_size(BLOCK_SIZE)
        num, idx = _check_pair("kv_num_blocks", kv_num_blocks, "kv_indices", kv_indices)
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError(
                "pass both full_kv_num_blocks and full_kv_indices, or neither "
                f"(got {type(full_kv_num_blocks).__name__} and {type(full_kv_indices).__name__})"
            )
        fnum = fidx = None
        if full_kv_num_blocks is not None:
            fnum, fidx = _check_pair(
                "full_kv_num_blocks", full_kv_num_blocks, "full_kv_indices", full_kv_indices
            )
            if fnum.shape != num.shape or fnum.device != num.device:
                raise ValueError(
                    f"full_kv_num_blocks {tuple(fnum.shape)} on {fnum.device} must match "
                    f"kv_num_blocks {tuple(num.shape)} on {num.device}"
                )
        n_q = num.shape[-1]
        if seq_lengths is None:
            seq_lengths = (n_q * bs[0], idx.shape[-1] * bs[1])
        q_len = _positive_int(seq_lengths[0], "seq_lengths[0] (Q_LEN)")
        kv_len = _positive_int(seq_lengths[1], "seq_lengths[1] (KV_LEN)")
        if math.ceil(q_len / bs[0]) != n_q:
            raise ValueError(
                f"kv_num_blocks has {n_q} q blocks but Q_LEN={q_len} with Q_BLOCK={bs[0]} needs "
                f"{math.ceil(q_len / bs[0])}"
            )
        n_kv = math.ceil(kv_len / bs[1])
        for name, n, i in (("kv", num, idx), ("full_kv", fnum, fidx)):
            if n is not None:
                _check_ranges(name, n, i, n_kv, kv_len, bs[1])
        ascending = _rows_ascending(num, idx) and (fnum is None or _rows_ascending(fnum, fidx))
        _check_no_overlap(num, idx, fnum, fidx, n_kv)
        return cls(
            (q_len, kv_len),
            num,
            idx,
            fnum,
            fidx,
            BLOCK_SIZE=bs,
            mask_mod=mask_mod,
            _ascending=ascending,
        )

    @classmethod
    def from_torch(cls, block_mask: Any) -> BlockMask:
        """Convert a ``torch.nn.attention.flex_attention.BlockMask`` (its mask_mod is traced)."""
        return cls.from_kv_blocks(
            block_mask.kv_num_blocks, block_mask.kv_indices,
            block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
            BLOCK_SIZE=block_mask.BLOCK_SIZE, mask_mod=block_mask.mask_mod,
            seq_lengths=block_mask.seq_lengths,
        )  # fmt: skip

    @classmethod
    def _from_classes(cls, classes, BLOCK_SIZE, mask_mod, seq_lengths) -> BlockMask:
        """From an int8 [B, H, nQ, nKV] EMPTY/PARTIAL/FULL grid (small masks, block scores)."""
        num, idx = _dense_to_lists(classes == PARTIAL)
        fnum, fidx = _dense_to_lists(classes == FULL)
        return cls(seq_lengths, num, idx, fnum, fidx, BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod,
                   _ascending=True)  # fmt: skip

    def _replace(self, fn) -> BlockMask:
        """A new BlockMask with ``fn`` applied to every tensor (computed transposes included)."""
        opt = lambda t: None if t is None else fn(t)
        q = None if self._q is None else tuple(opt(t) for t in self._q)
        return BlockMask(
            self.seq_lengths, fn(self.kv_num_blocks), fn(self.kv_indices),
            opt(self.full_kv_num_blocks), opt(self.full_kv_indices),
            *(q if q is not None else (None,) * 4),
            BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod, _ascending=self._ascending,
        )  # fmt: skip

    # -- geometry --

    @property
    def shape(self) -> tuple[int, int, int, int]:
        B, H = self.kv_num_blocks.shape[:2]
        return (int(B), int(H), *self.seq_lengths)

    @property
    def num_blocks(self) -> tuple[int, int]:
        """``(nQ, nKV)``: q-block rows and kv-block columns."""
        return (self.kv_num_blocks.shape[-1], math.ceil(self.seq_lengths[1] / self.BLOCK_SIZE[1]))

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def numel(self) -> int:
        """Elements of the (unsparsified) mask: B * H * Q_LEN * KV_LEN."""
        return math.prod(self.shape)

    def sparsity(self) -> float:
        """Percent of the mask skipped, counting each visited block as a whole block (as
        FlexAttention does, so clipped edge blocks count in full)."""
        visited = int(self.kv_num_blocks.sum())
        if self.full_kv_num_blocks is not None:
            visited += int(self.full_kv_num_blocks.sum())
        total = self.numel()
        return 100.0 * (1.0 - visited * self.BLOCK_SIZE[0] * self.BLOCK_SIZE[1] / total)

    # -- transposes (lazy) --

    def _transposes(self):
        if self._q is None:
            n_kv = self.num_blocks[1]
            asc = self._ascending
            if asc is None:
                asc = _rows_ascending(self.kv_num_blocks, self.kv_indices) and (
                    self.full_kv_num_blocks is None
                    or _rows_ascending(self.full_kv_num_blocks, self.full_kv_indices)
                )
            qn, qi = _transpose(self.kv_num_blocks, self.kv_indices, n_kv, asc)
            fqn = fqi = None
            if self.full_kv_num_blocks is not None:
                fqn, fqi = _transpose(self.full_kv_num_blocks, self.full_kv_indices, n_kv, asc)
            self._q = (qn, qi, fqn, fqi)
        return self._q

    @property
    def q_num_blocks(self) -> torch.Tensor:
        return self._transposes()[0]

    @property
    def q_indices(self) -> torch.Tensor:
        return self._transposes()[1]

    @property
    def full_q_num_blocks(self) -> torch.Tensor | None:
        return self._transposes()[2]

    @property
    def full_q_indices(self) -> torch.Tensor | None:
        return self._transposes()[3]

    # -- views --

    def to_dense_classes(self) -> torch.Tensor:
        """int8 [B, H, nQ, nKV]: 0 empty, 1 partial, 2 full."""
        n_q, n_kv = self.num_blocks
        B, H = self.shape[:2]
        out = torch.zeros(B, H, n_q, n_kv + 1, dtype=torch.int8, device=self.device)
        _scatter_dense(self.kv_num_blocks, self.kv_indices, n_kv, PARTIAL, out)
        if self.full_kv_num_blocks is not None:
            _scatter_dense(self.full_kv_num_blocks, self.full_kv_indices, n_kv, FULL, out)
        return out[..., :n_kv].contiguous()

    full_dense_classes = to_dense_classes

    def to_dense(self) -> torch.Tensor:
        """int32 [B, H, nQ, nKV]: 1 where a block is visited (partial or full), else 0."""
        return (self.to_dense_classes() > 0).to(torch.int32)

    def to(self, device: torch.device | str) -> BlockMask:
        """A copy with every tensor on ``device`` (this BlockMask is left unchanged)."""
        return self._replace(lambda t: t.to(device))

    def as_tuple(self, flatten: bool = True) -> tuple:
        """The fields in FlexAttention's order (BLOCK_SIZE flattened to two ints by default)."""
        bs = self.BLOCK_SIZE if flatten else (self.BLOCK_SIZE,)
        return (
            *self.seq_lengths, self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
            self.full_kv_indices, *self._transposes(), *bs, self.mask_mod,
        )  # fmt: skip

    def __getitem__(self, index) -> BlockMask:
        """Select batches and heads: ``bm[b]``, ``bm[b, h]``, slices or index lists.  Dimensions
        are kept (``bm[0].shape == (1, H, Q_LEN, KV_LEN)``), as in FlexAttention."""
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > 2:
            raise IndexError(
                f"BlockMask supports indexing batch and head only, got {len(index)} indices"
            )
        picks = [_dim_index(i, n, name) for i, n, name in zip(index, self.shape, ("batch", "head"))]

        def take(t: torch.Tensor) -> torch.Tensor:
            for dim, p in enumerate(picks):
                t = t[(slice(None),) * dim + (p,)]
            return t

        return self._replace(take)

    # -- printing --

    def to_string(self, grid_size: int | tuple[int, int] = (20, 20), limit: int = 4) -> str:
        """ASCII map of each (b, h) (up to ``limit``): one cell (two characters) per block,
        or per group of blocks when there are more than ``grid_size``; ``-1`` = never group."""
        B, H, q_len, kv_len = self.shape
        n_q, n_kv = self.num_blocks
        gq, gk = _group_sizes(grid_size, n_q, n_kv)
        lines = [
            f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, "
            f"sparsity={self.sparsity():.2f}%, mask_mod={self.mask_mod.name})"
        ]
        pairs = [(b, h) for b in range(B) for h in range(H)]
        for b, h in pairs[: max(limit, 0)]:
            lines.append(f"({b}, {h})")
            lines.extend(self._draw(b, h, gq, gk))
        if len(pairs) > limit:
            lines.append(
                f"... {len(pairs) - max(limit, 0)} more (b, h) maps: use to_string(limit=N) "
                "or index bm[b, h]"
            )
        cell = "one cell = one block" if gq == gk == 1 else f"one cell = {gq}x{gk} blocks"
        lines.append(f"{_LEGEND}; {cell} of {self.BLOCK_SIZE[0]}x{self.BLOCK_SIZE[1]}")
        return "\n".join(lines)

    def _draw(self, b: int, h: int, gq: int, gk: int) -> list[str]:
        n_q, n_kv = self.num_blocks
        rows, cols = math.ceil(n_q / gq), math.ceil(n_kv / gk)
        part = _cell_counts(self.kv_num_blocks[b, h], self.kv_indices[b, h], gq, gk, rows, cols)
        full = torch.zeros_like(part)
        if self.full_kv_num_blocks is not None:
            full = _cell_counts(
                self.full_kv_num_blocks[b, h], self.full_kv_indices[b, h], gq, gk, rows, cols
            )
        rq = (torch.clamp(n_q - torch.arange(rows) * gq, max=gq)).unsqueeze(-1)
        ck = torch.clamp(n_kv - torch.arange(cols) * gk, max=gk)
        size = rq * ck
        out = []
        for r in range(rows):
            chars = [
                _cell_char(int(f), int(p), int(s)) for f, p, s in zip(full[r], part[r], size[r])
            ]
            out.append("".join(c * 2 for c in chars))
        return out

    def __str__(self) -> str:
        return self.to_string()

    __repr__ = __str__

    def plot(self, path: str, limit: int = 4) -> str:
        """Write a PNG of the block map of the first ``limit`` (b, h) pairs; needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.colors import ListedColormap
        except ImportError as e:
            raise ImportError(
                "BlockMask.plot needs matplotlib: pip install 'attnforge[plot]' "
                "(or pip install matplotlib)"
            ) from e
        classes = self.to_dense_classes().cpu()
        B, H = classes.shape[:2]
        pairs = [(b, h) for b in range(B) for h in range(H)][: max(limit, 1)]
        fig, axes = plt.subplots(1, len(pairs), figsize=(4 * len(pairs), 4), squeeze=False)
        cmap = ListedColormap(["white", "#f4a259", "#2a6f97"])
        for ax, (b, h) in zip(axes[0], pairs):
            ax.imshow(classes[b, h].numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
            ax.set_title(f"(b={b}, h={h})  blue full, orange partial")
            ax.set_xlabel(f"kv block ({self.BLOCK_SIZE[1]})")
            ax.set_ylabel(f"q block ({self.BLOCK_SIZE[0]})")
        fig.suptitle(f"{self.mask_mod.name}: sparsity {self.sparsity():.2f}%")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path


def _check_pair(num_name, num, idx_name, idx):
    """Validate a (count, indices) pair; return them as int32 [B, H, nQ] / [B, H, nQ, W]."""
    for name, t in ((num_name, num), (idx_name, idx)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor (int32), got {t.dtype}")
    if idx.dim() < 2 or idx.dim() > 4 or num.dim() != idx.dim() - 1:
        raise ValueError(
            f"{idx_name} must be [B, H, nQ, W] (B, H optional) and {num_name} [B, H, nQ]; "
            f"got {tuple(idx.shape)} and {tuple(num.shape)}"
        )
    if tuple(num.shape) != tuple(idx.shape[:-1]):
        raise ValueError(
            f"{num_name} {tuple(num.shape)} must equal {idx_name}.shape[:-1] "
            f"{tuple(idx.shape[:-1])}"
        )
    if num.device != idx.device:
        raise ValueError(f"{num_name} is on {num.device} but {idx_name} on {idx.device}")
    while num.dim() < 3:
        num, idx = num.unsqueeze(0), idx.unsqueeze(0)
    bad = (num < 0) | (num > idx.shape[-1])
    if bool(bad.any()):
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{num_name}{list(at)} = {int(num[at])} is outside [0, {idx.shape[-1]}] "
            f"(the width of {idx_name})"
        )
    return num.to(torch.int32).contiguous(), idx.to(torch.int32).contiguous()


def _check_ranges(name, num, idx, n_kv, kv_len, kv_block):
    vals = idx[_valid(num, idx.shape[-1])]
    if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= n_kv):
        bad = int(vals.min()) if int(vals.min()) < 0 else int(vals.max())
        raise ValueError(
            f"{name}_indices holds block {bad}, outside [0, {n_kv}) for KV_LEN={kv_len} and "
            f"KV_BLOCK={kv_block}; pass seq_lengths=(Q_LEN, KV_LEN) when kv_indices is compact"
        )


def _dim_index(i, size: int, name: str):
    """An index for one BlockMask dimension that keeps the dimension."""
    if isinstance(i, slice):
        return i
    if isinstance(i, torch.Tensor) and i.dim() == 1:
        return i.long()
    if isinstance(i, (list, tuple)):
        return torch.tensor(i, dtype=torch.long)
    try:
        k = operator.index(i)
    except TypeError:
        raise IndexError(f"cannot index the BlockMask {name} dimension with {i!r}") from None
    if not -size <= k < size:
        raise IndexError(f"{name} index {k} is out of range for size {size}")
    k %= size
    return slice(k, k + 1)


def _group_sizes(grid_size, n_q: int, n_kv: int) -> tuple[int, int]:
    if grid_size == -1 or grid_size == (-1, -1):
        return 1, 1
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = _positive_int(rows, "grid_size rows"), _positive_int(cols, "grid_size cols")
    return max(1, math.ceil(n_q / rows)), max(1, math.ceil(n_kv / cols))


def _cell_counts(num, idx, gq, gk, rows, cols) -> torch.Tensor:
    """int64 [rows, cols]: listed blocks per display cell of one (b, h).

    Counts per block row come from a searchsorted of the cell boundaries into each (sorted)
    row, so a million-token causal map prints without materialising the entries.
    """
    n_q, n_kv = num.shape[0], cols * gk
    row = torch.where(_valid(num, idx.shape[-1]), idx, n_kv)
    if not _rows_ascending(num, idx):
        row = row.sort(dim=-1).values
    bounds = torch.arange(cols + 1, device=idx.device, dtype=row.dtype) * gk
    below = torch.searchsorted(row.contiguous(), bounds.expand(n_q, cols + 1).contiguous())
    per_row = (below[:, 1:] - below[:, :-1]).cpu()
    per_row = torch.cat([per_row, per_row.new_zeros(rows * gq - n_q, cols)])
    return per_row.view(rows, gq, cols).sum(1)


def _cell_char(full: int, part: int, size: int) -> str:
    if full == size:
        return _CHARS["full"]
    if full + part == 0:
        return _CHARS["empty"]
    if full + part == size:
        return _CHARS["partial"]
    return _CHARS["mixed"]


# -- create_block_mask ----------------------------------------------------------------------------

_CACHE_SIZE = 32
_cache: collections.OrderedDict = collections.OrderedDict()
_cache_lock = threading.Lock()
_cache_stats = {"hits": 0, "misses": 0}


def _plan_blocks(*args, **kwargs):
    from attnforge.codegen.blocks import plan_blocks

    return plan_blocks(*args, **kwargs)


def _resolve_device(device, values) -> torch.device:
    if device is not None:
        return torch.device(device)
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cache_key(mod: Mod, values: tuple, geometry: tuple):
    """Key over everything the plan depends on; captured tensors by identity and version.

    Returns ``(key, tensors)`` or ``(None, ())`` when a value cannot be keyed (unhashable
    scalar, inference tensor without a version counter): then nothing is cached.
    """
    parts, tensors = [], []
    try:
        for v in values:
            if isinstance(v, torch.Tensor):
                parts.append(("tensor", id(v), v._version, v.data_ptr(), tuple(v.shape),
                              str(v.dtype), str(v.device)))  # fmt: skip
                tensors.append(v)
            else:
                hash(v)
                parts.append((type(v).__name__, v))
    except (TypeError, RuntimeError):
        return None, ()
    return (mod.ir.key, tuple(parts), geometry), tuple(tensors)


def _cache_get(key, tensors):
    with _cache_lock:
        hit = _cache.get(key)
        if hit is None:
            _cache_stats["misses"] += 1
            return None
        bm, refs = hit
        if any(r() is not t for r, t in zip(refs, tensors)):
            del _cache[key]  # the id was reused by a different tensor
            _cache_stats["misses"] += 1
            return None
        _cache.move_to_end(key)
        _cache_stats["hits"] += 1
        return bm


def _cache_put(key, tensors, bm) -> None:
    with _cache_lock:
        _cache[key] = (bm, tuple(weakref.ref(t) for t in tensors))
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


def block_mask_cache_info() -> dict:
    """Hits, misses and size of the create_block_mask cache."""
    with _cache_lock:
        return {**_cache_stats, "size": len(_cache), "max_size": _CACHE_SIZE}


def block_mask_cache_clear() -> None:
    with _cache_lock:
        _cache.clear()
        _cache_stats.update(hits=0, misses=0)


def create_block_mask(
    mask_mod: Any,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str | None = None,
    BLOCK_SIZE: int | tuple[int, int] = 128,
    _compile: bool = False,
) -> BlockMask:
    """The block map of ``mask_mod``, found analytically (O(blocks), never O(Q_LEN * KV_LEN)).

    Same signature and semantics as FlexAttention's ``create_block_mask``.  ``mask_mod(b, h,
    q_idx, kv_idx) -> bool`` is a plain function or a decorated mod; B or H None means 1
    (broadcast); ``device=None`` picks the device of the tensors the mask captures, else CUDA
    when available, else CPU.  ``_compile`` is accepted and ignored.  A block whose valid part
    (lengths need not be multiples of the block) is all True is FULL, all False is skipped.

    Results are cached (bounded LRU) on the IR structure, captured scalar values, captured
    tensor identity and version (an in-place edit misses), lengths, B, H, block size and device.

    Example::

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < 1024)
        bm = create_block_mask(sliding, None, None, 131072, 131072, device="cpu")
        bm.kv_indices.shape   # (1, 1, 1024, 2): compact
    """
    del _compile
    mod = _as_mask_mod(mask_mod)
    B = 1 if B is None else _positive_int(B, "B")
    H = 1 if H is None else _positive_int(H, "H")
    q_len = _positive_int(Q_LEN, "Q_LEN")
    kv_len = _positive_int(KV_LEN, "KV_LEN")
    bs = _block_size(BLOCK_SIZE)
    values = mod.param_values()
    dev = _resolve_device(device, values)
    key, tensors = _cache_key(mod, values, (B, H, q_len, kv_len, bs, str(dev)))
    bm = _cache_get(key, tensors) if key is not None else None
    if bm is None:
        bm = _plan_to_block_mask(mod, values, B, H, q_len, kv_len, bs, dev)
        if key is not None:
            _cache_put(key, tensors, bm)
    # A hit may come from another function of the same structure: hand back *this* mod, whose
    # parameter getters the kernels will read.
    return bm if bm.mask_mod is mod else _with_mod(bm, mod)


def _with_mod(bm: BlockMask, mod: Mod) -> BlockMask:
    out = bm._replace(lambda t: t)
    out.mask_mod = mod
    return out


def _plan_to_block_mask(mod, values, B, H, q_len, kv_len, bs, dev) -> BlockMask:
    plan = _plan_blocks(mod.ir, list(values), B, H, q_len, kv_len, bs[0], bs[1], dev)
    n_q = math.ceil(q_len / bs[0])
    fields = []
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        t = getattr(plan, name)
        want = (B, H, n_q)
        if tuple(t.shape[:3]) != want:
            raise RuntimeError(f"plan_blocks returned {name} {tuple(t.shape)}; expected {want}+")
        fields.append(t.to(dev, torch.int32))
    num, idx, fnum, fidx = (_at_least_one_column(t) if t.dim() == 4 else t for t in fields)
    return BlockMask((q_len, kv_len), num, idx, fnum, fidx, BLOCK_SIZE=bs, mask_mod=mod,
                     _ascending=True)  # fmt: skip


# -- finer maps for small-tile kernels ----------------------------------------------------------
# A kernel whose tiles are smaller than the blocks walks each PARTIAL block in sub-tiles, and
# some of them keep nothing (a causal or sliding-window diagonal block seen by the dK/dV
# kernel's 64 keys x 64 queries: the quarter above the diagonal) or everything.  ``refined``
# splits PARTIAL blocks by mask_mod's analytic plan at the tile size.  FULL and empty blocks
# keep their class: FlexAttention applies mask_mod only in PARTIAL blocks.
_REFINE_MAX_CELLS = 1 << 24  # dense class cells of the finer map (int8) built once per values
_REFINE_MIN_GAIN = 0.02  # fraction of the visited sub-blocks skipped for a finer map to pay


def refined(bm: BlockMask, block: tuple[int, int]) -> BlockMask | None:
    """``bm`` at the finer ``block`` (dividing its BLOCK_SIZE), or None where that would not
    pay (under 2% of the visited sub-blocks skipped), the map would be too large, or the mask's
    captured values cannot be keyed.  Cached on ``bm`` per current captured values: a changed
    scalar or an in-place edit of a captured tensor builds it again (so a caller can check a
    kept result with ``refined(bm, block) is kept``)."""
    mod = bm.mask_mod
    values = mod.param_values()
    L, S = bm.seq_lengths
    B, H = bm.shape[:2]
    key, tensors = _cache_key(mod, values, (B, H, L, S, block, str(bm.device)))
    if key is None:
        return None
    kept = bm.__dict__.setdefault("_refined", {})
    hit = kept.get(block)
    if hit is not None and hit[0] == key and all(r() is t for r, t in zip(hit[1], tensors)):
        return hit[2]
    out = _refine(bm, mod, block)
    kept[block] = (key, tuple(weakref.ref(t) for t in tensors), out)
    return out


def _refine(bm: BlockMask, mod: Mod, block: tuple[int, int]) -> BlockMask | None:
    (qb, kb), (L, S) = bm.BLOCK_SIZE, bm.seq_lengths
    if qb % block[0] or kb % block[1] or (qb, kb) == tuple(block):
        return None
    B, H = bm.shape[:2]
    n_q, n_kv = math.ceil(L / block[0]), math.ceil(S / block[1])
    if B * H * n_q * n_kv > _REFINE_MAX_CELLS:
        return None
    try:
        fine = create_block_mask(mod, B, H, L, S, device=bm.device, BLOCK_SIZE=block)
    except Exception:  # noqa: BLE001 - a speed-up only: the kernels walk bm as it is
        return None
    coarse = bm.to_dense_classes()
    up = coarse.repeat_interleave(qb // block[0], 2).repeat_interleave(kb // block[1], 3)
    up = up[:, :, :n_q, :n_kv]
    classes = torch.where(up == PARTIAL, fine.to_dense_classes(), up)
    skipped = int(((up == PARTIAL) & (classes == EMPTY)).sum())
    if skipped < _REFINE_MIN_GAIN * int((up != EMPTY).sum()):
        return None
    num, idx = _dense_to_lists(classes == PARTIAL)
    fnum, fidx = _dense_to_lists(classes == FULL)
    return BlockMask((L, S), num, idx, fnum, fidx, BLOCK_SIZE=block, mask_mod=mod,
                     _ascending=True)  # fmt: skip


def _at_least_one_column(idx: torch.Tensor) -> torch.Tensor:
    """Kernels index ``kv_indices[..., 0]``; never hand them a zero-width tensor."""
    if idx.shape[-1] > 0:
        return idx.contiguous()
    return torch.zeros(*idx.shape[:-1], 1, dtype=idx.dtype, device=idx.device)


# -- dynamic block sparsity ----------------------------------------------------------------------


def block_mask_from_scores(
    block_scores: torch.Tensor,
    topk: int | None = None,
    threshold: float | None = None,
    causal: bool = False,
    keep_diagonal: bool = True,
    num_sink_blocks: int = 0,
    BLOCK_SIZE: int | tuple[int, int] = 128,
    seq_lengths: tuple[int, int] | None = None,
    cumulative_mass: float | None = None,
) -> BlockMask:
    """Select kv blocks per q block from importance scores (SeerAttention / NABLA / MoBA style).

    ``block_scores``: float ``[B, H, nQ, nKV]`` (higher = more important), on any device; the
    result lives there too and is built without Python loops over blocks.  Per q-block row a kv
    block is kept when any of these hold (give at least one of the first three):

    - ``topk``: it is among the ``topk`` highest scores of its row;
    - ``threshold``: its score is ``>= threshold``;
    - ``cumulative_mass``: it is in the smallest set of blocks whose softmax (over the row)
      reaches this mass (NABLA's CDF selection);
    - forced: the diagonal blocks (``keep_diagonal``, blocks holding some ``kv_idx == q_idx``)
      and the first ``num_sink_blocks`` kv blocks.

    Without ``causal`` every kept block is FULL and ``mask_mod`` is the noop mask.  With
    ``causal=True`` blocks above the diagonal are dropped (scores there never compete in
    top-k or the mass), blocks entirely below it are FULL, and blocks the diagonal crosses are
    PARTIAL with ``mask_mod = q_idx >= kv_idx``, so the element-level causal mask applies inside
    them.  Non-square blocks and lengths that are not multiples of the block are handled.

    Example::

        scores = torch.randn(2, 4, 16, 16)                 # e.g. pooled q @ pooled k^T
        bm = block_mask_from_scores(scores, topk=4, causal=True, num_sink_blocks=1)
    """
    scores = _check_scores(block_scores)
    B, H, n_q, n_kv = scores.shape
    bs = _block_size(BLOCK_SIZE)
    if seq_lengths is None:
        seq_lengths = (n_q * bs[0], n_kv * bs[1])
    q_len = _positive_int(seq_lengths[0], "seq_lengths[0] (Q_LEN)")
    kv_len = _positive_int(seq_lengths[1], "seq_lengths[1] (KV_LEN)")
    if (math.ceil(q_len / bs[0]), math.ceil(kv_len / bs[1])) != (n_q, n_kv):
        raise ValueError(
            f"block_scores has {n_q}x{n_kv} blocks but seq_lengths={seq_lengths} with "
            f"BLOCK_SIZE={bs} gives {math.ceil(q_len / bs[0])}x{math.ceil(kv_len / bs[1])}"
        )
    _check_selection(topk, threshold, cumulative_mass, num_sink_blocks, n_kv)
    allowed, full_ok = _causal_geometry(n_q, n_kv, bs, q_len, kv_len, scores.device)
    if not causal:
        allowed = full_ok = None
    sel = _select(scores, topk, threshold, cumulative_mass, allowed)
    if keep_diagonal:
        sel |= _diagonal(n_q, n_kv, bs, q_len, kv_len, scores.device)
    if num_sink_blocks:
        sel[..., :num_sink_blocks] = True
    if allowed is None:
        classes = sel.to(torch.int8) * FULL
        mod = None
    else:
        sel &= allowed
        classes = torch.where(full_ok, FULL, PARTIAL).to(torch.int8) * sel
        mod = _causal_mod()
    return BlockMask._from_classes(classes, bs, mod, (q_len, kv_len))


def _check_scores(block_scores) -> torch.Tensor:
    if not isinstance(block_scores, torch.Tensor):
        raise ValueError(f"block_scores must be a torch.Tensor, got {type(block_scores).__name__}")
    if block_scores.dim() != 4:
        raise ValueError(f"block_scores must be [B, H, nQ, nKV], got {tuple(block_scores.shape)}")
    if min(block_scores.shape) == 0:
        raise ValueError(f"block_scores has an empty dimension: {tuple(block_scores.shape)}")
    if not block_scores.dtype.is_floating_point:
        block_scores = block_scores.float()
    if bool(torch.isnan(block_scores).any()):
        raise ValueError("block_scores contains NaN")
    return block_scores.detach()


def _check_selection(topk, threshold, cumulative_mass, num_sink_blocks, n_kv) -> None:
    if topk is None and threshold is None and cumulative_mass is None:
        raise ValueError("give topk, threshold or cumulative_mass (the rule that selects blocks)")
    if topk is not None and not 1 <= _positive_int(topk, "topk") <= n_kv:
        raise ValueError(f"topk={topk} must be in [1, nKV={n_kv}]")
    if threshold is not None and not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    if cumulative_mass is not None and not 0.0 < float(cumulative_mass) <= 1.0:
        raise ValueError(f"cumulative_mass={cumulative_mass} must be in (0, 1]")
    if isinstance(num_sink_blocks, bool) or not 0 <= operator.index(num_sink_blocks) <= n_kv:
        raise ValueError(f"num_sink_blocks={num_sink_blocks} must be in [0, nKV={n_kv}]")


def _block_bounds(n: int, block: int, length: int, device):
    lo = torch.arange(n, device=device) * block
    hi = torch.clamp(lo + block, max=length) - 1
    return lo, hi


def _causal_geometry(n_q, n_kv, bs, q_len, kv_len, device):
    """bool [nQ, nKV]: blocks with some ``q >= kv`` (allowed), and with all (full)."""
    q_lo, q_hi = _block_bounds(n_q, bs[0], q_len, device)
    k_lo, k_hi = _block_bounds(n_kv, bs[1], kv_len, device)
    allowed = k_lo.unsqueeze(0) <= q_hi.unsqueeze(1)
    full = k_hi.unsqueeze(0) <= q_lo.unsqueeze(1)
    return allowed, full


def _diagonal(n_q, n_kv, bs, q_len, kv_len, device):
    """bool [nQ, nKV]: blocks holding some ``q_idx == kv_idx``."""
    q_lo, q_hi = _block_bounds(n_q, bs[0], q_len, device)
    k_lo, k_hi = _block_bounds(n_kv, bs[1], kv_len, device)
    return (k_lo.unsqueeze(0) <= q_hi.unsqueeze(1)) & (k_hi.unsqueeze(0) >= q_lo.unsqueeze(1))


def _select(scores, topk, threshold, cumulative_mass, allowed) -> torch.Tensor:
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    sel = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if topk is not None:
        sel.scatter_(-1, scores.topk(topk, dim=-1).indices, True)
    if threshold is not None:
        sel |= scores >= threshold
    if cumulative_mass is not None:
        sel |= _mass_selection(scores, float(cumulative_mass))
    return sel


def _mass_selection(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """The highest-probability blocks of each row until their softmax mass reaches ``mass``."""
    prob = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0)
    p_sorted, order = prob.sort(dim=-1, descending=True)
    before = p_sorted.cumsum(-1) - p_sorted  # mass of the strictly better blocks
    keep_sorted = (before < mass) & (p_sorted > 0)
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
