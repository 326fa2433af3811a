"""The autograd boundary: a ``torch.autograd.Function`` around the generated kernels.

``forward`` launches the forward kernel and saves ``q, k, v, out, lse`` and the captured tensors
(which are inputs of the Function, so gradients can flow to learnable biases).  Non-tensor state
(kernel modules, lowered variant, block mask, scale, GQA group, scalar values, config) travels
on ``ctx.call`` (:class:`attnforge.runtime.launch.KernelCall`).

Layout of ``ctx.saved_tensors``: ``(q, k, v, out, lse, *captured_tensors)`` with captured
tensors in kernel-slot order (``call.lowered.slots`` filtered to ``kind == "tensor"``).
"""

from __future__ import annotations

import torch

from .launch import KernelCall, launch_fwd

__all__ = ["FlexAttentionFunction", "attention"]


class FlexAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: KernelCall, *tensors):
        out, lse = launch_fwd(call, q, k, v, list(tensors))
        ctx.save_for_backward(q, k, v, out, lse, *tensors)
        ctx.call = call
        if not call.return_lse:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        raise NotImplementedError(
            "attnforge: backward kernels are not available yet (issue 6); call flex_attention "
            "under torch.no_grad() or with inputs that do not require grad"
        )


def attention(call: KernelCall, q, k, v, tensors: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward through autograd only when some input needs a gradient (saves host time)."""
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
        or any(t.requires_grad for t in tensors)
    )  # fmt: skip
    if not needs_grad:
        return launch_fwd(call, q, k, v, tensors)
    return FlexAttentionFunction.apply(q, k, v, call, *tensors)
