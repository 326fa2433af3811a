"""BlockMask format, transposes, create_block_mask (vs FlexAttention and brute force), caching,
printing, and block_mask_from_scores (vs a loop reference)."""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch.nn.attention import flex_attention as tflex

from attnforge.dsl import ir
from attnforge.dsl.evaluate import evaluate
from attnforge.dsl.ir import KV_IDX, Q_IDX, Op, node
from attnforge.dsl.mod import Mod, Param
from attnforge.runtime import blockmask as bmod
from attnforge.runtime.blockmask import (
    FULL,
    PARTIAL,
    BlockMask,
    block_mask_from_scores,
    create_block_mask,
)

# -- helpers ------------------------------------------------------------------------------------


def brute_classes(mod: Mod, B, H, q_len, kv_len, qb, kb) -> torch.Tensor:
    """int8 [B, H, nQ, nKV] from a dense evaluation, clipping the last blocks to the lengths."""
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    q = torch.arange(q_len).view(1, 1, q_len, 1)
    kv = torch.arange(kv_len).view(1, 1, 1, kv_len)
    env = {"b": b, "h": h, "q_idx": q, "kv_idx": kv}
    dense = evaluate(mod.ir, env, mod.param_values()).expand(B, H, q_len, kv_len)
    n_q, n_kv = math.ceil(q_len / qb), math.ceil(kv_len / kb)
    pad_t = torch.zeros(B, H, n_q * qb, n_kv * kb, dtype=torch.bool)
    pad_f = torch.ones(B, H, n_q * qb, n_kv * kb, dtype=torch.bool)
    pad_t[..., :q_len, :kv_len] = dense
    pad_f[..., :q_len, :kv_len] = dense
    any_t = pad_t.view(B, H, n_q, qb, n_kv, kb).any(5).any(3)
    all_t = pad_f.view(B, H, n_q, qb, n_kv, kb).all(5).all(3)
    return torch.where(all_t, FULL, torch.where(any_t, PARTIAL, 0)).to(torch.int8)


def brute_plan(mask_ir, params, B, H, q_len, kv_len, qb, kb, device="cpu"):
    """Stand-in for H3's plan_blocks (same interface) until it lands."""
    mod = Mod("mask", mask_ir if mask_ir is not None else ir.TRUE)
    mod.params = tuple(
        Param(i, f"p{i}", "tensor" if isinstance(v, torch.Tensor) else "scalar", None, v)
        for i, v in enumerate(params)
    )
    classes = brute_classes(mod, B, H, q_len, kv_len, qb, kb).to(device)
    num, idx = bmod._dense_to_lists(classes == PARTIAL)
    fnum, fidx = bmod._dense_to_lists(classes == FULL)
    return types.SimpleNamespace(
        kv_num_blocks=num, kv_indices=idx, full_kv_num_blocks=fnum, full_kv_indices=fidx
    )


def _has_plan_blocks() -> bool:
    try:
        from attnforge.codegen.blocks import plan_blocks  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(autouse=True)
def _plan(monkeypatch):
    if not _has_plan_blocks():
        monkeypatch.setattr(bmod, "_plan_blocks", brute_plan)
    bmod.block_mask_cache_clear()
    yield


def lists_from_classes(classes: torch.Tensor, width=None, shuffle=False):
    """Loop reference: per row, the PARTIAL and FULL kv blocks (optionally shuffled rows)."""
    B, H, n_q, n_kv = classes.shape
    out = []
    for cls in (PARTIAL, FULL):
        rows = [[[torch.nonzero(classes[b, h, r] == cls).flatten().tolist() for r in range(n_q)]
                 for h in range(H)] for b in range(B)]  # fmt: skip
        w = width or max(1, max(len(r) for bb in rows for hh in bb for r in hh))
        num = torch.zeros(B, H, n_q, dtype=torch.int32)
        idx = torch.full((B, H, n_q, w), 7, dtype=torch.int32)  # junk padding on purpose
        for b in range(B):
            for h in range(H):
                for r in range(n_q):
                    cols = rows[b][h][r]
                    if shuffle:
                        cols = [cols[i] for i in torch.randperm(len(cols)).tolist()]
                    num[b, h, r] = len(cols)
                    idx[b, h, r, : len(cols)] = torch.tensor(cols, dtype=torch.int32)
        out += [num, idx]
    return out


