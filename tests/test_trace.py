"""The Python tracer: every zoo mod's IR agrees with calling the function; keys are structural."""

from __future__ import annotations

import types

import pytest
import torch
from zoo import MAX_B, MAX_H, MAX_LEN, ZOO, eager

import attnforge as af
from attnforge.dsl import ir
from attnforge.dsl.api import TracedMod, as_mod
from attnforge.dsl.evaluate import evaluate
from attnforge.dsl.ir import DType, Op
from attnforge.dsl.mod import Mod, Param

ARGS = {"score": ("score", "b", "h", "q_idx", "kv_idx"), "mask": ("b", "h", "q_idx", "kv_idx")}


def _grid(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random distinct positions in ``[0, size)``, always including both ends."""
    picks = torch.randperm(size, generator=gen)[: n - 2]
    return torch.cat([torch.tensor([0, size - 1]), picks]).sort().values


def _env(kind: str, seed: int, n: int = 48):
    gen = torch.Generator().manual_seed(seed)
    b = torch.arange(MAX_B).view(-1, 1, 1, 1)
    h = torch.arange(MAX_H).view(1, -1, 1, 1)
    q = _grid(n, MAX_LEN, gen).view(1, 1, -1, 1)
    kv = _grid(n, MAX_LEN, gen).view(1, 1, 1, -1)
    values = {"b": b, "h": h, "q_idx": q, "kv_idx": kv}
    if kind == "score":
        values["score"] = torch.randn(MAX_B, MAX_H, n, n, generator=gen, dtype=torch.float64)
    return values


def assert_matches_eager(mod: Mod, fn_call, kind: str, seed: int = 0):
    env = _env(kind, seed)
    args = [env[a] for a in ARGS[kind]]
    got = evaluate(mod.ir, env, mod.param_values())
    want = torch.as_tensor(fn_call(*args))
    got, want = torch.broadcast_tensors(got, want)
    if kind == "mask":
        assert got.dtype == torch.bool and want.dtype == torch.bool
        assert torch.equal(got, want), f"{mod.name}: {int((got != want).sum())} entries differ"
    else:
        torch.testing.assert_close(
            got, want.to(torch.float64), rtol=1e-5, atol=1e-5, equal_nan=True
        )


def test_zoo_is_large_and_covers_both_kinds():
    assert len(ZOO) >= 45
    assert sum(e.kind == "mask" for e in ZOO.values()) >= 20
    assert sum(e.kind == "score" for e in ZOO.values()) >= 20


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_ir_matches_eager(name):
    e = ZOO[name]
    mod = af.trace(e.fn, e.kind)
    assert mod.ir.dtype is (DType.BOOL if e.kind == "mask" else DType.FLOAT)
    assert_matches_eager(mod, lambda *a: eager(e, *a), e.kind, seed=len(name))


def _numeric_args(args: dict) -> dict:
    bumped = {}
    for k, v in args.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            bumped[k] = v
        else:
            bumped[k] = v + 1 if isinstance(v, int) else v * 1.5
    return bumped


FACTORY_ENTRIES = sorted(
    n for n, e in ZOO.items() if e.factory is not None and _numeric_args(e.args) != e.args
)


@pytest.mark.parametrize("name", FACTORY_ENTRIES)
def test_captured_numbers_are_not_in_the_key(name):
    e = ZOO[name]
    other = e.factory(**_numeric_args(e.args))
    a, b = af.trace(e.fn, e.kind), af.trace(other, e.kind)
    assert a.ir is b.ir and a.ir.key == b.ir.key
    assert a.param_values() != b.param_values()
    assert_matches_eager(b, other, e.kind, seed=3)


def test_distinct_zoo_entries_have_distinct_keys():
    same_structure = {"partial_window": "sliding_window_strict"}
    keys = {}
    for name, e in ZOO.items():
        keys.setdefault(af.trace(e.fn, e.kind).ir.key, []).append(name)
    groups = [sorted(v) for v in keys.values() if len(v) > 1]
    assert groups == [sorted(p) for p in same_structure.items()]


def test_identical_lambdas_share_a_key():
    a = af.mask_mod(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (kv_idx % 4 != 1))
    b = af.mask_mod(lambda b, h, q, kv: (q >= kv) & (kv % 4 != 1))  # names do not matter
    assert a.ir.key == b.ir.key and a.ir is b.ir


def test_sliding_windows_with_different_sizes_share_a_key():
    w128 = ZOO["sliding_window"].factory(window=128)
    w256 = ZOO["sliding_window"].factory(window=256)
    a, b = as_mod(w128, "mask"), as_mod(w256, "mask")
    assert a.ir.key == b.ir.key
    assert (a.param_values(), b.param_values()) == ((128,), (256,))


@pytest.mark.parametrize(
    "left, right",
    [
        ("sliding_window", "sliding_window_strict"),  # <= vs <
        ("causal", "anti_causal"),
        ("alibi", "relative_table"),
        ("softcap", "softcap_causal"),
        ("document", "document_causal"),
        ("chunked", "chunked_causal"),
    ],
)
def test_different_variants_have_different_keys(left, right):
    a, b = ZOO[left], ZOO[right]
    assert af.trace(a.fn, a.kind).ir.key != af.trace(b.fn, b.kind).ir.key


def test_int_and_float_captures_are_different_parameter_kinds():
    def make(window):
        return lambda b, h, q_idx, kv_idx: q_idx - kv_idx < window

    a, b = af.trace(make(64), "mask"), af.trace(make(64.0), "mask")
    assert a.params[0].node.dtype is DType.INT and b.params[0].node.dtype is DType.FLOAT
    assert a.ir.key != b.ir.key


# -- parameters ----------------------------------------------------------------------------------


def test_parameters_numbered_by_first_use_with_names_and_kinds():
    table = torch.randn(4, 10)
    offset, scale = 3, 0.5

    def mod(score, b, h, q_idx, kv_idx):
        return score * scale + table[h, kv_idx % 10 + offset] - scale

    m = af.trace(mod, "score")
    assert [(p.index, p.name, p.kind) for p in m.params] == [
        (0, "scale", "scalar"),
        (1, "offset", "scalar"),
        (2, "table", "tensor"),
    ]
    assert m.params[2].node is ir.tensor(2, 2, "float32")
    assert ir.params_of(m.ir) == [p.node for p in m.params]
    assert m.param_values()[2] is table


def test_unused_captures_do_not_become_parameters():
    unused, used = 5, 7

    def mod(b, h, q_idx, kv_idx):
        dead = q_idx + unused  # noqa: F841 - traced, then dropped
        return kv_idx < used

    m = af.trace(mod, "mask")
    assert [p.name for p in m.params] == ["used"]
    assert m.params[0].node is ir.scalar(0, DType.INT)


def test_getters_reread_cells_globals_and_defaults():
    window = 10

    def mod(b, h, q_idx, kv_idx, extra=2):
        return q_idx - kv_idx < window + extra

    m = as_mod(mod, "mask")
    assert m.param_values() == (10, 2)
    window = 20  # noqa: F841 - the closure cell is re-read
    mod.__defaults__ = (5,)
    assert as_mod(mod, "mask") is m
    assert m.param_values() == (20, 5)
    assert_matches_eager(m, mod, "mask")


GLOBAL_TABLE = torch.arange(MAX_LEN) % 7


def _global_table_mask(b, h, q_idx, kv_idx):
    return GLOBAL_TABLE[q_idx] == GLOBAL_TABLE[kv_idx]


def test_global_tensor_reassignment_is_seen(monkeypatch):
    m = as_mod(_global_table_mask, "mask")
    key = m.ir.key
    monkeypatch.setitem(globals(), "GLOBAL_TABLE", torch.arange(MAX_LEN) % 3)
    assert m.param_values()[0] is GLOBAL_TABLE
    assert as_mod(_global_table_mask, "mask").ir.key == key
    assert_matches_eager(m, _global_table_mask, "mask")
    monkeypatch.setitem(globals(), "GLOBAL_TABLE", (torch.arange(MAX_LEN) % 3).float())
    retraced = as_mod(_global_table_mask, "mask")  # dtype changed: structure changed
    assert retraced.params[0].node.arg[2] == "float32" and retraced.ir.key != key


def test_zero_dim_tensor_is_a_rank_zero_tensor_parameter():
    m = af.trace(ZOO["learnable_temperature"].fn, "score")
    (p,) = m.params
    assert p.kind == "tensor" and p.node.arg[1] == 0
    loads = [n for n in m.ir.walk() if n.op is Op.LOAD]
    assert len(loads) == 1 and loads[0].src == (p.node,)


def test_tensor_shape_is_a_parameter_not_a_constant():
    m = af.trace(ZOO["relative_table_shape"].fn, "score")
    assert [p.name for p in m.params] == ["REL_TABLE.shape[1]", "REL_TABLE"]
    small = torch.randn(MAX_H, 9)
    m2 = af.trace(lambda s, b, h, q, kv: s + small[h][q - kv + small.shape[1] // 2], "score")
    assert m2.ir.key == m.ir.key


def test_captured_bool_is_baked_and_guarded():
    flag = True

    def mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx if flag else q_idx <= kv_idx

    m = as_mod(mod, "mask")
    assert m.params == () and m.ir is ir.node(Op.GE, ir.Q_IDX, ir.KV_IDX)
    flag = False  # noqa: F841 - the guard sees the new value and retraces
    assert as_mod(mod, "mask").ir is ir.node(Op.LE, ir.Q_IDX, ir.KV_IDX)


def test_numbers_used_by_python_control_flow_are_baked():
    n, threshold = 3, 0

    def mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        for i in range(n):
            keep = keep & (kv_idx != i)
        if threshold > 0:
            keep = keep & (q_idx > threshold)
        return keep

    m = as_mod(mod, "mask")
    first = m.ir
    assert m.params == ()
    assert_matches_eager(m, mod, "mask")
    n, threshold = 2, 5  # noqa: F841 - guards notice both and the mod is retraced
    m2 = as_mod(mod, "mask")
    assert m2.ir is not first and m2.params == ()  # a slot Python reads is a constant throughout
    assert ir.node(Op.GT, ir.Q_IDX, ir.const(5)) in m2.ir.walk()
    assert_matches_eager(m2, mod, "mask")


# -- forms of mods -------------------------------------------------------------------------------


def test_decorators_bare_and_on_lambdas():
    @af.score_mod
    def softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    causal = af.mask_mod(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
    assert isinstance(softcap, Mod) and isinstance(causal, Mod)
    assert softcap.kind == "score" and causal.kind == "mask"
    assert softcap.__name__ == "softcap" and "tanh" in softcap.pretty()
    assert causal.ir.key == af.trace(ZOO["causal"].fn, "mask").ir.key
    # still callable eagerly, calling the original function
    x = torch.tensor([60.0, -1.0])
    torch.testing.assert_close(softcap(x, 0, 0, 0, 0), 30.0 * torch.tanh(x / 30.0))
    assert causal(0, 0, torch.tensor(3), torch.tensor(2)).item() is True
    assert af.mask_mod(causal) is causal and as_mod(causal, "mask") is causal


def test_as_mod_caches_per_function_and_passes_none():
    def mod(b, h, q_idx, kv_idx):
        return q_idx > kv_idx

    assert as_mod(None, "mask") is None
    m = as_mod(mod, "mask")
    assert as_mod(mod, "mask") is m and isinstance(m, TracedMod)
    assert as_mod(lambda b, h, q, kv: q > kv, "mask").ir is m.ir


def test_mod_calling_decorated_mods_and_parsed_mods():
    window = 16

    @af.mask_mod
    def near(b, h, q_idx, kv_idx):
        return q_idx - kv_idx < window

    parsed = Mod(
        "mask",
        ir.node(Op.NE, ir.node(Op.MOD, ir.KV_IDX, ir.scalar(0, DType.INT)), ir.const(0)),
        params=(Param(0, "stride", "scalar", ir.scalar(0, DType.INT), 5),),
    )

    def combined(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & near(b, h, q_idx, kv_idx) & parsed(b, h, q_idx, kv_idx)

    m = af.trace(combined, "mask")
    assert [p.name for p in m.params] == ["window", "stride"]
    assert_matches_eager(m, lambda b, h, q, kv: (q >= kv) & (q - kv < 16) & (kv % 5 != 0), "mask")


def test_and_or_noop_masks():
    causal, window = ZOO["causal"].fn, ZOO["sliding_window"].fn
    both = af.and_masks(causal, window, ZOO["document"].fn)
    either = af.or_masks(ZOO["document"].fn, window)
    for m in (both, either):
        assert isinstance(m, Mod) and m.kind == "mask"
        assert_matches_eager(m, m, "mask")
    assert af.and_masks().ir is ir.TRUE and af.or_masks().ir is ir.FALSE
    assert af.noop_mask.ir is ir.TRUE
    out = af.noop_mask(torch.tensor(0), torch.tensor(0), torch.tensor(1), torch.tensor(2))
    assert out.dtype == torch.bool and out.item() is True
    assert af.and_masks(causal).ir is af.trace(causal, "mask").ir


def test_callable_object_partial_and_attribute_tensor():
    ns = types.SimpleNamespace(table=torch.arange(MAX_LEN) % 5)

    def via_attribute(b, h, q_idx, kv_idx):
        return ns.table[q_idx] == ns.table[kv_idx]

    m = af.trace(via_attribute, "mask")
    assert [p.kind for p in m.params] == ["tensor"]
    assert_matches_eager(m, via_attribute, "mask")
    obj = type(ZOO["window_object"].fn)(30, torch.tensor([100, 200]))
    m = as_mod(obj, "mask")
    assert [p.name for p in m.params] == ["window", "lengths"]
    obj.window = 77
    assert m.param_values()[0] == 77
    assert_matches_eager(m, obj, "mask")


def test_real_tensor_on_the_left_of_a_traced_value():
    m = af.trace(lambda s, b, h, q, kv: torch.tensor(2.0) * s - torch.tensor(1) + s, "score")
    assert m.params == ()
    assert_matches_eager(m, lambda s, b, h, q, kv: 2.0 * s - 1 + s, "score")


def test_locations_recorded_beside_the_ir():
    def mod(score, b, h, q_idx, kv_idx):
        return score + q_idx  # the add's location

    m = af.trace(mod, "score")
    add = m.ir.src[0] if m.ir.op is Op.CAST else m.ir
    loc = m.locs[add]
    assert loc.file == __file__ and "score + q_idx" in loc.text and loc.col >= 1


def test_config_dicts_namespaces_dataclasses_and_modules_are_captured():
    import dataclasses

    @dataclasses.dataclass
    class Config:
        window: int = 24

    class Bias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(MAX_H, 2 * MAX_LEN))

        def forward(self, score, b, h, q_idx, kv_idx):
            return score + self.table[h, q_idx - kv_idx + MAX_LEN]

    cfg_dict, ns, dc = {"sinks": 4}, types.SimpleNamespace(stride=3), Config()

    def mask(b, h, q_idx, kv_idx):
        local = q_idx - kv_idx < dc.window
        extra = (kv_idx < cfg_dict["sinks"]) | (kv_idx % ns.stride == 0)
        return (q_idx >= kv_idx) & (local | extra)

    m = af.trace(mask, "mask")
    assert [p.name for p in m.params] == ["window", "cfg_dict['sinks']", "stride"]
    assert_matches_eager(m, mask, "mask")
    dc.window = 50
    assert m.param_values()[0] == 50
    bias = Bias()
    sm = as_mod(bias, "score")
    assert [p.name for p in sm.params] == ["MAX_LEN", "table"]  # a global int is captured too
    p = sm.params[1]
    assert p.value is bias.table and p.kind == "tensor"
    with torch.no_grad():
        assert_matches_eager(sm, bias, "score")
    wrapped = af.trace(lambda s, b, h, q, kv: bias(s, b, h, q, kv) * 2, "score")
    assert wrapped.params[1].value is bias.table


def test_a_mod_that_builds_masks_inside_itself():
    window = 9

    def mod(b, h, q_idx, kv_idx):
        near = af.and_masks(lambda b, h, q, kv: q >= kv, lambda b, h, q, kv: q - kv < window)
        return near(b, h, q_idx, kv_idx) | (kv_idx == 0)

    m = af.trace(mod, "mask")
    assert [(p.index, p.name) for p in m.params] == [(0, "window")]
    assert_matches_eager(m, mod, "mask")


def test_constant_and_mixed_indices():
    table = torch.arange(5 * 7).view(5, 7)

    def mod(b, h, q_idx, kv_idx):
        return table[2, q_idx % 7] + table[-1][0] > table[h, torch.tensor(3)] + kv_idx

    m = af.trace(mod, "mask")
    assert_matches_eager(m, mod, "mask")
    loads = [n for n in m.ir.walk() if n.op is Op.LOAD]
    assert any(ir.const(-1) in n.src for n in loads)


def test_decorating_before_a_global_exists_defers_the_trace(monkeypatch):
    monkeypatch.delitem(globals(), "LATE_TABLE", raising=False)

    @af.mask_mod
    def late(b, h, q_idx, kv_idx):
        return LATE_TABLE[kv_idx] > 0  # noqa: F821 - defined below, as in a module

    monkeypatch.setitem(globals(), "LATE_TABLE", torch.arange(MAX_LEN) % 2)
    assert [p.name for p in late.params] == ["LATE_TABLE"]
    assert_matches_eager(late, late, "mask")
