"""The warp-specialised Hopper forward (``fwd_ws.py``, Gluon): it builds for sm_90 on a machine
without a GPU for every kind of variant, and on an sm_90 GPU it is the path taken and agrees with
the float64 reference and with the Triton kernel, forward and backward."""

from __future__ import annotations

import pytest
import torch
from aot import run_sm90_build

import attnforge as af
from attnforge.runtime import launch
from attnforge.runtime.reference import reference_attention

_SCRIPT = r"""
import importlib.util, subprocess, sys, tempfile
from pathlib import Path
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from attnforge.codegen import lower
from attnforge.dsl.api import as_mod

slopes = torch.tensor([0.5, 0.25])
doc = (torch.arange(1000) * 7 // 1000).to(torch.int32)
VARIANTS = {
    "noop": (None, None),
    "causal": (None, lambda b, h, q, kv: q >= kv),
    "alibi": (lambda s, b, h, q, kv: s + slopes[h] * (kv - q), lambda b, h, q, kv: q >= kv),
    "softcap": (lambda s, b, h, q, kv: 30.0 * torch.tanh(s / 30.0), None),
    "document": (None, lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)),
    "window": (None, lambda b, h, q, kv: (q >= kv) & (q - kv < 256)),
}
PTR = {"float32": "*fp32", "int64": "*i64", "int32": "*i32", "bool": "*i1"}
SCALAR = {"float": "fp32", "int": "i32", "bool": "i1"}
ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
for name, D, even in [("noop", 128, True), ("causal", 64, True), ("alibi", 128, False),
                      ("softcap", 64, True), ("document", 128, False), ("window", 128, True)]:
    score, mask = VARIANTS[name]
    low = lower(as_mod(score, "score"), as_mod(mask, "mask"))
    path = Path(tempfile.mkdtemp()) / "k_ws.py"
    path.write_text(low.files["fwd_ws.py"])
    spec = importlib.util.spec_from_file_location("k_ws_" + name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = mod._attn_fwd_ws
    slots = {s.name: PTR[s.dtype] if s.kind == "tensor" else SCALAR[s.dtype] for s in low.slots}
    cx = dict(BLOCK_M=128, SPARSE_Q_BLOCK=128, SPARSE_KV_BLOCK=128, EVEN_KV=even,
              HAS_FULL_BLOCKS=mask is not None, SCALE_FOLDED=score is None, POS_F32=True,
              NUM_STAGES=2 if D == 128 else 3, PINGPONG=False,
              # every schedule: one tile per CTA, static rounds, tiles from the counter
              PERSISTENT=D == 64 or name in ("document", "window"),
              DYNAMIC=name in ("causal", "document"))
    sig, consts = {}, {}
    for arg in fn.arg_names:
        if arg in cx:
            sig[arg], consts[arg] = "constexpr", cx[arg]
        elif arg.endswith("_DESC"):
            rows = 64 if arg == "Q_DESC" else 128
            lay = gl.NVMMASharedLayout.get_default_for([1, 1, rows, D], gl.bfloat16)
            sig[arg] = f"tensordesc<bf16[1, 1, {rows}, {D}],{lay!r}>"
        elif arg in slots:
            sig[arg] = slots[arg]
        else:
            sig[arg] = {"OUT": "*bf16", "LSE": "*fp32", "sm_scale": "fp32",
                        "TILE_COUNTER": "*i32"}.get(
                arg, "*i32" if arg.endswith(("NUM_BLKS", "_IDX")) else "i32")
    c = triton.compile(GluonASTSource(fn, sig, consts, {}), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 1})
    ptx = Path(tempfile.mkdtemp()) / "k.ptx"
    ptx.write_text(c.asm["ptx"])
    r = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", f"{ptx}.cubin"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    serialised = "C7512" in r.stderr or "C7514" in r.stderr
    print(name, D, c.metadata.num_warps, c.metadata.shared, "serialised" if serialised else "ok")
"""


_AOT = _SCRIPT.replace("{", "{{").replace("}", "}}")  # run_sm90_build fills {tests} holes


def test_ws_forward_builds_for_sm90(tmp_path):
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    from attnforge.runtime import standins

    if not standins._import_ws():
        pytest.skip("this Triton's Gluon lacks the API fwd_ws.py uses (Triton 3.5-3.6)")
    lines = run_sm90_build(_AOT, tmp_path, timeout=900).split()
    # six variants, each 8 warps (two warpgroup partitions) under 227 KB of shared memory, and
    # ptxas keeps the wgmmas asynchronous (no C7512/C7514 serialisation)
    rows = [lines[i : i + 5] for i in range(0, len(lines), 5)]
    assert len(rows) == 6, lines
    for name, _d, warps, shared, verdict in rows:
        assert warps == "8" and int(shared) <= 227 * 1024 and verdict == "ok", (name, lines)


