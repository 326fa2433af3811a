"""Train a learnable relative-position bias through attnforge's backward kernels.

A "teacher" attention layer uses a fixed relative bias ``table_true[h, q - kv]`` (a per-head
recency preference, causal mask); a "student" with the same q, k, v starts from a zero table and
fits the teacher's outputs by gradient descent.  The only learnable tensor is the bias table:
its gradient comes from the generated backward kernel (atomics into ``table.grad``).

    python examples/train_tiny.py            # CPU: Triton interpreter, tiny sizes, ~10 s
    python examples/train_tiny.py --steps 12 --check   # what the test suite runs

Shapes: q, k, v (B, H, S, D); table (H, 2 S - 1), entry ``S - 1 + d`` is the bias at
distance ``d = q_idx - kv_idx``.
"""

from __future__ import annotations

import argparse
import time

import torch

import attnforge as af

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def relative_bias(table: torch.Tensor, max_len: int):
    """A score mod reading ``table`` (captured: learnable, kernel argument, not in the key)."""

    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + (max_len - 1)]

    return rel_bias


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def teacher_table(H: int, S: int) -> torch.Tensor:
    """Head h prefers keys about 2**h positions back (a bump in relative distance)."""
    d = torch.arange(-(S - 1), S, dtype=torch.float32)
    centers = 2.0 ** torch.arange(H, dtype=torch.float32)
    return 3.0 * torch.exp(-((d[None, :] - centers[:, None]) ** 2) / 4.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--check", action="store_true", help="exit 1 unless the loss went down")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    B, H, S, D = 2, 2, 32, 16
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE) for _ in range(3))
    block_mask = af.create_block_mask(causal, None, None, S, S, device=DEVICE, BLOCK_SIZE=32)

    with torch.no_grad():
        target = af.flex_attention(
            q, k, v, score_mod=relative_bias(teacher_table(H, S).to(DEVICE), S),
            block_mask=block_mask,
        )  # fmt: skip

    table = torch.zeros(H, 2 * S - 1, device=DEVICE, requires_grad=True)
    student = relative_bias(table, S)
    opt = torch.optim.Adam([table], lr=args.lr)
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        out = af.flex_attention(q, k, v, score_mod=student, block_mask=block_mask)
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 8) == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.5f}")
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s on {DEVICE}")
    went_down = losses[-1] < 0.5 * losses[0]
    print(("loss decreased" if went_down else "loss did NOT decrease") + f": {losses[0]:.5f} -> "
          f"{losses[-1]:.5f}")  # fmt: skip
    return 0 if went_down or not args.check else 1


if __name__ == "__main__":
    raise SystemExit(main())