def brute_transpose(classes: torch.Tensor, cls: int):
    """Per (b, h, kv block): the ascending q blocks of class ``cls``."""
    B, H, n_q, n_kv = classes.shape
    return [[[torch.nonzero(classes[b, h, :, c] == cls).flatten().tolist() for c in range(n_kv)]
             for h in range(H)] for b in range(B)]  # fmt: skip


def check_transposes(bm: BlockMask, classes: torch.Tensor):
    for cls, num, idx in (
        (PARTIAL, bm.q_num_blocks, bm.q_indices),
        (FULL, bm.full_q_num_blocks, bm.full_q_indices),
    ):
        want = brute_transpose(classes, cls)
        B, H, n_kv = num.shape
        assert idx.dtype == torch.int32 and num.dtype == torch.int32
        for b in range(B):
            for h in range(H):
                for c in range(n_kv):
                    n = int(num[b, h, c])
                    assert idx[b, h, c, :n].tolist() == want[b][h][c], (cls, b, h, c)


def random_classes(B, H, n_q, n_kv, p_empty=0.5):
    r = torch.rand(B, H, n_q, n_kv)
    return torch.where(r < p_empty, 0, torch.where(r < (1 + p_empty) / 2, 1, 2)).to(torch.int8)


def causal_classes(n, B=1, H=1):
    qi = torch.arange(n).view(n, 1)
    ki = torch.arange(n).view(1, n)
    c = torch.where(ki < qi, FULL, torch.where(ki == qi, PARTIAL, 0)).to(torch.int8)
    return c.expand(B, H, n, n).contiguous()


# -- mods (built directly as IR, so the tests do not depend on the tracer) -------------------


def scalar_mod(name, build, values, fn):
    params = tuple(
        Param(i, f"s{i}", "scalar", ir.scalar(i, ir.DType.INT), v) for i, v in enumerate(values)
    )
    return Mod("mask", build(*(p.node for p in params)), params=params, fn=fn, name=name)


def causal_mod():
    return Mod("mask", node(Op.GE, Q_IDX, KV_IDX), fn=lambda b, h, q, kv: q >= kv, name="causal")


def sliding_mod(w):
    def build(W):
        return node(Op.AND, node(Op.GE, Q_IDX, KV_IDX), node(Op.LT, node(Op.SUB, Q_IDX, KV_IDX), W))

    return scalar_mod("sliding", build, [w], lambda b, h, q, kv: (q >= kv) & (q - kv < w))


def prefix_mod(p):
    def build(P):
        return node(Op.OR, node(Op.GE, Q_IDX, KV_IDX), node(Op.LT, KV_IDX, P))

    return scalar_mod("prefix", build, [p], lambda b, h, q, kv: (q >= kv) | (kv < p))


def head_mod():
    """Even heads causal, odd heads anti-causal: exercises per-(b, h) plans."""
    even = node(Op.EQ, node(Op.MOD, ir.H, ir.const(2)), ir.const(0))
    m = node(Op.WHERE, even, node(Op.GE, Q_IDX, KV_IDX), node(Op.LE, Q_IDX, KV_IDX))
    return Mod("mask", m, fn=lambda b, h, q, kv: torch.where(h % 2 == 0, q >= kv, q <= kv))


def doc_mod(doc: torch.Tensor):
    t = ir.tensor(0, 1, str(doc.dtype).replace("torch.", ""))
    p = Param(0, "doc", "tensor", t, doc, getter=lambda: doc)
    m = node(Op.EQ, node(Op.LOAD, t, Q_IDX), node(Op.LOAD, t, KV_IDX))
    return Mod("mask", m, params=(p,), fn=lambda b, h, q, kv: doc[q] == doc[kv], name="doc")


def doc_ids(length, n_docs, gen=None):
    cuts = torch.sort(torch.randperm(length - 1, generator=gen)[: n_docs - 1] + 1).values
    ids = torch.zeros(length, dtype=torch.long)
    ids[cuts] = 1
    return ids.cumsum(0)


