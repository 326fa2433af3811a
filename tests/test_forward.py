"""Forward kernels (generated Triton, run under the interpreter on CPU) vs the float64 reference.

Every case compares ``out`` and ``lse`` of ``af.flex_attention`` with
``reference_attention`` computed in float64 from the same (rounded) inputs; some also compare
with ``torch.nn.attention.flex_attention`` on CPU.  The interpreter is slow, so the default run
covers every zoo mod once at small shapes plus a representative shape/dtype grid; heavier
combinations are ``slow``; production shapes are ``gpu``.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from aot import run_sm90_build
from zoo import MASKS, MAX_B, MAX_H, SCORES, ZOO

import attnforge as af
from attnforge.codegen import lower, passes, render
from attnforge.dsl.api import as_mod
from attnforge.dsl.ir import KV_IDX, Q_IDX, SCORE, Op, const, node
from attnforge.dsl.mod import Mod
from attnforge.runtime.blockmask import BlockMask
from attnforge.runtime.reference import create_mask, reference_attention

# Tolerances against the float64 reference (inputs rounded to their dtype first, so only the
# kernel's arithmetic differs): fp32 uses IEEE dots; 16-bit inputs feed P to the second dot in
# the input dtype (relative error ~2**-8 for bf16, ~2**-11 for fp16) with fp32 accumulation.
TOL = {
    torch.float32: dict(out=2e-5, lse=2e-5),
    torch.float16: dict(out=4e-3, lse=1e-3),
    torch.bfloat16: dict(out=2.5e-2, lse=1e-3),
}


def _has_block_analysis() -> bool:
    try:
        import attnforge.codegen.blocks  # noqa: F401
    except ImportError:
        return False
    return True


def dense_block_mask(mask_fn, B, H, L, S, block_size=(128, 128), device="cpu") -> BlockMask:
    """A BlockMask classified by brute force from the dense mask (independent of the analytic
    planner, so a planner bug cannot hide a kernel bug)."""
    qb, kb = block_size
    keep = create_mask(mask_fn, B, H, L, S, device=device)
    nq, nk = -(-L // qb), -(-S // kb)
    pad = (0, nk * kb - S, 0, nq * qb - L)
    kp = F.pad(keep, pad).reshape(keep.shape[0], keep.shape[1], nq, qb, nk, kb)
    valid = F.pad(torch.ones(L, S, dtype=torch.bool, device=device), pad).reshape(nq, qb, nk, kb)
    any_kept = kp.any(dim=(3, 5))
    all_kept = (kp | ~valid).all(dim=(3, 5))
    classes = torch.where(all_kept, 2, torch.where(any_kept, 1, 0)).to(torch.int8)
    return BlockMask._from_classes(classes, block_size, as_mod(mask_fn, "mask"), (L, S))


def block_mask(mask_fn, B, H, L, S, block_size=128, device="cpu") -> BlockMask:
    bs = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if _has_block_analysis():
        return af.create_block_mask(mask_fn, B, H, L, S, device=device, BLOCK_SIZE=bs)
    return dense_block_mask(mask_fn, B or 1, H or 1, L, S, bs, device)


def make_qkv(B, Hq, Hkv, L, S, E, Ev, dtype, device="cpu", Bkv=None):
    Bkv = B if Bkv is None else Bkv
    q = torch.randn(B, Hq, L, E, device=device).to(dtype)
    k = torch.randn(Bkv, Hkv, S, E, device=device).to(dtype)
    v = torch.randn(Bkv, Hkv, S, Ev, device=device).to(dtype)
    return q, k, v


def reference(q, k, v, score_mod=None, block_mask=None, scale=None, enable_gqa=False):
    if k.shape[0] != q.shape[0]:  # Bkv == 1 broadcast: the reference wants equal batches
        k, v = k.expand(q.shape[0], *k.shape[1:]), v.expand(q.shape[0], *v.shape[1:])
    score = as_mod(score_mod, "score") if score_mod is not None else None
    return reference_attention(
        q.double(), k.double(), v.double(), score_mod=score, block_mask=block_mask,
        scale=scale, enable_gqa=enable_gqa, return_lse=True,
    )  # fmt: skip


def assert_close_lse(got, want, tol, what="lse"):
    inf_got, inf_want = torch.isinf(got), torch.isinf(want)
    assert torch.equal(inf_got, inf_want), f"{what}: -inf pattern differs"
    finite = ~inf_want
    if finite.any():
        err = (got[finite].double() - want[finite]).abs().max().item()
        assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def check(q, k, v, score_mod=None, bm=None, scale=None, enable_gqa=False, kernel_options=None):
    out, lse = af.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale,
                                 enable_gqa=enable_gqa, return_lse=True,
                                 kernel_options=kernel_options)  # fmt: skip
    ref_out, ref_lse = reference(q, k, v, score_mod, bm, scale, enable_gqa)
    # fp32 logits of magnitude M carry ~M * 2**-23 absolute error, which moves P (and lse) by
    # about that much: widen both tolerances by 4e-7 * M on top of the per-dtype base
    finite = ref_lse[torch.isfinite(ref_lse)]
    mag = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    tol = {key: base + 4e-7 * mag for key, base in TOL[q.dtype].items()}
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert not torch.isnan(out).any(), "NaN in out"
    assert not torch.isnan(lse).any(), "NaN in lse"
    err = (out.double() - ref_out).abs().max().item()
    assert err <= tol["out"], f"out: max error {err:.3g} > {tol['out']:.3g}"
    assert_close_lse(lse, ref_lse, tol["lse"])
    return out, lse


# -- every zoo mod, at small shapes -------------------------------------------------------------

# (B, Hq, Hkv, L, S, E, Ev, dtype): cycled over the zoo, so every mod sees a different corner
ZOO_SHAPES = [
    (1, 2, 2, 200, 257, 32, 32, torch.float32),
    (2, 2, 1, 128, 17, 16, 24, torch.float32),
    (1, 4, 2, 257, 128, 40, 40, torch.float32),
    (2, 1, 1, 17, 200, 64, 16, torch.float32),
    (1, 2, 2, 257, 257, 16, 16, torch.bfloat16),
    (2, 2, 2, 1, 128, 32, 32, torch.float16),
]


def _zoo_case(i: int, entry):
    B, Hq, Hkv, L, S, E, Ev, dtype = ZOO_SHAPES[i % len(ZOO_SHAPES)]
    if entry.needs.get("square"):
        S = L = 256 if L > 1 else 128
    assert B <= MAX_B and Hq <= MAX_H
    return B, Hq, Hkv, L, S, E, Ev, dtype


@pytest.mark.parametrize("name", sorted(MASKS))
def test_zoo_mask(name):
    entry = ZOO[name]
    i = sorted(ZOO).index(name)
    B, Hq, Hkv, L, S, E, Ev, dtype = _zoo_case(i, entry)
    q, k, v = make_qkv(B, Hq, Hkv, L, S, E, Ev, dtype)
    bm = block_mask(entry.fn, B, Hq, L, S)
    check(q, k, v, bm=bm, enable_gqa=Hq != Hkv)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_zoo_score(name):
    entry = ZOO[name]
    i = sorted(ZOO).index(name)
    B, Hq, Hkv, L, S, E, Ev, dtype = _zoo_case(i, entry)
    q, k, v = make_qkv(B, Hq, Hkv, L, S, E, Ev, dtype)
    # every other score mod also runs under a causal block mask (both lists, tail blocks)
    bm = block_mask(ZOO["causal"].fn, None, None, L, S) if i % 2 else None
    check(q, k, v, score_mod=entry.fn, bm=bm, enable_gqa=Hq != Hkv)


# -- shapes, head dims, GQA, dtypes ---------------------------------------------------------------

SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 40)


# (B, Hq, Hkv, L, S, E, Ev, dtype, score, mask)
GRID = [
    (1, 2, 2, 1, 17, 16, 16, torch.float32, alibi, causal),
    (2, 2, 2, 17, 1, 32, 32, torch.float32, None, None),
    (1, 4, 1, 128, 200, 40, 40, torch.float32, alibi, None),  # GQA 4:1, E not a power of two
    (2, 4, 2, 200, 128, 64, 40, torch.float32, softcap, causal),  # GQA 2:1, Ev != E
    (1, 2, 2, 257, 200, 40, 16, torch.bfloat16, alibi, sliding),
    (1, 2, 1, 200, 257, 64, 64, torch.float16, softcap, sliding),  # GQA 2:1
    (2, 1, 1, 128, 257, 16, 40, torch.bfloat16, None, causal),
    (1, 4, 4, 17, 128, 32, 64, torch.float16, alibi, None),
]


def _grid_id(case):
    B, Hq, Hkv, L, S, E, Ev, dt, score, mask = case
    sname = score.__name__ if score else "none"
    mname = mask.__name__ if mask else "none"
    return f"B{B}-H{Hq}:{Hkv}-L{L}-S{S}-E{E}-Ev{Ev}-{str(dt)[6:]}-{sname}-{mname}"


@pytest.mark.parametrize("case", GRID, ids=_grid_id)
def test_grid(case):
    B, Hq, Hkv, L, S, E, Ev, dtype, score, mask = case
    q, k, v = make_qkv(B, Hq, Hkv, L, S, E, Ev, dtype)
    bm = block_mask(mask, None, None, L, S) if mask else None
    check(q, k, v, score_mod=score, bm=bm, enable_gqa=Hq != Hkv)


SLOW_GRID = [
    (B, Hq, Hkv, L, S, E, E + dv, dt, sc, mk)
    for B, Hq, Hkv in [(2, 4, 1), (1, 2, 2)]
    for L, S in [(1, 257), (257, 17), (200, 128), (128, 128)]
    for E, dv in [(16, 0), (40, 24), (64, -24)]
    for dt in (torch.float32, torch.bfloat16, torch.float16)
    for sc, mk in [(alibi, causal), (softcap, None)]
][::3]


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_GRID, ids=_grid_id)
def test_grid_slow(case):
    test_grid(case)


# -- layouts and broadcasting -----------------------------------------------------------------


def test_non_contiguous_inputs():
    # (B, L, H, E) storage viewed as (B, H, L, E): the usual layout after a QKV projection
    B, H, L, S, E = 2, 2, 130, 70, 32
    q = torch.randn(B, L, H, E).transpose(1, 2)
    k = torch.randn(B, S, H, E).transpose(1, 2)
    v = torch.randn(B, S, H, 2 * E)[..., ::2].transpose(1, 2)  # strided last dim too
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check(q, k, v, score_mod=alibi, bm=block_mask(causal, None, None, L, S))


def test_kv_batch_broadcast():
    q, k, v = make_qkv(2, 2, 2, 64, 90, 16, 16, torch.float32, Bkv=1)
    check(q, k, v, score_mod=alibi)


def test_block_mask_per_batch_and_head():
    lengths = torch.tensor([50, 90])

    def per_batch_head(b, h, q_idx, kv_idx):
        return (kv_idx < lengths[b]) & ((h == 0) | (q_idx >= kv_idx))

    B, H, L, S = 2, 2, 100, 100
    q, k, v = make_qkv(B, H, H, L, S, 16, 16, torch.float32)
    bm = block_mask(per_batch_head, B, H, L, S, block_size=32)
    assert bm.kv_num_blocks.shape[:2] == (B, H)
    check(q, k, v, bm=bm)


def test_small_block_size_and_kernel_options():
    L = S = 150
    q, k, v = make_qkv(1, 2, 2, L, S, 32, 32, torch.float32)
    bm = block_mask(sliding, None, None, L, S, block_size=(32, 64))
    out_a, _ = check(q, k, v, score_mod=softcap, bm=bm)
    out_b, _ = check(q, k, v, score_mod=softcap, bm=bm,
                     kernel_options={"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 2})  # fmt: skip
    torch.testing.assert_close(out_a, out_b, atol=2e-6, rtol=0)


# -- fully masked rows ----------------------------------------------------------------------


def test_fully_masked_rows_give_zero_and_neg_inf():
    def late_start(b, h, q_idx, kv_idx):
        return (q_idx >= 20) & (kv_idx <= q_idx)

    L, S = 70, 70
    q, k, v = make_qkv(1, 2, 2, L, S, 16, 16, torch.float32)
    out, lse = check(q, k, v, bm=block_mask(late_start, None, None, L, S, block_size=16))
    assert torch.all(out[:, :, :20] == 0)
    assert torch.all(lse[:, :, :20] == -math.inf)
    assert torch.isfinite(lse[:, :, 20:]).all()


def test_score_mod_minus_inf_rows():
    # the score mod itself masks (no block mask): rows whose every score is -inf
    def only_even_rows(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx % 2 == 0, score, -float("inf"))

    q, k, v = make_qkv(1, 1, 1, 33, 45, 16, 16, torch.float32)
    out, lse = check(q, k, v, score_mod=only_even_rows)
    assert torch.all(out[:, :, 1::2] == 0) and torch.all(lse[:, :, 1::2] == -math.inf)


def test_empty_block_mask_rows():
    # a block mask whose first q block lists no kv block at all
    L = S = 64
    num = torch.tensor([[[0, 1]]], dtype=torch.int32)
    idx = torch.tensor([[[[0], [0]]]], dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=32, mask_mod=causal, seq_lengths=(L, S))
    q, k, v = make_qkv(1, 1, 1, L, S, 16, 16, torch.float32)
    out, lse = check(q, k, v, bm=bm)
    assert torch.all(out[:, :, :32] == 0) and torch.all(lse[:, :, :32] == -math.inf)


# -- integer semantics of the renderer ------------------------------------------------------


def test_python_int_semantics():
    # floor-div / mod by positive, negative, power-of-two and runtime divisors, on negatives
    d = 5

    def int_ops(score, b, h, q_idx, kv_idx):
        rel = q_idx - kv_idx
        x = rel // 7 + rel % 7 + rel // 8 + rel % 8 + rel // -3 + rel % -3
        y = rel // (h + d) + rel % (h + d) + (-rel) // (kv_idx + 1)
        z = (rel.abs() // 2) % 3 - (~rel) + 3 ** (kv_idx % 5) + (-2) ** (q_idx % 4 - 1)
        return score + 0.01 * (x + y + z) + (rel / 4) - torch.floor(rel / 3.0) * 0.1

    q, k, v = make_qkv(1, 2, 2, 40, 60, 16, 16, torch.float32)
    check(q, k, v, score_mod=int_ops)


def test_captured_tensor_negative_and_out_of_range_indices():
    table = torch.randn(2, 40)

    def negative_index(score, b, h, q_idx, kv_idx):
        # kv_idx - q_idx is negative below the diagonal: torch wraps it (table[h, -1] is last)
        return score + table[h, (kv_idx - q_idx) % 40 - 20]

    q, k, v = make_qkv(1, 2, 2, 30, 30, 16, 16, torch.float32)
    check(q, k, v, score_mod=negative_index)


# -- against torch's FlexAttention on CPU -------------------------------------------------------

TORCH_FLEX_CASES = ["causal", "sliding_window", "document_causal", "prefix_lm"]


@pytest.mark.parametrize("name", TORCH_FLEX_CASES)
def test_matches_torch_flex_attention(name):
    tfa = pytest.importorskip("torch.nn.attention.flex_attention")
    mask_fn = ZOO[name].fn
    B, H, L, S, E = 1, 2, 200, 200, 32
    q, k, v = make_qkv(B, H, H, L, S, E, E, torch.float32)
    score = SCORES["alibi"].fn
    tbm = tfa.create_block_mask(mask_fn, None, None, L, S, device="cpu")
    want = tfa.flex_attention(q, k, v, score_mod=score, block_mask=tbm)
    got = af.flex_attention(q, k, v, score_mod=score, block_mask=block_mask(mask_fn, None, None,
                                                                             L, S))  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # torch's own BlockMask is accepted too
    got2 = af.flex_attention(q, k, v, score_mod=score, block_mask=tbm)
    torch.testing.assert_close(got2, want, atol=1e-5, rtol=1e-5)


# -- one kernel per structure -------------------------------------------------------------------


def test_captured_scalar_is_a_runtime_argument():
    window = [16]

    def win(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window[0])

    q, k, v = make_qkv(1, 1, 1, 64, 64, 16, 16, torch.float32)
    keys = set()
    for w in (8, 16, 40):
        window[0] = w
        bm = block_mask(win, None, None, 64, 64, block_size=16)
        keys.add(lower(None, bm.mask_mod).key)
        check(q, k, v, bm=bm)
    assert len(keys) == 1


def test_equal_mods_share_a_key_and_canonical_forms():
    a = lower(None, as_mod(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, "mask"))
    b = lower(None, as_mod(lambda b, h, i, j: j <= i, "mask"))
    assert a.key == b.key
    s1 = lower(as_mod(lambda s, b, h, q, kv: s + (q - kv) * 1, "score"), None)
    s2 = lower(as_mod(lambda s, b, h, q, kv: (q - kv) + s, "score"), None)
    assert s1.key == s2.key
    ident = lower(as_mod(lambda s, b, h, q, kv: s * 1.0 + 0.0, "score"), None)
    assert ident.score is None and ident.key == lower(None, None).key


def test_fold_and_canonicalize():
    two = node(Op.ADD, const(1), const(1))
    assert passes.fold_constants(two) is const(2)
    e = node(Op.NOT, node(Op.LT, Q_IDX, KV_IDX))
    assert passes.canonicalize(e) is node(Op.LE, KV_IDX, Q_IDX)
    f = node(Op.NOT, node(Op.LT, SCORE, const(0.0)))  # floats: NaN makes this not a <=
    assert passes.canonicalize(f).op is Op.NOT
    # floor-div by zero is left for the kernel, not folded into an exception
    assert passes.fold_constants(node(Op.FLOORDIV, const(1), const(0))).op is Op.FLOORDIV


def test_split_mask():
    doc = torch.tensor([0, 0, 1, 1])
    m = as_mod(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx]),
               "mask")  # fmt: skip
    low = lower(None, m)
    assert low.mask_index is not None and low.mask_data is not None
    assert not passes.reads_memory(low.mask_index) and passes.reads_memory(low.mask_data)
    assert low.meta["mask_data_dependent"] is True


def test_missing_render_rule_is_actionable(monkeypatch):
    monkeypatch.delitem(render.RULES, Op.ERF)
    mod = Mod("score", node(Op.ERF, SCORE))
    with pytest.raises(render.RenderError, match="Op.ERF.*RULES"):
        lower(mod, None).files["fwd.py"]


def test_meta_describes_the_abi():
    low = lower(as_mod(alibi, "score"), as_mod(sliding, "mask"))
    (slot,) = low.meta["params"]
    assert slot == {"slot": 0, "mod": "score", "index": 0, "kind": "tensor", "dtype": "float32",
                    "ndim": 1, "args": ["T0", "T0_size0", "stride_t0_0"]}  # fmt: skip
    assert low.meta["kernels"]["fwd"] == "_attn_fwd"
    assert set(low.files) >= {"fwd.py", "ir.txt", "meta.json"}


def _function(src: str, name: str) -> str:
    start = src.index(f"def {name}(")
    return src[start : src.index("\n\n\n", start)]


def test_position_difference_converts_index_vectors_not_the_tile():
    # float(kv_idx - q_idx) as the two index vectors converted and subtracted in fp32 (POS_F32:
    # exact for positions < 2**24): BLOCK_M + BLOCK_N int->float conversions per tile, not one
    # per score; either order, also where the int difference is used as an int too
    def window_alibi(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx - kv_idx <= 40, score - SLOPES[h] * (q_idx - kv_idx), score)

    for score, want in ((alibi, "(kv_idx, q_idx, POS_F32)"),
                        (window_alibi, "(q_idx, kv_idx, POS_F32)")):  # fmt: skip
        src = lower(as_mod(score, "score"), as_mod(sliding, "mask")).files["fwd.py"]
        fn = _function(src, "score_mod")
        assert fn.startswith("def score_mod(score, b, h, q_idx, kv_idx, POS_F32: tl.constexpr,")
        assert f"_pos_sub_f32{want}" in fn
        assert re.search(r"\bt\d+\.to\(tl\.float32\)", fn) is None, fn  # no tile conversion
        assert "def _pos_sub_f32(a, b, POS_F32: tl.constexpr):" in src
        assert "off_h, q_idx, kv_idx, POS_F32, T0, T0_size0" in src  # the call site passes it
        # the mask needs no float: its int difference is left alone
        assert "_pos_sub_f32" not in _function(src, "mask_mod")


# -- argument checking ----------------------------------------------------------------------


def _qkv():
    return make_qkv(1, 2, 2, 32, 32, 16, 16, torch.float32)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v: (q[0], k, v), "4-D"),
        (lambda q, k, v: (q, k.double(), v), "same dtype"),
        (lambda q, k, v: (q.double(), k.double(), v.double()), "not supported"),
        (lambda q, k, v: (q, k[..., :8], v), "head dim"),
        (lambda q, k, v: (q, k[:, :1], v[:, :1]), "enable_gqa=True"),
        (lambda q, k, v: (q, k, v[:, :, :16]), "must agree"),
        (
            lambda q, k, v: (
                q.expand(3, -1, -1, -1),
                k.expand(2, -1, -1, -1),
                v.expand(2, -1, -1, -1),
            ),
            "batch",
        ),  # fmt: skip
    ],
)
def test_bad_inputs_raise(mutate, match):
    q, k, v = mutate(*_qkv())
    with pytest.raises(ValueError, match=match):
        af.flex_attention(q, k, v)


def test_gqa_group_must_divide():
    q, k, v = make_qkv(1, 3, 2, 16, 16, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="Hq=3 and Hkv=2"):
        af.flex_attention(q, k, v, enable_gqa=True)


def test_block_mask_length_mismatch_raises():
    q, k, v = _qkv()
    small = block_mask(causal, None, None, 16, 32)
    with pytest.raises(ValueError, match="smaller than the input"):
        af.flex_attention(q, k, v, block_mask=small)
    large = block_mask(causal, None, None, 64, 32)
    with pytest.raises(ValueError, match="create a block mask with the lengths"):
        af.flex_attention(q, k, v, block_mask=large)


def test_block_mask_shape_and_block_size_checks():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"\(B, H\)=\(1, 3\)"):
        af.flex_attention(q, k, v, block_mask=block_mask(causal, 1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        af.flex_attention(q, k, v, block_mask=dense_block_mask(causal, 1, 1, 32, 32, (8, 8)))
    with pytest.raises(ValueError, match="must be an attnforge BlockMask"):
        af.flex_attention(q, k, v, block_mask="causal")


def test_kernel_options_checked():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown kernel_options.*BLOCK_M"):
        af.flex_attention(q, k, v, kernel_options={"BLOCK_Q": 32})
    with pytest.raises(ValueError, match="power of two"):
        af.flex_attention(q, k, v, kernel_options={"BLOCK_M": 48})
    with pytest.raises(ValueError, match="positive int"):
        af.flex_attention(q, k, v, kernel_options={"num_warps": 0})
    af.flex_attention(q, k, v, kernel_options={"PRESCALE_QK": False})  # flex-only: ignored


def test_return_aux_like_recent_torch():
    tfa = pytest.importorskip("torch.nn.attention.flex_attention")
    if not hasattr(tfa, "AuxRequest"):
        pytest.skip("torch without AuxRequest")
    q, k, v = _qkv()
    out, aux = af.flex_attention(q, k, v, return_aux=tfa.AuxRequest(lse=True))
    out2, lse = af.flex_attention(q, k, v, return_lse=True)
    assert torch.equal(out, out2) and torch.equal(aux.lse, lse) and aux.max_scores is None
    with pytest.raises(NotImplementedError, match="max_scores"):
        af.flex_attention(q, k, v, return_aux=tfa.AuxRequest(max_scores=True))


def test_return_lse_false_and_scale():
    q, k, v = _qkv()
    out = af.flex_attention(q, k, v, scale=0.3)
    assert isinstance(out, torch.Tensor)
    want, _ = reference(q, k, v, scale=0.3)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=0)


# -- the compiled (GPU) path, checked without a GPU ----------------------------------------------

_AOT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attnforge.codegen import lower
from attnforge.dsl.api import as_mod
from attnforge.runtime import loader
sys.path.insert(0, {tests!r})
from zoo import ZOO
import tempfile, pathlib

PTR = {{"float32": "*fp32", "int64": "*i64", "int32": "*i32", "bool": "*i1"}}
SCALAR = {{"float": "fp32", "int": "i32", "bool": "i1"}}

def compile_fwd(i, score, mask, dtype, D, DV, even, tma=False):
    low = lower(as_mod(score, "score"), as_mod(mask, "mask"))
    path = pathlib.Path(tempfile.mkdtemp()) / "fwd.py"
    path.write_text(low.files["fwd.py"])
    fn = loader.load_module(path, f"aot{{i}}", interpret=False)._attn_fwd
    pad = lambda d: max(16, 1 << (d - 1).bit_length())
    const = dict(HEAD_DIM=D, HEAD_DIM_V=DV, HEAD_DIM_PAD=pad(D), HEAD_DIM_V_PAD=pad(DV),
                 BLOCK_M=128, BLOCK_N=64, SPARSE_Q_BLOCK=128, SPARSE_KV_BLOCK=128,
                 EVEN_KV=even, HAS_FULL_BLOCKS=True, DOT_PRECISION="tf32",
                 SCALE_FOLDED=low.score is None, USE_TMA=tma,
                 POS_F32=i != 7)  # case 7: alibi's exact-for-any-length branch
    desc = {{"Q_DESC": (128, pad(D)), "K_DESC": (64, pad(D)), "V_DESC": (64, pad(DV))}}
    slots = {{s.name: (SCALAR[s.dtype] if s.kind == "scalar" else PTR[s.dtype])
              for s in low.slots}}
    sig, constexprs = {{}}, {{}}
    for j, a in enumerate(fn.arg_names):
        if a in const:
            sig[a], constexprs[(j,)] = "constexpr", const[a]
        elif a in desc and tma:
            sig[a] = "tensordesc<%s[1,1,%d,%d]>" % (dtype, *desc[a])
        elif a in desc:
            sig[a], constexprs[(j,)] = "constexpr", None
        elif a in ("Q", "K", "V", "OUT"):
            sig[a] = "*" + dtype
        elif a == "LSE":
            sig[a] = "*fp32"
        elif a.isupper() and "BLK" in a or a.endswith("_IDX"):
            sig[a] = "*i32"
        else:
            sig[a] = "fp32" if a == "sm_scale" else slots.get(a, "i32")
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=8, num_stages=3))
    assert "wgmma" in k.asm["ptx"] or "mma" in k.asm["ptx"]
    if tma:
        assert "cp.async.bulk.tensor" in k.asm["ptx"]

cases = [
    (None, None, "bf16", 128, 128, True),
    (ZOO["softcap"].fn, ZOO["causal"].fn, "fp16", 64, 64, False),
    (ZOO["alibi"].fn, ZOO["document_causal"].fn, "bf16", 40, 24, False),
    (ZOO["floordiv_mod"].fn, ZOO["jagged_sliding"].fn, "fp32", 64, 64, True),
    (ZOO["power"].fn, ZOO["random_bool_mask"].fn, "bf16", 128, 128, True),
    (None, ZOO["causal"].fn, "bf16", 128, 128, True, True),
    (ZOO["softcap"].fn, ZOO["sliding_window"].fn, "fp16", 64, 64, False, True),
    (ZOO["alibi"].fn, ZOO["document_causal"].fn, "bf16", 40, 24, False, True),
]
for i, case in enumerate(cases):
    compile_fwd(i, *case)
print("compiled", len(cases))
"""


