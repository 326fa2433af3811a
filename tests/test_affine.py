"""The affine-bias pass (codegen/affine.py): which score mods it recognises, that its slopes are
right, and that the kernels' tile-origin evaluation matches the float64 reference (forward, lse
and gradients), also with large biases and where the mask, GQA and odd shapes meet it."""

from __future__ import annotations

import pytest
import torch
import zoo
from test_backward import Shape, Variant, run_case

import attnforge as af
from attnforge.codegen import lower, passes
from attnforge.codegen.affine import affine_bias
from attnforge.dsl.api import as_mod
from attnforge.dsl.evaluate import evaluate

AFFINE_ZOO = {"rel_bias", "alibi", "alibi_computed"}


def _ir(fn):
    return passes.run_passes(as_mod(fn, "score").ir)


def _multi_term(score, b, h, q_idx, kv_idx):
    return 0.5 * h - 0.01 * q_idx + score + (3 * kv_idx - 7) / 40.0 - (q_idx - kv_idx) * (h + 1)


@pytest.mark.parametrize("name", [n for n, e in zoo.ZOO.items() if e.kind == "score"])
def test_recognised_mods(name):
    assert (affine_bias(_ir(zoo.ZOO[name].fn)) is not None) == (name in AFFINE_ZOO)


@pytest.mark.parametrize(
    "fn, affine",
    [
        (_multi_term, True),
        (lambda s, b, h, q, kv: s - 0.25 * (q - kv), True),
        (lambda s, b, h, q, kv: -(q / 8.0) + s, True),
        (lambda s, b, h, q, kv: s + h, False),  # no position: nothing to save
        (lambda s, b, h, q, kv: s + q * kv / 100.0, False),  # bilinear
        (lambda s, b, h, q, kv: 2.0 * s + q, False),  # score not with coefficient 1
        (lambda s, b, h, q, kv: s - s + q, False),
        (lambda s, b, h, q, kv: s + (q - kv) // 2, False),  # floor division
        (lambda s, b, h, q, kv: s + (q - kv).abs(), False),
    ],
)
def test_recognition_rules(fn, affine):
    assert (affine_bias(_ir(fn)) is not None) == affine


def test_slopes_reproduce_the_bias():
    split = affine_bias(_ir(_multi_term))
    g = torch.Generator().manual_seed(0)
    q, kv, q0, kv0 = (torch.randint(0, 5000, (64,), generator=g) for _ in range(4))
    h = torch.randint(0, 8, (64,), generator=g)
    env = lambda qi, ki: {"b": torch.zeros_like(h), "h": h, "q_idx": qi, "kv_idx": ki}  # noqa: E731

    def ev(node, qi, ki):
        return evaluate(node, env(qi, ki), (), float_dtype=torch.float64)

    want = ev(split.bias, q, kv)
    got = (
        ev(split.bias, q0, kv0)
        + ev(split.d_q, q0, kv0) * (q - q0)
        + ev(split.d_kv, q0, kv0) * (kv - kv0)
    )
    torch.testing.assert_close(
        got.double(), want.double(), rtol=1e-7, atol=1e-6
    )  # constants are fp32 literals


def test_generated_source_uses_the_split():
    low = lower(as_mod(_multi_term, "score"), None)
    for name in ("fwd.py", "bwd.py", "fwd_ws.py"):
        assert "AFFINE_BIAS = tl.constexpr(True)" in low.files[name]
    low = lower(as_mod(zoo.ZOO["softcap"].fn, "score"), None)
    assert "AFFINE_BIAS = tl.constexpr(False)" in low.files["fwd.py"]


def _slope(t):
    return lambda s, b, h, q, kv: s + t["slopes"][h] * (kv - q)


_SLOPES = lambda big: (
    lambda B, H, L, S: {  # noqa: E731
        "slopes": (3.0 if big else 0.5) * torch.exp2(-torch.arange(1, H + 1) / H)
    }
)


@pytest.mark.parametrize(
    "shape, dtype, mask, big",
    [
        (Shape(L=257, S=300, Hq=4, Hkv=2, E=24, Ev=40), torch.float32, "causal_shift", True),
        (Shape(L=1, S=17, E=16), torch.float32, None, False),
        (Shape(L=17, S=1, E=16), torch.float32, "causal_shift", False),
        (Shape(L=130, S=131, Hq=4, Hkv=1, E=64, Ev=64), torch.bfloat16, "window", False),
        (Shape(L=64, S=64, E=32, Ev=32), torch.float16, "causal_shift", True),
    ],
)
def test_affine_kernels_match_reference(shape, dtype, mask, big):
    masks = {
        "causal_shift": lambda t: lambda b, h, q, kv: q + 3 >= kv,
        "window": lambda t: lambda b, h, q, kv: (q - kv).abs() <= 40,
        None: None,
    }
    variant = Variant("alibi_learnable", score=_slope, mask=masks[mask], tensors=_SLOPES(big))
    run_case(variant, shape, dtype, return_lse=True, check_forward=True)


def test_fully_masked_rows_stay_empty():
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    bm = af.create_block_mask(lambda b, h, qi, ki: qi >= 16, None, None, 33, 33)
    out, lse = af.flex_attention(
        q, k, v, score_mod=lambda s, b, h, qi, ki: s + 0.3 * (ki - qi), block_mask=bm,
        return_lse=True,
    )  # fmt: skip
    assert torch.all(lse[:, :, :16] == float("-inf")) and torch.all(out[:, :, :16] == 0)
    assert torch.isfinite(lse[:, :, 16:]).all()
