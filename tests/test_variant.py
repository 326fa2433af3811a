"""Variants: IR/source/block-mask inspection, block-mask caching, parameters, and (once the
tracer, block planner and kernels exist) the end-to-end caching guarantees of the kernel cache.

Unit tests use hand-built mods and fakes for lowering, block masks and the kernel entry point;
the end-to-end tests compare against the dense float64 reference.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import attnforge
from attnforge.dsl import ir
from attnforge.dsl.ir import Op, node
from attnforge.dsl.mod import Mod, Param
from attnforge.runtime import cache
from attnforge.runtime.variant import Variant, parse_spec, variant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cache import FakeLowered  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _have(*modules: str) -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except ModuleNotFoundError:
        return False


_KERNELS = ("attnforge.dsl.api", "attnforge.runtime.api", "attnforge.codegen.emit")
E2E_SCORE = pytest.mark.skipif(not _have(*_KERNELS), reason="needs the tracer and kernel codegen")
E2E = pytest.mark.skipif(
    not _have(*_KERNELS, "attnforge.codegen.blocks"),
    reason="needs the tracer, block planner and kernel codegen",
)


# -- hand-built mods --


def causal_mod() -> Mod:
    return Mod("mask", node(Op.GE, ir.Q_IDX, ir.KV_IDX), name="causal")


def window_mod(size) -> Mod:
    """q - kv <= w with w a captured scalar whose value ``size`` re-reads (a list cell)."""
    w = ir.scalar(0, ir.DType.INT)
    body = node(Op.LE, node(Op.SUB, ir.Q_IDX, ir.KV_IDX), w)
    return Mod("mask", body, (Param(0, "w", "scalar", w, size[0], lambda: size[0]),), name="win")


def head_mod() -> Mod:
    return Mod("mask", node(Op.GE, ir.Q_IDX, ir.H), name="by_head")


def scale_score() -> Mod:
    return Mod("score", node(Op.MUL, ir.SCORE, ir.const(0.5)), name="half")


@pytest.fixture
def fake_block_masks(monkeypatch):
    from attnforge.runtime import blockmask

    calls = []

    def fake(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128):
        calls.append((mask_mod.name, B, H, Q_LEN, KV_LEN, str(device), BLOCK_SIZE,
                      mask_mod.param_values()))  # fmt: skip
        return types.SimpleNamespace(call=len(calls), mask_mod=mask_mod)

    monkeypatch.setattr(blockmask, "create_block_mask", fake)
    return calls


@pytest.fixture
def fake_kernel_api(monkeypatch):
    """Record what a variant passes to flex_attention; no kernels run."""
    calls = []

    def fake(q, k, v, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(q)

    try:
        import attnforge.runtime.api as api

        monkeypatch.setattr(api, "flex_attention", fake)
    except ImportError:
        monkeypatch.setitem(sys.modules, "attnforge.runtime.api",
                            types.SimpleNamespace(flex_attention=fake))  # fmt: skip
    return calls


@pytest.fixture
def fake_lower(monkeypatch, tmp_path):
    import attnforge.codegen as codegen

    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path / "cache"))
    cache.cache_clear()
    lowered = []

    def lower(score, mask):
        lowered.append((score, mask))
        return FakeLowered(f"{score and score.key}/{mask and mask.key}")

    monkeypatch.setattr(codegen, "lower", lower, raising=False)
    yield lowered
    cache.cache_clear()


def qkv(B=1, H=2, L=8, S=8, D=4):
    return torch.randn(B, H, L, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)


# -- IR and inspection --


def test_ir_shows_score_and_mask_one_node_per_line():
    attn = variant(score_mod=scale_score(), mask_mod=causal_mod())
    text = str(attn.ir)
    assert "score_mod half:" in text and "mask_mod causal:" in text
    assert "    %1 = mul %0, 0.5 : float\n" in text
    assert "    %2 = ge %0, %1 : bool\n" in text
    assert attn.ir.score is scale_score().ir and attn.ir.mask is causal_mod().ir
    assert attn.score_mod.name == "half" and attn.mask_mod.name == "causal"


def test_ir_key_is_structural():
    a = variant(mask_mod=window_mod([3]))
    b = variant(mask_mod=window_mod([7]))
    c = variant(mask_mod=causal_mod())
    assert a.ir.key == b.ir.key != c.ir.key
    assert "attend everywhere" in str(variant(score_mod=scale_score()).ir)


def test_wrong_mod_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="score mod.*score_mod="):
        variant(mask_mod=scale_score())
    with pytest.raises(TypeError, match="callable"):
        variant(score_mod=3)


def test_source_is_the_loaded_file(fake_lower):
    attn = variant(mask_mod=causal_mod())
    src = attn.source("fwd")
    module = attn.kernels()["fwd"]
    assert src == inspect.getsource(module) == Path(module.__file__).read_text()
    assert attn.source("bwd") == Path(attn.kernels()["bwd"].__file__).read_text()
    assert len(fake_lower) == 1  # lowered once per variant
    with pytest.raises(ValueError, match="'fwd' or 'bwd'"):
        attn.source("decode")


# -- block masks --


def test_block_mask_cached_per_lengths_and_values(fake_block_masks):
    size = [4]
    attn = variant(mask_mod=window_mod(size), block_size=16)
    a = attn.block_mask(64, 32)
    assert attn.block_mask(64, 32) is a
    assert attn.block_mask(64, 64) is not a
    size[0] = 9  # a new captured value: a new map (same kernel)
    b = attn.block_mask(64, 32)
    assert b is not a
    size[0] = 4
    assert attn.block_mask(64, 32) is a
    assert [c[1:5] for c in fake_block_masks] == [(None, None, 64, 32), (None, None, 64, 64),
                                                  (None, None, 64, 32)]  # fmt: skip
    assert fake_block_masks[0][6] == 16 and fake_block_masks[2][7] == (9,)
    assert variant(score_mod=scale_score()).block_mask(8) is None


def test_block_mask_uses_b_h_only_when_the_mask_reads_them(fake_block_masks, fake_kernel_api):
    q, k, v = qkv(B=2, H=3, L=8, S=6)
    variant(mask_mod=causal_mod())(q, k, v)
    variant(mask_mod=head_mod())(q, k, v)
    assert [c[1:5] for c in fake_block_masks] == [(None, None, 8, 6), (None, 3, 8, 6)]


def test_call_passes_everything_to_flex_attention(fake_block_masks, fake_kernel_api):
    attn = variant(scale_score(), causal_mod(), BLOCK_M=32)
    q, k, v = qkv()
    attn(q, k, v, scale=0.3, return_lse=True, kernel_options={"num_warps": 2})
    attn(q, k, v)
    first, second = fake_kernel_api
    assert first["score_mod"] is attn.score_mod
    assert first["block_mask"].mask_mod is attn.mask_mod
    assert (first["scale"], first["return_lse"], first["enable_gqa"]) == (0.3, True, False)
    assert first["kernel_options"] == {"BLOCK_M": 32, "num_warps": 2}
    assert second["block_mask"] is first["block_mask"]  # built once for these lengths
    assert len(fake_block_masks) == 1
    with pytest.raises(ValueError, match="4-D"):
        attn(q[0], k, v)


# -- text specs --

SPEC = """
variant softcap_window(cap = 30.0, w: int):
    score = cap * tanh(score / cap)
    mask = (q_idx >= kv_idx) and (q_idx - kv_idx <= w)
