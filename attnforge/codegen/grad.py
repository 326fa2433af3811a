"""Symbolic derivatives of a score mod, as IR, for the backward kernels.

A score mod maps the scaled logit ``score`` (and the indices, captured scalars and captured
tensors) to the logit ``T`` that enters the softmax.  The backward kernel knows ``dL/dT`` per
element (``dT = P * (dP - delta)``) and needs

* ``d_score = dT/dscore``, to form ``dS = dT * d_score`` for dQ and dK, and
* for every read ``tensor[i0, i1, ...]`` of a captured float tensor, ``d_load = dT/d(read)``:
  the kernel scatters ``dT * d_load`` into ``grad_tensor[i0, i1, ...]`` with atomics.

Both are float IR in terms of the same leaves as the mod, built by reverse-mode accumulation over
the DAG with a table of local partials per :class:`Op`, then simplified while being built
(constant folding, ``x*1``, ``x*0 -> 0``, ``x+0``).  Reads of the same tensor at different indices
are different ``LOAD`` nodes, so each gets its own contribution; the same read used twice is one
node and its uses are summed.

Non-differentiable parts (comparisons, floor/ceil, integer arithmetic, masks) contribute nothing.
``where`` routes the adjoint with a select, never a multiplication by a 0/1 mask, so a branch
holding ``-inf`` (``where(cond, score, -inf)``) yields an exact zero instead of ``0 * inf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..dsl.ir import DType, Node, Op, const, node, toposort

__all__ = ["ScoreGrad", "differentiate", "float_loads"]

_LN2 = math.log(2.0)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


@dataclass(frozen=True)
class ScoreGrad:
    """Derivatives of one score mod.

    ``d_score``: dT/dscore.  ``d_loads``: ``(load_node, dT/d(load))`` for each distinct read of a
    captured float tensor, in topological order of the mod (deterministic).
    """

    d_score: Node
    d_loads: tuple[tuple[Node, Node], ...]

    def tensor_indices(self) -> list[int]:
        """Parameter indices of the tensors that receive gradients (sorted, unique)."""
        return sorted({load.src[0].arg[0] for load, _ in self.d_loads})


# -- simplifying constructors ------------------------------------------------------------------


def _is_const(n: Node, value=None) -> bool:
    return n.op is Op.CONST and (value is None or n.arg == value)


def _fold(op: Op, *src: Node) -> Node:
    """Evaluate an op whose operands are all constants, keeping the IR dtype of the result."""
    import torch

    from ..dsl.evaluate import evaluate

    n = node(op, *src)
    v = evaluate(n, {}, (), float_dtype=torch.float64).item()
    if n.dtype is DType.FLOAT:
        return const(float(v))
    if n.dtype is DType.INT:
        return const(int(v))
    return const(bool(v))


def _to_float(n: Node) -> Node:
    if n.dtype is DType.FLOAT:
        return n
    if n.op is Op.CONST:
        return const(float(n.arg))
    return node(Op.CAST, n, arg=DType.FLOAT)


def f(x: float | Node) -> Node:
    return x if isinstance(x, Node) else const(float(x))


def add(a: Node, b: Node) -> Node:
    if _is_const(a, 0):
        return _to_float(b)
    if _is_const(b, 0):
        return _to_float(a)
    if a.op is Op.CONST and b.op is Op.CONST:
        return _fold(Op.ADD, a, b)
    if b.op is Op.NEG:
        return sub(a, b.src[0])
    return node(Op.ADD, a, b)


def sub(a: Node, b: Node) -> Node:
    if _is_const(b, 0):
        return _to_float(a)
    if _is_const(a, 0):
        return neg(b)
    if a.op is Op.CONST and b.op is Op.CONST:
        return _fold(Op.SUB, a, b)
    if b.op is Op.NEG:
        return add(a, b.src[0])
    return node(Op.SUB, a, b)


def neg(a: Node) -> Node:
    if a.op is Op.CONST:
        return _fold(Op.NEG, a)
    if a.op is Op.NEG:
        return a.src[0]
    return node(Op.NEG, a)


def mul(a: Node, b: Node) -> Node:
    # x*0 -> 0 on purpose: a structurally zero partial must stay zero even where x is inf.
    if _is_const(a, 0) or _is_const(b, 0):
        return const(0.0)
    if _is_const(a, 1):
        return _to_float(b)
    if _is_const(b, 1):
        return _to_float(a)
    if _is_const(a, -1):
        return neg(_to_float(b))
    if _is_const(b, -1):
        return neg(_to_float(a))
    if a.op is Op.CONST and b.op is Op.CONST:
        return _fold(Op.MUL, a, b)
    if b.op is Op.CONST:  # constants first: c * x reads better and folds with c2 * (c * x)
        a, b = b, a
    if a.op is Op.CONST and b.op is Op.MUL and b.src[0].op is Op.CONST:
        return mul(_fold(Op.MUL, a, b.src[0]), b.src[1])
    if a.op is Op.NEG and b.op is Op.NEG:
        return mul(a.src[0], b.src[0])
    return node(Op.MUL, a, b)


def div(a: Node, b: Node) -> Node:
    if _is_const(a, 0):
        return const(0.0)
    if _is_const(b, 1):
        return _to_float(a)
    if a.op is Op.CONST and b.op is Op.CONST:
        return _fold(Op.DIV, a, b)
    if b.op is Op.CONST and b.arg != 0 and a.op is Op.MUL and a.src[0].op is Op.CONST:
        return mul(_fold(Op.DIV, a.src[0], b), a.src[1])  # (c1 * x) / c2 -> (c1 / c2) * x
    return node(Op.DIV, a, b)


def where(c: Node, a: Node, b: Node) -> Node:
    a, b = _to_float(a), _to_float(b)
    if a is b:
        return a
    if c.op is Op.CONST:
        return a if c.arg else b
    return node(Op.WHERE, c, a, b)


def pow_(a: Node, b: Node) -> Node:
    if _is_const(b, 1):
        return _to_float(a)
    if _is_const(b, 0):
        return const(1.0)
    return bin_(Op.POW, a, b)


def un(op: Op, a: Node) -> Node:
    if a.op is Op.CONST:
        return _fold(op, a)
    return node(op, a)


def bin_(op: Op, a: Node, b: Node) -> Node:
    if a.op is Op.CONST and b.op is Op.CONST:
        return _fold(op, a, b)
    return node(op, a, b)


# -- local partials ------------------------------------------------------------------------------
# Each rule takes the node ``n`` (its operands in ``n.src``) and the adjoint ``g`` of ``n`` and
# returns the adjoint contribution for each operand (``None`` where there is none).

Rule = Callable[[Node, Node], tuple]


def _sign(x: Node) -> Node:
    # torch's abs backward uses sign(x): 0 at 0
    return where(bin_(Op.GT, x, const(0)), f(1), where(bin_(Op.LT, x, const(0)), f(-1), f(0)))


def _pow_rule(n: Node, g: Node) -> tuple:
    a, b = n.src
    # a ** b: d/da = b * a ** (b - 1) (0 where b == 0, as torch); d/db = a ** b * log(a)
    # (0 where a == 0 and b >= 0, as torch, so 0 ** b does not give 0 * -inf).
    if _is_const(b):
        da = mul(g, mul(b, pow_(a, _fold(Op.SUB, b, const(1)))))
    else:
        da = where(bin_(Op.EQ, b, const(0)), f(0), mul(g, mul(b, pow_(a, sub(b, const(1))))))
    zero_base = bin_(Op.AND, bin_(Op.EQ, a, const(0)), bin_(Op.GE, b, const(0)))
    db = where(zero_base, f(0), mul(g, mul(n, un(Op.LOG, a))))
    return da, db


def _minmax_rule(n: Node, g: Node) -> tuple:
    # torch.minimum / maximum: the winner gets the gradient, a tie splits it in half
    a, b = n.src
    wins = Op.LT if n.op is Op.MIN else Op.GT
    half = mul(f(0.5), g)
    da = where(bin_(wins, a, b), g, where(bin_(Op.EQ, a, b), half, f(0)))
    db = where(bin_(wins, b, a), g, where(bin_(Op.EQ, a, b), half, f(0)))
    return da, db


_RULES: dict[Op, Rule] = {
    Op.ADD: lambda n, g: (g, g),
    Op.SUB: lambda n, g: (g, neg(g)),
    Op.MUL: lambda n, g: (mul(g, n.src[1]), mul(g, n.src[0])),
    Op.DIV: lambda n, g: (div(g, n.src[1]), neg(div(mul(g, n), n.src[1]))),
    Op.NEG: lambda n, g: (neg(g),),
    Op.POW: _pow_rule,
    Op.WHERE: lambda n, g: (None, where(n.src[0], g, f(0)), where(n.src[0], f(0), g)),
    Op.EXP: lambda n, g: (mul(g, n),),
    Op.EXP2: lambda n, g: (mul(g, mul(f(_LN2), n)),),
    Op.LOG: lambda n, g: (div(g, n.src[0]),),
    Op.LOG2: lambda n, g: (div(g, mul(f(_LN2), n.src[0])),),
    Op.TANH: lambda n, g: (mul(g, sub(f(1), mul(n, n))),),
    Op.SIGMOID: lambda n, g: (mul(g, mul(n, sub(f(1), n))),),
    Op.ABS: lambda n, g: (mul(g, _sign(n.src[0])),),
    Op.SQRT: lambda n, g: (div(mul(f(0.5), g), n),),
    Op.RSQRT: lambda n, g: (mul(mul(f(-0.5), g), mul(n, mul(n, n))),),
    Op.SIN: lambda n, g: (mul(g, un(Op.COS, n.src[0])),),
    Op.COS: lambda n, g: (neg(mul(g, un(Op.SIN, n.src[0]))),),
    Op.ERF: lambda n, g: (
        mul(mul(f(_TWO_OVER_SQRT_PI), g), un(Op.EXP, neg(mul(n.src[0], n.src[0])))),
    ),
    Op.MIN: _minmax_rule,
    Op.MAX: _minmax_rule,
    Op.CAST: lambda n, g: (g,),  # only float -> float casts are active (see _active)
}

# Piecewise-constant or non-float ops: their partials are zero, so they stop the chain.
_ZERO = frozenset({Op.FLOOR, Op.CEIL})


def _active(root: Node) -> set[int]:
    """ids of float nodes whose value depends on ``score`` or on a float tensor read."""
    active: set[int] = set()
    for n in toposort([root]):
        if n.dtype is not DType.FLOAT or n.op in _ZERO:
            continue
        if n.op is Op.SCORE or (n.op is Op.LOAD and n.src[0].dtype is DType.FLOAT):
            active.add(id(n))
        elif n.op is Op.CAST and n.src[0].dtype is not DType.FLOAT:
            continue
        elif n.op is not Op.LOAD and any(id(s) in active for s in n.src):
            active.add(id(n))
    return active


def differentiate(root: Node) -> ScoreGrad:
    """Reverse-mode derivatives of the score mod ``root`` (see the module docstring)."""
    if root.dtype is not DType.FLOAT:
        raise ValueError(
            f"differentiate: a score mod must return a float, got {root.dtype.value}; "
            "fix: return a float expression of score (e.g. score + bias)"
        )
    active = _active(root)
    order = [n for n in toposort([root]) if id(n) in active]
    adj: dict[int, Node] = {id(root): const(1.0)}
    for n in reversed(order):
        g = adj.get(id(n))
        if g is None or n.op in (Op.SCORE, Op.LOAD):
            continue
        rule = _RULES.get(n.op)
        if rule is None:
            raise NotImplementedError(
                f"differentiate: no derivative rule for op {n.op.value!r}; "
                "fix: add one to attnforge.codegen.grad._RULES"
            )
        for s, gs in zip(n.src, rule(n, g)):
            if gs is None or id(s) not in active:
                continue
            prev = adj.get(id(s))
            adj[id(s)] = gs if prev is None else add(prev, gs)
    zero = const(0.0)
    d_score = next((adj.get(id(n), zero) for n in order if n.op is Op.SCORE), zero)
    d_loads = tuple((n, adj.get(id(n), zero)) for n in order if n.op is Op.LOAD and id(n) in adj)
    return ScoreGrad(_to_float(d_score), d_loads)


def float_loads(root: Node) -> list[Node]:
    """Distinct reads of captured float tensors in ``root``, in topological order."""
    return [n for n in root.walk() if n.op is Op.LOAD and n.src[0].dtype is DType.FLOAT]


# -- the backward kernel module (templates/bwd.py.tmpl) -------------------------------------------
#
# Holes: ``key``, ``prelude`` (the forward template's imports and math helpers, shared so the two
# modules cannot drift), ``mods`` (score_mod / mask_mod exactly as in the forward), ``grads``
# (``score_mod_with_grad`` and ``captured_grads``), ``param_args`` / ``score_params`` /
# ``mask_params`` (as in the forward), ``grad_args`` / ``grad_params`` (the gradient buffers).

_PRELUDE_START = "import os"
_PRELUDE_END = "# -- generated"


@dataclass(frozen=True)
class GradSlot:
    """The fp32 gradient buffer of a captured float tensor read by the score mod.

    ``bit`` is its bit in the kernels' ``TENSOR_GRADS`` constexpr (set when the tensor
    requires grad); its sizes are those of ``T<slot>``, its strides its own.
    """

    slot: int
    index: int  # parameter index in the score mod
    ndim: int
    bit: int

    @property
    def name(self) -> str:
        return f"DT{self.slot}"

    def stride(self, d: int) -> str:
        return f"stride_dt{self.slot}_{d}"

    @property
    def args(self) -> tuple[str, ...]:
        return (self.name, *(self.stride(d) for d in range(self.ndim)))

    def as_json(self) -> dict:
        return {"slot": self.slot, "index": self.index, "bit": self.bit, "args": list(self.args)}


_GRADS: dict[int, tuple[Node, ScoreGrad]] = {}


def score_grad(score: Node) -> ScoreGrad:
    """``differentiate(score)``, memoised per (interned) IR root."""
    hit = _GRADS.get(id(score))
    if hit is None or hit[0] is not score:
        hit = _GRADS[id(score)] = (score, differentiate(score))
    return hit[1]


def grad_slots(score: Node | None, score_slots) -> tuple[GradSlot, ...]:
    """The gradient buffers of a lowered variant, in kernel-slot order."""
    if score is None:
        return ()
    wanted = set(score_grad(score).tensor_indices())
    tensors = [s for s in score_slots if s.kind == "tensor" and s.index in wanted]
    return tuple(GradSlot(s.slot, s.index, s.ndim, bit) for bit, s in enumerate(tensors))


def _prelude() -> str:
    from .emit import template

    text = template("fwd.py.tmpl")
    start, end = text.find(_PRELUDE_START), text.find(_PRELUDE_END)
    if start < 0 or end < start:
        raise AssertionError(
            "bwd.py: cannot find the shared prelude in templates/fwd.py.tmpl (between "
            f"{_PRELUDE_START!r} and {_PRELUDE_END!r}); keep those markers or move the prelude "
            "to its own template and update attnforge.codegen.grad._prelude"
        )
    return text[start:end].rstrip() + "\n"


def _nontrivial(sg: ScoreGrad | None) -> bool:
    return sg is not None and sg.d_score is not const(1.0)


def has_score_grad(score: Node | None) -> bool:
    """dT/dscore of the score mod is not the constant 1."""
    return _nontrivial(score_grad(score) if score is not None else None)


def _depends(roots, ops) -> bool:
    return any(n.op in ops for n in toposort(list(roots)))


def _jit_def(name: str, args: list[str], body: list[str]) -> str:
    # @_device_fn (template prelude): triton.jit when compiled, plain Python when interpreted
    head = f"def {name}({', '.join(args)}):"
    if len(head) > 100:
        head = f"def {name}(\n" + "".join(f"    {a},\n" for a in args) + "):"
    return "@_device_fn\n" + head + "\n" + "\n".join("    " + ln for ln in body) + "\n"


def _scatter_lines(load: Node, d_expr: str, idx_exprs: list[str], gs: GradSlot) -> list[str]:
    """``DT[idx] += dt * d`` for one read, summed over the tile axes its index ignores."""
    from ..dsl.ir import Op as _Op
    from .passes import is_nonnegative, literal

    size = lambda d: f"T{gs.slot}_size{d}"  # noqa: E731
    offs, conds, pre = [], [], []
    for d, (i, x) in enumerate(zip(load.src[1:], idx_exprs)):
        if i.op is _Op.CONST:
            x = literal(i.arg) if i.arg >= 0 else f"({size(d)} - {-i.arg})"
            conds += [f"{x} < {size(d)}"] if i.arg >= 0 else [f"{x} >= 0"]
        elif is_nonnegative(i):
            conds.append(f"{x} < {size(d)}")
        else:
            w = f"i{gs.slot}_{d}_{len(pre)}"
            pre.append(f"{w} = tl.where({x} < 0, {x} + {size(d)}, {x})")  # torch: t[-1] wraps
            x = w
            conds += [f"{w} >= 0", f"{w} < {size(d)}"]
        offs.append(f"{x} * {gs.stride(d)}")
    g = "dt" if d_expr == "1.0" else f"tl.where(dt == 0.0, 0.0, dt * {d_expr})"
    rows = _depends(load.src[1:], {_Op.Q_IDX, _Op.SCORE})
    cols = _depends(load.src[1:], {_Op.KV_IDX, _Op.SCORE})
    if rows and cols:
        conds.append("g != 0.0")  # skip the traffic of masked / zero entries
    else:
        g_red = {(True, False): "tl.sum(g, 1)[:, None]", (False, True): "tl.sum(g, 0)[None, :]"}
        pre_red = g_red.get((rows, cols), "tl.sum(tl.sum(g, 1), 0)")
    ptr = " + ".join([gs.name, *offs])
    mask = " & ".join(f"({c})" for c in conds)
    lines = [*pre, f"g = {g}"]
    if not (rows and cols):
        lines.append(f"g = {pre_red}")
    lines.append(f"tl.atomic_add({ptr}, g, mask={mask})" if mask else f"tl.atomic_add({ptr}, g)")
    return lines


def _captured_grads_fn(sg: ScoreGrad | None, score_slots, gslots) -> str:
    from .emit import _SCORE_ARGS, POS_F32
    from .render import render_body

    by_index = {s.index: s for s in score_slots}
    gs_of = {g.index: g for g in gslots}
    args = ["dt", *_SCORE_ARGS]
    args += [a for s in score_slots for a in s.args] + [a for g in gslots for a in g.args]
    args.append("TENSOR_GRADS: tl.constexpr")
    reads = [] if sg is None else [(ld, d) for ld, d in sg.d_loads if ld.src[0].arg[0] in gs_of]
    if not reads:
        return _jit_def(
            "captured_grads", args, ["# no captured float tensor: never called", "return"]
        )
    roots = [d for _, d in reads] + [i for ld, _ in reads for i in ld.src[1:]]
    lines, exprs = render_body(roots, by_index, pos_f32=POS_F32)
    d_exprs, idx_exprs = exprs[: len(reads)], iter(exprs[len(reads) :])
    body = list(lines)
    for (ld, _), d_expr in zip(reads, d_exprs):
        gs = gs_of[ld.src[0].arg[0]]
        idx = [next(idx_exprs) for _ in ld.src[1:]]
        body.append(f"if TENSOR_GRADS & {1 << gs.bit}:  # d/d {gs.name.removeprefix('D')}[...]")
        body += ["    " + s for s in _scatter_lines(ld, d_expr, idx, gs)]
    return _jit_def("captured_grads", args, body)


def grad_functions(score: Node | None, score_slots, gslots) -> str:
    """The generated derivative section of bwd.py: flags, score_mod_with_grad (the modified
    score and dT/dscore from one shared evaluation), captured_grads."""
    from .emit import _SCORE_ARGS, POS_F32, _score_result
    from .render import render_body

    sg = score_grad(score) if score is not None else None
    has_score_grad = _nontrivial(sg)
    flags = f"HAS_SCORE_GRAD = tl.constexpr({has_score_grad})  # False: dT/dscore == 1"
    args = _SCORE_ARGS + [a for s in score_slots for a in s.args]
    if sg is None:
        body = ["# never called (no score_mod)", "return score, 1.0"]
    else:
        roots = [score, sg.d_score] if has_score_grad else [score]
        lines, exprs = render_body(roots, {s.index: s for s in score_slots}, pos_f32=POS_F32)
        d_expr = exprs[1] if has_score_grad else "1.0"
        body = [*lines, f"return {_score_result(exprs[0], score)}, {d_expr}"]
    parts = (
        flags,
        _jit_def("score_mod_with_grad", args, body),
        _captured_grads_fn(sg, score_slots, gslots),
    )
    return "\n\n\n".join(p.rstrip("\n") for p in parts)


def emit_bwd(low) -> str:
    """The backward kernel module source for a :class:`attnforge.codegen.Lowered`."""
    from .emit import call_params, fill, mod_functions, param_arg_lines, template

    gslots = grad_slots(low.score, low.score_slots)
    holes = {
        "key": low.key,
        "prelude": _prelude(),
        "mods": mod_functions(low.score, low.mask, low.score_slots, low.mask_slots),
        "grads": grad_functions(low.score, low.score_slots, gslots),
        "param_args": param_arg_lines(low.slots),
        "score_params": call_params(low.score_slots),
        "mask_params": call_params(low.mask_slots),
        "grad_args": param_arg_lines(gslots),
        "grad_params": call_params(gslots),
    }
    return fill(template("bwd.py.tmpl"), holes, "bwd.py.tmpl")


BWD_KERNELS = ("_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq")