# -- from_kv_blocks, to_dense, transposes --------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (2, 3, 6, 4), (1, 2, 1, 9)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_from_kv_blocks_round_trip_and_transposes(shape, shuffle):
    classes = random_classes(*shape)
    num, idx, fnum, fidx = lists_from_classes(classes, shuffle=shuffle)
    B, H, n_q, n_kv = shape
    bm = BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=(16, 32),
                                  seq_lengths=(n_q * 16 - 3, n_kv * 32 - 5))  # fmt: skip
    assert torch.equal(bm.to_dense_classes(), classes)
    assert torch.equal(bm.to_dense(), (classes > 0).to(torch.int32))
    assert bm.to_dense().dtype == torch.int32
    assert bm.BLOCK_SIZE == (16, 32) and bm.shape == (B, H, n_q * 16 - 3, n_kv * 32 - 5)
    check_transposes(bm, classes)
    plain = BlockMask._from_classes(classes, (16, 32), None, bm.seq_lengths)
    for grid in ((2, 3), -1):
        assert bm.to_string(grid_size=grid) == plain.to_string(grid_size=grid)


def test_from_kv_blocks_defaults_like_flex():
    classes = random_classes(2, 2, 4, 4)
    num, idx, fnum, fidx = lists_from_classes(classes, width=4)
    ours = BlockMask.from_kv_blocks(num, idx, fnum, fidx)
    theirs = tflex.BlockMask.from_kv_blocks(num, idx, fnum, fidx)
    assert ours.shape == theirs.shape and ours.seq_lengths == theirs.seq_lengths
    assert ours.BLOCK_SIZE == (128, 128)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert ours.sparsity() == pytest.approx(theirs.sparsity())
    assert ours.numel() == theirs.numel()
    for name in ("q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name))


def test_partial_only_and_leading_dims_optional():
    num = torch.tensor([1, 2, 0], dtype=torch.int32)
    idx = torch.tensor([[0, 0], [0, 2], [0, 0]], dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=64, seq_lengths=(150, 150))
    assert bm.shape == (1, 1, 150, 150) and bm.full_kv_num_blocks is None
    assert bm.to_dense()[0, 0].tolist() == [[1, 0, 0], [1, 0, 1], [0, 0, 0]]
    assert bm.q_num_blocks[0, 0].tolist() == [2, 0, 1]
    assert bm.full_q_num_blocks is None
    assert bm.mask_mod.ir is ir.TRUE


@pytest.mark.parametrize("n,B,H", [(1, 1, 1), (9, 2, 3), (40, 1, 2)])
def test_transpose_interval_path(n, B, H):
    """Causal-like rows (intervals, empty first full row) take the searchsorted path."""
    classes = causal_classes(n, B, H)
    num, idx, fnum, fidx = lists_from_classes(classes)
    assert bmod._interval_rows(fnum.view(B * H, n).long(), fidx.view(B * H, n, -1), n) is not None
    bm = BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=8, seq_lengths=(8 * n, 8 * n))
    check_transposes(bm, classes)
    # the interval and sort paths agree; padding holds valid block indices
    qn, _ = bmod._transpose_by_sort(fnum.view(B * H, n).long(), fidx.view(B * H, n, -1), n, n)
    assert torch.equal(bm.full_q_num_blocks.flatten(), qn.flatten())
    assert int(bm.full_q_indices.min()) >= 0 and int(bm.full_q_indices.max()) < n


def test_transpose_interval_path_rejects_overlap_around_empty_row():
    # rows [0, 3), empty, [1, 2): column 1 holds rows 0 and 2 but not 1 -> not one run
    num = torch.tensor([[3, 0, 1]])
    idx = torch.tensor([[[0, 1, 2], [0, 0, 0], [1, 0, 0]]])
    assert bmod._interval_rows(num, idx, 3) is None
    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=1, seq_lengths=(3, 3))
    assert bm.q_num_blocks[0, 0].tolist() == [1, 2, 1]
    assert bm.q_indices[0, 0, 1, :2].tolist() == [0, 2]


