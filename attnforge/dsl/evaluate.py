"""Evaluate an IR DAG eagerly on torch tensors (the semantics every backend must reproduce).

Used by the dense reference for text-spec variants, by the exact block-map fallback, and by tests
that check traced IR against calling the Python function.  Semantics follow torch eager:
``//`` rounds toward -inf, ``%`` takes the sign of the divisor, ``&|^~`` are logical on bools and
bitwise on ints, true division always gives a float, and tensor indices wrap when negative.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .ir import DType, Node, Op

_UNARY = {
    Op.EXP: torch.exp,
    Op.EXP2: torch.exp2,
    Op.LOG: torch.log,
    Op.LOG2: torch.log2,
    Op.TANH: torch.tanh,
    Op.SIGMOID: torch.sigmoid,
    Op.ABS: torch.abs,
    Op.SQRT: torch.sqrt,
    Op.RSQRT: torch.rsqrt,
    Op.SIN: torch.sin,
    Op.COS: torch.cos,
    Op.ERF: torch.erf,
    Op.FLOOR: torch.floor,
    Op.CEIL: torch.ceil,
}

_BINARY = {
    Op.ADD: lambda a, b: a + b,
    Op.SUB: lambda a, b: a - b,
    Op.MUL: lambda a, b: a * b,
    Op.DIV: lambda a, b: torch.true_divide(a, b),
    Op.POW: lambda a, b: torch.pow(a, b),
    Op.FLOORDIV: lambda a, b: torch.div(a, b, rounding_mode="floor"),
    Op.MOD: lambda a, b: torch.remainder(a, b),
    Op.LT: lambda a, b: a < b,
    Op.LE: lambda a, b: a <= b,
    Op.GT: lambda a, b: a > b,
    Op.GE: lambda a, b: a >= b,
    Op.EQ: lambda a, b: a == b,
    Op.NE: lambda a, b: a != b,
    Op.AND: lambda a, b: a & b,
    Op.OR: lambda a, b: a | b,
    Op.XOR: lambda a, b: a ^ b,
    Op.MIN: torch.minimum,
    Op.MAX: torch.maximum,
}

_TORCH_DTYPE = {DType.BOOL: torch.bool, DType.INT: torch.int64}


def _tensorize(x: Any, dtype: DType, float_dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x, dtype=_TORCH_DTYPE.get(dtype, float_dtype), device=device)


def evaluate(
    root: Node,
    env: Mapping[str, Any],
    params: Sequence[Any] = (),
    *,
    float_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Evaluate ``root``.

    ``env`` maps leaf names (``"score"``, ``"b"``, ``"h"``, ``"q_idx"``, ``"kv_idx"``) to tensors
    or numbers that broadcast together; ``params[i]`` is the value of parameter ``i`` (a Python
    number or a tensor).  Floats are computed in ``float_dtype``.  Always returns a tensor.
    """
    device = None
    for v in env.values():
        if isinstance(v, torch.Tensor):
            device = v.device
            break
    vals: dict[int, Any] = {}
    for n in root.walk():
        vals[id(n)] = _eval_one(n, [vals[id(s)] for s in n.src], env, params, float_dtype, device)
    return _tensorize(vals[id(root)], root.dtype, float_dtype, device)


def _eval_one(n: Node, a: list, env, params, float_dtype, device):
    op = n.op
    if op is Op.CONST:
        return n.arg
    if op in (Op.SCORE, Op.B, Op.H, Op.Q_IDX, Op.KV_IDX):
        if op.value not in env:
            raise KeyError(f"evaluate: leaf {op.value!r} has no value in env")
        return env[op.value]
    if op is Op.SCALAR:
        return params[n.arg[0]]
    if op is Op.TENSOR:
        t = params[n.arg[0]]
        if t.dtype.is_floating_point:
            t = t.to(float_dtype)
        return t.to(device) if device is not None else t
    if op is Op.LOAD:
        t, idx = a[0], a[1:]
        idx = [_tensorize(i, DType.INT, float_dtype, t.device).long() for i in idx]
        idx = torch.broadcast_tensors(*idx)
        return t[tuple(idx)]
    if op is Op.WHERE:
        c, x, y = a
        dt = n.dtype
        return torch.where(
            _tensorize(c, DType.BOOL, float_dtype, device),
            _tensorize(x, dt, float_dtype, device).to(_TORCH_DTYPE.get(dt, float_dtype)),
            _tensorize(y, dt, float_dtype, device).to(_TORCH_DTYPE.get(dt, float_dtype)),
        )
    if op is Op.CAST:
        return _tensorize(a[0], n.src[0].dtype, float_dtype, device).to(
            _TORCH_DTYPE.get(n.dtype, float_dtype)
        )
    if op is Op.NEG:
        x = a[0]
        return -x if not isinstance(x, bool) else -int(x)
    if op is Op.NOT:
        x = _tensorize(a[0], n.src[0].dtype, float_dtype, device)
        return torch.logical_not(x) if x.dtype == torch.bool else torch.bitwise_not(x)
    if op in _UNARY:
        x = _tensorize(a[0], n.src[0].dtype, float_dtype, device)
        if n.dtype is DType.FLOAT and not x.is_floating_point():
            x = x.to(float_dtype)
        return _UNARY[op](x)
    if op in _BINARY:
        x, y = a
        if op in (Op.MIN, Op.MAX, Op.FLOORDIV, Op.MOD, Op.POW) or not (
            isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor)
        ):
            x = _tensorize(x, n.src[0].dtype, float_dtype, device)
            y = _tensorize(y, n.src[1].dtype, float_dtype, device)
            want = _TORCH_DTYPE.get(n.dtype, float_dtype) if n.dtype is not DType.BOOL else None
            if want is not None and op in (Op.MIN, Op.MAX):
                x, y = x.to(want), y.to(want)
        if op is Op.DIV:
            x = _tensorize(x, n.src[0].dtype, float_dtype, device)
            if not x.is_floating_point():
                x = x.to(float_dtype)
        return _BINARY[op](x, y)
    raise NotImplementedError(f"evaluate: no rule for {op}")
