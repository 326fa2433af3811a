"""A captured tensor indexed out of its bounds at a real position raises IndexError (as torch's
eager flex does) instead of the kernels' masked read of 0; guarded or masked reads, negative
indices within range, and data-dependent indices are left alone."""

from __future__ import annotations

import pytest
import torch

import attnforge as af
from attnforge.runtime.reference import reference_attention

L = 64


def _qkv(B=1, H=2, S=L):
    torch.manual_seed(0)
    return (torch.randn(B, H, L, 32), torch.randn(B, H, S, 32), torch.randn(B, H, S, 32))


def _close(out, ref):
    assert (out.double() - ref).abs().max().item() < 1e-4


def test_table_shorter_than_the_queries_raises():
    q, k, v = _qkv()
    tab = torch.randn(10)
    with pytest.raises(IndexError, match=r"'tab'.*q_idx.*reaches 63.*size 10"):
        af.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + tab[i])


def test_relative_bias_sized_for_the_lengths_runs_and_one_short_raises():
    S = 40
    q, k, v = _qkv(S=S)
    rel = torch.randn(L + S - 1)

    def mod(s, b, h, i, j):
        return s + rel[i - j + S - 1]

    _close(af.flex_attention(q, k, v, score_mod=mod),
           reference_attention(q.double(), k.double(), v.double(), score_mod=mod))  # fmt: skip
    short = torch.randn(L + S - 2)
    with pytest.raises(IndexError, match=r"q_idx - kv_idx \+ 39.*size 102"):
        af.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + short[i - j + S - 1])


def test_negative_indices_within_range_wrap_as_in_torch():
    q, k, v = _qkv()
    rel = torch.randn(L)

    def mod(s, b, h, i, j):
        return s + rel[j - i]  # in [-63, 63]: wraps

    _close(af.flex_attention(q, k, v, score_mod=mod),
           reference_attention(q.double(), k.double(), v.double(), score_mod=mod))  # fmt: skip


def test_captured_offset_and_batch_index_are_checked():
    q, k, v = _qkv(B=2)
    tab = torch.randn(L)
    off = 1
    with pytest.raises(IndexError, match="reaches 64"):
        af.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + tab[i + off])
    per_batch = torch.randn(1, 2)
    with pytest.raises(IndexError, match=r"'per_batch'.*dimension 0 with size 1"):
        af.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + per_batch[b, h])
    lengths = torch.tensor([L])
    bm = af.create_block_mask(lambda b, h, i, j: j < lengths[0], None, None, L, L,
                              device="cpu")  # fmt: skip
    valid = torch.ones(1, dtype=torch.bool)
    bm2 = af.create_block_mask(lambda b, h, i, j: valid[b] | (i >= j), None, None, L, L,
                               device="cpu")  # fmt: skip
    assert af.flex_attention(q, k, v, block_mask=bm).shape == q.shape  # a constant index
    assert af.flex_attention(q, k, v, block_mask=bm2).shape == q.shape  # under `|`: unchecked


def test_guarded_and_masked_reads_are_left_to_the_kernels():
    q, k, v = _qkv()
    tab = torch.randn(10)

    def guarded(s, b, h, i, j):  # the out-of-range read is discarded by the where
        return torch.where(i < 10, s + tab[i], s)

    def clamped(s, b, h, i, j):
        return torch.where(i < 10, s + tab[torch.clamp(i, max=9)], s)

    ref = reference_attention(q.double(), k.double(), v.double(), score_mod=clamped)
    _close(af.flex_attention(q, k, v, score_mod=guarded), ref)
    # a window-sized bias: positions outside the window are masked, their scores unused
    W = 8
    win = torch.randn(W)
    bm = af.create_block_mask(lambda b, h, i, j: (i >= j) & (i - j < W), None, None, L, L,
                              device="cpu")  # fmt: skip
    out = af.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + win[i - j],
                            block_mask=bm)  # fmt: skip
    ref = reference_attention(
        q.double(), k.double(), v.double(), block_mask=bm,
        score_mod=lambda s, b, h, i, j: s + win[torch.clamp(i - j, 0, W - 1)],
    )  # fmt: skip
    _close(out, ref)


def test_data_dependent_index_is_not_refused():
    q, k, v = _qkv()
    doc = (torch.arange(L) * 3 // L).to(torch.int64)
    doc_bias = torch.randn(3)
    mod = lambda s, b, h, i, j: s + doc_bias[doc[i]]  # noqa: E731
    _close(af.flex_attention(q, k, v, score_mod=mod),
           reference_attention(q.double(), k.double(), v.double(), score_mod=mod))  # fmt: skip
