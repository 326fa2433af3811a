"""The dK/dV kernel over finer block lists (``REFINE_BLOCKS``) against the block mask as given:
per-kernel GPU time of a forward+backward (torch.profiler), bench_attention's shapes and mods.

    PYTHONPATH=. python bench/exp/refine_probe.py --D 128 --variants sliding_window document
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "bench" / "exp")]

from bench_attention import allow_recompiles  # noqa: E402
from prof_bwd import kernel_times, make_inputs  # noqa: E402


def step_fn(af, inputs, bm, options):
    q, k, v, do, score_mod, _ = inputs

    def step():
        q.grad = k.grad = v.grad = None
        out = af.flex_attention(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=bm,
            enable_gqa=k.shape[1] != q.shape[1],
            kernel_options=options,
        )
        out.backward(do)  # fmt: skip

    return step


def main(argv=None) -> None:
    import attnforge as af

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--S", type=int, default=8192)
    ap.add_argument("--variants", nargs="+", default=["sliding_window", "document", "causal"])
    a = ap.parse_args(argv)
    allow_recompiles()
    for variant in a.variants:
        inputs = make_inputs(variant, 4, 16, a.S, a.D)
        bm = af.create_block_mask(inputs[5], None, None, a.S, a.S, device="cuda")
        for name, options in (("refined", None), ("as given", {"REFINE_BLOCKS": False})):
            times = kernel_times(step_fn(af, inputs, bm, options), iters=5)
            text = ", ".join(f"{n[:16]} {ms:.3f}" for n, ms in sorted(times.items()) if ms > 0.01)
            print(f"D={a.D} {variant:14s} {name:8s} total {sum(times.values()):.3f} ms: {text}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