def test_compiled_path_builds_for_sm90_without_a_gpu(tmp_path):
    # CI has no GPU: build the same generated source through Triton's CUDA backend (to PTX /
    # cubin) in a process where triton is not in interpreter mode
    stdout = run_sm90_build(_AOT, tmp_path, timeout=600)
    assert "compiled 8" in stdout


# -- GPU, production shapes -----------------------------------------------------------------

GPU_CASES = [
    (S, D, name)
    for S in (2048, 8192)
    for D in (64, 128)
    for name in ("noop", "causal", "sliding_window", "alibi", "softcap", "document_causal")
]


def _gpu_variant(name: str, S: int, dev: str):
    """(score_mod, mask_mod) of a headline benchmark variant, captured tensors on ``dev``."""
    slopes = torch.tensor([0.5, 0.25], device=dev)
    doc = (torch.arange(S, device=dev) * 7 // S).to(torch.int32)

    def alibi_dev(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 1024)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    return {
        "noop": (None, None),
        "causal": (None, causal),
        "sliding_window": (None, window),
        "alibi": (alibi_dev, causal),
        "softcap": (softcap, causal),
        "document_causal": (None, document_causal),
    }[name]


@pytest.mark.gpu
@pytest.mark.parametrize("S, D, name", GPU_CASES)
def test_gpu_production_shapes(S, D, name):
    dev = "cuda"
    q, k, v = make_qkv(1, 2, 2, S, S, D, D, torch.bfloat16, device=dev)
    score, mask = _gpu_variant(name, S, dev)
    bm = af.create_block_mask(mask, None, None, S, S, device=dev) if mask else None
    out, lse = af.flex_attention(q, k, v, score_mod=score, block_mask=bm, return_lse=True)
    ref_out, ref_lse = reference_attention(q.float(), k.float(), v.float(), score_mod=score,
                                           block_mask=bm, return_lse=True)  # fmt: skip
    # bf16 P in the second dot: ~2**-8 relative, outputs are O(1)
    assert (out.float() - ref_out).abs().max().item() < 2.5e-2
    assert_close_lse(lse, ref_lse.double(), 2e-2)
    tfa = pytest.importorskip("torch.nn.attention.flex_attention")
    tbm = tfa.create_block_mask(mask, None, None, S, S, device=dev) if mask else None
    want = torch.compile(tfa.flex_attention)(q, k, v, score_mod=score, block_mask=tbm)
    assert (out.float() - want.float()).abs().max().item() < 2.5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_cpu_interpreter(dtype):
    # the same generated source, compiled on the GPU and interpreted on the CPU
    q, k, v = make_qkv(1, 2, 2, 200, 257, 40, 24, dtype)
    score_cpu, _ = _gpu_variant("alibi", 257, "cpu")
    score_gpu, _ = _gpu_variant("alibi", 257, "cuda")
    cpu = af.flex_attention(q, k, v, score_mod=score_cpu,
                            block_mask=block_mask(causal, None, None, 200, 257))  # fmt: skip
    gpu = af.flex_attention(q.cuda(), k.cuda(), v.cuda(), score_mod=score_gpu,
                            block_mask=af.create_block_mask(causal, None, None, 200, 257,
                                                            device="cuda"))  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (cpu.float() - gpu.cpu().float()).abs().max().item() < tol


def _tanh_probe_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def probe(X, Y, N, TANH: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < N, other=0.0)
        tl.store(Y + offs, TANH(x), mask=offs < N)

    return probe


@pytest.mark.gpu
def test_gpu_fast_tanh_accuracy():
    # compiled kernels use PTX tanh.approx.f32 (one special-function op instead of libdevice's
    # ~20 instructions); PTX documents a max relative error of 2**-10.99: pin that, plus the
    # exact points softcap relies on (0, +-inf saturate to +-1, no NaN)
    from attnforge.runtime.cache import load_kernels
    from attnforge.runtime.loader import device_kind

    dev = torch.device("cuda")
    fwd = load_kernels(lower(as_mod(softcap, "score"), None), device_kind(dev))["fwd"]
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-6, 88.0, -88.0, math.inf, -math.inf])
    x = torch.cat([torch.linspace(-12.0, 12.0, 1 << 20), torch.randn(1 << 16) * 3, special])
    x = x.to(dev)
    y = torch.full_like(x, float("nan"))
    _tanh_probe_kernel()[(triton_cdiv(x.numel(), 1024),)](x, y, x.numel(), TANH=fwd._tanh,
                                                          BLOCK=1024)  # fmt: skip
    want = torch.tanh(x.double())
    assert not torch.isnan(y).any()
    err = (y.double() - want).abs()
    big = want.abs() > 1e-6  # denormal-range inputs may flush to zero: absolute error there
    rel = (err[big] / want[big].abs()).max().item()
    assert rel <= 2.0**-10.5, f"tanh.approx relative error {rel:.3g}"
    assert err[~big].max().item() <= 1e-6
    assert y[-2].item() == 1.0 and y[-1].item() == -1.0


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("scale", [2.5, 0.0, -0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_scale_sign_paths(scale, masked):
    # sm_scale > 0 with no score_mod takes the folded path (max over raw q.k, scale inside the
    # exp2 FMA); 0 and negative scales keep the scores scaled first: both must match
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 73, 32) for _ in range(3))
    bm = None
    if masked:
        bm = af.create_block_mask(
            lambda b, h, q_idx, kv_idx: q_idx >= kv_idx + 5, None, None, 73, 73, device="cpu"
        )  # rows 0-4 keep no key
    check(q, k, v, bm=bm, scale=scale)
    check(q, k, v, score_mod=lambda s, b, h, qi, ki: s + 0.01 * (qi - ki), bm=bm, scale=scale)