def test_ws_not_taken_off_sm90():
    q, k, v = (torch.randn(1, 2, 64, 64, dtype=torch.bfloat16) for _ in range(3))
    assert launch.ws_stages(_Call(), q, k, v) == 0  # CPU tensors: the Triton kernel
    out = af.flex_attention(q, k, v)
    ref = reference_attention(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max().item() < 3e-2


class _Call:  # what ws_stages reads of a KernelCall
    options: dict = {}


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _variant(name: str, S: int):
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device="cuda")
    doc = (torch.arange(S, device="cuda") * 5 // max(S, 1)).to(torch.int32)
    causal = lambda b, h, q, kv: q >= kv  # noqa: E731
    return {
        "noop": (None, None),
        "causal": (None, causal),
        "alibi": (lambda s, b, h, q, kv: s + slopes[h] * (kv - q), causal),
        "softcap": (lambda s, b, h, q, kv: 30.0 * torch.tanh(s / 30.0), causal),
        "document": (None, lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)),
        "window": (None, lambda b, h, q, kv: (q >= kv) & (q - kv < 200)),
        # rows 0..99 keep no key at all: out 0, lse -inf
        "empty_rows": (None, lambda b, h, q, kv: (q >= 100) & (kv <= q)),
    }[name]


GPU_CASES = [
    # (variant, L, S, D, Hq, Hkv, dtype)
    ("noop", 1, 1, 64, 4, 4, torch.bfloat16),
    ("causal", 17, 17, 128, 4, 4, torch.float16),
    ("noop", 1000, 777, 64, 4, 2, torch.float16),
    ("alibi", 257, 300, 128, 4, 2, torch.bfloat16),
    ("softcap", 1000, 1000, 128, 4, 4, torch.bfloat16),
    ("document", 1537, 1537, 128, 4, 1, torch.float16),
    ("window", 2048, 2048, 128, 4, 2, torch.bfloat16),
    ("empty_rows", 300, 300, 128, 4, 4, torch.bfloat16),
    ("noop", 4096, 4096, 128, 4, 4, torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="the warp-specialised forward runs on sm_90")
@pytest.mark.parametrize("name, L, S, D, Hq, Hkv, dtype", GPU_CASES)
def test_gpu_ws_forward_and_backward(name, L, S, D, Hq, Hkv, dtype, monkeypatch):
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(2, Hq, L, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(2, Hkv, S, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(2, Hkv, S, D, device=dev, dtype=dtype, requires_grad=True)
    score, mask = _variant(name, S)
    bm = af.create_block_mask(mask, None, None, L, S, device=dev) if mask else None
    taken = []
    real = launch._launch_fwd_ws
    monkeypatch.setattr(launch, "_launch_fwd_ws", lambda *a: taken.append(1) or real(*a))
    gqa = Hq != Hkv
    out, lse = af.flex_attention(q, k, v, score_mod=score, block_mask=bm, return_lse=True,
                                 enable_gqa=gqa)  # fmt: skip
    assert taken, "the warp-specialised forward was not taken"
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), score_mod=score,
                                       block_mask=bm, return_lse=True, enable_gqa=gqa)  # fmt: skip
    assert (out.double() - ref).abs().max().item() < 2.5e-2
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < 2e-2
    assert not torch.isnan(out).any()
    # the Triton kernel on the same inputs, and the gradients through either forward
    g = torch.randn_like(out)
    grads_ws = torch.autograd.grad(out, (q, k, v), g)
    tri = af.flex_attention(q, k, v, score_mod=score, block_mask=bm, enable_gqa=gqa,
                            kernel_options={"FWD_WS": False})  # fmt: skip
    assert len(taken) == 1
    assert (out.float() - tri.float()).abs().max().item() < 2e-2
    for a, b in zip(grads_ws, torch.autograd.grad(tri, (q, k, v), g)):
        assert (a.float() - b.float()).abs().max().item() < 5e-2


DYNAMIC_CASES = [
    # (variant, L, D, Hq): tiles of unequal work, more tiles than SMs and fewer
    ("causal", 4096, 128, 8),
    ("document", 3000, 128, 4),
    ("window", 4096, 64, 8),
    ("empty_rows", 300, 128, 4),
    ("alibi", 1000, 64, 4),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="the warp-specialised forward runs on sm_90")
@pytest.mark.parametrize("name, L, D, Hq", DYNAMIC_CASES)
def test_gpu_ws_persistent_counter_matches_one_tile_per_cta(name, L, D, Hq):
    # a persistent launch with a block mask takes its tiles from an atomic counter: every tile
    # is computed as by a CTA of its own, so out and lse are bit-identical, on every launch
    # (the counter starts at zero each time) and in a CUDA graph's replays
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, Hq, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    score, mask = _variant(name, L)
    bm = af.create_block_mask(mask, None, None, L, L, device="cuda")
    opts = {"FWD_WS": True}

    def run(persistent):
        return af.flex_attention(q, k, v, score_mod=score, block_mask=bm, return_lse=True,
                                 kernel_options=dict(opts, PERSISTENT=persistent))  # fmt: skip

    ref_out, ref_lse = run(False)
    for _ in range(3):
        out, lse = run(True)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    exact = reference_attention(q.double(), k.double(), v.double(), score_mod=score,
                                block_mask=bm)  # fmt: skip
    assert (out.double() - exact).abs().max().item() < 2.5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="the warp-specialised forward runs on sm_90")
def test_gpu_ws_persistent_counter_in_cuda_graph():
    # the counter's zeroing is part of the captured work: every replay takes every tile
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))  # fmt: skip
    bm = af.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 4096, 4096, device="cuda")

    def run(persistent):
        return af.flex_attention(q, k, v, block_mask=bm,
                                 kernel_options={"PERSISTENT": persistent})  # fmt: skip

    ref = run(False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(True)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out = run(True)
    for _ in range(2):
        g_out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(g_out, ref)
