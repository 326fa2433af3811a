"""Shared plumbing for the examples: sizes, inputs, the check against the dense reference and
the timing against FlexAttention. Each example file only defines its variant.

On CPU the generated Triton kernels run under the Triton interpreter, so sizes are small
(seconds); ``--small`` shrinks them further (the test suite uses it). On a GPU the examples use
bf16 at a benchmark-like size and also time torch.compile(flex_attention) on the same mods.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

import attnforge as af

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = "--small" in sys.argv[1:]


@dataclass(frozen=True)
class Shape:
    """B batch, H heads, L query length, S key length, D head dim."""

    B: int
    H: int
    L: int
    S: int
    D: int
    dtype: torch.dtype


def default_shape() -> Shape:
    if DEVICE == "cuda":
        return Shape(4, 16, 4096, 4096, 64, torch.bfloat16)
    if SMALL:
        return Shape(1, 2, 128, 128, 16, torch.float32)
    return Shape(1, 2, 256, 256, 32, torch.float32)


SHAPE = default_shape()


def square(n: int) -> Shape:
    """SHAPE with L = S = n (for variants whose length is fixed by a canvas or documents)."""
    return replace(SHAPE, L=n, S=n)


def make_qkv(shape: Shape = SHAPE, requires_grad: bool = False, seed: int = 0):
    """Random q (B,H,L,D), k and v (B,H,S,D) on DEVICE."""
    gen = torch.Generator().manual_seed(seed)

    def rand(n):
        t = torch.randn(shape.B, shape.H, n, shape.D, generator=gen, dtype=torch.float32)
        return t.to(DEVICE, shape.dtype).requires_grad_(requires_grad)

    return rand(shape.L), rand(shape.S), rand(shape.S)


def mods_of(attn):
    """(score_mod, mask_mod) of a variant (``af.variant`` or a ``parse_spec`` entry)."""
    return getattr(attn, "score_mod", None), getattr(attn, "mask_mod", None)


def reference(attn, q, k, v):
    """The float64 dense reference for the variant ``attn`` on q, k, v."""
    score_mod, mask_mod = mods_of(attn)
    return af.reference_attention(
        q.double(), k.double(), v.double(), score_mod=score_mod, mask_mod=mask_mod
    )


def _print_error(what: str, got: torch.Tensor, want: torch.Tensor) -> float:
    err = (got.double() - want.double()).abs().max().item()
    print(f"max error vs reference{what}: {err:.2e}")
    return err


def max_error(attn, q, k, v) -> float:
    """Run ``attn`` and the float64 dense reference on the same inputs; print the max error."""
    return _print_error("", attn(q, k, v), reference(attn, q, k, v))


def max_grad_error(attn, q, k, v, learnable: dict[str, torch.Tensor]) -> float:
    """Backward through ``attn`` and the reference; print the error of each captured grad."""
    grads = {}
    for who, fn in (("ours", attn), ("ref", lambda *t: reference(attn, *t))):
        for t in learnable.values():
            t.grad = None
        fn(q, k, v).sum().backward()
        grads[who] = {name: t.grad.clone() for name, t in learnable.items()}
    return max(
        _print_error(f" ({name}.grad)", grads["ours"][name], grads["ref"][name])
        for name in learnable
    )


# -- timing against FlexAttention -----------------------------------------------------------------


def _python_fn(mod):
    """The plain FlexAttention-style function behind an attnforge mod (torch's flex traces it)."""
    return mod.fn


def _flex(score_mod, mask_mod, shape: Shape):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(
            _python_fn(mask_mod), shape.B, shape.H, shape.L, shape.S, device=DEVICE
        )
    compiled = torch.compile(flex_attention)
    fn = _python_fn(score_mod) if score_mod is not None else None
    return lambda q, k, v: compiled(q, k, v, score_mod=fn, block_mask=block_mask)


def _time_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _step(fwd, q, k, v, backward: bool):
    if not backward:
        return lambda: fwd(q, k, v)

    def run():
        fwd(q, k, v).sum().backward()

    return run


def compare_with_flex(attn, shape: Shape = SHAPE, backward: bool = False) -> None:
    """On a GPU: time attnforge and compiled FlexAttention on the same mods and print both."""
    if DEVICE != "cuda":
        return
    score_mod, mask_mod = mods_of(attn)
    if any(m is not None and getattr(m, "fn", None) is None for m in (score_mod, mask_mod)):
        print("(text-spec variant: no Python function to hand to FlexAttention; not timed)")
        return
    q, k, v = make_qkv(shape, requires_grad=backward)
    what = "fwd+bwd" if backward else "fwd"
    head = f"{what} B={shape.B} H={shape.H} L={shape.L} S={shape.S} D={shape.D} {shape.dtype}:"
    ours = _time_ms(_step(attn, q, k, v, backward))
    try:
        theirs = _time_ms(_step(_flex(score_mod, mask_mod, shape), q, k, v, backward))
    except Exception as e:  # e.g. Inductor finds no flex config that fits in shared memory
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160]}"
        print(f"{head} attnforge {ours:.3f} ms | FlexAttention (compiled) failed: {reason}")
        return
    print(
        f"{head} attnforge {ours:.3f} ms | FlexAttention (compiled) {theirs:.3f} ms | "
        f"speedup {theirs / ours:.2f}x"
    )


def check_shape(shape: Shape = SHAPE) -> Shape:
    """The float64 reference materialises (B, H, L, S): check one batch, two heads on a GPU."""
    return shape if DEVICE == "cpu" else replace(shape, B=1, H=min(shape.H, 2))


def banner(name: str) -> None:
    print(f"== {name} on {DEVICE} ({'Triton interpreter' if DEVICE == 'cpu' else 'GPU'}) ==")


def run(name: str, attn, shape: Shape = SHAPE) -> float:
    """The whole demo of one example: error vs the reference, then (GPU) timing vs flex."""
    banner(name)
    err = max_error(attn, *make_qkv(check_shape(shape)))
    compare_with_flex(attn, shape)
    return err
