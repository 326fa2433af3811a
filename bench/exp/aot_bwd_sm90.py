"""Compile a bench variant's backward kernels for sm_90 on a machine without a GPU and print
registers / spills / shared memory per kernel (ptxas), as bench/exp/aot_sm90.py does for the
forward.

    python bench/exp/aot_bwd_sm90.py --variant alibi --D 128 --cfg 64,128,128,64,w8s3,a1 [--tma]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from aot_sm90 import build_sm90, slot_types  # noqa: E402

from attnforge.codegen import lower  # noqa: E402
from attnforge.dsl.api import as_mod  # noqa: E402
from attnforge.runtime import loader  # noqa: E402

_RED = re.compile(r"\bred\.global")  # not the "shared.global" of cp.async
BF16_PTRS = {"Q", "K", "V", "DO", "OUT", "DQ", "DK", "DV"}
F32_PTRS = {"LSE", "DELTA", "DLSE", "DQ_ACC"}


def arg_type(a: str, slots: dict) -> str:
    if a in BF16_PTRS:
        return "*bf16"
    if a in F32_PTRS:
        return "*fp32"
    if "NUM_BLKS" in a or a.endswith("_IDX"):
        return "*i32"
    return "fp32" if a == "sm_scale" else slots.get(a, "i32")


def sass_of(c) -> str:
    """nvdisasm of the kernel's cubin."""
    cubin = Path(tempfile.mkdtemp(prefix="aotsass")) / "k.cubin"
    cubin.write_bytes(c.asm["cubin"])
    nvdisasm = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    return subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True).stdout


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^\.(L_x_\d+):", re.M)


def loop_local_access(sass: str) -> int:
    """LDL/STL inside innermost loop bodies (a label to a branch back to it, holding no other
    such span): the spills paid every tile step; the others run once per program or head."""
    where, at = {}, 0
    insns = []
    for line in sass.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            where[m.group(1)] = at
        m = _INSN.search(line)
        if m:
            at = int(m.group(1), 16)
            insns.append((at, m.group(2)))
    spans = []
    for addr, text in insns:
        b = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", text)
        if b and where.get(b.group(1), addr + 1) <= addr:
            spans.append((where[b.group(1)], addr))
    inner = [(lo, hi) for lo, hi in spans
             if not any((a, b) != (lo, hi) and lo <= a and b <= hi for a, b in spans)]  # fmt: skip
    return sum(
        1
        for addr, text in insns
        if re.search(r"\b(LDL|STL)\b", text) and any(lo <= addr <= hi for lo, hi in inner)
    )


def dump(folder: Path, name: str, c, ptx: str, sass: str) -> None:
    """TTGIR, PTX and SASS of one kernel, for reading by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.ttgir").write_text(c.asm["ttgir"])
    (folder / f"{name}.ptx").write_text(ptx)
    (folder / f"{name}.sass").write_text(sass)


def main() -> None:
    import bench_attention as ba

    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="causal")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--cfg", default="64,128,128,64,w8s3,a1")
    ap.add_argument("--kernels", nargs="*", default=["_attn_bwd_dkdv", "_attn_bwd_dq"])
    ap.add_argument("--extra", nargs="*", default=[], help="NAME=int constexprs")
    ap.add_argument("--tma", action="store_true", help="USE_TMA: descriptor loads in the loops")
    ap.add_argument("--dump", help="write <kernel>.ttgir / .ptx / .sass into this folder")
    ap.add_argument(
        "--pos-f32",
        type=int,
        default=1,
        help="POS_F32 (0: the exact-for-any-length int subtraction)",
    )
    a = ap.parse_args()
    parts = a.cfg.split(",")
    m1, n1, m2, n2 = map(int, parts[:4])
    w, st = map(int, parts[4][1:].split("s"))
    atomic = len(parts) > 5 and parts[5] == "a1"
    score, mask, _ = ba.make_variant(a.variant, 16, 8192, "cpu")
    low = lower(as_mod(score, "score"), as_mod(mask, "mask"))
    path = Path(tempfile.mkdtemp(prefix="aotbwd")) / "bwd.py"
    path.write_text(low.files["bwd.py"])
    mod = loader.load_module(path, "aot_bwd", interpret=False)
    slots = slot_types(low)
    D = a.D
    common = dict(
        HEAD_DIM=D,
        HEAD_DIM_V=D,
        HEAD_DIM_PAD=D,
        HEAD_DIM_V_PAD=D,
        SPARSE_Q_BLOCK=128,
        SPARSE_KV_BLOCK=128,
        EVEN_Q=True,
        EVEN_KV=True,
        HAS_FULL_BLOCKS=mask is not None,
        DOT_PRECISION="tf32",
        TENSOR_GRADS=0,
        HAS_DLSE=False,
        DQ_ATOMIC=atomic,
        USE_TMA=a.tma,
        POS_F32=bool(a.pos_f32),
        DP_FIRST=False,  # launch.dp_first's default (--extra DP_FIRST=1: the other order)
    )
    for e in a.extra:
        k_, v_ = e.split("=")
        common[k_] = int(v_)
    tiles = {
        "_attn_bwd_dkdv": dict(BLOCK_M=m1, BLOCK_N=n1),
        "_attn_bwd_dq": dict(BLOCK_M=m2, BLOCK_N=n2),
    }
    for name in a.kernels:
        fn = getattr(mod, name)
        const = {**common, **tiles.get(name, {})}
        sig, constexprs, attrs = {}, {}, {}
        rows = const.get("BLOCK_M") if name == "_attn_bwd_dkdv" else const.get("BLOCK_N")
        for j, arg in enumerate(fn.arg_names):
            if arg.endswith("_DESC"):
                if a.tma:
                    sig[arg] = f"tensordesc<bf16[1,1,{rows},{D}]>"
                else:
                    sig[arg], constexprs[(j,)] = "constexpr", None
            elif arg in const:
                sig[arg], constexprs[(j,)] = "constexpr", const[arg]
            elif arg.startswith("stride_") and arg.endswith("k") and arg[-2] in "oqkvdhaibf":
                # feature strides: 1 (Triton specialises a unit stride into a constexpr)
                sig[arg], constexprs[(j,)] = "constexpr", 1
            else:
                sig[arg] = arg_type(arg, slots)
                if sig[arg].startswith("*") or arg.startswith("stride_") or arg.endswith("_LEN"):
                    attrs[(j,)] = [["tt.divisibility", 16]]
        c, ptx, regs = build_sm90(fn, sig, constexprs, attrs, w, st)
        sass = sass_of(c)
        if a.dump:
            dump(Path(a.dump), name, c, ptx, sass)
        print(
            f"{a.variant} D={D} {a.cfg} {name}: shared={c.metadata.shared} "
            f"wgmma={ptx.count('wgmma.mma_async')} atom={ptx.count('atom.global')} "
            f"red={len(_RED.findall(ptx))} tma={ptx.count('cp.async.bulk.tensor')} "
            f"cp.async={ptx.count('cp.async.cg')} i2f={ptx.count('cvt.rn.f32.s32')} "
            f"loop_ldl_stl={loop_local_access(sass)} | " + " | ".join(regs)
        )


if __name__ == "__main__":
    main()
