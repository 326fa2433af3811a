"""Sweep attnforge tile configs against FlexAttention (torch.compile) and cuDNN on the GPU.

One process, same inputs for every implementation; each config is checked against flex
(max |out - flex|, and the gradients for backward configs) before it is timed.

    python bench/tune.py --D 64 128 --variants noop causal softcap \\
        --fwd 128x64w8s3 128x128w8s3 --bwd 32,128,128,32,w8s2 64,128,128,64,w8s3
    python bench/tune.py --template bench/exp/fwd_v0.py.tmpl ...   # A/B a template copy

Forward configs are ``BMxBNwWsS[,tma|,notma]`` (``,tma``/``,notma``: ``USE_TMA`` on/off);
backward ``M1,N1,M2,N2,wWsS[/wWsS][,a0|a1][,dp0|dp1][,tma|notma]`` (kernel_options keys;
``wWsS/wWsS``: the dK/dV kernel's warps and stages, then the dQ kernel's (``num_warps1``,
``num_stages1``); ``a1``/``a0``: ``DQ_ATOMIC`` True/False; ``dp1``/``dp0``: ``DP_FIRST``, the
dK/dV step order; ``,tma``/``,notma``: ``USE_TMA``; flags alone keep the default tiles).
A trailing ``,gN`` (or ``gN`` alone) sets ``HEAD_GROUP=N``, the program order.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def parse_fwd(s: str) -> dict:
    s, group = _head_group(s)
    m = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)((?:,tma|,notma)?)", s)
    if not m:
        raise SystemExit(
            f"bad forward config {s!r}: want BMxBNwWsS[,tma|,notma][,gN], "
            "e.g. 128x64w8s3 or 128x128w8s3,tma"
        )
    bm, bn, w, st = map(int, m.groups()[:4])
    opts = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, **group)
    flags = m.group(5).split(",")
    if "tma" in flags or "notma" in flags:  # USE_TMA on/off (else the default)
        opts["USE_TMA"] = "tma" in flags
    return opts


def _head_group(s: str) -> tuple[str, dict]:
    """A trailing ``,gN`` sets ``HEAD_GROUP=N`` (program order); ``gN`` alone: only that."""
    m = re.fullmatch(r"(.*?),?g(\d+)", s)
    return (m.group(1), {"HEAD_GROUP": int(m.group(2))}) if m else (s, {})


def parse_bwd(s: str) -> dict:
    """``M1,N1,M2,N2,wWsS[/wWsS]`` then flags, any of them alone keeping the default tiles:
    ``a0|a1`` (DQ_ATOMIC), ``tma|notma`` (USE_TMA), ``dp0|dp1`` (DP_FIRST), ``gN``
    (HEAD_GROUP).  ``wWsS/wWsS``: the dK/dV kernel's warps/stages, then the dQ kernel's."""
    opts: dict = {}
    parts = s.split(",") if s else []
    flags = {
        "a0": ("DQ_ATOMIC", False),
        "a1": ("DQ_ATOMIC", True),
        "tma": ("USE_TMA", True),
        "notma": ("USE_TMA", False),
        "dp0": ("DP_FIRST", False),
        "dp1": ("DP_FIRST", True),
    }
    while parts and (parts[-1] in flags or re.fullmatch(r"g\d+", parts[-1])):
        flag = parts.pop()
        key, value = flags[flag] if flag in flags else ("HEAD_GROUP", int(flag[1:]))
        opts.setdefault(key, value)
    if not parts:
        return opts
    m = re.fullmatch(r"(\d+),(\d+),(\d+),(\d+),w(\d+)s(\d+)(?:/w(\d+)s(\d+))?", ",".join(parts))
    if not m:
        raise SystemExit(
            f"bad backward config {s!r}: want M1,N1,M2,N2,wWsS[/wWsS][,a0|a1][,dp0|dp1]"
            "[,tma|notma][,gN]"
        )
    m1, n1, m2, n2, w, st = map(int, m.groups()[:6])
    opts.update(BLOCK_M1=m1, BLOCK_N1=n1, BLOCK_M2=m2, BLOCK_N2=n2, num_warps=w, num_stages=st)
    if m.group(7) is not None:  # w4s2/w8s3: dK/dV's, then dQ's
        opts.update(num_warps1=w, num_stages1=st, num_warps=int(m.group(7)))
        opts["num_stages"] = int(m.group(8))
    return opts


def use_template(path: str) -> None:
    """Generate kernels from a copy of fwd.py.tmpl (A/B runs); the disk cache is bypassed
    because its key does not see the swap."""
    import attnforge.codegen.emit as emit

    os.environ["ATTNFORGE_DISABLE_CACHE"] = "1"
    real = emit.template
    text = Path(path).read_text()
    emit.template = lambda name: text if name == "fwd.py.tmpl" else real(name)


def run_case(args, D, var, flex_c, table):
    """Baselines, then every forward and backward config, for one (D, variant)."""
    from bench_attention import bench_ms, flops, make_variant
    from torch.nn.attention.flex_attention import create_block_mask as t_cbm

    import attnforge as af

    B, H, S, dev = args.B, args.H, args.S, "cuda"
    torch.manual_seed(0)
    Hkv = 4 if var == "gqa_causal" else H
    q = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(2)
    )
    do = torch.randn_like(q)
    score_mod, mask_mod, sdpa_kw = make_variant(var, H, S, dev)
    bm = af.create_block_mask(mask_mod, None, None, S, S, device=dev) if mask_mod else None
    tbm = t_cbm(mask_mod, None, None, S, S, device=dev) if mask_mod else None
    density = 1.0 - bm.sparsity() / 100.0 if bm is not None else 1.0
    f_fl, b_fl = flops(B, H, S, D, density)

    def flex(q_, k_, v_):
        return flex_c(q_, k_, v_, score_mod=score_mod, block_mask=tbm, enable_gqa=Hkv != H)

    ref = flex(q, k, v)
    ref.backward(do)
    ref_g = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None

    def timed(name, fn, with_bwd):
        with torch.no_grad():
            f_ms = bench_ms(lambda: fn(q, k, v))
        b_tf = None
        if with_bwd:

            def fb():
                for t in (q, k, v):
                    t.grad = None
                fn(q, k, v).backward(do)

            b_tf = b_fl / max(bench_ms(fb) - f_ms, 1e-6) / 1e9
        row = (D, var, name, f_fl / f_ms / 1e9, b_tf)
        table.append(row)
        bs = f"{b_tf:6.1f}" if b_tf else "     -"
        print(f"D={D} {var:8s} {name:34s} fwd {row[3]:6.1f} bwd {bs} TF/s", flush=True)

    if "flex" in args.baselines:
        timed("flex", flex, bool(args.bwd))
    if "cudnn" in args.baselines and sdpa_kw is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn(q_, k_, v_):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    q_, k_, v_, enable_gqa=Hkv != H, **sdpa_kw
                )

        timed("cudnn", cudnn, bool(args.bwd))

    def af_with(opts):
        return lambda q_, k_, v_: af.flex_attention(
            q_, k_, v_, score_mod=score_mod, block_mask=bm, kernel_options=opts, enable_gqa=Hkv != H
        )

    for fc in args.fwd:
        af_fwd = af_with(
            (parse_fwd(fc) if not fc.startswith("g") else _head_group(fc)[1]) if fc else None
        )
        try:
            with torch.no_grad():
                err = (af_fwd(q, k, v).float() - ref.float()).abs().max().item()
            timed(f"af fwd {fc or 'default'} err {err:.1e}", af_fwd, False)
        except Exception as e:
            print(f"D={D} {var} fwd {fc}: FAILED {type(e).__name__}: {e}"[:300])
    for bc in args.bwd:
        af_fb = af_with(parse_bwd(bc) or None)
        try:
            for t in (q, k, v):  # the baselines' timing loops leave their grads
                t.grad = None
            af_fb(q, k, v).backward(do)
            # relative: dK of the first keys of a causal mask sums thousands of rows
            gerr = max(((t.grad.float() - g.float()).abs().max()
                        / g.float().abs().max()).item()
                       for t, g in zip((q, k, v), ref_g))  # fmt: skip
            for t in (q, k, v):
                t.grad = None
            timed(f"af bwd {bc or 'default'} rel gerr {gerr:.1e}", af_fb, True)
        except Exception as e:
            print(f"D={D} {var} bwd {bc}: FAILED {type(e).__name__}: {e}"[:300])
    torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", nargs="*", default=["noop", "causal", "softcap"])
    ap.add_argument("--D", nargs="*", type=int, default=[128])
    ap.add_argument("--S", type=int, default=8192)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--fwd", nargs="*", default=[""], help="forward configs ('' = default)")
    ap.add_argument("--bwd", nargs="*", default=[], help="backward configs ('' = default)")
    ap.add_argument("--baselines", nargs="*", default=["flex", "cudnn"])
    ap.add_argument("--template", default=None)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.template:
        use_template(args.template)

    from bench_attention import allow_recompiles
    from torch.nn.attention.flex_attention import flex_attention as t_flex

    allow_recompiles()
    flex_c = torch.compile(t_flex, dynamic=False)
    table = []
    for D in args.D:
        for var in args.variants:
            run_case(args, D, var, flex_c, table)
    print(f"\n== summary {args.tag} (TF/s) ==")
    for D, var, name, f, b in table:
        print(f"{D:4d} {var:8s} {name:40s} {f:6.1f} {b if b is None else round(b, 1)}")


if __name__ == "__main__":
    main()
