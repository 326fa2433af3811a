"""The attnforge IR: one immutable, hash-consed node type.

A mod (score modifier or mask) is a DAG of ``Node(op, dtype, src, arg)``.  Nodes are interned,
so two structurally equal expressions are the *same* object: structural equality is identity and
``node.key`` (a hex digest over the structure) is stable across processes.  Nothing here depends
on Python object identity of user functions, their names, or the values of captured scalars:
captured values are ``SCALAR``/``TENSOR`` parameter leaves numbered in order of first use.

Source locations live beside the IR (``attnforge.dsl.mod.Mod.locs``), never in a node.

Legend of leaves::

    score            the scaled logit (score mods only), float
    b, h             batch and query-head index, int
    q_idx, kv_idx    query and key position, int
    const            literal; arg = the Python value
    scalar           captured Python number; arg = (param index,)
    tensor           captured tensor; arg = (param index, ndim, torch dtype name)
    load             src = (tensor, i0, i1, ...): read tensor[i0, i1, ...]
"""

from __future__ import annotations

import enum
import hashlib
import weakref
from typing import Any


class DType(str, enum.Enum):
    """Value kinds. Precision is the kernel's business (fp32 math, int32 indices)."""

    BOOL = "bool"
    INT = "int"
    FLOAT = "float"


class Op(enum.Enum):
    # -- leaves: indices and the score --
    SCORE = "score"
    B = "b"
    H = "h"
    Q_IDX = "q_idx"
    KV_IDX = "kv_idx"
    # -- constants and parameters --
    CONST = "const"
    SCALAR = "scalar"
    TENSOR = "tensor"
    # -- arithmetic --
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    NEG = "neg"
    POW = "pow"
    # -- floor-div and mod (Python semantics: round toward -inf, result sign of divisor) --
    FLOORDIV = "floordiv"
    MOD = "mod"
    # -- comparison --
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    EQ = "eq"
    NE = "ne"
    # -- logic (bitwise on ints, logical on bools) --
    AND = "and"
    OR = "or"
    XOR = "xor"
    NOT = "not"
    # -- selection --
    WHERE = "where"
    # -- unary math --
    EXP = "exp"
    EXP2 = "exp2"
    LOG = "log"
    LOG2 = "log2"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    ABS = "abs"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    SIN = "sin"
    COS = "cos"
    ERF = "erf"
    FLOOR = "floor"
    CEIL = "ceil"
    # -- min / max --
    MIN = "min"
    MAX = "max"
    # -- memory and conversion --
    LOAD = "load"
    CAST = "cast"  # arg = target DType


INDEX_LEAVES = frozenset({Op.B, Op.H, Op.Q_IDX, Op.KV_IDX})
LEAVES = INDEX_LEAVES | {Op.SCORE}
PARAMS = frozenset({Op.SCALAR, Op.TENSOR})
ARITH = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG, Op.POW})
INTDIV = frozenset({Op.FLOORDIV, Op.MOD})
COMPARE = frozenset({Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE})
LOGIC = frozenset({Op.AND, Op.OR, Op.XOR, Op.NOT})
UNARY_MATH = frozenset(
    {
        Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.TANH, Op.SIGMOID, Op.ABS, Op.SQRT, Op.RSQRT,
        Op.SIN, Op.COS, Op.ERF, Op.FLOOR, Op.CEIL,
    }
)  # fmt: skip
MINMAX = frozenset({Op.MIN, Op.MAX})
UNARY = UNARY_MATH | {Op.NEG, Op.NOT, Op.CAST}
BINARY = (ARITH - {Op.NEG}) | INTDIV | COMPARE | (LOGIC - {Op.NOT}) | MINMAX
COMMUTATIVE = frozenset({Op.ADD, Op.MUL, Op.EQ, Op.NE, Op.AND, Op.OR, Op.XOR, Op.MIN, Op.MAX})
# Ops whose result is float whatever the inputs (torch promotes int -> float for these).
FLOAT_RESULT = (UNARY_MATH - {Op.ABS}) | {Op.DIV}

_ARITY = {op: 1 for op in UNARY} | {op: 2 for op in BINARY} | {Op.WHERE: 3}