# -- TMA tile loads (USE_TMA: the default on sm_90+; the interpreter runs the same descriptors) --

TMA_CASES = [
    # (B, Hq, Hkv, L, S, E, Ev, dtype, score, mask, Bkv)
    (2, 4, 2, 17, 257, 40, 24, torch.bfloat16, "softcap", "causal", None),
    (1, 2, 2, 130, 64, 64, 64, torch.float16, None, "sliding_window", None),
    (1, 1, 1, 1, 17, 128, 128, torch.float32, None, None, None),
    (3, 2, 1, 100, 100, 32, 32, torch.bfloat16, "alibi", "document_causal", 1),
    (1, 2, 2, 257, 129, 16, 16, torch.bfloat16, None, "causal", None),
]


@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: f"{c[8]}-{c[9]}-L{c[3]}-E{c[5]}")
def test_tma_loads_match_reference(case, tma_descriptor_calls):
    B, Hq, Hkv, L, S, E, Ev, dtype, score, mask, Bkv = case
    torch.manual_seed(5)
    q, k, v = make_qkv(B, Hq, Hkv, L, S, E, Ev, dtype, Bkv=Bkv)
    score_fn = ZOO[score].fn if score else None
    bm = block_mask(ZOO[mask].fn, B, Hq, L, S) if mask else None
    out, lse = check(q, k, v, score_fn, bm, enable_gqa=Hq != Hkv,
                     kernel_options={"USE_TMA": True})  # fmt: skip
    assert tma_descriptor_calls, "the TMA path was not taken"
    plain = af.flex_attention(q, k, v, score_mod=score_fn, block_mask=bm, enable_gqa=Hq != Hkv,
                              kernel_options={"USE_TMA": False})  # fmt: skip
    assert torch.equal(out, plain)


def test_tma_layouts_and_fallback(tma_descriptor_calls):
    # transposed views ([B, L, H, E] storage) and size-1 dims go through descriptors; a feature
    # stride TMA cannot address (E=20 bf16: 40-byte rows) or a misaligned base falls back
    calls = tma_descriptor_calls
    opts = {"USE_TMA": True}
    torch.manual_seed(6)
    x = torch.randn(2, 33, 3, 40).to(torch.bfloat16).transpose(1, 2)  # strides not [B, H, L, E]
    check(x, x, x, kernel_options=opts)
    one = torch.randn(1, 1, 5, 24).to(torch.bfloat16)
    check(one, one, one, kernel_options=opts)
    assert len(calls) == 2
    narrow = torch.randn(1, 2, 33, 20).to(torch.bfloat16)
    check(narrow, narrow, narrow, kernel_options=opts)
    base = torch.randn(1 * 2 * 33 * 32 + 1).to(torch.bfloat16)
    shifted = base[1:].view(1, 2, 33, 32)  # 2-byte offset from a 16-byte boundary
    check(shifted, shifted, shifted, kernel_options=opts)
    assert len(calls) == 2, "an input TMA cannot describe must take the pointer-load kernel"