def test_compact_indices_need_seq_lengths():
    num = torch.tensor([[[1, 1]]], dtype=torch.int32)
    idx = torch.tensor([[[[0], [5]]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside \\[0, 1\\).*seq_lengths"):
        BlockMask.from_kv_blocks(num, idx)
    bm = BlockMask.from_kv_blocks(num, idx, seq_lengths=(256, 6 * 128))
    assert bm.to_dense().shape == (1, 1, 2, 6) and bm.q_indices.shape[-2] == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kv_num_blocks=torch.tensor([[[3]]]), kv_indices=torch.zeros(1, 1, 1, 2)),
         "integer tensor"),
        (dict(kv_num_blocks=torch.tensor([[[3]]]), kv_indices=torch.zeros(1, 1, 1, 2, dtype=int)),
         "outside \\[0, 2\\]"),
        (dict(kv_num_blocks=torch.tensor([[[1, 1]]]),
              kv_indices=torch.zeros(1, 1, 3, 2, dtype=int)),
         "must equal"),
        (dict(kv_num_blocks=torch.tensor([[[2]]]), kv_indices=torch.tensor([[[[1, 1]]]])),
         "listed twice"),
        (dict(kv_num_blocks=torch.tensor([[[1]]]), kv_indices=torch.tensor([[[[1, 0]]]]),
              full_kv_num_blocks=torch.tensor([[[1]]]), full_kv_indices=torch.tensor([[[[1]]]])),
         "listed twice"),
        (dict(kv_num_blocks=torch.tensor([[[1]]]), kv_indices=torch.tensor([[[[1, 0]]]]),
              full_kv_num_blocks=torch.tensor([[[1]]])),
         "both"),
        (dict(kv_num_blocks=torch.tensor([[[1]]]), kv_indices=torch.tensor([[[[1, 0]]]]),
              seq_lengths=(300, 256)),
         "needs 3"),
        (dict(kv_num_blocks=torch.tensor([[[1]]]), kv_indices=torch.tensor([[[[1, 0]]]]),
              BLOCK_SIZE=0),
         "BLOCK_SIZE"),
    ],
)  # fmt: skip
def test_from_kv_blocks_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockMask.from_kv_blocks(**kwargs)


# -- indexing, to(), printing --------------------------------------------------------------------


def test_getitem_like_flex():
    classes = random_classes(3, 4, 5, 6)
    num, idx, fnum, fidx = lists_from_classes(classes, width=6)
    bm = BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=16, seq_lengths=(80, 96))
    ref = tflex.BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=16, seq_lengths=(80, 96))
    for index in [1, -1, (0, 2), (slice(0, 2), slice(1, 3)), (slice(None), 3),
                  (torch.tensor([2, 0]),)]:  # fmt: skip
        sub, want = bm[index], ref[index]
        assert sub.shape == want.shape, index
        assert torch.equal(sub.to_dense(), want.to_dense()), index
        assert torch.equal(sub.q_num_blocks, want.q_num_blocks), index
        assert sub.sparsity() == pytest.approx(want.sparsity())
    _ = bm.q_indices  # computed transposes travel with the slice
    assert torch.equal(bm[1, 2].q_indices, bm.q_indices[1:2, 2:3])
    with pytest.raises(IndexError, match="out of range"):
        bm[3]
    with pytest.raises(IndexError, match="batch and head only"):
        bm[0, 0, 0]


def test_to_device_returns_copy():
    bm = BlockMask.from_kv_blocks(
        *lists_from_classes(causal_classes(4)), BLOCK_SIZE=4, seq_lengths=(16, 16)
    )
    moved = bm.to("cpu")
    assert moved is not bm and moved.device.type == "cpu"
    assert torch.equal(moved.to_dense(), bm.to_dense())
    assert torch.equal(moved.full_q_indices, bm.full_q_indices)
    assert moved.mask_mod is bm.mask_mod


def test_str_small_causal():
    bm = create_block_mask(causal_mod(), None, None, 512, 512, device="cpu")
    text = str(bm)
    assert "░░      \n██░░    \n████░░  \n██████░░" in text
    assert "legend" in text and "█ full" in text and "░ partial" in text
    assert f"sparsity={bm.sparsity():.2f}%" in text and "37.50%" in text
    assert repr(bm) == text