def _argkey(arg: Any) -> Any:
    """A hashable, exact identity for ``arg`` (floats by bit pattern: -0.0 and nan are distinct)."""
    if isinstance(arg, float):
        return ("f", arg.hex())
    if isinstance(arg, tuple):
        return tuple(_argkey(a) for a in arg)
    if isinstance(arg, enum.Enum):
        return ("e", arg.value)
    return (type(arg).__name__, arg)


class Node:
    """An interned IR node. Build with :func:`node` or the helpers below, never directly."""

    __slots__ = ("op", "dtype", "src", "arg", "_key", "__weakref__")
    _table: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    op: Op
    dtype: DType
    src: tuple[Node, ...]
    arg: Any

    def __new__(cls, op: Op, dtype: DType, src: tuple[Node, ...] = (), arg: Any = None):
        ident = (op, dtype, src, _argkey(arg))
        hit = cls._table.get(ident)
        if hit is not None:
            return hit
        self = object.__new__(cls)
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "src", src)
        object.__setattr__(self, "arg", arg)
        object.__setattr__(self, "_key", None)
        cls._table[ident] = self
        return self

    def __setattr__(self, name, value):
        raise AttributeError("IR nodes are immutable")

    def __reduce__(self):
        return (Node, (self.op, self.dtype, self.src, self.arg))

    # identity is structural equality thanks to interning
    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other

    @property
    def key(self) -> str:
        """Stable structural hash (hex). Independent of process, names and captured values."""
        if self._key is None:
            h = hashlib.sha256()
            h.update(repr((self.op.value, self.dtype.value, _argkey(self.arg))).encode())
            for s in self.src:
                h.update(s.key.encode())
            object.__setattr__(self, "_key", h.hexdigest()[:32])
        return self._key

    def __repr__(self) -> str:
        if self.op is Op.CONST:
            return f"const({self.arg!r})"
        if self.op in LEAVES:
            return self.op.value
        if self.op is Op.SCALAR:
            return f"scalar{self.arg[0]}"
        if self.op is Op.TENSOR:
            return f"tensor{self.arg[0]}"
        return f"{self.op.value}({', '.join(map(repr, self.src))})"

    def __str__(self) -> str:
        return pretty(self)

    def __bool__(self):
        return True

    def walk(self) -> list[Node]:
        """All nodes reachable from ``self``, operands before users (topological order)."""
        return toposort([self])


def toposort(roots) -> list[Node]:
    order: list[Node] = []
    seen: set[int] = set()
    stack = [(r, False) for r in reversed(list(roots))]
    while stack:
        n, expanded = stack.pop()
        if id(n) in seen:
            continue
        if expanded:
            seen.add(id(n))
            order.append(n)
            continue
        stack.append((n, True))
        for s in reversed(n.src):
            if id(s) not in seen:
                stack.append((s, False))
    return order


# -- construction --------------------------------------------------------------------------------


def promote(*dtypes: DType) -> DType:
    """torch-like type promotion over our three kinds."""
    if DType.FLOAT in dtypes:
        return DType.FLOAT
    if DType.INT in dtypes:
        return DType.INT
    return DType.BOOL


def result_dtype(op: Op, src: tuple[Node, ...], arg: Any = None) -> DType:
    if op is Op.CAST:
        return DType(arg)
    if op in COMPARE:
        return DType.BOOL
    if op in FLOAT_RESULT:
        return DType.FLOAT
    if op is Op.WHERE:
        return promote(src[1].dtype, src[2].dtype)
    if op in LOGIC:
        return promote(*(s.dtype for s in src))
    if op in (Op.FLOOR, Op.CEIL):
        return src[0].dtype
    d = promote(*(s.dtype for s in src))
    if op in (ARITH - {Op.ADD, Op.MUL}) | INTDIV | {Op.ABS} and d is DType.BOOL:
        return DType.INT  # torch keeps bool for + and * (logical), other ops go through ints
    return d


