"""ATTNFORGE_AUTOTUNE (``runtime/autotune.py``) on CPU: the interpreter runs the real kernels,
``autotune.device_ok`` is patched to allow tuning there and ``autotune.bench`` is a fake timer
that prefers one candidate, so the choice, the tune file and the results are all checked
without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

import attnforge as af
from attnforge.dsl.api import as_mod
from attnforge.runtime import api, autotune, cache, launch
from attnforge.runtime.launch import BwdConfig, FwdConfig
from attnforge.runtime.reference import reference_attention

B, H, L, S, D = 1, 2, 128, 128, 16


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _fresh_process() -> None:
    """Memory as in a new process: no kernels, plans, winners or shrunk configs."""
    cache.cache_clear()
    api._plans.clear()
    autotune.clear_memory()
    launch._SHRUNK.clear()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(d))
    monkeypatch.setenv("ATTNFORGE_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "device_ok", lambda q: True)
    _fresh_process()
    yield d
    _fresh_process()


class Timer:
    """``autotune.bench`` stand-in: 1 ms for configs ``prefer`` accepts, 2 ms for the rest."""

    def __init__(self, prefer=lambda cfg: False, allowed=True):
        self.prefer, self.allowed, self.seen = prefer, allowed, []

    def __call__(self, fn, cfg) -> float:
        assert self.allowed, f"timed {cfg} although nothing should be timed"
        self.seen.append(cfg)
        return 1.0 if self.prefer(cfg) else 2.0

    def of(self, kind) -> list:
        return [c for c in self.seen if isinstance(c, kind)]


@pytest.fixture
def timer(monkeypatch):
    def install(**kw) -> Timer:
        t = Timer(**kw)
        monkeypatch.setattr(autotune, "bench", t)
        return t

    return install


@pytest.fixture
def launched(monkeypatch):
    """The configs the real launches start from (``launch_shrinking``'s), in order."""
    seen: list = []
    real = launch.launch_shrinking

    def spy(kernel, cfg, *rest):
        seen.append(cfg)
        return real(kernel, cfg, *rest)

    monkeypatch.setattr(launch, "launch_shrinking", spy)
    return seen


def _fwd_pick(cfg) -> bool:
    want = (128, 3, 8)  # BLOCK_N, num_stages, num_warps
    return isinstance(cfg, FwdConfig) and (cfg.BLOCK_N, cfg.num_stages, cfg.num_warps) == want


def _bwd_pick(cfg) -> bool:
    want = (True, 2, 32)  # DQ_ATOMIC (the fp32 accumulator path), num_stages, BLOCK_M1
    return isinstance(cfg, BwdConfig) and (cfg.DQ_ATOMIC, cfg.num_stages, cfg.BLOCK_M1) == want


def _run(make_score=None, learn=None, options=None, grad=True):
    """Forward (and backward) on fresh inputs, checked against the float64 reference;
    ``make_score(tensor)`` builds the score mod around the learnable ``learn``."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (L, S, S))
    leaves = [q, k, v] + ([learn] if learn is not None else [])
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    refs = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    score = ref_score = None
    if make_score is not None:
        score, ref_score = make_score(learn), as_mod(make_score(refs[3]), "score")
    bm = af.create_block_mask(_causal, B, H, L, S, device="cpu")
    out = af.flex_attention(q, k, v, score_mod=score, block_mask=bm, kernel_options=options)
    ref = reference_attention(*refs[:3], score_mod=ref_score, block_mask=bm)
    torch.testing.assert_close(out.detach().double(), ref.detach(), atol=2e-5, rtol=1e-4)
    if grad:
        g_out = torch.randn(out.shape, generator=g)
        got = torch.autograd.grad(out, leaves, g_out)
        want = torch.autograd.grad(ref, refs, g_out.double())
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def _tune_files(root) -> list:
    return sorted(root.rglob("tune-*.json"))


def _winners(root) -> dict:
    (path,) = _tune_files(root)
    return json.loads(path.read_text())["winners"]


def test_picks_the_fastest_forward_and_backward(cache_dir, timer, launched):
    t = timer(prefer=lambda c: _fwd_pick(c) or _bwd_pick(c))
    _run()
    fwd, bwd = t.of(FwdConfig), t.of(BwdConfig)
    assert len(fwd) > 1 and len(set(fwd)) == len(fwd) and sum(map(_fwd_pick, fwd)) == 1
    assert len(bwd) > 1 and len(set(bwd)) == len(bwd) and sum(map(_bwd_pick, bwd)) == 1
    assert _fwd_pick(next(c for c in launched if isinstance(c, FwdConfig)))
    ran_bwd = [c for c in launched if isinstance(c, BwdConfig)]
    assert ran_bwd and all(map(_bwd_pick, ran_bwd))
    # next to the kernel, keyed by shape class; the file names the device and versions
    (path,) = _tune_files(cache_dir)
    assert path.parent == cache.entry_dir(path.parent.name, "cpu-interp")
    data = json.loads(path.read_text())
    assert data["device"] == "cpu" and data["torch"] == torch.__version__ and data["triton"]
    picked = {k.split("|")[0]: v for k, v in data["winners"].items()}
    assert FwdConfig(**picked["fwd"]) == next(filter(_fwd_pick, fwd))
    assert BwdConfig(**picked["bwd"]) == next(filter(_bwd_pick, bwd))


def test_a_new_process_reads_the_winners_without_timing(cache_dir, timer, launched):
    timer(prefer=lambda c: _fwd_pick(c) or _bwd_pick(c))
    _run()
    before = _winners(cache_dir)
    _fresh_process()
    launched.clear()
    timer(allowed=False)
    _run()
    assert _fwd_pick(next(c for c in launched if isinstance(c, FwdConfig)))
    assert any(_bwd_pick(c) for c in launched)
    assert _winners(cache_dir) == before


def test_kernel_options_fields_are_never_tuned(cache_dir, timer, launched):
    t = timer(prefer=lambda c: _fwd_pick(c) or _bwd_pick(c))
    options = {"BLOCK_N": 64, "num_stages": 1, "DQ_ATOMIC": False, "BLOCK_M1": 64}
    _run(options=options)
    assert t.of(FwdConfig) and t.of(BwdConfig)
    for cfg in t.seen + launched:
        fields = vars(cfg)
        assert all(fields[k] == v for k, v in options.items() if k in fields), cfg
    assert all("fixed=" in key and "num_stages" in key for key in _winners(cache_dir))


def test_a_corrupt_tune_file_warns_and_is_rewritten(cache_dir, timer):
    timer(prefer=lambda c: _fwd_pick(c) or _bwd_pick(c))
    _run()
    (path,) = _tune_files(cache_dir)
    good = json.loads(path.read_text())
    path.write_text('{"format": 1, "winn')
    _fresh_process()
    t = timer(prefer=lambda c: _fwd_pick(c) or _bwd_pick(c))
    with pytest.warns(RuntimeWarning, match="unreadable autotune file"):
        _run()
    assert t.seen  # retuned
    assert json.loads(path.read_text()) == good


def test_another_gpus_winners_are_not_used(cache_dir, timer):
    timer(prefer=_fwd_pick)
    _run(grad=False)
    (path,) = _tune_files(cache_dir)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "device": "some other GPU"}))
    _fresh_process()
    t = timer(prefer=_fwd_pick)
    _run(grad=False)
    assert t.of(FwdConfig)
    assert json.loads(path.read_text())["device"] == "cpu"


def test_captured_tensors_needing_grads_skip_backward_tuning(cache_dir, timer, launched):
    bias = torch.randn(H).requires_grad_(True)

    def with_bias(b_):
        def score(s, b, h, q_idx, kv_idx):
            return s + b_[h]

        return score

    t = timer(prefer=lambda c: _fwd_pick(c) or _bwd_pick(c))
    _run(make_score=with_bias, learn=bias)
    assert t.of(FwdConfig) and not t.of(BwdConfig)
    assert not any(_bwd_pick(c) for c in launched)
    assert all(key.startswith("fwd|") for key in _winners(cache_dir))


def test_knob_off_times_and_writes_nothing(cache_dir, timer, monkeypatch):
    monkeypatch.setenv("ATTNFORGE_AUTOTUNE", "0")
    timer(allowed=False)
    _run()
    monkeypatch.delenv("ATTNFORGE_AUTOTUNE")
    _fresh_process()
    _run()
    assert not _tune_files(cache_dir)


def test_no_tuning_on_cpu_without_the_test_hook(cache_dir, timer, monkeypatch):
    monkeypatch.undo()  # the real device_ok (and bench): CPU tensors are never tuned
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ATTNFORGE_AUTOTUNE", "1")
    timer(allowed=False)
    _run(grad=False)
    assert not _tune_files(cache_dir)


def test_candidates_respect_block_size_and_fixed_fields():
    base = FwdConfig(64, 64, 4, 1)
    found = autotune.candidates(
        base, {"BLOCK_N": (64, 128), "num_stages": (2, 3)}, {"num_stages": 1}, {"BLOCK_N": 64}
    )
    assert found == [base]
    found = autotune.candidates(base, {"BLOCK_N": (32, 128)}, {}, {"BLOCK_N": 128})
    assert found == [base, FwdConfig(64, 32, 4, 1), FwdConfig(64, 128, 4, 1)]


def test_a_candidate_that_raises_is_skipped(timer):
    from triton.runtime.errors import OutOfResources

    cfgs = [FwdConfig(64, n, 4, 1) for n in (16, 32, 64)]

    def run(cfg):
        if cfg.BLOCK_N == 32:
            raise OutOfResources(1 << 20, 1 << 18, "shared memory")

    t = timer(prefer=lambda c: c.BLOCK_N == 32)
    assert autotune.fastest(cfgs, run) == cfgs[0]  # the preferred one never ran
    assert t.seen == [cfgs[0], cfgs[2]]
    assert autotune.fastest(cfgs[1:2], run) is None
