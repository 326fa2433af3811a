"""Compile a variant's forward kernel for sm_90 on a machine without a GPU and print what the
PTX/ptxas say (warp specialisation applied? registers, spills, shared memory).

    python bench/exp/aot_sm90.py --variant causal --D 128 --cfg 128x128w4s2 --tma

Triton's real specialisation is reproduced: 16-divisible pointers/strides and ==1 inner strides
(without them the PTX is unrepresentative: scalar loads, no pipelining).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnforge.codegen import lower  # noqa: E402
from attnforge.dsl.api import as_mod  # noqa: E402

# kernel argument types of captured values (``Lowered.slots``), by slot kind and dtype
CUBIN = "/tmp/aot_sm90.cubin"  # the last ptxas output (nvdisasm -c it for SASS)
PTR = {"float32": "*fp32", "int64": "*i64", "int32": "*i32", "bool": "*i1"}
SCALAR = {"float": "fp32", "int": "i32", "bool": "i1"}


def slot_types(low) -> dict[str, str]:
    return {s.name: PTR[s.dtype] if s.kind == "tensor" else SCALAR[s.dtype] for s in low.slots}


def build_sm90(
    fn, sig: dict, consts: dict, attrs: dict, num_warps: int, num_stages: int, extra=None
):
    """``triton.compile`` for sm_90 and ``ptxas -v`` on its PTX: (compiled kernel, PTX, the
    ptxas lines on registers and spills)."""
    c = triton.compile(
        ASTSource(fn, sig, consts, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages, **(extra or {})},
    )
    ptx = c.asm["ptx"]
    return c, ptx, ptxas_lines(ptx)


def ptxas_lines(ptx: str) -> list[str]:
    """``ptxas -v`` for sm_90a on a PTX text: its lines on registers and spills."""
    ptx_path = Path(tempfile.mkdtemp(prefix="aot")) / "k.ptx"
    ptx_path.write_text(ptx)
    bin_dir = Path(triton.__file__).parent / "backends/nvidia/bin"
    # Triton >= 3.7 ships the sm_90 ptxas as ptxas-blackwell (its plain ptxas is older)
    ptxas = max(bin_dir.glob("ptxas*"), key=lambda p: p.name.endswith("blackwell"))
    r = subprocess.run(
        [str(ptxas), "-arch=sm_90a", "-v", str(ptx_path), "-o", CUBIN],
        capture_output=True,
        text=True,
    )
    return [
        ln.strip()
        for ln in r.stderr.splitlines()
        if "registers" in ln or "spill" in ln or "fatal" in ln
    ]


MODS = {
    "noop": (None, None),
    "causal": (None, lambda b, h, q, kv: q >= kv),
    "softcap": (lambda s, b, h, q, kv: 30.0 * torch.tanh(s / 30.0), lambda b, h, q, kv: q >= kv),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="causal", help=f"{sorted(MODS)} or a bench variant")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--cfg", default="128x128w8s3")
    ap.add_argument("--tma", action="store_true")
    ap.add_argument("--maxnreg", type=int, default=None, help="ptxas register cap per thread")
    ap.add_argument("--ptx", help="write the PTX here")
    ap.add_argument("--full", type=int, default=None, help="HAS_FULL_BLOCKS (default: masked)")
    ap.add_argument(
        "--pos-f32",
        type=int,
        default=1,
        help="POS_F32 (0: the exact-for-any-length int subtraction)",
    )
    a = ap.parse_args()
    bm, bn, w, st = map(int, re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", a.cfg).groups())
    if a.variant in MODS:
        score, mask = MODS[a.variant]
    else:  # bench_attention's variants (alibi, document, ...): captured tensors live on the CPU
        import bench_attention as ba

        score, mask, _ = ba.make_variant(a.variant, 16, 8192, "cpu")
    low = lower(as_mod(score, "score"), as_mod(mask, "mask"))
    slot_t = slot_types(low)
    src = low.files["fwd.py"]
    tmp = Path(tempfile.mkdtemp(prefix="aotfwd"))
    path = tmp / "aot_fwd_kernel.py"
    path.write_text(src)
    import importlib.util

    spec = importlib.util.spec_from_file_location("aot_fwd_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = mod._attn_fwd
    D = a.D
    desc = f"tensordesc<bf16[1,1,{bn},{D}]>"
    sig, consts, attrs = {}, {}, {}
    ptr_names = {
        "Q",
        "K",
        "V",
        "OUT",
        "LSE",
        "KV_NUM_BLKS",
        "KV_IDX",
        "FULL_KV_NUM_BLKS",
        "FULL_KV_IDX",
    }
    full = (mask is not None) if a.full is None else bool(a.full)
    cx = dict(
        HEAD_DIM=D,
        HEAD_DIM_V=D,
        HEAD_DIM_PAD=D,
        HEAD_DIM_V_PAD=D,
        BLOCK_M=bm,
        BLOCK_N=bn,
        SPARSE_Q_BLOCK=128,
        SPARSE_KV_BLOCK=128,
        EVEN_KV=True,
        HAS_FULL_BLOCKS=full,
        DOT_PRECISION="tf32",
        SCALE_FOLDED=score is None,
        USE_TMA=a.tma,
        POS_F32=bool(a.pos_f32),
    )
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            sig[name] = "constexpr"
            consts[name] = cx[name]
        elif name in ("Q_DESC", "K_DESC", "V_DESC"):
            if a.tma:
                sig[name] = desc.replace(f"[1,1,{bn},", f"[1,1,{bm},") if name == "Q_DESC" else desc
            else:
                sig[name] = "constexpr"
                consts[name] = None
        elif name in ptr_names:
            sig[name] = (
                "*fp32" if name == "LSE" else "*i32" if "NUM" in name or "IDX" in name else "*bf16"
            )
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in slot_t:
            sig[name] = slot_t[name]
        elif name == "sm_scale":
            sig[name] = "fp32"
        elif (
            name.endswith("k")
            and name.startswith("stride_")
            or name in ("stride_bin", "stride_fin", "stride_bnm", "stride_fnm")
        ):
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if name.startswith("stride_") or name in ("Q_LEN", "KV_LEN"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    extra = {"maxnreg": a.maxnreg} if a.maxnreg else None
    c, ptx, ptxas_lines = build_sm90(fn, sig, consts, attrs, w, st, extra)
    if a.ptx:
        Path(a.ptx).write_text(ptx)
    print(
        f"{a.variant} D={D} {a.cfg} tma={a.tma}: warps={c.metadata.num_warps} "
        f"shared={c.metadata.shared} setmaxnreg={ptx.count('setmaxnreg')} "
        f"wgmma={ptx.count('wgmma.mma_async')} tma_loads={ptx.count('cp.async.bulk.tensor')} "
        f"cp.async={ptx.count('cp.async.cg')} i2f={ptx.count('cvt.rn.f32.s32')}"
    )
    for line in ptxas_lines:
        print("  ", line)


if __name__ == "__main__":
    main()