def test_str_downsamples_and_limits():
    bm = create_block_mask(causal_mod(), 2, 3, 64 * 40, 64 * 40, device="cpu", BLOCK_SIZE=64)
    text = bm.to_string(grid_size=(10, 10), limit=2)
    maps = text.split("(0, 0)\n")[1].split("(0, 1)")[0].splitlines()
    assert len(maps) == 10 and all(len(line) == 20 for line in maps)
    assert maps[0] == "▒▒" + " " * 18 and maps[9] == "██" * 9 + "▒▒"  # 4x4 blocks per cell
    assert "4 more (b, h) maps" in text and "4x4 blocks" in text
    full = bm[0, 0].to_string(grid_size=-1)
    assert len(full.splitlines()) == 1 + 1 + 40 + 1


def test_plot(tmp_path):
    bm = create_block_mask(causal_mod(), None, None, 300, 300, device="cpu")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install"):
            bm.plot(str(tmp_path / "m.png"))
        return
    path = bm.plot(str(tmp_path / "m.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# -- create_block_mask ---------------------------------------------------------------------------

SHAPES = [(300, 500, (64, 128)), (257, 129, 128), (200, 200, (128, 64)), (96, 320, 32)]


def _flex_dense(fn, B, H, q_len, kv_len, bs):
    return tflex.create_block_mask(fn, B, H, q_len, kv_len, device="cpu", BLOCK_SIZE=bs).to_dense()


@pytest.mark.parametrize("q_len, kv_len, bs", SHAPES)
@pytest.mark.parametrize(
    "make", [causal_mod, lambda: sliding_mod(100), lambda: prefix_mod(70), head_mod],
    ids=["causal", "sliding", "prefix", "head"],
)  # fmt: skip
def test_create_block_mask_matches_flex_and_brute_force(make, q_len, kv_len, bs):
    mod = make()
    B, H = (2, 3) if mod.ir is not causal_mod().ir else (None, None)  # both kinds of call
    bm = create_block_mask(mod, B, H, q_len, kv_len, device="cpu", BLOCK_SIZE=bs)
    qb, kb = bm.BLOCK_SIZE
    assert bm.shape == (B or 1, H or 1, q_len, kv_len)
    assert torch.equal(bm.to_dense(), _flex_dense(mod.fn, B, H, q_len, kv_len, bs))
    want = brute_classes(mod, B or 1, H or 1, q_len, kv_len, qb, kb)
    assert torch.equal(bm.to_dense_classes(), want)
    check_transposes(bm, want)
    assert bm.mask_mod is mod
    # the planner's lists are ascending, as the transposes' fast path assumes
    assert bmod._rows_ascending(bm.kv_num_blocks, bm.kv_indices)
    assert bmod._rows_ascending(bm.full_kv_num_blocks, bm.full_kv_indices)


@pytest.mark.parametrize("q_len, bs", [(1000, 128), (777, (64, 32))])
def test_create_block_mask_document(q_len, bs):
    doc = doc_ids(q_len, 7, torch.Generator().manual_seed(1))
    mod = doc_mod(doc)
    bm = create_block_mask(mod, None, None, q_len, q_len, BLOCK_SIZE=bs)
    assert bm.device.type == "cpu"  # the captured tensor's device
    assert torch.equal(bm.to_dense(), _flex_dense(mod.fn, None, None, q_len, q_len, bs))
    want = brute_classes(mod, 1, 1, q_len, q_len, *bm.BLOCK_SIZE)
    assert torch.equal(bm.to_dense_classes(), want)
    check_transposes(bm, want)


def test_create_block_mask_plain_function():
    pytest.importorskip("attnforge.dsl.api")
    w = 64

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

    bm = create_block_mask(sliding, 1, 1, 1000, 1000, device="cpu", BLOCK_SIZE=128, _compile=True)
    assert torch.equal(bm.to_dense(), _flex_dense(sliding, 1, 1, 1000, 1000, 128))
    assert bm.mask_mod.kind == "mask"


def test_cache_hits_and_misses():
    mod = sliding_mod(100)
    a = create_block_mask(mod, None, None, 1024, 1024, device="cpu")
    b = create_block_mask(sliding_mod(100), None, None, 1024, 1024, device="cpu")
    info = bmod.block_mask_cache_info()
    assert (info["hits"], info["misses"]) == (1, 1)
    assert b.kv_indices is a.kv_indices  # structure and values equal: shared plan
    assert b.mask_mod is not a.mask_mod  # ... but each keeps its own mod (param getters)
    c = create_block_mask(sliding_mod(300), None, None, 1024, 1024, device="cpu")
    assert bmod.block_mask_cache_info()["misses"] == 2
    assert not torch.equal(c.to_dense(), a.to_dense())
    create_block_mask(mod, None, None, 1024, 1024, device="cpu", BLOCK_SIZE=64)
    create_block_mask(mod, 2, None, 1024, 1024, device="cpu")
    create_block_mask(mod, None, None, 1024, 1000, device="cpu")
    assert bmod.block_mask_cache_info()["misses"] == 5


def test_cache_misses_after_in_place_edit():
    doc = doc_ids(512, 4, torch.Generator().manual_seed(2))
    mod = doc_mod(doc)
    before = create_block_mask(mod, None, None, 512, 512, BLOCK_SIZE=64)
    again = create_block_mask(mod, None, None, 512, 512, BLOCK_SIZE=64)
    assert again.kv_indices is before.kv_indices
    doc.zero_()  # one document: everything FULL
    after = create_block_mask(mod, None, None, 512, 512, BLOCK_SIZE=64)
    assert bmod.block_mask_cache_info()["misses"] == 2
    assert torch.equal(after.to_dense_classes(), torch.full((1, 1, 8, 8), FULL, dtype=torch.int8))
    # a different tensor with equal values is a different key (identity, not contents)
    create_block_mask(doc_mod(doc.clone()), None, None, 512, 512, BLOCK_SIZE=64)
    assert bmod.block_mask_cache_info()["misses"] == 3


def test_cache_is_bounded():
    for w in range(bmod._CACHE_SIZE + 5):
        create_block_mask(sliding_mod(w + 1), None, None, 256, 256, device="cpu")
    assert bmod.block_mask_cache_info()["size"] == bmod._CACHE_SIZE


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((None, None, 0, 10), {}, "Q_LEN must be a positive int, got 0"),
        ((None, None, 10, -3), {}, "KV_LEN must be a positive int, got -3"),
        ((None, None, 10, 10), {"BLOCK_SIZE": 0}, "BLOCK_SIZE must be a positive int, got 0"),
        ((None, None, 10, 10), {"BLOCK_SIZE": (64, 32, 1)}, "pair"),
        ((0, None, 10, 10), {}, "B must be a positive int, got 0"),
        ((None, 2.5, 10, 10), {}, "H must be a positive int, got 2.5"),
    ],
)
def test_create_block_mask_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_block_mask(causal_mod(), *args, device="cpu", **kwargs)