"""


def test_parse_spec_needs_missing_params(fake_block_masks, fake_kernel_api):
    attn = parse_spec(SPEC)["softcap_window"]
    assert isinstance(attn, Variant) and attn.name == "softcap_window"
    assert attn.params == {"cap": 30.0, "w": None}
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"needs values for parameter\(s\) w.*bind\(w=\.\.\.\)"):
        attn(q, k, v)
    with pytest.raises(ValueError, match="needs values for parameter"):
        attn.block_mask(64)
    with pytest.raises(TypeError, match="no parameter 'ww'"):
        attn.bind(ww=3)


def test_spec_params_change_values_not_kernels(fake_block_masks, fake_kernel_api, fake_lower):
    attn = parse_spec(SPEC)["softcap_window"]
    q, k, v = qkv()
    bound = attn.bind(w=4)
    bound(q, k, v)
    attn(q, k, v, w=6, cap=10.0)
    assert bound.params == {"cap": 30.0, "w": 4}
    assert [c[7] for c in fake_block_masks] == [(4,), (6,)]
    scores = [c["score_mod"] for c in fake_kernel_api]
    assert scores[0].ir is scores[1].ir and scores[1].param_values() == (10.0,)
    assert bound.lowered is attn.lowered and len(fake_lower) == 1
    with pytest.raises(TypeError, match="Python functions"):
        variant(mask_mod=causal_mod()).bind(w=1)


def test_public_exports():
    assert attnforge.variant is variant and attnforge.parse_spec is parse_spec


# -- plain Python functions (traced) --

FLAG = True


def test_plain_functions_are_traced_and_relowered_when_their_structure_changes(fake_lower):
    global FLAG

    def fn(score, b, h, q_idx, kv_idx):
        return score * 2.0 if FLAG else score  # a baked global bool: re-traced when it flips

    attn = variant(score_mod=fn)
    first = attn.lowered
    assert attn.lowered is first and "mul" in str(attn.ir)
    FLAG = False
    try:
        assert attn.lowered is not first and "mul" not in str(attn.ir)
        assert len(fake_lower) == 2
    finally:
        FLAG = True


def test_plain_closure_values_are_read_each_call(fake_block_masks, fake_kernel_api):
    window = 3
    attn = variant(mask_mod=lambda b, h, q_idx, kv_idx: q_idx - kv_idx <= window)
    q, k, v = qkv()
    attn(q, k, v)
    window = 5  # noqa: F841 - read through the closure cell
    attn(q, k, v)
    assert [c[7] for c in fake_block_masks] == [(3,), (5,)]
    assert attn.params == {"window": 5}


# -- end to end (tracer + block planner + kernels) --


@pytest.fixture
def e2e_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("ATTNFORGE_DUMP_DIR", "ATTNFORGE_DISABLE_CACHE"):
        monkeypatch.delenv(name, raising=False)
    cache.cache_clear()
    yield tmp_path / "cache"
    cache.cache_clear()


def _reference(q, k, v, score_mod=None, mask_mod=None):
    from attnforge.runtime.reference import reference_attention

    out = reference_attention(q.double(), k.double(), v.double(), score_mod=score_mod,
                              mask_mod=mask_mod)  # fmt: skip
    return out.float()


def _close(out, ref):
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)  # fp32 kernel vs float64


def _small(L=40, S=40):
    return qkv(B=1, H=2, L=L, S=S, D=16)


@E2E_SCORE
def test_twelve_identical_lambdas_share_one_kernel(e2e_cache):
    import attnforge as af

    q, k, v = _small()
    for i in range(12):
        fn = eval("lambda score, b, h, q_idx, kv_idx: score * 0.5 + (q_idx - kv_idx) * 0.01")
        assert i == 0 or fn is not prev  # noqa: F821 - distinct function objects
        prev = fn  # noqa: F841
        out = af.flex_attention(q, k, v, score_mod=fn)
        _close(out, _reference(q, k, v, score_mod=fn))
    info = af.cache_info()
    assert (info.misses, info.hits, info.compiles) == (1, 11, 1)
    assert (info.entries, info.disk_entries) == (1, 1)


@E2E
def test_sliding_window_sizes_share_one_kernel(e2e_cache):
    import attnforge as af
    from attnforge.library import generate_sliding_window

    q, k, v = _small()
    for w in (1, 3, 8, 17, 30):
        attn = af.variant(mask_mod=generate_sliding_window(w), block_size=16)
        _close(attn(q, k, v), _reference(q, k, v, mask_mod=attn.mask_mod))
    info = af.cache_info()
    assert (info.misses, info.compiles, info.entries, info.disk_entries) == (1, 1, 1, 1)


def _slope_variant(slope: float):
    """A relative-position bias with a captured slope (a kernel argument, not in the key)."""
    return variant(score_mod=lambda score, b, h, q_idx, kv_idx: score + slope * (kv_idx - q_idx))


_SECOND = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_variant import _slope_variant, _reference
attn = _slope_variant(0.25)
torch.manual_seed(0)
q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
err = (attn(q, k, v) - _reference(q, k, v, score_mod=attn.score_mod)).abs().max().item()
from attnforge.runtime import cache
print(json.dumps(dict(cache.cache_info()._asdict(), err=err)))
"""


