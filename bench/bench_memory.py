"""Peak GPU memory of forward + backward, attnforge vs FlexAttention (compiled), at long lengths.

    python bench/bench_memory.py            # S=32768, B=1, H=16, D=128, bf16, causal + alibi

Prints a table and writes bench/results/memory_<gpu>_<yyyymmdd>.json. The inputs and their
gradients are allocated before the measured region, so the figure is the extra memory the
attention call itself needs (O(L*S) buffers would show up as gigabytes here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_extra_mib(fn, q, k, v, do) -> float:
    for t in (q, k, v):
        t.grad = torch.zeros_like(t)
    fn(q, k, v).backward(do)  # warm-up: compile, autotune, caches
    torch.cuda.synchronize()
    for t in (q, k, v):
        t.grad.zero_()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(q, k, v).backward(do)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=32768)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    args = ap.parse_args(argv)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import attnforge as af

    B, H, S, D = args.B, args.H, args.S, args.D
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device=dev) / H)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    flex_c = torch.compile(flex_attention)
    rows = []
    for name, score in (("causal", None), ("alibi_causal", alibi)):
        abm = af.create_block_mask(causal, None, None, S, S, device=dev)
        tbm = create_block_mask(causal, None, None, S, S, device=dev)
        impls = {
            "attnforge": lambda q_, k_, v_, s=score, bm=abm: af.flex_attention(
                q_, k_, v_, s, block_mask=bm
            ),
            "flex": lambda q_, k_, v_, s=score, bm=tbm: flex_c(q_, k_, v_, s, block_mask=bm),
        }
        for impl, fn in impls.items():
            mib = peak_extra_mib(fn, q, k, v, do)
            rows.append(dict(variant=name, impl=impl, B=B, H=H, S=S, D=D, peak_extra_mib=mib))
            print(f"{name:14s} {impl:10s} fwd+bwd peak extra {mib:9.1f} MiB", flush=True)
    io_mib = 4 * q.numel() * q.element_size() / 2**20
    print(
        f"(for scale: q, k, v, out together are {io_mib:.0f} MiB; one fp32 score matrix "
        f"would be {B * H * S * S * 4 / 2**30:.0f} GiB)"
    )
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    stamp = datetime.date.today().strftime("%Y%m%d")
    out = ROOT / "bench" / "results" / f"memory_{gpu}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