def test_create_block_mask_rejects_non_bool_mask():
    mod = Mod("mask", node(Op.SUB, Q_IDX, KV_IDX), name="diff")
    with pytest.raises(ValueError, match="must return a bool.*returns int"):
        create_block_mask(mod, None, None, 64, 64, device="cpu")
    with pytest.raises(ValueError, match="score mod"):
        create_block_mask(Mod("score", ir.SCORE), None, None, 64, 64, device="cpu")


# -- block_mask_from_scores ----------------------------------------------------------------------


def reference_from_scores(scores, topk, threshold, causal, keep_diagonal, sinks, bs, lens):
    """Straightforward loops over blocks."""
    B, H, n_q, n_kv = scores.shape
    qb, kb = bs
    out = torch.zeros(B, H, n_q, n_kv, dtype=torch.int8)
    for b in range(B):
        for h in range(H):
            for i in range(n_q):
                q_lo, q_hi = i * qb, min((i + 1) * qb, lens[0]) - 1
                ok = [not causal or j * kb <= q_hi for j in range(n_kv)]
                cand = [(float(scores[b, h, i, j]), -j, j) for j in range(n_kv) if ok[j]]
                keep = set()
                if topk:
                    keep |= {j for _, _, j in sorted(cand, reverse=True)[:topk]}
                if threshold is not None:
                    keep |= {j for s, _, j in cand if s >= threshold}
                for j in range(n_kv):
                    k_lo, k_hi = j * kb, min((j + 1) * kb, lens[1]) - 1
                    if keep_diagonal and k_lo <= q_hi and k_hi >= q_lo:
                        keep.add(j)
                    if j < sinks:
                        keep.add(j)
                for j in keep:
                    if ok[j]:
                        full = not causal or min((j + 1) * kb, lens[1]) - 1 <= q_lo
                        out[b, h, i, j] = FULL if full else PARTIAL
    return out


