"""Backward kernels: dq, dk, dv, dlse and captured-tensor grads against the float64 reference.

Every case runs attnforge's generated kernels (the Triton interpreter on CPU) and compares with
torch autograd through ``reference_attention`` in float64 on the same inputs.  A case is a
variant (score mod and/or mask mod, some reading learnable tensors) on a shape.  The learnable
tensors are made twice by the variant's factory: float32 leaves for the kernel, float64 copies
for the reference, so the same closure code runs on both sides.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import zoo
from aot import run_sm90_build
from zoo import ZOO

import attnforge as af
from attnforge.runtime.reference import reference_attention

ROOT = Path(__file__).resolve().parents[1]


# -- variants -------------------------------------------------------------------------------------
# ``tensors(B, H, L, S)`` makes the captured tensors (float ones are learnable); ``score`` and
# ``mask`` are factories taking that dict and returning FlexAttention-style functions.


@dataclass
class Variant:
    name: str
    score: object = None  # (tensors) -> score_mod
    mask: object = None  # (tensors) -> mask_mod
    tensors: object = field(default=lambda B, H, L, S: {})


def _rel_table(B, H, L, S):
    return {"table": 0.5 * torch.randn(H, L + S)}


def _doc(B, H, L, S):
    n = max(L, S)
    return {"doc": (torch.arange(n) * 3 // max(n, 1)).long()}


def _wrap(name):
    return lambda t: lambda s, b, h, q, kv: s + t[name][h, q - kv]


VARIANTS = [
    Variant("causal_offset_masked_rows", mask=lambda t: lambda b, h, q, kv: q >= kv + 3),
    Variant(
        "softcap_causal",
        score=lambda t: lambda s, b, h, q, kv: 2.0 * torch.tanh(s / 2.0),
        mask=lambda t: lambda b, h, q, kv: q >= kv,
    ),
    Variant(
        "alibi_fixed",
        score=lambda t: lambda s, b, h, q, kv: s + t["slopes_int"][h] * 0.25 * (kv - q),
        tensors=lambda B, H, L, S: {"slopes_int": torch.arange(1, H + 1)},
    ),
    Variant(
        "alibi_learnable",
        score=lambda t: lambda s, b, h, q, kv: s + t["slopes"][h] * (kv - q),
        mask=lambda t: lambda b, h, q, kv: q >= kv,
        tensors=lambda B, H, L, S: {"slopes": 0.1 * torch.rand(H)},
    ),
    Variant("rel_bias", score=_wrap("table"), tensors=_rel_table),
    Variant(
        "rel_bias_causal",
        score=_wrap("table"),
        mask=lambda t: lambda b, h, q, kv: q >= kv,
        tensors=_rel_table,
    ),
    Variant(
        "graphormer",
        score=lambda t: lambda s, b, h, q, kv: s + t["spatial"][h, t["dist"][b, q, kv]],
        tensors=lambda B, H, L, S: {
            "spatial": torch.randn(H, 6),
            "dist": torch.randint(0, 6, (B, L, S)),
        },
    ),
    Variant(
        "three_tensors",
        score=lambda t: (
            lambda s, b, h, q, kv: s + t["bias1"][h, q - kv] + t["bias2"][b, q] * t["scale"][h]
        ),
        tensors=lambda B, H, L, S: {
            "bias1": torch.randn(H, L + S),
            "bias2": torch.randn(B, L),
            "scale": torch.randn(H),
        },
    ),
    Variant(
        "gate_and_key_bias",
        score=lambda t: lambda s, b, h, q, kv: s * t["gate"][h] + t["kbias"][kv],
        tensors=lambda B, H, L, S: {"gate": 1 + 0.3 * torch.randn(H), "kbias": torch.randn(S)},
    ),
    Variant(
        "batch_key_bias",
        score=lambda t: lambda s, b, h, q, kv: s + t["kb"][b, kv],
        tensors=lambda B, H, L, S: {"kb": torch.randn(B, S)},
    ),
    Variant(
        "same_tensor_two_reads",
        score=lambda t: lambda s, b, h, q, kv: s + t["pos"][q] - 0.5 * t["pos"][kv],
        tensors=lambda B, H, L, S: {"pos": torch.randn(max(L, S))},
    ),
    Variant(
        "leaky",
        score=lambda t: lambda s, b, h, q, kv: torch.where(s > 0, s, 0.1 * s),
    ),
    Variant("silu", score=lambda t: lambda s, b, h, q, kv: s * torch.sigmoid(s)),
    Variant(
        "mask_in_score_bias",
        score=lambda t: (
            lambda s, b, h, q, kv: torch.where(
                q >= kv + 2, s + t["table"][h, q - kv], -float("inf")
            )
        ),
        tensors=_rel_table,
    ),
    Variant(
        "key_lengths",
        mask=lambda t: lambda b, h, q, kv: kv < t["lens"][b],
        tensors=lambda B, H, L, S: {"lens": torch.tensor([0] + [S // 2 + 1] * (B - 1))},
    ),
    Variant("dead_head", mask=lambda t: lambda b, h, q, kv: (h > 0) & (q >= kv)),
    Variant(
        "learnable_cap",
        score=lambda t: lambda s, b, h, q, kv: t["cap"][h] * torch.tanh(s / t["cap"][h]),
        tensors=lambda B, H, L, S: {"cap": 1.0 + torch.rand(H)},
    ),
    Variant(
        "temperature",
        score=lambda t: lambda s, b, h, q, kv: s * t["temp"][h],
        mask=lambda t: lambda b, h, q, kv: (q - kv).abs() <= 10,
        tensors=lambda B, H, L, S: {"temp": 1.0 + 0.5 * torch.rand(H)},
    ),
    Variant(
        "doc_with_bias",
        score=lambda t: lambda s, b, h, q, kv: s + t["kb"][b, kv],
        mask=lambda t: lambda b, h, q, kv: t["doc"][q] == t["doc"][kv],
        tensors=lambda B, H, L, S: {**_doc(B, H, L, S), "kb": torch.randn(B, S)},
    ),
]
BY_NAME = {v.name: v for v in VARIANTS}


# -- the check -----------------------------------------------------------------------------------

# max |kernel - reference| <= TOL * (1 + max |reference|), per dtype: fp32 accumulates in fp32
# (tf32 is off for fp32 inputs); bf16/fp16 round P and dS to the input dtype before each dot.
TOL = {torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}


@dataclass
class Shape:
    B: int = 2
    Hq: int = 2
    Hkv: int = 2
    L: int = 37
    S: int = 45
    E: int = 16
    Ev: int = 16
    Bkv: int | None = None
    block: tuple = (16, 16)


def _inputs(shape: Shape, dtype, transposed: bool, device):
    B, Bkv = shape.B, shape.Bkv or shape.B
    q = torch.randn(B, shape.Hq, shape.L, shape.E, dtype=torch.float64, device=device)
    k = torch.randn(Bkv, shape.Hkv, shape.S, shape.E, dtype=torch.float64, device=device)
    v = torch.randn(Bkv, shape.Hkv, shape.S, shape.Ev, dtype=torch.float64, device=device)
    # round to the kernel dtype first so both sides see the same values
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    kernel = [t.to(dtype) for t in (q, k, v)]
    if transposed:  # non-contiguous views: (B, L, H, E) storage seen as (B, H, L, E)
        kernel = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in kernel]
    kernel = [t.requires_grad_(True) for t in kernel]
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    return kernel, ref


def _tensors(variant: Variant, shape: Shape, device):
    made = variant.tensors(shape.B, shape.Hq, shape.L, shape.S)
    made = {n: t.to(device) for n, t in made.items()}
    mine = {
        n: (t.float().requires_grad_(True) if t.is_floating_point() else t) for n, t in made.items()
    }
    ref = {
        n: (t.double().requires_grad_(True) if t.is_floating_point() else t)
        for n, t in made.items()
    }
    return mine, ref


def _loss(out, lse, g_out, g_lse):
    loss = (out.double() * g_out).sum()
    if lse is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse.double() * g_lse, 0.0).sum()
    return loss


@dataclass
class Case:
    """One comparison: the mods for the kernel and for the reference, and the learnable
    tensors as (name, kernel leaf, reference leaf) (the same object when shared)."""

    name: str
    score: object
    mask: object
    ref_score: object
    ref_mask: object
    learn: list


def variant_case(variant: Variant, shape: Shape, device) -> Case:
    mine, ref = _tensors(variant, shape, device)
    make = lambda f, t: f(t) if f else None  # noqa: E731
    learn = [(n, t, ref[n]) for n, t in mine.items() if t.is_floating_point()]
    return Case(
        variant.name, make(variant.score, mine), make(variant.mask, mine),
        make(variant.score, ref), make(variant.mask, ref), learn,
    )  # fmt: skip


def run_case(
    variant: Variant | Case, shape: Shape, dtype=torch.float32, return_lse=False, device="cpu",
    check_forward=False, **kw,
):  # fmt: skip
    case = variant if isinstance(variant, Case) else variant_case(variant, shape, device)
    (q, k, v), (rq, rk, rv) = _inputs(shape, dtype, kw.pop("transposed", False), device)
    gqa = shape.Hq != shape.Hkv
    block_mask = None
    if case.mask is not None:
        block_mask = af.create_block_mask(
            case.mask, shape.B, shape.Hq, shape.L, shape.S, device=device, BLOCK_SIZE=shape.block
        )
    res = af.flex_attention(
        q, k, v, score_mod=case.score, block_mask=block_mask, enable_gqa=gqa,
        return_lse=return_lse, **kw,
    )  # fmt: skip
    out, lse = res if return_lse else (res, None)
    want = reference_attention(
        rq, rk, rv, score_mod=case.ref_score, mask_mod=case.ref_mask, enable_gqa=gqa,
        return_lse=True, scale=kw.get("scale"),
    )  # fmt: skip
    tol = TOL[dtype]
    if check_forward:  # out (and lse) themselves, not only through the gradients
        for name, a, b in [("out", out, want[0])] + ([("lse", lse, want[1])] if return_lse else []):
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), finite), f"{case.name}: {name} -inf rows differ"
            err = (a.double() - b).abs()[finite].max().item() if finite.any() else 0.0
            bound = tol * (1.0 + b[finite].abs().max().item()) if finite.any() else 0.0
            assert err <= bound, f"{case.name} {name}: max err {err:.3g} > {bound:.3g}"
    g_out = torch.randn_like(want[0])
    g_lse = torch.randn_like(want[1]) if return_lse else None
    names = ["dq", "dk", "dv"] + [n for n, _, _ in case.learn]
    got = torch.autograd.grad(
        _loss(out, lse, g_out, g_lse), [q, k, v] + [t for _, t, _ in case.learn],
        allow_unused=True,
    )  # fmt: skip
    exp = torch.autograd.grad(
        _loss(want[0], want[1] if return_lse else None, g_out, g_lse),
        [rq, rk, rv] + [t for _, _, t in case.learn],
        allow_unused=True,
    )
    for name, a, b, leaf in zip(names, got, exp, [q, k, v] + [t for _, t, _ in case.learn]):
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
        assert torch.isfinite(a).all(), f"{case.name}: {name} has NaN/inf"
        err = (a.double() - b).abs().max().item()
        bound = tol * (1.0 + b.abs().max().item())
        assert err <= bound, f"{case.name} {name}: max err {err:.3g} > {bound:.3g}"
    return got


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_variant_grads(name):
    run_case(BY_NAME[name], Shape())


# -- ALiBi-style position differences: POS_F32 (launch.positions_f32) ----------------------------
# float(kv_idx - q_idx) is formed as float(kv_idx) - float(q_idx) when every position is < 2**24
# (see _pos_sub_f32 in the forward template): exact, so the kernels must match the reference,
# and the fast and the general branch must agree bit for bit.

_SLOPES = torch.exp2(-torch.arange(1.0, 3.0))  # Hq = 2, exact in every dtype


def _alibi_case(kind: str, learnable: bool) -> Case:
    made = {}
    for side, dtype in (("mine", torch.float32), ("ref", torch.float64)):
        made[side] = _SLOPES.to(dtype).requires_grad_(learnable)
    scores = {
        "kv_minus_q": lambda t: lambda s, b, h, q, kv: s + t[h] * (kv - q),
        "q_minus_kv": lambda t: lambda s, b, h, q, kv: s - t[h] * (q - kv),
        # the int difference also used as an int (the select), the float one via POS_F32
        "window": lambda t: lambda s, b, h, q, kv: torch.where(kv - q > -9, s + t[h] * (kv - q),
                                                              s - 0.5 * (q - kv)),
    }  # fmt: skip
    causal = (lambda b, h, q, kv: q >= kv) if kind == "kv_minus_q" else None
    learn = [("slopes", made["mine"], made["ref"])] if learnable else []
    return Case(f"alibi_{kind}", scores[kind](made["mine"]), causal, scores[kind](made["ref"]),
                causal, learn)  # fmt: skip


_ALIBI_KINDS = [("kv_minus_q", True), ("q_minus_kv", False), ("window", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L", [17, 1])
@pytest.mark.parametrize("kind, learnable", _ALIBI_KINDS, ids=[k for k, _ in _ALIBI_KINDS])
def test_alibi_positions_match_reference(kind, learnable, L, dtype):
    run_case(_alibi_case(kind, learnable), Shape(L=L, S=45), dtype, return_lse=True,
             check_forward=True)  # fmt: skip


def test_positions_f32_threshold():
    from attnforge.runtime.launch import positions_f32

    assert positions_f32(17, 45) and positions_f32(2**24, 2**24) and positions_f32(0, 0)
    assert not positions_f32(2**24 + 1, 1) and not positions_f32(1, 2**24 + 1)


def _alibi_results(kind: str, shape: Shape, dtype) -> list:
    case = _alibi_case(kind, True)  # fresh closures: no per-call plan of another run is reused
    torch.manual_seed(0)
    (q, k, v), _ = _inputs(shape, dtype, False, "cpu")
    bm = None
    if case.mask is not None:
        bm = af.create_block_mask(case.mask, shape.B, shape.Hq, shape.L, shape.S, device="cpu",
                                  BLOCK_SIZE=shape.block)  # fmt: skip
    out, lse = af.flex_attention(q, k, v, score_mod=case.score, block_mask=bm, return_lse=True)
    g_out = torch.randn(out.shape, dtype=torch.float64)
    g_lse = torch.randn(lse.shape, dtype=torch.float64)
    learn = [t for _, t, _ in case.learn]
    grads = torch.autograd.grad(_loss(out, lse, g_out, g_lse), [q, k, v, *learn])
    return [out, lse, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L", [17, 1])
def test_alibi_general_branch_matches_fast_branch(monkeypatch, L, dtype):
    """POS_F32 False (positions past 2**24; here forced by lowering the limit): the int
    difference converted per score gives the same bits as the fast branch, and the reference."""
    from attnforge.runtime import launch

    shape = Shape(L=L, S=45)
    seen = []
    decide = launch.positions_f32
    monkeypatch.setattr(launch, "positions_f32", lambda L, S: seen.append(decide(L, S)) or seen[-1])
    fast = _alibi_results("window", shape, dtype)
    assert seen and all(seen)  # forward and backward both asked
    seen.clear()
    monkeypatch.setattr(launch, "_POS_F32_LIMIT", 16)  # max(L, S) = 45 > 16
    slow = _alibi_results("window", shape, dtype)
    assert len(seen) >= 2 and not any(seen)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dslopes"], fast, slow):
        assert torch.equal(a, b), f"{name}: POS_F32 branches differ"
    monkeypatch.setattr(launch, "_POS_F32_LIMIT", 2**24)
    run_case(_alibi_case("window", True), shape, dtype, return_lse=True, check_forward=True)
    monkeypatch.setattr(launch, "_POS_F32_LIMIT", 16)
    run_case(_alibi_case("window", True), shape, dtype, return_lse=True, check_forward=True)


# -- the shared zoo (tests/zoo.py): every mod, with its float tables made learnable -------------


@pytest.fixture
def learnable_zoo(monkeypatch):
    """Every float tensor the zoo captures becomes a fresh learnable leaf for this test (the
    zoo's mods read their tables as globals, so tracing and the reference both see it)."""
    tables = {}
    for name, value in vars(zoo).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            tables[name] = value.detach().clone().requires_grad_(True)
            monkeypatch.setattr(zoo, name, tables[name])
    return tables


def zoo_case(name: str, tables: dict) -> tuple[Case, Shape]:
    e = ZOO[name]
    shape = Shape(L=48, S=48, block=(32, 32)) if e.needs.get("square") else Shape(block=(32, 32))
    # per-element (vmap) mods cannot run on broadcast index grids: the reference evaluates
    # their traced IR instead
    ref_fn = af.trace(e.fn, e.kind) if e.needs.get("vmap") else e.fn
    fns = (e.fn, None, ref_fn, None) if e.kind == "score" else (None, e.fn, None, ref_fn)
    return Case(name, *fns, [(n, t, t) for n, t in sorted(tables.items())]), shape


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_grads(name, learnable_zoo):
    case, shape = zoo_case(name, learnable_zoo)
    run_case(case, shape, return_lse=name in ("causal", "relative_table", "graphormer"))


LSE_CASES = ["causal_offset_masked_rows", "rel_bias_causal", "three_tensors", "key_lengths"]


@pytest.mark.parametrize("name", LSE_CASES)
def test_lse_grad(name):
    run_case(BY_NAME[name], Shape(), return_lse=True)


SHAPES = {
    "gqa_2to1": Shape(Hq=4, Hkv=2),
    "gqa_4to1_d40": Shape(Hq=4, Hkv=1, E=40, Ev=40),
    "ev_ne_e": Shape(E=24, Ev=40, L=20, S=33),
    "l1": Shape(L=1, S=17),
    "s1": Shape(L=17, S=1),
    "odd_blocks": Shape(L=17, S=50, block=(32, 16)),
    "bkv_broadcast": Shape(B=3, Bkv=1, L=21, S=29),
    "bkv_broadcast_gqa": Shape(B=2, Bkv=1, Hq=4, Hkv=2, L=19, S=23),
    "default_block": Shape(L=40, S=70, block=(128, 128)),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", ["rel_bias_causal", "graphormer", "alibi_learnable"])
def test_shapes(name, shape):
    run_case(BY_NAME[name], SHAPES[shape], return_lse=(shape == "gqa_2to1"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "name", ["causal_offset_masked_rows", "softcap_causal", "rel_bias", "three_tensors"]
)
def test_low_precision(name, dtype):
    run_case(BY_NAME[name], Shape(L=33, S=40), dtype=dtype)


def test_transposed_inputs():
    run_case(BY_NAME["rel_bias_causal"], Shape(Hq=4, Hkv=2), transposed=True, return_lse=True)


def test_backward_kernel_options():
    # tiles smaller than the sparse blocks: several tiles per listed block in both kernels
    tiles = {"BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16}
    run_case(BY_NAME["rel_bias_causal"], Shape(L=50, S=70, block=(32, 32)), kernel_options=tiles)


@pytest.mark.parametrize("order", [False, True])
@pytest.mark.parametrize(
    "name, shape, dtype, atomic",
    [
        ("causal_offset_masked_rows", Shape(L=33, S=40), torch.float32, False),  # masked rows
        ("doc_with_bias", Shape(Hq=4, Hkv=2, L=17, S=29), torch.float32, False),  # GQA, gathers
        ("alibi_learnable", Shape(E=24, Ev=40, L=20, S=33), torch.float32, False),  # E != Ev
        ("softcap_causal", Shape(L=257, S=17, block=(64, 16)), torch.bfloat16, False),
        ("causal_offset_masked_rows", Shape(L=33, S=40), torch.float16, True),  # delta unfolded
    ],
)
def test_dkdv_step_order(name, shape, dtype, atomic, order):
    """Both orders of the dK/dV step (DP_FIRST: dP^T's matmul before dV's; without DQ_ATOMIC
    delta is dP^T's initial accumulator) give the same gradients, whatever the default picks."""
    opts = {"DP_FIRST": order, "DQ_ATOMIC": atomic}
    run_case(BY_NAME[name], shape, dtype=dtype, return_lse=True, kernel_options=opts)


def test_dp_first_default_and_dkdv_launch_options():
    from attnforge.runtime.launch import choose_bwd_config, dp_first

    # off by default (no faster on the H100), on where kernel_options ask for it
    assert not dp_first({})
    assert dp_first({"DP_FIRST": True}) and not dp_first({"DP_FIRST": False})
    # num_warps / num_stages set both kernels; num_warps1 / num_stages1 only dK/dV's
    q = torch.empty(1, 1, 64, 128)
    pick = lambda **o: choose_bwd_config(q, q, (128, 128), o)  # noqa: E731
    c = pick()
    assert (c.num_warps1, c.num_stages1) == (c.num_warps, c.num_stages)
    c = pick(num_warps=8, num_stages=3)
    assert (c.num_warps, c.num_stages, c.num_warps1, c.num_stages1) == (8, 3, 8, 3)
    c = pick(num_warps=8, num_stages=3, num_warps1=4, num_stages1=2)
    assert (c.num_warps, c.num_stages, c.num_warps1, c.num_stages1) == (8, 3, 4, 2)
    tiles = {"BLOCK_M1": 16, "BLOCK_N1": 32, "num_warps1": 4, "num_stages1": 2}
    run_case(BY_NAME["rel_bias_causal"], Shape(L=50, S=70, block=(32, 32)), kernel_options=tiles)


@pytest.mark.parametrize("group", [1, 2, 3, 7])
@pytest.mark.parametrize("atomic", [False, True])
def test_program_order_head_groups(group, atomic):
    """Any HEAD_GROUP (heads per group of the 1-D program order, the last group smaller when it
    does not divide the heads) computes every (tile, head) exactly once: 5 query heads over 5
    kv heads (B=5, H=1) and 3 x 2 GQA, several tiles per head, causal."""
    opts = {
        "HEAD_GROUP": group,
        "DQ_ATOMIC": atomic,
        "BLOCK_M1": 16,
        "BLOCK_N1": 16,
        "BLOCK_M2": 16,
        "BLOCK_N2": 16,
        "BLOCK_M": 16,
        "BLOCK_N": 16,
    }
    run_case(
        BY_NAME["causal_offset_masked_rows"],
        Shape(B=5, Hq=1, Hkv=1, L=50, S=47),
        kernel_options=opts,
        return_lse=True,
    )
    run_case(BY_NAME["rel_bias_causal"], Shape(B=3, Hq=4, Hkv=2, L=33, S=40), kernel_options=opts)


def _fake_launch(max_tile: int):
    """A stand-in kernel that runs only when its dK/dV tiles fit ``max_tile`` (the way Triton
    refuses an over-large binary), recording the configs it was asked to run."""
    from triton.runtime.errors import OutOfResources

    seen: list = []

    def run(cfg):
        seen.append(cfg)
        if cfg.BLOCK_M1 * cfg.num_stages1 > max_tile:
            raise OutOfResources(cfg.BLOCK_M1 * cfg.num_stages1, max_tile, "shared memory")

    return run, seen


def test_shrink_on_out_of_resources_is_remembered_and_keeps_user_tiles():
    from attnforge.runtime import launch

    def cfg(m1, stages1):  # dK/dV stages (num_stages1) shrink, dQ's are another kernel's
        return launch.BwdConfig(m1, 128, 128, 64, 8, 2, num_warps1=8, num_stages1=stages1)

    kernel, start = object(), cfg(64, 2)
    run, seen = _fake_launch(max_tile=64)
    got = launch.launch_shrinking(kernel, start, ("k",), {}, launch._DKDV_SHRINK, run)
    assert got == cfg(32, 2)  # inner tile halved first
    assert len(seen) == 2
    # the second launch of the same kernel/shape class goes straight to the working config
    assert launch.launch_shrinking(kernel, start, ("k",), {}, launch._DKDV_SHRINK, run) == got
    assert len(seen) == 3
    # a user-set tile is never changed: the stages shrink instead ...
    run, seen = _fake_launch(max_tile=64)
    opts = {"BLOCK_M1": 64}
    got = launch.launch_shrinking(kernel, start, ("k",), opts, launch._DKDV_SHRINK, run)
    assert got == cfg(64, 1)
    # ... and when nothing else can shrink, the error names the options to change
    run, _ = _fake_launch(max_tile=32)
    opts = {"BLOCK_M1": 64, "num_stages": 2}
    with pytest.raises(ValueError, match=r"kernel_options \['BLOCK_M1', 'num_stages'\]"):
        launch.launch_shrinking(kernel, start, ("k",), opts, launch._DKDV_SHRINK, run)


def test_default_backward_tiles_follow_measurements():
    from attnforge.runtime.launch import BwdConfig, _default_bwd

    cuda = torch.device("cuda")
    # D=128: dK/dV one warpgroup over 64 keys (2 CTAs per SM), dQ 128 rows x 8 warps
    assert _default_bwd(cuda, torch.bfloat16, 128) == BwdConfig(
        64, 64, 128, 64, 8, 3, False, num_warps1=4, num_stages1=2
    )
    assert _default_bwd(cuda, torch.bfloat16, 128, costly_score=True) == BwdConfig(
        64, 128, 128, 64, 8, 3, True
    )
    # a score mod with a non-constant derivative (softcap) takes dQ by atomics at D=128
    assert _default_bwd(cuda, torch.bfloat16, 128, costly_score=True).DQ_ATOMIC
    assert not _default_bwd(cuda, torch.bfloat16, 64, costly_score=True).DQ_ATOMIC
    assert _default_bwd(cuda, torch.float16, 64) == BwdConfig(64, 64, 64, 64, 4, 3)
    assert _default_bwd(torch.device("cpu"), torch.float32, 64).num_stages == 1


def test_custom_scale():
    run_case(BY_NAME["softcap_causal"], Shape(), scale=0.37)


def test_fully_masked_everything_gives_zero_grads():
    v = Variant("nothing", mask=lambda t: lambda b, h, q, kv: q < 0)
    dq, dk, dv = run_case(v, Shape(L=9, S=11), return_lse=True)
    for g in (dq, dk, dv):
        assert (g == 0).all()


def test_no_grad_for_int_and_frozen_tensors():
    table = torch.randn(2, 90)  # not requires_grad: must not get a .grad
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    out = af.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + table[h, i - j])
    out.sum().backward()
    assert table.grad is None and q.grad is not None


def test_double_backward_raises():
    table = torch.randn(2, 90, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    out = af.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + table[h, i - j])
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), [q, table], create_graph=True)


GRADCHECK = ["rel_bias_causal", "softcap_causal", "graphormer", "three_tensors", "learnable_cap"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # gradcheck warns on non-float64 inputs
@pytest.mark.parametrize("name", GRADCHECK)
def test_gradcheck(name):
    """torch.autograd.gradcheck on tiny shapes, through q, k, v, lse and the learnable tensors.
    The kernels take fp16/bf16/fp32 only (as FlexAttention), so this runs in fp32 with
    ``fast_mode`` (a random projection u^T J v, checked against central differences of the
    kernels' own forward) and tolerances sized for fp32 differences at eps=1e-3."""
    v = BY_NAME[name]
    shape = Shape(B=1, Hq=2, Hkv=1, L=7, S=9)
    mine, _ = _tensors(v, shape, "cpu")
    learn = {n: t for n, t in mine.items() if t.is_floating_point()}
    q = torch.randn(1, 2, 7, 16, requires_grad=True)
    k, val = (torch.randn(1, 1, 9, 16, requires_grad=True) for _ in range(2))
    bm = None
    if v.mask:
        bm = af.create_block_mask(v.mask(mine), 1, 2, 7, 9, device="cpu", BLOCK_SIZE=16)

    def f(q, k, val, *tables):
        captured = {**mine, **dict(zip(learn, tables))}
        score = v.score(captured) if v.score else None
        out, lse = af.flex_attention(
            q, k, val, score_mod=score, block_mask=bm, enable_gqa=True, return_lse=True
        )
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    inputs = (q, k, val, *learn.values())
    assert torch.autograd.gradcheck(
        f, inputs, fast_mode=True, eps=1e-3, atol=1e-2, rtol=1e-2, nondet_tol=1e-5
    )


def test_train_tiny_example_loss_decreases():
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_tiny.py"), "--steps", "12", "--check"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "loss decreased" in res.stdout


def test_inspection_covers_backward(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ATTNFORGE_DUMP_DIR", str(tmp_path / "dump"))
    table = torch.randn(2, 64)

    def bias(score, b, h, q_idx, kv_idx):  # a structure no other test uses: a cache miss
        return score + 0.918273 * table[h, q_idx - kv_idx]

    attn = af.variant(score_mod=bias, mask_mod=lambda b, h, q, kv: q >= kv)
    q = torch.randn(1, 2, 20, 16)
    attn(q, q, q)
    src = attn.source("bwd")
    for name in ("_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq", "tl.atomic_add"):
        assert name in src
    dumped = list((tmp_path / "dump").rglob("bwd.py"))
    assert dumped and dumped[0].read_text() == src


# -- the compiled (GPU) path, checked without a GPU ----------------------------------------------

_AOT = r"""
import pathlib, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attnforge.codegen import lower
from attnforge.dsl.api import as_mod
from attnforge.runtime import loader
sys.path.insert(0, {tests!r})
from zoo import ZOO

PTR = {{"float32": "*fp32", "int64": "*i64", "int32": "*i32", "bool": "*i1"}}
SCALAR = {{"float": "fp32", "int": "i32", "bool": "i1"}}


def arg_type(a, dtype, slots):
    if a in ("Q", "K", "V", "DO", "OUT", "DQ", "DK", "DV"):
        return "*" + dtype
    if a in ("LSE", "DELTA", "DLSE", "DQ_ACC") or a.startswith("DT") and a[2:].isdigit():
        return "*fp32"
    if "NUM_BLKS" in a or a.endswith("_IDX"):
        return "*i32"
    return "fp32" if a == "sm_scale" else slots.get(a, "i32")


def compile_bwd(i, score, mask, dtype, D, DV, even):
    low = lower(as_mod(score, "score"), as_mod(mask, "mask"))
    path = pathlib.Path(tempfile.mkdtemp()) / "bwd.py"
    path.write_text(low.files["bwd.py"])
    mod = loader.load_module(path, f"aot_bwd{{i}}", interpret=False)
    pad = lambda d: max(16, 1 << (d - 1).bit_length())
    slots = {{s.name: (SCALAR[s.dtype] if s.kind == "scalar" else PTR[s.dtype])
              for s in low.slots}}
    common = dict(HEAD_DIM=D, HEAD_DIM_V=DV, HEAD_DIM_PAD=pad(D), HEAD_DIM_V_PAD=pad(DV),
                  SPARSE_Q_BLOCK=128, SPARSE_KV_BLOCK=128, EVEN_Q=even, EVEN_KV=even,
                  HAS_FULL_BLOCKS=True, DOT_PRECISION="tf32", TENSOR_GRADS=(1 << 8) - 1,
                  HAS_DLSE=True, DQ_ATOMIC=i != 1,  # dQ by atomics in the dK/dV kernel
                  POS_F32=True, USE_TMA=i == 0,  # descriptor loads in both loops
                  DQ_TMA=i == 0,  # dQ tiles by TMA bulk reduce-adds
                  DP_FIRST=i != 2)  # both orders of the dK/dV step
    tiles = {{"_attn_bwd_preprocess": dict(BLOCK_M=128), "_attn_bwd_dkdv": dict(BLOCK_M=32,
             BLOCK_N=128), "_attn_bwd_dq": dict(BLOCK_M=128, BLOCK_N=32)}}
    for name, tile in tiles.items():
        fn = getattr(mod, name)
        const = {{**common, **tile}}
        sig, constexprs = {{}}, {{}}
        rows = tile.get("BLOCK_M" if name == "_attn_bwd_dkdv" else "BLOCK_N")
        for j, a in enumerate(fn.arg_names):
            if a == "DQ_DESC":
                if const["DQ_TMA"]:
                    sig[a] = f"tensordesc<fp32[1,1,{{rows}},{{pad(D)}}]>"
                else:
                    sig[a], constexprs[(j,)] = "constexpr", None
            elif a.endswith("_DESC"):
                if const["USE_TMA"]:
                    sig[a] = f"tensordesc<{{dtype}}[1,1,{{rows}},{{pad(D)}}]>"
                else:
                    sig[a], constexprs[(j,)] = "constexpr", None
            elif a in const:
                sig[a], constexprs[(j,)] = "constexpr", const[a]
            else:
                sig[a] = arg_type(a, dtype, slots)
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4,
                           num_stages=3))
        assert name == "_attn_bwd_preprocess" or "mma" in k.asm["ptx"]


cases = [  # no mods; full-tile atomics, odd dims; softcap(alibi) (one atomic per tile)
    (None, None, "bf16", 128, 128, True),
    (ZOO["graphormer"].fn, ZOO["document_causal"].fn, "bf16", 40, 24, False),
    (ZOO["nested_score"].fn, ZOO["causal"].fn, "fp16", 64, 64, True),
]
for i, case in enumerate(cases):
    compile_bwd(i, *case)
print("compiled", len(cases))
"""


def test_compiled_backward_builds_for_sm90_without_a_gpu(tmp_path):
    """CI has no GPU: build the generated backward kernels through Triton's CUDA backend (to
    PTX) in a process where triton is not in interpreter mode (catches compile-only errors)."""
    stdout = run_sm90_build(_AOT, tmp_path, timeout=900)
    assert "compiled 3" in stdout


# -- heavier, on demand ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_variant_grads_long(name):
    run_case(BY_NAME[name], Shape(B=1, Hq=2, Hkv=1, L=257, S=200, E=64, Ev=32, block=(64, 32)))


GPU_VARIANTS = [
    "causal_offset_masked_rows",
    "rel_bias_causal",
    "alibi_learnable",
    "graphormer",
    "softcap_causal",
    "three_tensors",
    "doc_with_bias",
]


@pytest.mark.gpu
@pytest.mark.parametrize("S", [1024, 8192])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name", GPU_VARIANTS)
def test_gpu_production(name, S, D):
    """bf16 on CUDA vs the dense float64 reference (B*H*S*S*8 bytes per score tensor: H is
    kept small at S=8192 so the reference fits in memory)."""
    H = 4 if S <= 2048 else 2
    shape = Shape(B=1, Hq=H, Hkv=H // 2, L=S, S=S, E=D, Ev=D, block=(128, 128))
    run_case(BY_NAME[name], shape, dtype=torch.bfloat16, device="cuda", return_lse=True)


@pytest.mark.gpu
def test_gpu_peak_memory_is_linear_in_length():
    """Forward + backward at S=32768 (bf16, B=1, H=16, D=64): no O(L*S) buffer, so the peak
    stays a small multiple of the inputs (an fp32 L*S score tensor per head alone would be
    64 GiB).  Prints attnforge's and FlexAttention's peaks for the issue note (-s)."""
    B, H, S, D = 1, 16, 32768, 64
    causal = lambda b, h, q, kv: q >= kv  # noqa: E731

    def peak(fn) -> int:
        q, k, v = (
            torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(q, k, v).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    bm = af.create_block_mask(causal, None, None, S, S, device="cuda")
    ours = peak(lambda q, k, v: af.flex_attention(q, k, v, block_mask=bm))
    inputs = 3 * B * H * S * D * 2
    mib = 2**20
    print(f"attnforge fwd+bwd peak above inputs: {ours / mib:.1f} MiB (q+k+v {inputs / mib:.0f})")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        tbm = create_block_mask(causal, None, None, S, S, device="cuda")
        flex = torch.compile(flex_attention)
        theirs = peak(lambda q, k, v: flex(q, k, v, block_mask=tbm))
        print(f"FlexAttention fwd+bwd peak above inputs: {theirs / 2**20:.1f} MiB")
    except Exception as exc:  # pragma: no cover - informative only
        print(f"FlexAttention not measured: {exc}")
    assert ours < 8 * inputs


# -- dQ by atomics in the dK/dV kernel (DQ_ATOMIC) against its own kernel ------------------------

ATOMIC_SHAPES = {
    "plain": Shape(),
    "gqa_4to1_d40": Shape(Hq=4, Hkv=1, E=40, Ev=40),
    "bkv1": Shape(B=3, Bkv=1),
    "odd_blocks": Shape(L=17, S=50, block=(32, 16)),
    "l1": Shape(L=1, S=17),
}


@pytest.mark.parametrize("atomic", [False, True])
@pytest.mark.parametrize("shape", sorted(ATOMIC_SHAPES))
@pytest.mark.parametrize("name", ["causal_offset_masked_rows", "softcap_causal", "leaky"])
def test_dq_atomic_and_separate(name, shape, atomic):
    run_case(BY_NAME[name], ATOMIC_SHAPES[shape], kernel_options={"DQ_ATOMIC": atomic})


GPU_ATOMIC_SHAPES = {
    **ATOMIC_SHAPES,
    "d128_odd": Shape(B=1, Hq=4, Hkv=2, L=257, S=300, E=128, Ev=128, block=(128, 128)),
    "d17_gqa": Shape(B=2, Hq=4, Hkv=1, L=131, S=130, E=17, Ev=24, block=(64, 64)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("shape", sorted(GPU_ATOMIC_SHAPES))
@pytest.mark.parametrize("name", ["causal_offset_masked_rows", "softcap_causal", "alibi_learnable"])
def test_gpu_dq_atomic(name, shape, tma):
    """dQ added inside the dK/dV kernel on the GPU: TMA bulk reduce-adds (DQ_TMA) and
    element-wise atomics, odd lengths and head dims, against the float64 reference."""
    run_case(BY_NAME[name], GPU_ATOMIC_SHAPES[shape], dtype=torch.bfloat16, device="cuda",
             kernel_options={"DQ_ATOMIC": True, "DQ_TMA": tma})  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dq_atomic_16bit(dtype):
    run_case(BY_NAME["softcap_causal"], Shape(L=70, S=70, E=32, Ev=32), dtype=dtype,
             kernel_options={"DQ_ATOMIC": True})  # fmt: skip


def test_dq_atomic_policy(monkeypatch):
    from attnforge.runtime.launch import BwdConfig, use_dq_atomic

    on, off = BwdConfig(64, 128, 128, 64, 8, 3, True), BwdConfig(64, 64, 64, 64, 4, 3, False)
    assert use_dq_atomic(on, {}, 0) and not use_dq_atomic(off, {}, 0)
    assert not use_dq_atomic(on, {}, 0b1)  # captured tensors need grads: the dQ kernel runs
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not use_dq_atomic(on, {}, 0)  # atomic order is not reproducible
    assert use_dq_atomic(on, {"DQ_ATOMIC": True}, 0)  # an explicit choice wins
    with pytest.raises(ValueError, match="True or False"):
        af.flex_attention(*(torch.randn(1, 1, 16, 16) for _ in range(3)),
                          kernel_options={"DQ_ATOMIC": 1})  # fmt: skip


@pytest.mark.parametrize("atomic", [False, True])
def test_no_dq_when_q_needs_no_grad(atomic):
    torch.manual_seed(0)
    q = torch.randn(1, 2, 40, 16)
    k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(2))
    bm = af.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 40, 40, device="cpu",
                              BLOCK_SIZE=16)  # fmt: skip
    out = af.flex_attention(q, k, v, block_mask=bm, kernel_options={"DQ_ATOMIC": atomic})
    out.sum().backward()
    rk, rv = (t.detach().double().requires_grad_(True) for t in (k, v))
    want = reference_attention(q.double(), rk, rv, mask_mod=lambda b, h, qi, ki: qi >= ki)
    want.sum().backward()
    assert q.grad is None
    torch.testing.assert_close(k.grad.double(), rk.grad, atol=1e-4, rtol=0)
    torch.testing.assert_close(v.grad.double(), rv.grad, atol=1e-4, rtol=0)


# -- TMA tile loads in the backward loops (the interpreter runs the same descriptors) ------------

BWD_TMA_CASES = {
    "gqa_causal_odd": (BY_NAME["causal_offset_masked_rows"], Shape(Hq=4, Hkv=2, L=37, S=45)),
    "bkv1_l17_e40": (BY_NAME["rel_bias_causal"], Shape(B=3, Bkv=1, L=17, S=50, E=40, Ev=24)),
    "doc_tensor_mask": (BY_NAME["doc_with_bias"], Shape(L=70, S=70, E=32, Ev=32, block=(32, 32))),
}


@pytest.mark.parametrize("atomic", [False, True])
@pytest.mark.parametrize("name", sorted(BWD_TMA_CASES))
def test_backward_tma_loads(name, atomic, monkeypatch):
    from attnforge.runtime import launch

    variant, shape = BWD_TMA_CASES[name]
    built = []
    real = launch._descriptor
    monkeypatch.setattr(launch, "_descriptor", lambda t, rows: built.append(rows) or real(t, rows))
    for dtype in (torch.float32, torch.bfloat16):
        run_case(variant, shape, dtype=dtype, return_lse=True,
                 kernel_options={"USE_TMA": True, "DQ_ATOMIC": atomic})  # fmt: skip
    assert built, "the TMA path was not taken"
    # bit-equal to the pointer-load kernels: the same tiles reach the same dots
    case = variant_case(variant, shape, "cpu")
    (q, k, v), _ = _inputs(shape, torch.bfloat16, False, "cpu")
    bm = None
    if case.mask is not None:
        bm = af.create_block_mask(case.mask, shape.B, shape.Hq, shape.L, shape.S, device="cpu",
                                  BLOCK_SIZE=shape.block)  # fmt: skip
    grads = []
    for tma in (True, False):
        out = af.flex_attention(q, k, v, score_mod=case.score, block_mask=bm,
                                enable_gqa=shape.Hq != shape.Hkv,
                                kernel_options={"USE_TMA": tma, "DQ_ATOMIC": atomic})  # fmt: skip
        grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
