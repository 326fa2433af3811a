"""The autograd boundary: a ``torch.autograd.Function`` around the generated kernels.

``forward`` launches the forward kernel and saves ``q, k, v, out, lse`` and the captured tensors
(which are inputs of the Function, so gradients can flow to learnable biases).  Non-tensor state
(kernel modules, lowered variant, block mask, scale, GQA group, scalar values, config) travels
on ``ctx.call`` (:class:`attnforge.runtime.launch.KernelCall`).

Layout of ``ctx.saved_tensors``: ``(q, k, v, out, lse, *captured_tensors)`` with captured
tensors in kernel-slot order (``call.lowered.slots`` filtered to ``kind == "tensor"``).

``backward`` runs the generated backward kernels (:func:`attnforge.runtime.launch.launch_bwd`):
grads for q, k, v, the lse when it was returned, and every captured float tensor that requires
grad (fp32 atomics, then cast; order-dependent rounding on a GPU).  Double backward
(``create_graph=True``) raises a RuntimeError.
"""

from __future__ import annotations

import torch

from .launch import KernelCall, compile_backward_ahead, launch_bwd, launch_fwd

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
        if torch.is_grad_enabled():  # create_graph=True: the engine records this backward
            raise RuntimeError(
                "attnforge.flex_attention does not support double backward: its backward "
                "kernels are not differentiable. Compute first-order gradients without "
                "create_graph=True (or detach the attention output from the second-order path)"
            )
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        call = ctx.call
        # lse is an output only with return_lse=True; its gradient shifts delta (see bwd.py)
        d_lse = d_lse if call.return_lse else None
        needs = list(ctx.needs_input_grad[4:])
        wanted = ctx.needs_input_grad
        dq, dk, dv, grads = launch_bwd(
            call, q, k, v, out, lse, d_out, d_lse, tensors, needs, need_dq=wanted[0]
        )
        return (
            dq if wanted[0] else None,
            dk if wanted[1] else None,
            dv if wanted[2] else None,
            None,  # call
            *grads,
        )


def needs_grad(q, k, v, tensors) -> bool:
    """Some input of the call needs a gradient (else the forward skips autograd)."""
    return torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
        or any(t.requires_grad for t in tensors)
    )  # fmt: skip


def attention(call: KernelCall, q, k, v, tensors: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward through autograd only when some input needs a gradient (saves host time)."""
    if not needs_grad(q, k, v, tensors):
        return launch_fwd(call, q, k, v, tensors)
    if call.memo is not None and "bwd_ahead" not in call.memo:
        compile_backward_ahead(call, q, k, v, tensors)  # first call of a plan: compile ahead
    return FlexAttentionFunction.apply(q, k, v, call, *tensors)