def node(op: Op, *src: Node, arg: Any = None) -> Node:
    """Build (or find) the node for ``op`` applied to ``src``, inferring its dtype."""
    want = _ARITY.get(op)
    if want is not None and len(src) != want:
        raise ValueError(f"{op.value} takes {want} operand(s), got {len(src)}")
    for s in src:
        if not isinstance(s, Node):
            raise TypeError(f"{op.value}: operand {s!r} is not an IR node")
    if op is Op.LOAD:
        t = src[0]
        if t.op is not Op.TENSOR:
            raise ValueError("load: first operand must be a tensor parameter")
        ndim = t.arg[1]
        if len(src) - 1 != ndim:
            raise ValueError(f"load: tensor has {ndim} dim(s) but {len(src) - 1} index(es)")
        return Node(op, t.dtype, tuple(src), arg)
    return Node(op, result_dtype(op, src, arg), tuple(src), arg)


def const(value: bool | int | float) -> Node:
    if isinstance(value, bool):
        return Node(Op.CONST, DType.BOOL, (), bool(value))
    if isinstance(value, int):
        return Node(Op.CONST, DType.INT, (), int(value))
    return Node(Op.CONST, DType.FLOAT, (), float(value))


def leaf(op: Op) -> Node:
    if op not in LEAVES:
        raise ValueError(f"{op} is not a leaf")
    return Node(op, DType.FLOAT if op is Op.SCORE else DType.INT)


def scalar(index: int, dtype: DType) -> Node:
    return Node(Op.SCALAR, DType(dtype), (), (int(index),))


def tensor(index: int, ndim: int, torch_dtype: str) -> Node:
    """A captured tensor parameter; ``torch_dtype`` like ``"float32"`` / ``"int64"``."""
    kind = (
        DType.BOOL
        if torch_dtype == "bool"
        else (DType.FLOAT if ("float" in torch_dtype or "bfloat" in torch_dtype) else DType.INT)
    )
    return Node(Op.TENSOR, kind, (), (int(index), int(ndim), str(torch_dtype)))


SCORE = leaf(Op.SCORE)
B = leaf(Op.B)
H = leaf(Op.H)
Q_IDX = leaf(Op.Q_IDX)
KV_IDX = leaf(Op.KV_IDX)
TRUE = const(True)
FALSE = const(False)


# -- printing ------------------------------------------------------------------------------------


def pretty(*roots: Node, names: dict[Node, str] | None = None) -> str:
    """One node per line: ``%3 = add %1, %2 : float``. Leaves and constants print inline."""
    ids: dict[int, str] = {}
    lines: list[str] = []

    def ref(n: Node) -> str:
        if n.op is Op.CONST:
            return repr(n.arg)
        return ids[id(n)]

    for n in toposort(roots):
        if n.op is Op.CONST:
            continue
        name = f"%{len(lines)}"
        ids[id(n)] = name
        if n.op in LEAVES:
            rhs = n.op.value
        elif n.op is Op.SCALAR:
            label = names.get(n) if names else None
            rhs = f"scalar[{n.arg[0]}]" + (f"  # {label}" if label else "")
        elif n.op is Op.TENSOR:
            label = names.get(n) if names else None
            rhs = f"tensor[{n.arg[0]}] ndim={n.arg[1]} {n.arg[2]}"
            rhs += f"  # {label}" if label else ""
        else:
            rhs = n.op.value + " " + ", ".join(ref(s) for s in n.src)
            if n.op is Op.CAST:
                rhs += f" to {n.arg.value if isinstance(n.arg, DType) else n.arg}"
        lines.append(f"{name} = {rhs} : {n.dtype.value}")
    if len(roots) == 1 and roots[0].op is Op.CONST:
        lines.append(f"%0 = const {roots[0].arg!r} : {roots[0].dtype.value}")
    lines.append("return " + ", ".join(ref(r) for r in roots))
    return "\n".join(lines)


def params_of(root: Node) -> list[Node]:
    """Parameter leaves (scalars and tensors) reachable from ``root``, by index."""
    ps = {n for n in root.walk() if n.op in PARAMS}
    return sorted(ps, key=lambda n: n.arg[0])


def uses(root: Node, op: Op) -> bool:
    return any(n.op is op for n in root.walk())