@pytest.mark.parametrize(
    "topk, threshold, causal, diag, sinks, bs, lens",
    [
        (3, None, False, True, 0, (64, 64), (640, 640)),
        (2, None, True, True, 1, (64, 64), (600, 630)),
        (None, 0.5, True, False, 0, (64, 128), (640, 1200)),
        (1, 1.0, True, True, 2, (128, 64), (1000, 700)),
        (4, None, False, False, 3, 32, (300, 300)),
    ],
)
def test_block_mask_from_scores_matches_loops(topk, threshold, causal, diag, sinks, bs, lens):
    bs = bs if isinstance(bs, tuple) else (bs, bs)
    n_q, n_kv = math.ceil(lens[0] / bs[0]), math.ceil(lens[1] / bs[1])
    scores = torch.randn(2, 3, n_q, n_kv)
    bm = block_mask_from_scores(scores, topk=topk, threshold=threshold, causal=causal,
                                keep_diagonal=diag, num_sink_blocks=sinks, BLOCK_SIZE=bs,
                                seq_lengths=lens)  # fmt: skip
    want = reference_from_scores(scores, topk, threshold, causal, diag, sinks, bs, lens)
    assert torch.equal(bm.to_dense_classes(), want)
    assert bm.shape == (2, 3, *lens)
    assert bm.mask_mod.ir is (node(Op.GE, Q_IDX, KV_IDX) if causal else ir.TRUE)
    check_transposes(bm, want)


def test_block_mask_from_scores_causal_partial_blocks_are_exact():
    """Selecting every block causally reproduces create_block_mask(causal) exactly."""
    scores = torch.zeros(1, 1, 5, 5)
    bm = block_mask_from_scores(scores, threshold=0.0, causal=True, BLOCK_SIZE=(64, 128),
                                seq_lengths=(300, 600))  # fmt: skip
    ref = create_block_mask(causal_mod(), None, None, 300, 600, device="cpu", BLOCK_SIZE=(64, 128))
    assert torch.equal(bm.to_dense_classes(), ref.to_dense_classes()[..., :5, :5])


def test_block_mask_from_scores_cumulative_mass():
    scores = torch.log(torch.tensor([[[[0.5, 0.3, 0.15, 0.05]]]]))
    pick = lambda m: block_mask_from_scores(scores, cumulative_mass=m, keep_diagonal=False,
                                            BLOCK_SIZE=1).to_dense()[0, 0, 0].tolist()  # fmt: skip
    assert pick(0.5) == [1, 0, 0, 0]
    assert pick(0.6) == [1, 1, 0, 0]
    assert pick(0.96) == [1, 1, 1, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "give topk, threshold or cumulative_mass"),
        ({"topk": 9}, "topk=9 must be in \\[1, nKV=4\\]"),
        ({"topk": 0}, "topk must be a positive int"),
        ({"topk": 1, "num_sink_blocks": 5}, "num_sink_blocks=5"),
        ({"cumulative_mass": 1.5}, "cumulative_mass=1.5"),
        ({"topk": 1, "seq_lengths": (100, 100)}, "4x4 blocks"),
    ],
)
def test_block_mask_from_scores_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        block_mask_from_scores(torch.randn(1, 1, 4, 4), BLOCK_SIZE=64, **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        block_mask_from_scores(torch.full((1, 1, 2, 2), float("nan")), topk=1)


def test_from_torch_block_mask():
    pytest.importorskip("attnforge.dsl.api")
    theirs = tflex.create_block_mask(
        lambda b, h, q, kv: q >= kv, 2, 1, 300, 200, device="cpu", BLOCK_SIZE=64
    )
    ours = BlockMask.from_torch(theirs)
    assert ours.shape == theirs.shape and ours.BLOCK_SIZE == (64, 64)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.full_q_num_blocks, theirs.full_q_num_blocks)
    assert ours.mask_mod.ir is node(Op.GE, Q_IDX, KV_IDX)
