"""IR -> Triton source: one SSA line per node, from a table keyed by :class:`Op`.

Semantics are those of :mod:`attnforge.dsl.evaluate` (torch eager), in kernel precision:

* ints are int32 (indices, captured ints, loaded int tensors), floats are fp32;
* ``//`` and ``%`` on ints follow Python (floor) rules; Triton's truncate toward zero, so they
  go through the ``_floordiv``/``_mod`` helpers of the template prelude, or a shift / mask /
  one-compare fix-up when the divisor is a positive constant;
* ``/`` always divides as floats (by a power-of-two constant: times its exact reciprocal);
* ``& | ^ ~`` are logical on bools and bitwise on ints;
* bools promote to int32 in arithmetic (``True + True == 2``), ints to fp32 next to floats;
* reads of captured tensors wrap negative indices (``t[-1]``) and are masked to the tensor's
  bounds, so padded rows/columns (q_idx >= L, kv_idx >= S) never fault: they read 0;
* ``kv_idx - q_idx`` (either order) promoted to float goes through the prelude's
  ``_pos_sub_f32`` where the function has the ``POS_F32`` constexpr (positions < 2**24): the two
  index vectors are converted instead of every score of the tile, with the same result.

A rendered function looks like::

    @_device_fn
    def score_mod(score, b, h, q_idx, kv_idx, POS_F32: tl.constexpr, T0, T0_size0, stride_t0_0):
        t0 = tl.load(T0 + h * stride_t0_0, mask=h < T0_size0, other=0).to(tl.float32)
        t1 = q_idx - kv_idx
        t2 = t0 * _pos_sub_f32(q_idx, kv_idx, POS_F32)
        t3 = score + t2
        return t3

Rendering names: leaves ``score b h q_idx kv_idx``; captured scalar parameter in kernel slot
``i`` is ``s<i>``; captured tensor ``T<i>`` with sizes ``T<i>_size<d>`` and strides
``stride_t<i>_<d>`` (see :class:`ParamSlot`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..dsl.ir import (
    COMPARE,
    INTDIV,
    LEAVES,
    DType,
    Node,
    Op,
    toposort,
)
from .passes import is_nonnegative, literal

__all__ = ["ParamSlot", "RenderError", "render_function", "render_body", "LEAF_NAMES", "RULES"]

LEAF_NAMES = {Op.SCORE: "score", Op.B: "b", Op.H: "h", Op.Q_IDX: "q_idx", Op.KV_IDX: "kv_idx"}
_F32, _I32 = "tl.float32", "tl.int32"


class RenderError(NotImplementedError):
    """The IR uses something the Triton renderer has no rule for."""


@dataclass(frozen=True)
class ParamSlot:
    """One captured value as the kernels see it.

    ``slot`` numbers kernel parameters (score-mod parameters first, then mask-mod ones);
    ``mod``/``index`` say where the runtime reads the value (``Mod.params`` index).
    """

    slot: int
    mod: str  # "score" | "mask"
    index: int
    kind: str  # "scalar" | "tensor"
    dtype: str  # scalar: "float" | "int" | "bool"; tensor: torch dtype name, e.g. "float32"
    ndim: int = 0

    @property
    def name(self) -> str:
        return f"s{self.slot}" if self.kind == "scalar" else f"T{self.slot}"

    def size(self, d: int) -> str:
        return f"T{self.slot}_size{d}"

    def stride(self, d: int) -> str:
        return f"stride_t{self.slot}_{d}"

    @property
    def args(self) -> tuple[str, ...]:
        """Kernel argument names, in order: the value (or pointer), then sizes, then strides."""
        if self.kind == "scalar":
            return (self.name,)
        return (
            self.name,
            *(self.size(d) for d in range(self.ndim)),
            *(self.stride(d) for d in range(self.ndim)),
        )

    def as_json(self) -> dict:
        return {
            "slot": self.slot, "mod": self.mod, "index": self.index, "kind": self.kind,
            "dtype": self.dtype, "ndim": self.ndim, "args": list(self.args),
        }  # fmt: skip


class _Ctx:
    """Names of the nodes rendered so far and the lines emitted, for one function body."""

    def __init__(
        self,
        names: Mapping[Node, str],
        slots: Mapping[int, ParamSlot],
        prefix: str,
        pos_f32: str | None = None,
    ):
        self.names: dict[int, str] = {id(n): s for n, s in names.items()}
        self.slots = slots
        self.prefix = prefix
        self.pos_f32 = pos_f32  # name of the POS_F32 constexpr in scope, if any
        self.lines: list[str] = []
        self.nonneg: dict = {}

    def fresh(self) -> str:
        return f"{self.prefix}{len(self.lines)}"

    def emit(self, expr: str) -> str:
        name = self.fresh()
        self.lines.append(f"{name} = {expr}")
        return name

    def ref(self, n: Node) -> str:
        if n.op is Op.CONST:
            return literal(n.arg)
        name = self.names.get(id(n))
        if name is None:
            raise AssertionError(f"render: {n!r} used before it was rendered")
        return name

    # -- coercions to a torch-promoted dtype --

    def as_float(self, n: Node) -> str:
        if n.dtype is DType.FLOAT:
            return self.ref(n)
        if n.op is Op.CONST:
            return literal(float(n.arg))
        if self.pos_f32 is not None and _is_pos_sub(n):
            # [BLOCK_M, 1] and [1, BLOCK_N] conversions instead of one per score (int->float
            # issues at the exp2 rate); the int node stays for any int use
            a, b = n.src
            return f"_pos_sub_f32({self.ref(a)}, {self.ref(b)}, {self.pos_f32})"
        return f"{self.ref(n)}.to({_F32})"

    def as_int(self, n: Node) -> str:
        if n.dtype is not DType.BOOL:
            return self.ref(n)
        if n.op is Op.CONST:
            return literal(int(n.arg))
        return f"{self.ref(n)}.to({_I32})"

    def as_dtype(self, n: Node, dtype: DType) -> str:
        if dtype is DType.FLOAT:
            return self.as_float(n)
        if dtype is DType.INT:
            return self.as_int(n)
        return self.ref(n)

    def tensor_value(self, n: Node) -> str:
        """``n`` as a Triton tensor even if it is a Python constant (for helpers that branch
        on the sign of their operands)."""
        if n.op is not Op.CONST:
            return self.ref(n)
        dt = {DType.BOOL: "tl.int1", DType.INT: _I32, DType.FLOAT: _F32}[n.dtype]
        return f"tl.full([], {literal(n.arg)}, {dt})"


def _is_pos_sub(n: Node) -> bool:
    """``kv_idx - q_idx`` or ``q_idx - kv_idx``: a difference of the two position leaves."""
    return n.op is Op.SUB and {a.op for a in n.src} == {Op.Q_IDX, Op.KV_IDX}


Rule = Callable[[_Ctx, Node], str]

# -- arithmetic ----------------------------------------------------------------------------------


def _binary(symbol: str) -> Rule:
    def rule(c: _Ctx, n: Node) -> str:
        a, b = n.src
        return f"{c.as_dtype(a, n.dtype)} {symbol} {c.as_dtype(b, n.dtype)}"

    return rule


def _div(c: _Ctx, n: Node) -> str:
    a, b = n.src
    if b.op is Op.CONST and _is_power_of_two(float(b.arg)):
        # exact, and a division costs ~10x a multiply in the hot loop (other constants keep
        # the division: x * (1/3) can round below an integer that x / 3 hits exactly)
        return f"{c.as_float(a)} * {literal(1.0 / float(b.arg))}"
    return f"{c.as_float(a)} / {c.as_float(b)}"


def _is_power_of_two(x: float) -> bool:
    if not math.isfinite(x) or x == 0.0:
        return False
    mantissa, _ = math.frexp(abs(x))
    return mantissa == 0.5


def _neg(c: _Ctx, n: Node) -> str:
    return f"-{c.as_dtype(n.src[0], n.dtype)}"


def _pow(c: _Ctx, n: Node) -> str:
    a, b = n.src
    if b.op is Op.CONST and float(b.arg).is_integer() and 0 <= b.arg <= 4:
        if b.arg == 0:
            return literal(1.0 if n.dtype is DType.FLOAT else 1)
        x = c.as_dtype(a, n.dtype)
        return " * ".join([x] * int(b.arg))
    if n.dtype is not DType.FLOAT:
        return f"_ipow({c.tensor_value(a) if a.op is Op.CONST else c.as_int(a)}, {c.as_int(b)})"
    if b.op is Op.CONST and b.arg == 0.5:
        return f"tl.sqrt({c.as_float(a)})"
    if b.op is Op.CONST and b.arg == -1:
        return f"1.0 / {c.as_float(a)}"
    return f"_pow({c.as_float(a)}, {c.as_float(b)})"


def _is_pos_const(n: Node) -> bool:
    return n.op is Op.CONST and not isinstance(n.arg, (bool, float)) and n.arg > 0


def _floordiv(c: _Ctx, n: Node) -> str:
    a, b = n.src
    if n.dtype is DType.FLOAT:
        return f"tl.floor({c.as_float(a)} / {c.as_float(b)})"
    if _is_pos_const(b):
        x, d = c.as_int(a), b.arg
        if is_nonnegative(a, c.nonneg):
            return f"{x} // {d}"  # truncation == floor for a non-negative dividend
        if d & (d - 1) == 0:
            return f"{x} >> {d.bit_length() - 1}"  # arithmetic shift floors
        return f"_floordiv_pos({x}, {d})"
    return f"_floordiv({c.tensor_value(a) if a.op is Op.CONST else c.as_int(a)}, {c.as_int(b)})"


def _mod(c: _Ctx, n: Node) -> str:
    a, b = n.src
    if n.dtype is DType.FLOAT:
        x, y = c.as_float(a), c.as_float(b)
        return f"{x} - {y} * tl.floor({x} / {y})"
    if _is_pos_const(b):
        x, d = c.as_int(a), b.arg
        if is_nonnegative(a, c.nonneg):
            return f"{x} % {d}"
        if d & (d - 1) == 0:
            return f"{x} & {d - 1}"  # two's complement: the Python remainder for d = 2**k
        return f"_mod_pos({x}, {d})"
    return f"_mod({c.tensor_value(a) if a.op is Op.CONST else c.as_int(a)}, {c.as_int(b)})"


# -- comparison and logic ------------------------------------------------------------------------

_COMPARE_SYMBOL = {Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">=", Op.EQ: "==", Op.NE: "!="}


def _compare(c: _Ctx, n: Node) -> str:
    a, b = n.src
    symbol = _COMPARE_SYMBOL[n.op]
    if a.op is Op.CONST:  # keep a tensor on the left: `3 < x` is fine, but be uniform
        a, b = b, a
        symbol = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(symbol, symbol)
    return f"{c.ref(a)} {symbol} {c.ref(b)}"


def _not(c: _Ctx, n: Node) -> str:
    (a,) = n.src
    if n.dtype is DType.BOOL:
        return f"~{c.ref(a)}"  # i1 inversion is logical not
    return f"~{c.as_int(a)}"


# -- selection, math, min/max, casts -------------------------------------------------------------


def _where(c: _Ctx, n: Node) -> str:
    cond, x, y = n.src
    cond_s = c.ref(cond) if cond.dtype is DType.BOOL else f"{c.ref(cond)} != 0"
    return f"tl.where({cond_s}, {c.as_dtype(x, n.dtype)}, {c.as_dtype(y, n.dtype)})"


def _unary(fn: str) -> Rule:
    def rule(c: _Ctx, n: Node) -> str:
        return f"{fn}({c.as_float(n.src[0])})"

    return rule


def _abs(c: _Ctx, n: Node) -> str:
    return f"tl.abs({c.as_dtype(n.src[0], n.dtype)})"


def _round(fn: str) -> Rule:
    def rule(c: _Ctx, n: Node) -> str:
        (a,) = n.src
        return f"{fn}({c.ref(a)})" if n.dtype is DType.FLOAT else c.ref(a)

    return rule


def _minmax(fn: str) -> Rule:
    def rule(c: _Ctx, n: Node) -> str:
        a, b = n.src
        if n.dtype is DType.BOOL:  # min/max of bools == and/or
            return f"{c.ref(a)} {'&' if fn == 'tl.minimum' else '|'} {c.ref(b)}"
        return f"{fn}({c.as_dtype(a, n.dtype)}, {c.as_dtype(b, n.dtype)})"

    return rule


def _cast(c: _Ctx, n: Node) -> str:
    (a,) = n.src
    if n.dtype is DType.BOOL:
        return f"{c.ref(a)} != 0"
    return c.as_float(a) if n.dtype is DType.FLOAT else f"{c.ref(a)}.to({_I32})"


# -- loads from captured tensors -----------------------------------------------------------------


def _index(c: _Ctx, slot: ParamSlot, d: int, i: Node) -> tuple[str, list[str]]:
    """Source for index ``i`` into dim ``d`` (wrapped when it may be negative) and the
    conditions that keep it inside the tensor."""
    size = slot.size(d)
    if i.op is Op.CONST:
        if i.arg >= 0:
            return literal(i.arg), [f"{literal(i.arg)} < {size}"]
        wrapped = c.emit(f"{size} - {-i.arg}")
        return wrapped, [f"{wrapped} >= 0"]
    x = c.as_int(i)
    if is_nonnegative(i, c.nonneg):
        return x, [f"{x} < {size}"]
    wrapped = c.emit(f"tl.where({x} < 0, {x} + {size}, {x})")  # torch: t[-1] is the last
    return wrapped, [f"{wrapped} >= 0", f"{wrapped} < {size}"]


def _load(c: _Ctx, n: Node) -> str:
    t, idx = n.src[0], n.src[1:]
    slot = c.slots.get(t.arg[0])
    if slot is None:
        raise AssertionError(f"render: no kernel slot for tensor parameter {t.arg[0]}")
    offsets, conds = [], []
    for d, i in enumerate(idx):
        x, ok = _index(c, slot, d, i)
        offsets.append(f"{x} * {slot.stride(d)}")
        conds += ok
    ptr = " + ".join([slot.name, *offsets])
    mask = " & ".join(f"({x})" for x in conds) if len(conds) > 1 else (conds[0] if conds else "")
    load = f"tl.load({ptr}, mask={mask}, other=0)" if mask else f"tl.load({ptr})"
    if n.dtype is DType.FLOAT:
        return f"{load}.to({_F32})"
    if n.dtype is DType.INT:
        return f"{load}.to({_I32})"
    return load


def _param(c: _Ctx, n: Node) -> str:
    raise AssertionError("parameters are named, not rendered")


RULES: dict[Op, Rule] = {
    Op.ADD: _binary("+"),
    Op.SUB: _binary("-"),
    Op.MUL: _binary("*"),
    Op.DIV: _div,
    Op.NEG: _neg,
    Op.POW: _pow,
    Op.FLOORDIV: _floordiv,
    Op.MOD: _mod,
    **{op: _compare for op in COMPARE},
    Op.AND: _binary("&"),
    Op.OR: _binary("|"),
    Op.XOR: _binary("^"),
    Op.NOT: _not,
    Op.WHERE: _where,
    Op.EXP: _unary("tl.exp"),
    Op.EXP2: _unary("tl.exp2"),
    Op.LOG: _unary("tl.log"),
    Op.LOG2: _unary("tl.log2"),
    Op.TANH: _unary("_tanh"),
    Op.SIGMOID: _unary("tl.sigmoid"),
    Op.ABS: _abs,
    Op.SQRT: _unary("tl.sqrt"),
    Op.RSQRT: _unary("tl.rsqrt"),
    Op.SIN: _unary("tl.sin"),
    Op.COS: _unary("tl.cos"),
    Op.ERF: _unary("tl.erf"),
    Op.FLOOR: _round("tl.floor"),
    Op.CEIL: _round("tl.ceil"),
    Op.MIN: _minmax("tl.minimum"),
    Op.MAX: _minmax("tl.maximum"),
    Op.LOAD: _load,
    Op.CAST: _cast,
}
assert not (INTDIV - RULES.keys())


def render_body(
    roots: Iterable[Node],
    slots: Mapping[int, ParamSlot],
    names: Mapping[Node, str] | None = None,
    prefix: str = "t",
    pos_f32: str | None = None,
) -> tuple[list[str], list[str]]:
    """Lines computing every node reachable from ``roots`` and the expression for each root.

    ``slots`` maps a parameter index (``node.arg[0]`` of SCALAR/TENSOR leaves) to its kernel
    slot; ``names`` may pre-name any node (leaves default to ``score b h q_idx kv_idx``);
    ``pos_f32`` names the POS_F32 constexpr where the function has it (see ``_pos_sub_f32``).
    """
    roots = list(roots)
    given = {n: s for n, s in (names or {}).items()}
    c = _Ctx(given, slots, prefix, pos_f32)
    for n in toposort(roots):
        if id(n) in c.names or n.op is Op.CONST:
            continue
        if n.op in LEAVES:
            c.names[id(n)] = LEAF_NAMES[n.op]
        elif n.op is Op.SCALAR or n.op is Op.TENSOR:
            slot = slots.get(n.arg[0])
            if slot is None:
                raise AssertionError(f"render: no kernel slot for parameter {n.arg[0]}")
            c.names[id(n)] = slot.name
        else:
            rule = RULES.get(n.op)
            if rule is None:
                raise RenderError(
                    f"no Triton rendering for IR op {n.op.value!r}; add an entry for Op."
                    f"{n.op.name} to attnforge.codegen.render.RULES"
                )
            c.names[id(n)] = c.emit(rule(c, n))
    return c.lines, [c.ref(r) if r.op is not Op.CONST else literal(r.arg) for r in roots]


def render_function(
    name: str,
    args: list[str],
    root: Node,
    slots: Mapping[int, ParamSlot],
    result: Callable[[str, Node], str] | None = None,
    doc: str | None = None,
    decorator: str = "@triton.jit",
    pos_f32: str | None = None,
) -> str:
    """A device function ``name(*args)`` returning ``root`` (``result(expr, root)`` may wrap
    the returned expression, e.g. to broadcast or cast it; ``pos_f32``: see render_body)."""
    lines, (expr,) = render_body([root], slots, pos_f32=pos_f32)
    if result is not None:
        expr = result(expr, root)
    body = ([f'"""{doc}"""'] if doc else []) + lines + [f"return {expr}"]
    head = f"def {name}({', '.join(args)}):"
    if len(head) > 100:
        head = f"def {name}(\n" + "".join(f"    {a},\n" for a in args) + "):"
    return decorator + "\n" + head + "\n" + "\n".join("    " + ln for ln in body) + "\n"