@E2E_SCORE
def test_second_process_compiles_nothing(e2e_cache):
    q, k, v = _small()
    attn = _slope_variant(0.1)
    _close(attn(q, k, v), _reference(q, k, v, score_mod=attn.score_mod))
    assert cache.cache_info().compiles == 1
    env = dict(os.environ, ATTNFORGE_CACHE_DIR=str(e2e_cache), TRITON_INTERPRET="1",
               PYTHONPATH=str(REPO))  # fmt: skip
    code = _SECOND.format(tests=str(REPO / "tests"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, text=True,
                          capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["disk_hits"] == 1 and info["compiles"] == 0 and info["codegen_seconds"] == 0.0
    assert info["err"] < 1e-4


@E2E_SCORE
def test_corrupted_kernel_file_is_rebuilt(e2e_cache):
    q, k, v = _small()
    attn = _slope_variant(0.1)
    ref = _reference(q, k, v, score_mod=attn.score_mod)
    _close(attn(q, k, v), ref)
    path = Path(attn.kernels(q.device)["fwd"].__file__)
    path.write_text(path.read_text().replace("\n", "\n    this is not python\n", 1))
    cache.cache_clear()
    again = _slope_variant(0.1)
    with pytest.warns(RuntimeWarning, match="corrupt kernel cache entry"):
        _close(again(q, k, v), ref)
    assert "this is not python" not in path.read_text()
    assert cache.cache_info().compiles == 1


@E2E_SCORE
def test_unwritable_cache_dir_still_runs(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(blocker / "cache"))
    cache.cache_clear()
    try:
        q, k, v = _small()
        attn = _slope_variant(0.2)
        with pytest.warns(RuntimeWarning, match="not writable"):
            out = attn(q, k, v)
        _close(out, _reference(q, k, v, score_mod=attn.score_mod))
    finally:
        cache.cache_clear()


@E2E_SCORE
def test_dump_dir_and_source_match_what_runs(e2e_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFORGE_DUMP_DIR", str(tmp_path / "dump"))
    q, k, v = _small()
    attn = _slope_variant(0.3)
    _close(attn(q, k, v), _reference(q, k, v, score_mod=attn.score_mod))
    module = attn.kernels(q.device)["fwd"]
    assert attn.source("fwd") == inspect.getsource(module) == attn.lowered.files["fwd.py"]
    dumped = tmp_path / "dump" / attn.lowered.key
    assert {"fwd.py", "ir.txt", "meta.json"} <= {p.name for p in dumped.iterdir()}
    assert (dumped / "fwd.py").read_text() == attn.source("fwd")
    assert json.loads((dumped / "meta.json").read_text())["key"] == attn.lowered.key


@E2E
def test_masked_variant_source_and_block_map(e2e_cache):
    q, k, v = _small(L=40, S=56)
    attn = variant(score_mod=scale_score(), mask_mod=causal_mod(), block_size=16)
    _close(attn(q, k, v), _reference(q, k, v, attn.score_mod, attn.mask_mod))
    kernels = attn.kernels(q.device)
    assert attn.source("fwd") == inspect.getsource(kernels["fwd"])
    if "bwd.py" in attn.lowered.files:
        assert attn.source("bwd") == inspect.getsource(kernels["bwd"])
        assert "def " in attn.source("bwd")
    bm = attn.block_mask(40, 56)
    assert bm is attn.block_mask(40, 56) and str(bm).strip()
