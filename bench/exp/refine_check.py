"""GPU check of the dK/dV kernel's finer block lists (``REFINE_BLOCKS``): gradients with and
without them, and against float64 dense attention, for the bench's sliding-window and document
masks (B=2, H=4, bf16).

    PYTHONPATH=. python bench/exp/refine_check.py --S 2048 --D 64 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_attention import make_variant  # noqa: E402


def main(argv=None) -> None:
    import attnforge as af
    from attnforge.runtime.reference import reference_attention

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--S", type=int, default=2048)
    ap.add_argument("--D", type=int, nargs="+", default=[64, 128])
    a = ap.parse_args(argv)
    for D in a.D:
        for variant in ("sliding_window", "document"):
            _, mask_mod, _ = make_variant(variant, 4, a.S, "cuda")
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, do = (torch.randn(2, 4, a.S, D, device="cuda", generator=g,
                                       dtype=torch.bfloat16) for _ in range(4))  # fmt: skip
            bm = af.create_block_mask(mask_mod, None, None, a.S, a.S, device="cuda")
            got = []
            for options in (None, {"REFINE_BLOCKS": False}):
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                af.flex_attention(*leaves, block_mask=bm, kernel_options=options).backward(do)
                got.append([t.grad.float() for t in leaves])
            leaves = [t.double().requires_grad_() for t in (q, k, v)]
            reference_attention(*leaves, block_mask=bm).backward(do.double())
            same = max((x - y).abs().max().item() for x, y in zip(*got))
            err = max((x.double() - t.grad).abs().max().item() for x, t in zip(got[0], leaves))
            ref = max((x.double() - t.grad).abs().max().item() for x, t in zip(got[1], leaves))
            print(f"D={D} {variant:14s} refined vs as given {same:.2e}; vs float64: refined "
                  f"{err:.2e}, as given {ref:.2e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
