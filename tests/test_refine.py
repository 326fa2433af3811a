"""Finer block maps for the dK/dV kernel (``blockmask.refined``, ``launch.dkdv_block_mask``).

A PARTIAL block is split into sub-blocks of the kernel's tile by mask_mod's analytic plan: the
ones it keeps nothing of are skipped, the ones it keeps all of run without mask code.  Pinned
here: the classes match the dense mask exactly, FULL and empty blocks keep their class (only
PARTIAL blocks see mask_mod), gradients are bit-identical to walking the block mask as given,
and a changed captured value (scalar or in-place tensor edit) never serves stale lists, on the
full path or a plan's replay."""

from __future__ import annotations

import pytest
import torch

import attnforge as af
from attnforge.runtime import api, launch
from attnforge.runtime.blockmask import EMPTY, FULL, PARTIAL, BlockMask, refined
from attnforge.runtime.reference import reference_attention

FINE = (64, 64)


def _sliding(window):
    def mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return mask


def _dense_classes(mask, L, S, block):
    """[nQ, nKV] classes of the dense mask (valid part of each block), the ground truth."""
    q = torch.arange(L)[:, None]
    kv = torch.arange(S)[None, :]
    dense = torch.as_tensor(mask(0, 0, q, kv)).expand(L, S)
    n_q, n_kv = -(-L // block[0]), -(-S // block[1])
    out = torch.zeros(n_q, n_kv, dtype=torch.int8)
    for i in range(n_q):
        for j in range(n_kv):
            cell = dense[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            out[i, j] = FULL if cell.all() else PARTIAL if cell.any() else EMPTY
    return out


@pytest.mark.parametrize("L, S", [(256, 256), (300, 257), (130, 500)])
@pytest.mark.parametrize("window", [100, 64, 1000])
def test_refined_classes_match_the_dense_mask(L, S, window):
    mask = _sliding(window)
    bm = af.create_block_mask(mask, None, None, L, S, device="cpu", BLOCK_SIZE=128)
    fine = refined(bm, FINE)
    if fine is None:  # nothing (or under 2%) to skip: then there is indeed little empty
        return
    coarse = bm.to_dense_classes()[0, 0]
    up = coarse.repeat_interleave(2, 0).repeat_interleave(2, 1)[: fine.num_blocks[0]]
    up = up[:, : fine.num_blocks[1]]
    truth = _dense_classes(mask, L, S, FINE)
    got = fine.to_dense_classes()[0, 0]
    assert torch.equal(got[up == PARTIAL], truth[up == PARTIAL])
    assert torch.equal(got[up != PARTIAL], up[up != PARTIAL])
    assert ((up == PARTIAL) & (got == EMPTY)).any()


def test_full_and_empty_blocks_keep_their_class():
    # a hand-made block mask that calls a block FULL where mask_mod would drop most of it, and
    # skips one mask_mod keeps: FlexAttention applies mask_mod only in PARTIAL blocks
    mask = _sliding(100)
    num = torch.tensor([[[1, 1]]], dtype=torch.int32)
    idx = torch.tensor([[[[0, 0], [1, 0]]]], dtype=torch.int32)  # partial: (0,0), (1,1)
    fnum = torch.tensor([[[0, 1]]], dtype=torch.int32)
    fidx = torch.tensor([[[[0, 0], [0, 0]]]], dtype=torch.int32)  # full: (1,0)
    bm = BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=128, mask_mod=mask,
                                  seq_lengths=(256, 256))  # fmt: skip
    fine = refined(bm, FINE)
    assert fine is not None
    got = fine.to_dense_classes()[0, 0]
    assert (got[2:, :2] == FULL).all()  # block (1, 0) stays FULL
    assert (got[:2, 2:] == EMPTY).all()  # block (0, 1) stays skipped
    assert got[0, 1] == EMPTY and got[2, 3] == EMPTY  # above the diagonals: skipped


def _grads(q, k, v, do, bm, **options):
    for t in (q, k, v):
        t.grad = None
    out = af.flex_attention(q, k, v, block_mask=bm, kernel_options=options or None)
    out.backward(do)
    return out, [t.grad.clone() for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask_name", ["sliding", "document"])
def test_gradients_equal_walking_the_block_mask_as_given(dtype, mask_name):
    L = 257
    doc = (torch.arange(L) * 5 // L).to(torch.int32)
    masks = {
        "sliding": _sliding(100),
        "document": lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv),
    }
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, L, 32, generator=g).to(dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    bm = af.create_block_mask(masks[mask_name], None, None, L, L, device="cpu")
    assert launch.dkdv_block_mask(bm, {}) is not bm  # refined: the sub-tiles differ
    out, got = _grads(q, k, v, do, bm)
    _, want = _grads(q, k, v, do, bm, REFINE_BLOCKS=False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, block_mask=bm)
    ref.backward(do.double())
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=4e-2, rtol=4e-2)
    for a, leaf in zip(got, leaves):
        torch.testing.assert_close(a.double(), leaf.grad, **tol)


def test_changed_captured_values_rebuild_the_lists():
    # the block mask stays the one built for window 100 and document ids `doc`; mask_mod, read
    # at each call, sees window 40 (sub-blocks it keeps nothing of are skipped), then 100 again
    # (they hold kept pairs), then doc ids edited in place to one document.  Every backward
    # (the first on the full path, repeats replaying the plan) must equal walking the block
    # mask as given
    L = 256
    window = 100
    doc = (torch.arange(L) * 3 // L).to(torch.int32)

    def mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window) & (doc[q_idx] == doc[kv_idx])

    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(1, 1, L, 16, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    bm = af.create_block_mask(mask, None, None, L, L, device="cpu")
    window = 40
    api._plans.clear()
    for step in range(6):
        if step == 2:
            window = 100
        if step == 4:
            doc.fill_(7)  # in place: the version counter moves
        _, got = _grads(q, k, v, do, bm)
        _, want = _grads(q, k, v, do, bm, REFINE_BLOCKS=False)
        for a, b in zip(got, want):
            assert torch.equal(a, b), step


def test_no_refinement_where_it_does_not_pay():
    causal = af.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 8192, 8192,
                                  device="cpu")  # fmt: skip
    assert refined(causal, FINE) is None  # 64 of 8320 sub-blocks (above the diagonal) skipped
    assert launch.dkdv_block_mask(causal, {}) is causal
    small = af.create_block_mask(_sliding(100), None, None, 256, 256, device="cpu",
                                 BLOCK_SIZE=64)  # fmt: skip
    assert refined(small, FINE) is None  # already the kernel's tile
    cfg = launch.BwdConfig(64, 128, 128, 64, 8, 3)
    sliding = af.create_block_mask(_sliding(100), None, None, 256, 256, device="cpu")
    assert launch.dkdv_block_mask(sliding, {}, cfg) is sliding  # 128-key tiles
    assert launch.dkdv_block_mask(sliding, {"REFINE_BLOCKS": False}) is sliding


@pytest.mark.parametrize("L, S", [(200, 300), (300, 130), (1, 257)])
def test_per_head_mask_gqa_and_odd_lengths(L, S):
    # a window per head (a captured tensor), B=2, GQA 4:2, lengths off the block grid
    windows = torch.tensor([30, 70, 150, 500])

    def mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + (S - L)) & (q_idx + (S - L) - kv_idx < windows[h])

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, L, 24, generator=g).requires_grad_()
    k, v = (torch.randn(2, 2, S, 24, generator=g).requires_grad_() for _ in range(2))
    do = torch.randn(2, 4, L, 24, generator=g)
    bm = af.create_block_mask(mask, 2, 4, L, S, device="cpu")
    kw = dict(block_mask=bm, enable_gqa=True)
    grads = []
    for options in (None, {"REFINE_BLOCKS": False}):
        for t in (q, k, v):
            t.grad = None
        af.flex_attention(q, k, v, kernel_options=options, **kw).backward(do)
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference_attention(*leaves, **kw).backward(do.double())
    for a, leaf in zip(grads[0], leaves):
        torch.testing.assert_close(a.double(), leaf.grad, atol=2e-5, rtol=1e-4)
