"""Block plans (codegen.blocks): analytic plan == dense brute force for many masks and shapes
(lengths not multiples of the block, L != S, non-square and tiny blocks), layout of the compact
index tables, long sequences without dense work, and mask_from_score."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnforge.codegen.blocks import (
    FULL,
    PARTIAL,
    BlockPlan,
    brute_force_classes,
    mask_from_score,
    plan_blocks,
)
from attnforge.dsl import ir

O, Q, K, B_, H_, c, N = ir.Op, ir.Q_IDX, ir.KV_IDX, ir.B, ir.H, ir.const, ir.node


def sub(a, b):
    return N(O.SUB, a, b)


def both(a, b):
    return N(O.AND, a, b)


def either(a, b):
    return N(O.OR, a, b)


def load(t, *idx):
    return N(O.LOAD, t, *idx)


def check_layout(plan: BlockPlan, B, H, n_q, n_kv):
    for num, idx in ((plan.kv_num_blocks, plan.kv_indices),
                     (plan.full_kv_num_blocks, plan.full_kv_indices)):  # fmt: skip
        assert num.dtype == idx.dtype == torch.int32
        assert num.shape == (B, H, n_q) and idx.shape[:3] == (B, H, n_q)
        width = idx.shape[-1]
        assert width == max(1, int(num.max()))  # compact: the widest row
        assert int(idx.min()) >= 0 and int(idx.max()) < n_kv
        keep = torch.arange(width) < num[..., None]
        step = idx[..., 1:] - idx[..., :-1]
        assert bool((step[keep[..., 1:]] > 0).all())  # ascending within the count
        last = torch.where(num > 0, idx.gather(3, (num.long() - 1).clamp(min=0)[..., None])[..., 0],
                           0)  # fmt: skip
        assert torch.equal(torch.where(keep, last[..., None], idx), last[..., None].expand_as(idx))


def check_plan(mask, params, B, H, L, S, QB, KB):
    plan = plan_blocks(mask, params, B, H, L, S, QB, KB)
    n_q, n_kv = math.ceil(L / QB), math.ceil(S / KB)
    check_layout(plan, B, H, n_q, n_kv)
    want = brute_force_classes(mask, params, B, H, L, S, QB, KB)
    got = plan.to_classes()
    assert got.shape == want.shape
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{len(bad)} blocks differ, first (b, h, q, kv) {bad[:5].tolist()}"
    return plan


# -- masks built from IR -------------------------------------------------------------------------

CAUSAL = N(O.GE, Q, K)
DOC_T = ir.tensor(0, 1, "int64")
SORTED_DOCS = torch.repeat_interleave(torch.arange(7), torch.tensor([37, 64, 5, 90, 70, 34, 900]))
UNSORTED_DOCS = torch.randint(0, 4, (1200,), generator=torch.Generator().manual_seed(0))
WIN_T = ir.tensor(0, 1, "int64")


def natten_2d(width, kw, kh):
    def clamp(x, lo, hi):
        return N(O.MIN, N(O.MAX, x, c(lo)), c(hi))

    qx, qy = N(O.FLOORDIV, Q, c(width)), N(O.MOD, Q, c(width))
    kx, ky = N(O.FLOORDIV, K, c(width)), N(O.MOD, K, c(width))
    cx, cy = clamp(qx, kw // 2, width - 1 - kw // 2), clamp(qy, kh // 2, width - 1 - kh // 2)
    return both(N(O.LE, N(O.ABS, sub(cx, kx)), c(kw // 2)),
                N(O.LE, N(O.ABS, sub(cy, ky)), c(kh // 2)))  # fmt: skip


def sta(width, tile, window):
    per_row = width // tile
    qt, kt = N(O.FLOORDIV, Q, c(tile * tile)), N(O.FLOORDIV, K, c(tile * tile))
    dx = sub(N(O.FLOORDIV, qt, c(per_row)), N(O.FLOORDIV, kt, c(per_row)))
    dy = sub(N(O.MOD, qt, c(per_row)), N(O.MOD, kt, c(per_row)))
    return both(N(O.LE, N(O.ABS, dx), c(window)), N(O.LE, N(O.ABS, dy), c(window)))


MASKS = {
    "causal": (CAUSAL, []),
    "anti_causal": (N(O.LE, Q, K), []),
    "sliding_window": (both(CAUSAL, N(O.LT, sub(Q, K), c(40))), []),
    "sliding_window_aligned": (both(CAUSAL, N(O.LE, sub(Q, K), c(64))), []),
    "window_param": (both(CAUSAL, N(O.LT, sub(Q, K), ir.scalar(0, "int"))), [70]),
    "bidirectional": (N(O.LE, N(O.ABS, sub(Q, K)), c(33)), []),
    "prefix_lm": (either(N(O.LT, K, c(50)), CAUSAL), []),
    "chunked": (N(O.EQ, N(O.FLOORDIV, Q, c(48)), N(O.FLOORDIV, K, c(48))), []),
    "chunked_causal": (both(N(O.EQ, N(O.FLOORDIV, Q, c(48)), N(O.FLOORDIV, K, c(48))), CAUSAL),
                       []),
    "dilated": (both(N(O.LE, N(O.ABS, sub(Q, K)), c(64)),
                     N(O.EQ, N(O.MOD, sub(Q, K), c(4)), c(0))), []),
    "natten_1d": (N(O.LE, N(O.ABS, sub(N(O.MIN, N(O.MAX, Q, c(7)), c(292)), K)), c(7)), []),
    "natten_2d": (natten_2d(16, 5, 3), []),
    "sta_tiles": (sta(16, 4, 1), []),
    "document_sorted": (N(O.EQ, load(DOC_T, Q), load(DOC_T, K)), [SORTED_DOCS]),
    "document_unsorted": (N(O.EQ, load(DOC_T, Q), load(DOC_T, K)), [UNSORTED_DOCS]),
    "document_causal": (both(N(O.EQ, load(DOC_T, Q), load(DOC_T, K)), CAUSAL), [SORTED_DOCS]),
    "head_window": (both(CAUSAL, N(O.LT, sub(Q, K), load(WIN_T, H_))),
                    [torch.tensor([16, 48, 16, 200])]),
    "head_parity": (N(O.WHERE, N(O.EQ, N(O.MOD, H_, c(2)), c(0)), CAUSAL, N(O.LE, Q, K)), []),
    "batch_lengths": (both(N(O.LT, K, load(WIN_T, B_)), N(O.LT, Q, load(WIN_T, B_))),
                      [torch.tensor([170, 300])]),
    "prefix_per_batch": (either(N(O.LT, K, load(WIN_T, B_)), CAUSAL), [torch.tensor([40, 111])]),
    "xor_not": (N(O.XOR, CAUSAL, N(O.NOT, N(O.EQ, N(O.MOD, K, c(5)), c(0)))), []),
    "global_tokens": (either(either(N(O.EQ, N(O.MOD, Q, c(64)), c(0)),
                                    N(O.EQ, N(O.MOD, K, c(64)), c(0))),
                             N(O.LT, N(O.ABS, sub(Q, K)), c(16))), []),
    "float_slope": (N(O.LE, N(O.MUL, sub(Q, K), c(0.37)), c(11.5)), []),
    "constant_true": (ir.TRUE, []),
    "constant_false": (ir.FALSE, []),
}  # fmt: skip

SHAPES = [
    (300, 300, 64, 64),
    (257, 129, 64, 128),
    (17, 250, 16, 32),
    (300, 299, 128, 32),
    (1, 1, 16, 16),
    (1, 300, 16, 16),
    (256, 256, 16, 16),
]


@pytest.mark.parametrize("name", MASKS)
def test_plan_equals_brute_force(name):
    mask, params = MASKS[name]
    for L, S, QB, KB in SHAPES:
        check_plan(mask, params, 2, 4, L, S, QB, KB)


def test_no_mask_is_all_full():
    plan = check_plan(None, [], 1, 2, 300, 200, 128, 64)
    assert plan.kv_num_blocks.sum() == 0
    assert plan.full_kv_indices.shape[-1] == 4 and bool((plan.full_kv_num_blocks == 4).all())


def test_block_independent_of_b_h_is_computed_once():
    plan = plan_blocks(CAUSAL, [], 3, 5, 300, 300, 64, 64)
    assert plan.stats["groups"] == 1
    mask, params = MASKS["head_window"]
    assert plan_blocks(mask, params, 2, 4, 300, 300, 64, 64).stats["groups"] == 3  # 16 repeats


def test_padding_repeats_the_last_valid_index():
    plan = plan_blocks(CAUSAL, [], 1, 1, 512, 512, 128, 128)
    assert plan.full_kv_indices[0, 0].tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 1], [0, 1, 2]]
    assert plan.full_kv_num_blocks[0, 0].tolist() == [0, 1, 2, 3]
    assert plan.kv_indices[0, 0, :, 0].tolist() == [0, 1, 2, 3]


def test_device_argument():
    plan = plan_blocks(CAUSAL, [], 1, 1, 100, 100, 32, 32, device="cpu")
    assert plan.kv_indices.device.type == "cpu"


# -- zoo: every traced mask, and the masking part of every score mod -----------------------------


def _zoo():
    try:
        from zoo import MASKS as ZMASKS
        from zoo import SCORES as ZSCORES

        from attnforge.dsl.api import trace
    except ImportError:  # pragma: no cover - the tracer lands separately
        return []
    out = []
    for name, e in {**ZMASKS, **ZSCORES}.items():
        out.append(pytest.param(e, trace, id=name))
    return out


@pytest.mark.parametrize(("entry", "trace"), _zoo())
def test_zoo_plan_equals_brute_force(entry, trace):
    mod = trace(entry.fn, entry.kind)
    mask = mod.ir if entry.kind == "mask" else mask_from_score(mod.ir)
    if mask is None:
        return
    values = list(mod.param_values())
    for L, S, QB, KB in [(257, 200, 32, 128), (300, 300, 16, 16)]:
        if entry.needs.get("square") and L != S:
            continue
        check_plan(mask, values, 2, 4, L, S, QB, KB)


# -- random affine masks -------------------------------------------------------------------------

BLOCKS = st.sampled_from([1, 2, 3, 8, 16, 32, 64, 128])


@st.composite
def affine_mask(draw, depth=2):
    if depth == 0 or draw(st.booleans()):
        a, b = draw(st.integers(-2, 2)), draw(st.integers(-2, 2))
        form = N(O.ADD, N(O.ADD, N(O.MUL, Q, c(a)), N(O.MUL, K, c(b))), c(draw(st.integers(-300,
                 300))))  # fmt: skip
        op = draw(st.sampled_from([O.LT, O.LE, O.GT, O.GE, O.EQ, O.NE]))
        return N(op, form, c(0))
    op = draw(st.sampled_from([O.AND, O.OR, O.XOR, O.NOT]))
    x = draw(affine_mask(depth - 1))
    return N(op, x) if op is O.NOT else N(op, x, draw(affine_mask(depth - 1)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(affine_mask(), st.integers(1, 200), st.integers(1, 200), BLOCKS, BLOCKS)
def test_random_affine_masks(mask, L, S, QB, KB):
    check_plan(mask, [], 1, 1, L, S, QB, KB)


# -- long sequences: analytic, no dense work -----------------------------------------------------


def test_causal_at_131072_tokens():
    n = 131072
    plan = plan_blocks(CAUSAL, [], 1, 1, n, n, 128, 128)
    rows = torch.arange(n // 128, dtype=torch.int32)
    assert torch.equal(plan.full_kv_num_blocks[0, 0], rows)
    assert torch.equal(plan.kv_indices[0, 0, :, 0], rows)
    assert plan.stats["unknown_blocks"] == 0


def test_sliding_window_at_one_million_tokens():
    n, w = 1 << 20, 1024
    mask = both(CAUSAL, N(O.LT, sub(Q, K), c(w)))
    plan = plan_blocks(mask, [], 1, 1, n, n, 128, 128)
    n_q = n // 128
    assert plan.full_kv_indices.shape == (1, 1, n_q, w // 128 - 1)
    assert (
        plan.kv_num_blocks[0, 0, 8:].eq(2).all() and plan.full_kv_num_blocks[0, 0, 8:].eq(7).all()
    )
    r = 5000
    assert plan.kv_indices[0, 0, r].tolist() == [r - 8, r]
    assert plan.full_kv_indices[0, 0, r].tolist() == list(range(r - 7, r))


def test_sorted_document_mask_uses_run_structure():
    docs = torch.repeat_interleave(torch.arange(64), 2048)
    mask = N(O.EQ, load(DOC_T, Q), load(DOC_T, K))
    plan = plan_blocks(mask, [docs], 1, 1, 131072, 131072, 128, 128)
    assert plan.kv_num_blocks.sum() == 0 and plan.stats["unknown_blocks"] == 0
    assert bool((plan.full_kv_num_blocks == 16).all())
    assert plan.full_kv_indices[0, 0, 17].tolist() == list(range(16, 32))


# -- mask_from_score -----------------------------------------------------------------------------

NEG_INF = c(-math.inf)


def test_mask_from_score_finds_the_masking_condition():
    s = ir.SCORE
    assert mask_from_score(N(O.WHERE, CAUSAL, s, NEG_INF)) is CAUSAL
    capped = N(O.MUL, c(30.0), N(O.TANH, N(O.DIV, s, c(30.0))))
    assert mask_from_score(N(O.WHERE, CAUSAL, capped, NEG_INF)) is CAUSAL
    bias = N(O.ADD, s, N(O.WHERE, CAUSAL, c(0.0), NEG_INF))
    assert mask_from_score(bias) is CAUSAL
    nested = N(O.WHERE, N(O.LE, Q, c(5)), N(O.WHERE, CAUSAL, s, NEG_INF), NEG_INF)
    got = mask_from_score(nested)
    assert got is not None
    check_against(got, nested)


def check_against(mask, score_ir):
    q, kv = torch.arange(20)[:, None], torch.arange(20)[None, :]
    from attnforge.dsl.evaluate import evaluate

    env = {"q_idx": q, "kv_idx": kv, "b": 0, "h": 0, "score": torch.zeros(20, 20)}
    scores = evaluate(score_ir, env)
    m = torch.broadcast_to(evaluate(mask, env).bool(), (20, 20))
    assert torch.equal(m, scores != -math.inf)


def test_mask_from_score_none_when_nothing_is_masked():
    s = ir.SCORE
    assert mask_from_score(s) is None
    assert mask_from_score(N(O.WHERE, CAUSAL, s, c(0.0))) is None
    assert mask_from_score(N(O.WHERE, N(O.GT, s, c(0.0)), s, NEG_INF)) is None  # reads score


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "match"), [
    ((CAUSAL, [], 0, 1, 10, 10, 4, 4), "B=0"),
    ((CAUSAL, [], 1, 1, 10, 10, 4, -1), "KV_BLOCK=-1"),
    ((CAUSAL, [], 1, 1, 10.0, 10, 4, 4), "Q_LEN=10.0"),
    ((N(O.GT, ir.SCORE, c(0.0)), [], 1, 1, 10, 10, 4, 4), "score"),
    ((MASKS["document_sorted"][0], [], 1, 1, 10, 10, 4, 4), "parameter 0"),
])  # fmt: skip
def test_bad_input_is_a_clear_error(args, match):
    with pytest.raises(ValueError, match=match):
        plan_blocks(*args)


def test_classes_constants():
    assert (PARTIAL, FULL) == (1, 2)
