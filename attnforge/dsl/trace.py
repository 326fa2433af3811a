"""Python tracer: run a FlexAttention-style mod on proxy values and record the IR.

How it works.  The mod is called once with proxies (:class:`Traced`) for ``score, b, h, q_idx,
kv_idx``; every Python operator and every supported torch function (through
``__torch_function__``) on a proxy builds an IR node.  Before the call the function is rebuilt
(``types.FunctionType(code, globals, name, defaults, closure)``) with its captured values
replaced by proxies, recursively for the Python functions and mods it calls:

* captured ints and floats (closure cells, globals named by the code, default arguments,
  attributes of ``self``/callable objects, ``functools.partial`` arguments) become ``scalar``
  parameters, and captured tensors become ``tensor`` parameters.  Parameters are numbered in
  order of first use and carry a getter that re-reads the storage slot (the cell, the globals
  entry, ...), so their *values* are runtime inputs, never part of ``ir.key``.
* a 0-d captured tensor is a ``tensor`` parameter of ndim 0, read with a ``load`` with no index
  (so a learnable scalar stays differentiable).
* captured bools are baked into the structure (guarded), because branching on a flag in
  Python is legitimate.  An int/float parameter whose value Python itself needs (``if window:``,
  ``range(n)``, a list index) is baked the same way: the tracer notices, and traces again with
  that slot as a constant.  Callers re-check these guards (:func:`guards_hold`) and retrace when
  a baked value, a tensor's rank/dtype or a called function changes.

Mistakes raise :class:`~attnforge.dsl.errors.DSLError` pointing at the user's line and column.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import linecache
import numbers
import os
import re
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import ir
from .errors import DSLError
from .ir import DType, Node, Op
from .mod import Mod, Param, SourceLoc

SCORE_ARGS = ("score", "b", "h", "q_idx", "kv_idx")
MASK_ARGS = ("b", "h", "q_idx", "kv_idx")
_LEAF_OF = {"score": ir.SCORE, "b": ir.B, "h": ir.H, "q_idx": ir.Q_IDX, "kv_idx": ir.KV_IDX}
_MAX_TRACES = 16
_TORCH_DTYPE = {DType.BOOL: torch.bool, DType.INT: torch.int64, DType.FLOAT: torch.float32}
_FRAMEWORK_DIRS = tuple(
    os.path.dirname(p) + os.sep
    for p in (
        os.path.join(os.path.dirname(__file__), "x"),
        os.path.join(os.path.dirname(os.path.dirname(__file__)), "codegen", "x"),
        os.path.join(os.path.dirname(os.path.dirname(__file__)), "runtime", "x"),
        torch.__file__,
    )
)


def arg_names(kind: str) -> tuple[str, ...]:
    if kind not in ("score", "mask"):
        raise ValueError(f"kind must be 'score' or 'mask', got {kind!r}")
    return SCORE_ARGS if kind == "score" else MASK_ARGS


# -- results -------------------------------------------------------------------------------------


@dataclass
class TraceResult:
    ir: Node
    params: tuple[Param, ...]
    locs: dict
    guards: tuple = ()  # (getter, check) pairs: the trace is valid while check(getter()) holds


def guards_hold(result: TraceResult) -> bool:
    """Whether the structure baked into ``result`` still matches the captured values."""
    for getter, check in result.guards:
        try:
            if not check(getter()):
                return False
        except Exception:
            return False
    return True


class _NeedConstant(BaseException):
    """Python needed the value of these parameter slots: trace again with them baked.

    A BaseException so that a user's ``except Exception`` inside a mod cannot swallow it.
    """

    def __init__(self, keys):
        super().__init__(keys)
        self.keys = frozenset(keys)


# -- where the user is ---------------------------------------------------------------------------


def _is_framework(filename: str) -> bool:
    return filename.startswith(_FRAMEWORK_DIRS) or filename.startswith("<frozen")


def user_frame():
    """The innermost frame that belongs to the user's code (not attnforge.dsl, not torch)."""
    f = sys._getframe(1)
    while f is not None and _is_framework(f.f_code.co_filename):
        f = f.f_back
    return f


def _frame_span(frame) -> tuple[int, int | None, int | None, int | None]:
    """(line, end_line, col0, end_col0) of the instruction ``frame`` is executing."""
    code = frame.f_code
    if hasattr(code, "co_positions") and frame.f_lasti >= 0:
        positions = list(code.co_positions())
        i = frame.f_lasti // 2
        if i < len(positions) and positions[i][0] is not None:
            return positions[i]
    return frame.f_lineno, None, None, None


def frame_loc(frame) -> SourceLoc | None:
    if frame is None:
        return None
    line, _, col0, _ = _frame_span(frame)
    file = frame.f_code.co_filename
    return SourceLoc(
        file,
        line,
        (col0 + 1) if col0 is not None else 0,
        linecache.getline(file, line).rstrip("\n"),
    )


def error_here(message: str, fix: str | None = None, frame=None) -> DSLError:
    """A DSLError located at the user's current line (or ``frame``)."""
    frame = frame or user_frame()
    if frame is None:
        return DSLError(message, fix=fix)
    line, end_line, col0, end_col0 = _frame_span(frame)
    col = col0 + 1 if col0 is not None else None
    end_col = end_col0 + 1 if (end_col0 is not None and end_line == line) else None
    return DSLError(
        message, file=frame.f_code.co_filename, line=line, col=col, fix=fix, end_col=end_col
    )


def _unwrap_function(fn):
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(fn, types.FunctionType):
            return fn
        if isinstance(fn, Mod) and fn.fn is not None:
            fn = fn.fn
        elif isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, types.MethodType):
            fn = fn.__func__
        elif isinstance(_class_attr(type(fn), "__call__"), types.FunctionType):
            fn = _class_attr(type(fn), "__call__")
        else:
            return None
    return None


def _class_attr(cls, name: str):
    """``name`` as defined by ``cls`` or a base (not by its metaclass)."""
    for c in cls.__mro__:
        if name in vars(c):
            return vars(c)[name]
    return None


def def_location(fn) -> tuple[str | None, int | None, int | None]:
    """(file, line, col) of the ``def``/``lambda`` that defines ``fn`` (decorators skipped)."""
    f = _unwrap_function(fn)
    if f is None:
        return None, None, None
    code = f.__code__
    file, first = code.co_filename, code.co_firstlineno
    pattern = re.compile(
        r"\blambda\b" if code.co_name == "<lambda>" else rf"\bdef\s+{re.escape(code.co_name)}\b"
    )
    for line in range(first, first + 50):
        text = linecache.getline(file, line)
        if not text:
            break
        m = pattern.search(text)
        if m:
            return file, line, m.start() + 1
    return file, first, None


def error_at_def(fn, message: str, fix: str | None = None) -> DSLError:
    file, line, col = def_location(fn)
    return DSLError(message, file=file, line=line, col=col, fix=fix)


# -- naming the Python construct that asked for a truth value ------------------------------------


@functools.lru_cache(maxsize=32)
def _ast_with_parents(filename: str, source: str):
    try:
        tree = ast.parse(source, filename)
    except SyntaxError:
        return None
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            child._af_parent = parent  # type: ignore[attr-defined]
    return tree


def _nodes_at(frame) -> list:
    line, end_line, col0, end_col0 = _frame_span(frame)
    if col0 is None:
        return []
    file = frame.f_code.co_filename
    source = "".join(linecache.getlines(file))
    tree = _ast_with_parents(file, source) if source else None
    if tree is None:
        return []
    return [
        n
        for n in ast.walk(tree)
        if getattr(n, "lineno", None) == line
        and getattr(n, "end_lineno", None) == end_line
        and n.col_offset == col0
        and n.end_col_offset == end_col0
    ]


_BOOL_FIXES = {
    "if": "use torch.where(cond, a, b) to choose between values, or combine conditions with "
    "& | ~ (e.g. `return (q_idx >= kv_idx) & (q_idx - kv_idx < window)`)",
    "while": "a mod cannot loop on a traced value; express the condition with torch.where",
    "conditional expression": "use torch.where(cond, a, b) instead of `a if cond else b`",
    "and": "use `&` instead of `and`, with parentheses: `(a < b) & (c < d)`",
    "or": "use `|` instead of `or`, with parentheses: `(a < b) | (c < d)`",
    "not": "use `~cond` (or torch.logical_not(cond)) instead of `not cond`",
    "chained comparison": "write `(a <= b) & (b < c)` instead of `a <= b < c`",
    "max()": "use torch.maximum(a, b) instead of Python's max()",
    "min()": "use torch.minimum(a, b) instead of Python's min()",
    "assert": "a mod cannot assert on traced values; drop the assert or use torch.where",
}
_GENERIC_BOOL_FIX = (
    "a traced value has no Python truth value: use torch.where(cond, a, b) or "
    "combine conditions with & | ~"
)


def _bool_construct(frame) -> str:
    for n in _nodes_at(frame):
        p = getattr(n, "_af_parent", None)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
            return "not"
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
            return f"{n.func.id}()"
        if isinstance(n, ast.BoolOp):
            return "and" if isinstance(n.op, ast.And) else "or"
        if isinstance(n, ast.Compare) and len(n.ops) > 1:
            return "chained comparison"
        if isinstance(p, ast.BoolOp):
            return "and" if isinstance(p.op, ast.And) else "or"
        if isinstance(p, ast.Compare) and len(p.ops) > 1:
            return "chained comparison"
        if isinstance(p, ast.If) and p.test is n:
            return "if"
        if isinstance(p, ast.While) and p.test is n:
            return "while"
        if isinstance(p, ast.IfExp) and p.test is n:
            return "conditional expression"
        if isinstance(p, ast.Assert):
            return "assert"
        if isinstance(p, ast.comprehension):
            return "if"
    return "bool()"


def bool_error(frame=None) -> DSLError:
    frame = frame or user_frame()
    construct = _bool_construct(frame) if frame is not None else "bool()"
    if construct in ("max()", "min()"):
        return error_here(
            f"Python `{construct}` compares traced values with `if`", _BOOL_FIXES[construct], frame
        )
    return error_here(
        f"Python `{construct}` on a traced value (Python `if`/`and`/`or`/`not`/`bool()` need a "
        "concrete True/False, but a mod's values are per-element tensors)",
        _BOOL_FIXES.get(construct, _GENERIC_BOOL_FIX),
        frame,
    )


# -- the active tracer ---------------------------------------------------------------------------

_state = threading.local()


def active_tracer() -> _Tracer | None:
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


@dataclass(frozen=True)
class Source:
    """Where a captured value lives: ``key`` identifies the slot, ``getter`` re-reads it."""

    key: tuple
    name: str
    getter: Callable[[], Any] | None


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, torch.Tensor))


def _is_bool(v) -> bool:
    return isinstance(v, bool) or type(v).__name__ == "bool_"


def _number(v):
    return int(v) if isinstance(v, numbers.Integral) else float(v)


def _same_const(expected):
    return lambda v: type(v) is type(expected) and v == expected


def _tensor_sig(t):
    return (t.dim(), str(t.dtype))


def _same_number_kind(expected):
    kind = type(expected)
    return lambda v: _is_number(v) and type(_number(v)) is kind


def _same_tensor_kind(expected: torch.Tensor):
    sig = _tensor_sig(expected)
    return lambda v: isinstance(v, torch.Tensor) and _tensor_sig(v) == sig


def _shape_getter(getter, d: int):
    return lambda: getter().shape[d]


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _rebuildable(fn: types.FunctionType) -> bool:
    """User functions (and attnforge's own combinators) are rebuilt; torch's are called as is."""
    module = getattr(fn, "__module__", None) or ""
    return not module.startswith(
        ("torch", "triton", "numpy")
    ) and not fn.__code__.co_filename.startswith(os.path.dirname(torch.__file__))


def _is_config_object(v) -> bool:
    """Objects whose attributes are read like captured variables (``cfg.window``)."""
    return isinstance(v, (types.SimpleNamespace, torch.nn.Module)) or (
        dataclasses.is_dataclass(v) and not isinstance(v, type)
    )


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


class _Tracer:
    def __init__(self, kind: str, constant_slots: frozenset):
        self.kind = kind
        self.constant_slots = constant_slots
        self.params: list[Param] = []
        self.slots: dict[tuple, Node] = {}  # source key -> parameter node
        self.slot_of_param: dict[int, tuple] = {}  # parameter index -> source key
        self.guards: list[tuple] = []
        self.locs: dict[Node, SourceLoc] = {}
        self.rebuilt: dict[int, Any] = {}
        self.keepalive: list[Any] = []

    # -- parameters --
    def param(self, src: Source, value, kind: str) -> Node:
        hit = self.slots.get(src.key)
        if hit is not None:
            return hit
        index = len(self.params)
        if kind == "scalar":
            n = ir.scalar(index, DType.INT if isinstance(value, int) else DType.FLOAT)
            check = _same_number_kind(value)
        else:
            n = ir.tensor(index, value.dim(), _dtype_name(value))
            check = _same_tensor_kind(value)
        self.params.append(Param(index, src.name, kind, n, value, src.getter))
        if src.getter is not None:
            self.guards.append((src.getter, check))
        self.slots[src.key] = n
        self.slot_of_param[index] = src.key
        return n

    def bake(self, src: Source, value):
        if src.getter is not None:
            self.guards.append((src.getter, _same_const(value)))
        return value

    def record(self, n: Node) -> Node:
        if n not in self.locs:
            loc = frame_loc(user_frame())
            if loc is not None:
                self.locs[n] = loc
        return n

    # -- substitution of captured values --
    def capture(self, value, src: Source):
        if _is_bool(value):
            return self.bake(src, bool(value))
        if _is_number(value):
            if src.key in self.constant_slots:
                return self.bake(src, _number(value))
            return ScalarRef(src, _number(value))
        if isinstance(value, torch.Tensor):
            return TensorRef(_TensorSlot(src, value))
        if isinstance(value, (tuple, list)) and value and not isinstance(value, torch.Size):
            return self._capture_sequence(value, src)
        if isinstance(value, dict) and value:
            return self._capture_dict(value, src)
        if isinstance(value, (ScalarRef, TensorRef)):  # a proxy of an enclosing trace
            return value
        if isinstance(value, (Mod, types.FunctionType, functools.partial, types.MethodType)):
            new = self.callable(value, src)
            if new is not value and src.getter is not None:
                self.guards.append((src.getter, lambda v, old=value: v is old))
            return new
        if _is_config_object(value):
            return self.obj(value)
        return value

    def _capture_dict(self, value: dict, src: Source):
        items = {}
        for k, v in value.items():
            getter = (lambda g=src.getter, k=k: g()[k]) if src.getter is not None else None
            items[k] = self.capture(
                v, Source(src.key + (("key", k),), f"{src.name}[{k!r}]", getter)
            )
        if all(items[k] is v for k, v in value.items()):
            return value
        return items

    def _capture_sequence(self, value, src: Source):
        items = []
        for i, v in enumerate(value):
            getter = (lambda g=src.getter, i=i: g()[i]) if src.getter is not None else None
            items.append(self.capture(v, Source(src.key + (i,), f"{src.name}[{i}]", getter)))
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(items) if isinstance(value, list) else tuple(items)

    def callable(self, fn, src: Source | None = None):
        """``fn`` rebuilt so that what it captures is traced; non-Python callables unchanged."""
        if isinstance(fn, Mod):
            if fn.fn is not None:
                return self.callable(fn.fn, src)
            return _InlinedMod(fn)
        if isinstance(fn, types.FunctionType):
            return self.function(fn) if _rebuildable(fn) else fn
        if isinstance(fn, functools.partial):
            return self._partial(fn)
        if isinstance(fn, types.MethodType):
            return types.MethodType(self.callable(fn.__func__), self.obj(fn.__self__))
        call = _class_attr(type(fn), "__call__")
        if isinstance(fn, torch.nn.Module):
            call = type(fn).forward
        if isinstance(call, types.FunctionType) and _rebuildable(call):
            return types.MethodType(self.function(call), self.obj(fn))
        return fn

    def _partial(self, p: functools.partial):
        self.keepalive.append(p)
        args = tuple(
            self.capture(v, Source(("partial", id(p), i), f"arg{i}", lambda p=p, i=i: p.args[i]))
            for i, v in enumerate(p.args)
        )
        kw = {
            k: self.capture(v, Source(("partial", id(p), k), k, lambda p=p, k=k: p.keywords[k]))
            for k, v in p.keywords.items()
        }
        return functools.partial(self.callable(p.func), *args, **kw)

    def obj(self, o):
        if isinstance(o, (types.ModuleType, type)):
            return o
        self.keepalive.append(o)
        return _ObjectRef(self, o)

    def function(self, fn: types.FunctionType):
        hit = self.rebuilt.get(id(fn))
        if hit is not None:
            return hit
        self.rebuilt[id(fn)] = fn  # a self-recursive function calls its original
        self.keepalive.append(fn)
        code = fn.__code__
        closure = fn.__closure__
        if closure:
            closure = tuple(self._cell(name, c) for name, c in zip(code.co_freevars, closure))
        new = types.FunctionType(code, self._globals(fn), fn.__name__, self._defaults(fn), closure)
        if fn.__kwdefaults__:
            new.__kwdefaults__ = {
                k: self.capture(
                    v, Source(("kwdefault", id(fn), k), k, lambda f=fn, k=k: f.__kwdefaults__[k])
                )
                for k, v in fn.__kwdefaults__.items()
            }
        new.__qualname__ = fn.__qualname__
        self.rebuilt[id(fn)] = new
        return new

    def _cell(self, name: str, cell):
        try:
            v = cell.cell_contents
        except ValueError:  # not assigned yet
            return cell
        new = self.capture(v, Source(("cell", id(cell)), name, lambda c=cell: c.cell_contents))
        return cell if new is v else types.CellType(new)

    def _globals(self, fn: types.FunctionType) -> dict:
        g = fn.__globals__
        overrides = {}
        for name in _global_names(fn.__code__):
            if name in g and not name.startswith("__"):
                v = g[name]
                new = self.capture(
                    v, Source(("global", id(g), name), name, lambda g=g, n=name: g[n])
                )
                if new is not v:
                    overrides[name] = new
        if not overrides:
            return g
        return {**g, **overrides}

    def _defaults(self, fn: types.FunctionType):
        d = fn.__defaults__
        if not d:
            return d
        code = fn.__code__
        first = code.co_argcount - len(d)
        return tuple(
            self.capture(
                v,
                Source(
                    ("default", id(fn), i),
                    code.co_varnames[first + i],
                    lambda f=fn, i=i: f.__defaults__[i],
                ),
            )
            for i, v in enumerate(d)
        )

    # -- the structural fallback --
    def need_value(self, n: Node, what: str):
        """Python needs a concrete value of ``n``: bake its parameters or raise."""
        ops = {m.op for m in n.walk()}
        if ops & (ir.LEAVES | {Op.TENSOR, Op.LOAD}):
            return None  # depends on indices / score / tensor data: the caller raises
        scalars = [m for m in n.walk() if m.op is Op.SCALAR]
        keys = {self.slot_of_param[m.arg[0]] for m in scalars}
        if keys:
            raise _NeedConstant(keys)
        from .evaluate import evaluate

        return evaluate(n, {}, ()).item()


# -- proxies -------------------------------------------------------------------------------------


def _tracer() -> _Tracer:
    tr = active_tracer()
    if tr is None:
        raise RuntimeError("attnforge: a traced value was used outside of tracing")
    return tr


def mk(op: Op, *src: Node, arg=None) -> Traced:
    return Traced(_tracer().record(ir.node(op, *src, arg=arg)))


def _const_of_tensor(t: torch.Tensor) -> Node:
    if t.dim() != 0:
        raise error_here(
            f"a tensor of shape {list(t.shape)} was used as a value inside a mod; a mod computes "
            "one element at a time",
            "index the tensor with the traced indices (e.g. `bias[h, q_idx]`), or use a 0-d "
            "tensor / Python number",
        )
    if t.requires_grad:  # a learnable scalar reached without a capture slot stays a parameter
        return TensorRef(_TensorSlot(Source(("obj", id(t)), "tensor", None), t)).node
    v = t.item()
    return ir.const(v)


def lift(x) -> Node | None:
    """The IR node for ``x`` (a proxy, Python number or 0-d tensor), or None if not a value."""
    if isinstance(x, Proxy):
        return x.node
    if _is_bool(x):
        return ir.const(bool(x))
    if _is_number(x):
        return ir.const(_number(x))
    if isinstance(x, torch.Tensor):
        return _const_of_tensor(x)
    return None


def lift_or_raise(x, what: str) -> Node:
    n = lift(x)
    if n is None:
        raise error_here(
            f"{what}: {type(x).__name__} {x!r:.60} is not a value a mod can use",
            "use traced values, Python numbers or captured tensors",
        )
    return n


def _truthy(n: Node) -> Node:
    return n if n.dtype is DType.BOOL else ir.node(Op.NE, n, ir.const(0))


def _torch_dtype_kind(dt) -> DType:
    if dt == torch.bool:
        return DType.BOOL
    if dt.is_floating_point:
        return DType.FLOAT
    if dt.is_complex:
        raise error_here(f"complex dtype {dt} is not supported in a mod")
    return DType.INT


def cast(x, kind: DType) -> Traced:
    n = lift_or_raise(x, "cast")
    if n.dtype is kind:
        return Traced(n)
    return mk(Op.CAST, n, arg=kind)


class Proxy:
    """Base of the traced values: a proxy for one IR node, with torch-like operators.

    The concrete kinds (:class:`Traced`, :class:`ScalarRef`, :class:`TensorRef`) are siblings,
    not subclasses of each other, so Python never prefers a reflected operator between them
    (``a < window`` stays ``lt``, it does not become ``window > a``).
    """

    __slots__ = ("_node",)

    def __init__(self, node: Node | None):
        self._node = node

    @property
    def node(self) -> Node:
        return self._node

    def __repr__(self):
        return f"{type(self).__name__}({self.node!r})"

    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(cls, func, types=(), args=(), kwargs=None):
        return call_torch(func, args, kwargs or {})

    # -- python operators --
    def _bin(self, op, other, reflected=False):
        # operands are lifted left to right so parameters are numbered in source order
        mine = None if reflected else self.node
        o = lift(other)
        if o is None:
            return NotImplemented
        a, b = (o, self.node) if reflected else (mine, o)
        if op in ir.LOGIC:
            _check_logic(op, a, b)
        return mk(op, a, b)

    def __add__(self, o):
        return self._bin(Op.ADD, o)

    def __radd__(self, o):
        return self._bin(Op.ADD, o, True)

    def __sub__(self, o):
        return self._bin(Op.SUB, o)

    def __rsub__(self, o):
        return self._bin(Op.SUB, o, True)

    def __mul__(self, o):
        return self._bin(Op.MUL, o)

    def __rmul__(self, o):
        return self._bin(Op.MUL, o, True)

    def __truediv__(self, o):
        return self._bin(Op.DIV, o)

    def __rtruediv__(self, o):
        return self._bin(Op.DIV, o, True)

    def __floordiv__(self, o):
        return self._bin(Op.FLOORDIV, o)

    def __rfloordiv__(self, o):
        return self._bin(Op.FLOORDIV, o, True)

    def __mod__(self, o):
        return self._bin(Op.MOD, o)

    def __rmod__(self, o):
        return self._bin(Op.MOD, o, True)

    def __pow__(self, o):
        return self._bin(Op.POW, o)

    def __rpow__(self, o):
        return self._bin(Op.POW, o, True)

    def __and__(self, o):
        return self._bin(Op.AND, o)

    def __rand__(self, o):
        return self._bin(Op.AND, o, True)

    def __or__(self, o):
        return self._bin(Op.OR, o)

    def __ror__(self, o):
        return self._bin(Op.OR, o, True)

    def __xor__(self, o):
        return self._bin(Op.XOR, o)

    def __rxor__(self, o):
        return self._bin(Op.XOR, o, True)

    def __lt__(self, o):
        return self._bin(Op.LT, o)

    def __le__(self, o):
        return self._bin(Op.LE, o)

    def __gt__(self, o):
        return self._bin(Op.GT, o)

    def __ge__(self, o):
        return self._bin(Op.GE, o)

    def __eq__(self, o):
        return self._bin(Op.EQ, o)  # type: ignore[override]

    def __ne__(self, o):
        return self._bin(Op.NE, o)  # type: ignore[override]

    def __neg__(self):
        return mk(Op.NEG, self.node)

    def __pos__(self):
        return self

    def __abs__(self):
        return mk(Op.ABS, self.node)

    def __invert__(self):
        n = self.node
        if n.dtype is DType.FLOAT:
            raise error_here(
                "`~` on a float value",
                "`~` is logical not on bools and bitwise "
                "not on ints; compare first, e.g. `~(score > 0)`",
            )
        return mk(Op.NOT, n)

    # -- Python asking for concrete values --
    def __bool__(self):
        frame = user_frame()
        value = _tracer().need_value(self.node, "bool")
        if value is not None:
            return bool(value)
        raise bool_error(frame)

    def _concrete(self, what: str, fix: str):
        frame = user_frame()
        value = _tracer().need_value(self.node, what)
        if value is not None:
            return value
        raise error_here(f"a traced value was used as a Python {what}", fix, frame)

    def __index__(self):
        v = self._concrete(
            "int (list index, range(), slice)",
            "capture a torch tensor instead of a Python list and index it with "
            "the traced value, e.g. `torch.tensor(sizes)[h]`",
        )
        return int(v)

    def __int__(self):
        return int(self._concrete("int (int())", "use `.long()` / `.to(torch.int64)` instead"))

    def __float__(self):
        return float(
            self._concrete(
                "float (float() or math.*)", "use `.float()` and torch functions instead of math.*"
            )
        )

    def __iter__(self):
        raise error_here("a traced value is not iterable", "a mod computes one element at a time")

    # -- tensor-like attributes and methods --
    @property
    def dtype(self):
        return _TORCH_DTYPE[self.node.dtype]

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def shape(self):
        return torch.Size([])

    ndim = 0

    def dim(self):
        return 0

    def size(self, d=None):
        if d is not None:
            raise error_here("a traced value is a scalar and has no size")
        return torch.Size([])

    def __getattr__(self, name):
        handler = HANDLERS.get(name)
        if handler is not None:
            return functools.partial(handler, self)
        if name.startswith("_") or not hasattr(torch.Tensor, name):
            raise AttributeError(name)
        raise unsupported_error(f"Tensor.{name}()")


class Traced(Proxy):
    """An intermediate traced value (an index leaf, the score, or a computed expression)."""

    __slots__ = ()


def _check_logic(op: Op, a: Node, b: Node):
    if DType.FLOAT in (a.dtype, b.dtype):
        sym = {Op.AND: "&", Op.OR: "|", Op.XOR: "^"}[op]
        raise error_here(
            f"`{sym}` on a float value",
            f"`{sym}` combines bool conditions (or ints bitwise); compare first, "
            "e.g. `(score > 0) " + sym + " (q_idx >= kv_idx)`",
        )


class ScalarRef(Proxy):
    """A captured Python number: becomes a parameter at its first use."""

    __slots__ = ("_src", "value")

    def __init__(self, src: Source, value):
        super().__init__(None)
        self._src = src
        self.value = value

    @property
    def node(self) -> Node:
        # not cached: the active tracer numbers it (a mod may build and trace another mod)
        return _tracer().param(self._src, self.value, "scalar")

    def __repr__(self):
        return f"ScalarRef({self._src.name}={self.value!r})"


class _TensorSlot:
    __slots__ = ("src", "value")

    def __init__(self, src: Source, value: torch.Tensor):
        self.src, self.value = src, value

    def param(self) -> Node:
        return _tracer().param(self.src, self.value, "tensor")


class TensorRef(Proxy):
    """A captured tensor (or a partly indexed / cast view of it).

    Indexing with traced or integer indices builds a ``load`` once every dim has an index.
    """

    __slots__ = ("slot", "prefix", "cast_to")

    def __init__(self, slot: _TensorSlot, prefix: tuple = (), cast_to: DType | None = None):
        super().__init__(None)
        self.slot, self.prefix, self.cast_to = slot, prefix, cast_to

    @property
    def _name(self) -> str:
        return self.slot.src.name

    @property
    def _rank(self) -> int:
        return self.slot.value.dim() - len(self.prefix)

    @property
    def node(self) -> Node:
        # rebuilt at each use, in the active tracer
        if self._rank != 0:
            raise error_here(
                f"captured tensor `{self._name}` (shape {list(self.slot.value.shape)}) is "
                f"used as a value with {len(self.prefix)} of its {self.slot.value.dim()} "
                "dims indexed",
                f"index every dim with a traced value or int, e.g. `{self._name}[h, q_idx]`",
            )
        t = self.slot.param()
        n = _tracer().record(ir.node(Op.LOAD, t, *self.prefix))
        if self.cast_to is not None and self.cast_to is not n.dtype:
            n = _tracer().record(ir.node(Op.CAST, n, arg=self.cast_to))
        return n

    def __repr__(self):
        return f"TensorRef({self._name}, indexed={len(self.prefix)})"

    def __getitem__(self, index):
        idx = index if isinstance(index, tuple) else (index,)
        if len(idx) > self._rank:
            raise error_here(
                f"captured tensor `{self._name}` has {self.slot.value.dim()} dim(s) but is "
                f"indexed with {len(self.prefix) + len(idx)} index(es)",
                "give exactly one index per dim",
            )
        nodes = tuple(self._index_node(i) for i in idx)
        return TensorRef(self.slot, self.prefix + nodes, self.cast_to)._settle()

    def _settle(self):
        return Traced(self.node) if self._rank == 0 else self

    def _index_node(self, i) -> Node:
        if isinstance(i, (slice, type(Ellipsis))) or i is None:
            raise error_here(
                f"slicing captured tensor `{self._name}` inside a mod is not supported",
                "index every dim with a single traced value or int; slice outside the mod",
            )
        n = lift(i)
        if n is None:
            raise error_here(
                f"cannot index captured tensor `{self._name}` with {type(i).__name__}",
                "use traced int values or Python ints",
            )
        if n.dtype is DType.FLOAT:
            raise error_here(
                f"a float value is used as an index into captured tensor `{self._name}`",
                "indices must be ints: use `//` instead of `/`, or convert with `.long()` / "
                "`.to(torch.int64)`",
            )
        if n.dtype is DType.BOOL:
            raise error_here(
                f"a bool value is used as an index into captured tensor `{self._name}`",
                "convert it to an int index with `.long()`, or use torch.where(cond, a, b)",
            )
        return n

    # metadata of the captured tensor; sizes become scalar parameters of their own
    @property
    def shape(self):
        t = self.slot.value
        src = self.slot.src
        dims = []
        for d in range(len(self.prefix), t.dim()):
            getter = _shape_getter(src.getter, d) if src.getter else None
            dims.append(
                ScalarRef(
                    Source(src.key + ("shape", d), f"{src.name}.shape[{d}]", getter),
                    int(t.shape[d]),
                )
            )
        return tuple(dims)

    def size(self, d=None):
        return self.shape if d is None else self.shape[d]

    def __len__(self):
        src = self.slot.src
        v = self.slot.value.shape[len(self.prefix)]
        if src.getter is not None:
            _tracer().guards.append(
                (_shape_getter(src.getter, len(self.prefix)), _same_const(int(v)))
            )
        return int(v)

    @property
    def ndim(self):
        return self._rank

    def dim(self):
        return self._rank

    @property
    def dtype(self):
        if self.cast_to is not None:
            return _TORCH_DTYPE[self.cast_to]
        return self.slot.value.dtype

    @property
    def device(self):
        return self.slot.value.device

    def view_cast(self, kind: DType | None):
        if self._rank == 0:
            return cast(self, kind) if kind is not None else Traced(self.node)
        return TensorRef(self.slot, self.prefix, kind or self.cast_to)

    def __getattr__(self, name):
        if self._rank == 0:
            return Proxy.__getattr__(self, name)
        if name in _VIEW_METHODS:
            return functools.partial(HANDLERS[name], self)
        if name.startswith("_"):
            raise AttributeError(name)
        raise error_here(
            f"`{self._name}.{name}` on a captured tensor inside a mod is not supported",
            f"compute it outside the mod and capture the result, or index `{self._name}` first",
        )


class _ObjectRef:
    """``self`` of a callable object: attribute reads go through capture (tracked slots)."""

    def __init__(self, tracer: _Tracer, obj):
        object.__setattr__(self, "_af_obj", obj)
        object.__setattr__(self, "_af_tracer", tracer)

    def __getattr__(self, name):
        obj = object.__getattribute__(self, "_af_obj")
        tracer = object.__getattribute__(self, "_af_tracer")
        value = getattr(obj, name)
        return tracer.capture(
            value, Source(("attr", id(obj), name), name, lambda o=obj, n=name: getattr(o, n))
        )

    def __call__(self, *args):
        obj = object.__getattribute__(self, "_af_obj")
        return object.__getattribute__(self, "_af_tracer").callable(obj)(*args)


class _InlinedMod:
    """A mod with no Python function (e.g. parsed from a spec): splice its IR in."""

    def __init__(self, mod: Mod):
        self.mod = mod

    def __call__(self, *args):
        tr = _tracer()
        names = arg_names(self.mod.kind)
        if len(args) != len(names):
            raise error_here(f"{self.mod.name} takes {len(names)} arguments ({', '.join(names)})")
        mapping: dict[Node, Node] = {
            _LEAF_OF[name]: lift_or_raise(a, name) for name, a in zip(names, args)
        }
        for p in self.mod.params:
            src = Source(
                ("mod", id(self.mod), p.index),
                p.name,
                p.getter if p.getter is not None else (lambda p=p: p.value),
            )
            mapping[p.node] = tr.param(src, p.current(), p.kind)
        tr.keepalive.append(self.mod)
        return Traced(substitute(self.mod.ir, mapping))


def substitute(root: Node, mapping: dict[Node, Node]) -> Node:
    """``root`` with the nodes in ``mapping`` replaced (structure otherwise rebuilt as is)."""
    new: dict[Node, Node] = {}
    for n in root.walk():
        if n in mapping:
            new[n] = mapping[n]
        elif n.src:
            src = tuple(new[s] for s in n.src)
            new[n] = n if src == n.src else ir.node(n.op, *src, arg=n.arg)
        else:
            new[n] = n
    return new[root]


# -- torch functions and tensor methods ----------------------------------------------------------


def unsupported_error(name: str) -> DSLError:
    tr = active_tracer()
    kind = f"{tr.kind}_mod" if tr is not None else "mod"
    return error_here(
        f"`{name}` is not supported in a {kind}",
        "supported: arithmetic and comparison operators, & | ~ ^, torch.where, clamp, "
        "minimum/maximum, exp/exp2/log/log2/tanh/sigmoid/abs/sqrt/rsqrt/sin/cos/erf/floor/ceil, "
        "pow, casts (.float() .long() .bool() .to()); compute anything else outside the mod "
        "and capture the result as a tensor",
    )


def _unary(op: Op):
    def handler(x, *, out=None):
        if out is not None:
            raise error_here("`out=` is not supported in a mod")
        return mk(op, lift_or_raise(x, op.value))

    return handler


def _binary(op: Op):
    def handler(a, b, *, out=None):
        if out is not None:
            raise error_here("`out=` is not supported in a mod")
        x, y = lift_or_raise(a, op.value), lift_or_raise(b, op.value)
        if op in ir.LOGIC:
            _check_logic(op, x, y)
        return mk(op, x, y)

    return handler


def _reflected(op: Op):
    fwd = _binary(op)
    return lambda a, b: fwd(b, a)


def _logical(op: Op):
    def handler(a, b=None, *, out=None):
        x = _truthy(lift_or_raise(a, op.value))
        if op is Op.NOT:
            return mk(Op.NOT, x)
        return mk(op, x, _truthy(lift_or_raise(b, op.value)))

    return handler


def _where(cond, x=None, y=None):
    if x is None or y is None:
        raise error_here(
            "torch.where(cond) with one argument is not supported in a mod",
            "use torch.where(cond, a, b)",
        )
    c = lift_or_raise(cond, "torch.where condition")
    if c.dtype is not DType.BOOL:
        raise error_here(
            "torch.where needs a bool condition", "compare first, e.g. torch.where(x != 0, a, b)"
        )
    return mk(Op.WHERE, c, lift_or_raise(x, "torch.where"), lift_or_raise(y, "torch.where"))


def _clamp(x, min=None, max=None, *, out=None):  # noqa: A002 - torch's keyword names
    if min is None and max is None:
        raise error_here("clamp() needs `min` or `max`")
    n = lift_or_raise(x, "clamp")
    if min is not None:
        n = _tracer().record(ir.node(Op.MAX, n, lift_or_raise(min, "clamp min")))
    if max is not None:
        n = _tracer().record(ir.node(Op.MIN, n, lift_or_raise(max, "clamp max")))
    return Traced(n)


def _min_max(op: Op, name: str):
    def handler(a, b=None, *args, **kwargs):
        if b is None or args or kwargs or not isinstance(b, (Proxy, torch.Tensor)):
            raise error_here(
                f"torch.{name} reduction / dim form is not supported in a mod",
                f"use the two-argument form torch.{name}imum(a, b)",
            )
        return _binary(op)(a, b)

    return handler


def _div(a, b, *, rounding_mode=None, out=None):
    if rounding_mode is None:
        return _binary(Op.DIV)(a, b)
    if rounding_mode == "floor":
        return _binary(Op.FLOORDIV)(a, b)
    if rounding_mode == "trunc":
        x, y = lift_or_raise(a, "div"), lift_or_raise(b, "div")
        if DType.FLOAT in (x.dtype, y.dtype):
            return _trunc(Traced(ir.node(Op.DIV, x, y)))
        q = ir.node(Op.FLOORDIV, x, y)
        inexact = ir.node(Op.NE, ir.node(Op.MUL, q, y), x)
        negative = ir.node(Op.LT, q, ir.const(0))
        fix = ir.node(Op.AND, negative, inexact)
        return mk(Op.WHERE, fix, ir.node(Op.ADD, q, ir.const(1)), q)
    raise error_here(f"div rounding_mode={rounding_mode!r} is not supported")


def _trunc(x):
    n = lift_or_raise(x, "trunc")
    if n.dtype is not DType.FLOAT:
        return Traced(n)
    return mk(Op.WHERE, ir.node(Op.LT, n, ir.const(0.0)), ir.node(Op.CEIL, n), ir.node(Op.FLOOR, n))


def _sign(x):
    n = lift_or_raise(x, "sign")
    zero = ir.const(0.0 if n.dtype is DType.FLOAT else 0)
    pos = ir.node(Op.CAST, ir.node(Op.GT, n, zero), arg=n.dtype)
    neg = ir.node(Op.CAST, ir.node(Op.LT, n, zero), arg=n.dtype)
    return mk(Op.SUB, pos, neg)


def _fill(value, like=None, dtype=None):
    kind = (
        _torch_dtype_kind(dtype)
        if dtype is not None
        else (
            lift_or_raise(like, "fill").dtype
            if like is not None
            else lift_or_raise(value, "").dtype
        )
    )
    n = lift_or_raise(value, "fill value")
    if n.op is Op.CONST:  # fold: a constant of the requested kind
        py = {DType.BOOL: bool, DType.INT: int, DType.FLOAT: float}[kind]
        return Traced(ir.const(py(n.arg)))
    return cast(Traced(n), kind)


def _full_like(x, fill_value, *, dtype=None, **_):
    return _fill(fill_value, x, dtype)


def _constant_like(v):
    def handler(x, *args, dtype=None, **_):
        return _fill(v, x, dtype)

    return handler


def _new_const(v):
    def handler(x, size=(), *args, dtype=None, **kwargs):
        _scalar_size(size)
        return _fill(v, x, dtype)

    return handler


def _new_full(x, size, fill_value, *, dtype=None, **_):
    _scalar_size(size)
    return _fill(fill_value, x, dtype)


def _new_tensor(x, data, *, dtype=None, **_):
    return _fill(data, x, dtype)


def _scalar_size(size):
    if tuple(size) not in ((), (1,)):
        raise error_here(
            f"a mod computes one element: size {tuple(size)} is not supported", "use size=()"
        )


def _to(x, *args, dtype=None, **kwargs):
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (Proxy, torch.Tensor)):
            dtype = a.dtype
    kind = _torch_dtype_kind(dtype) if dtype is not None else None
    if isinstance(x, TensorRef):
        return x.view_cast(kind)
    return cast(x, kind) if kind is not None else x


def _cast_to(kind: DType):
    def handler(x, *args, **kwargs):
        if isinstance(x, TensorRef):
            return x.view_cast(kind)
        return cast(x, kind)

    return handler


def _identity(x, *args, **kwargs):
    return x


def _getitem(t, index):
    if isinstance(t, TensorRef):
        return t[index]
    if isinstance(t, torch.Tensor):  # a tensor the tracer could not capture through a slot
        ref = TensorRef(_TensorSlot(Source(("obj", id(t)), "tensor", None), t))
        _tracer().keepalive.append(t)
        return ref[index]
    raise unsupported_error("__getitem__")


def _composite(build):
    def handler(x, *args, **kwargs):
        return Traced(_tracer().record(build(lift_or_raise(x, "value"), *args, **kwargs)))

    return handler


_LN10 = 2.302585092994046

_COMPOSITES = {
    "square": lambda n: ir.node(Op.MUL, n, n),
    "relu": lambda n: ir.node(Op.MAX, n, ir.const(0 if n.dtype is DType.INT else 0.0)),
    "reciprocal": lambda n: ir.node(Op.DIV, ir.const(1.0), n),
    "log10": lambda n: ir.node(Op.DIV, ir.node(Op.LOG, n), ir.const(_LN10)),
    "log1p": lambda n: ir.node(Op.LOG, ir.node(Op.ADD, n, ir.const(1.0))),
    "expm1": lambda n: ir.node(Op.SUB, ir.node(Op.EXP, n), ir.const(1.0)),
    "tan": lambda n: ir.node(Op.DIV, ir.node(Op.SIN, n), ir.node(Op.COS, n)),
}

HANDLERS: dict[str, Callable] = {
    **{op.value: _unary(op) for op in ir.UNARY_MATH},
    "absolute": _unary(Op.ABS),
    "neg": _unary(Op.NEG),
    "negative": _unary(Op.NEG),
    "expit": _unary(Op.SIGMOID),
    "add": _binary(Op.ADD),
    "sub": _binary(Op.SUB),
    "subtract": _binary(Op.SUB),
    "mul": _binary(Op.MUL),
    "multiply": _binary(Op.MUL),
    "div": _div,
    "divide": _div,
    "true_divide": _binary(Op.DIV),
    "floor_divide": _binary(Op.FLOORDIV),
    "remainder": _binary(Op.MOD),
    "pow": _binary(Op.POW),
    "float_power": _binary(Op.POW),
    "minimum": _binary(Op.MIN),
    "maximum": _binary(Op.MAX),
    "fmin": _binary(Op.MIN),
    "fmax": _binary(Op.MAX),
    "min": _min_max(Op.MIN, "min"),
    "max": _min_max(Op.MAX, "max"),
    "eq": _binary(Op.EQ),
    "ne": _binary(Op.NE),
    "not_equal": _binary(Op.NE),
    "lt": _binary(Op.LT),
    "less": _binary(Op.LT),
    "le": _binary(Op.LE),
    "less_equal": _binary(Op.LE),
    "gt": _binary(Op.GT),
    "greater": _binary(Op.GT),
    "ge": _binary(Op.GE),
    "greater_equal": _binary(Op.GE),
    "bitwise_and": _binary(Op.AND),
    "bitwise_or": _binary(Op.OR),
    "bitwise_xor": _binary(Op.XOR),
    "bitwise_not": lambda x: ~Traced(lift_or_raise(x, "bitwise_not")),
    "logical_and": _logical(Op.AND),
    "logical_or": _logical(Op.OR),
    "logical_xor": _logical(Op.XOR),
    "logical_not": _logical(Op.NOT),
    "where": _where,
    "clamp": _clamp,
    "clip": _clamp,
    "clamp_min": lambda x, m: _clamp(x, min=m),
    "clamp_max": lambda x, m: _clamp(x, max=m),
    "trunc": _trunc,
    "fix": _trunc,
    "sign": _sign,
    **{name: _composite(build) for name, build in _COMPOSITES.items()},
    "full_like": _full_like,
    "zeros_like": _constant_like(0),
    "ones_like": _constant_like(1),
    "new_ones": _new_const(1),
    "new_zeros": _new_const(0),
    "new_full": _new_full,
    "new_tensor": _new_tensor,
    "to": _to,
    "type_as": lambda x, other: _to(x, other),
    "float": _cast_to(DType.FLOAT),
    "double": _cast_to(DType.FLOAT),
    "half": _cast_to(DType.FLOAT),
    "bfloat16": _cast_to(DType.FLOAT),
    "int": _cast_to(DType.INT),
    "long": _cast_to(DType.INT),
    "short": _cast_to(DType.INT),
    "bool": _cast_to(DType.BOOL),
    "contiguous": _identity,
    "clone": _identity,
    "detach": _identity,
    "cpu": _identity,
    "cuda": _identity,
    "squeeze": _identity,
    "__getitem__": _getitem,
}
_VIEW_METHODS = frozenset(
    {
        "to",
        "float",
        "double",
        "half",
        "bfloat16",
        "int",
        "long",
        "short",
        "bool",
        "contiguous",
        "clone",
        "detach",
        "cpu",
        "cuda",
        "type_as",
    }
)

# Tensor dunders reach __torch_function__ when a real tensor is on the left of a proxy.
_DUNDERS = {
    "add": Op.ADD,
    "sub": Op.SUB,
    "mul": Op.MUL,
    "truediv": Op.DIV,
    "div": Op.DIV,
    "floordiv": Op.FLOORDIV,
    "mod": Op.MOD,
    "pow": Op.POW,
    "and": Op.AND,
    "or": Op.OR,
    "xor": Op.XOR,
}
for _name, _op in _DUNDERS.items():
    HANDLERS[f"__{_name}__"] = _binary(_op)
    HANDLERS[f"__r{_name}__"] = _reflected(_op)
for _name, _op in {
    "lt": Op.LT,
    "le": Op.LE,
    "gt": Op.GT,
    "ge": Op.GE,
    "eq": Op.EQ,
    "ne": Op.NE,
}.items():
    HANDLERS[f"__{_name}__"] = _binary(_op)
HANDLERS["__neg__"] = _unary(Op.NEG)
HANDLERS["__abs__"] = _unary(Op.ABS)
HANDLERS["__invert__"] = HANDLERS["bitwise_not"]


def _function_table() -> dict[Any, str]:
    table: dict[Any, str] = {}
    owners = [torch, torch.Tensor, torch.special, torch.nn.functional]
    for name in HANDLERS:
        for owner in owners:
            f = getattr(owner, name, None)
            if f is not None and callable(f) and not isinstance(f, type):
                try:
                    table.setdefault(f, name)
                except TypeError:
                    pass
    return table


_FUNC_NAMES = _function_table()


def _qualified_name(func) -> str:
    name = getattr(func, "__name__", repr(func))
    for prefix, owner in (
        ("torch", torch),
        ("torch.nn.functional", torch.nn.functional),
        ("torch.special", torch.special),
        ("Tensor", torch.Tensor),
    ):
        if getattr(owner, name, None) is func:
            return f"{prefix}.{name}"
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module else name


def call_torch(func, args, kwargs):
    name = _FUNC_NAMES.get(func)
    if name is None:
        if getattr(func, "__name__", None) == "__get__":  # attribute access on a proxy
            return func(*args, **kwargs)
        raise unsupported_error(_qualified_name(func))
    return HANDLERS[name](*args, **kwargs)


# -- tracing entry point ---------------------------------------------------------------------------


def check_arity(fn, kind: str, name: str) -> None:
    names = arg_names(kind)
    want = len(names)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    ps = list(sig.parameters.values())
    positional = [p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    variadic = any(p.kind is p.VAR_POSITIONAL for p in ps)
    kw_required = [p for p in ps if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if len(required) <= want and (variadic or len(positional) >= want) and not kw_required:
        return
    got = f"{len(positional)} positional argument(s) ({', '.join(p.name for p in positional)})"
    if kw_required:
        got += f" and required keyword(s) {', '.join(p.name for p in kw_required)}"
    other = "mask" if kind == "score" else "score"
    hint = ""
    if len(required) == len(arg_names(other)):
        hint = f"; it looks like a {other}_mod: pass it as {other}_mod (or @af.{other}_mod)"
    raise error_at_def(
        fn,
        f"{kind}_mod `{name}` takes {got}, but a {kind}_mod is called with {want}: "
        f"({', '.join(names)})",
        f"define it as `{_signature_text(fn, name, names)}`{hint}",
    )


def _signature_text(fn, name: str, names) -> str:
    if name == "<lambda>":
        return f"lambda {', '.join(names)}: ..."
    return f"def {name}({', '.join(names)}): ..."


def _finish(tr: _Tracer, out, fn, name: str) -> Node:
    if out is None:
        raise error_at_def(
            fn,
            f"{tr.kind}_mod `{name}` returned None",
            "return a traced expression, e.g. `return q_idx >= kv_idx`",
        )
    if isinstance(out, (tuple, list)):
        raise error_at_def(
            fn, f"{tr.kind}_mod `{name}` returned a {type(out).__name__}", "return a single value"
        )
    root = lift_or_raise(out, f"{tr.kind}_mod `{name}` return value")
    where = tr.locs.get(root)
    if tr.kind == "mask" and root.dtype is not DType.BOOL:
        raise _located(
            where,
            fn,
            f"mask_mod `{name}` must return a bool, but it returns {_an(root.dtype.value)} value",
            "return a comparison such as `q_idx >= kv_idx`; to change scores use a score_mod",
        )
    if tr.kind == "score":
        if root.dtype is DType.BOOL:
            raise _located(
                where,
                fn,
                f"score_mod `{name}` returns a bool; a score_mod must return the new score",
                "pass it as mask_mod (create_block_mask / @af.mask_mod), or return "
                "torch.where(cond, score, -float('inf'))",
            )
        if root.dtype is DType.INT:
            root = ir.node(Op.CAST, root, arg=DType.FLOAT)
    return root


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _located(loc: SourceLoc | None, fn, message: str, fix: str) -> DSLError:
    if loc is None:
        return error_at_def(fn, message, fix)
    return DSLError(
        message,
        file=loc.file,
        line=loc.line,
        col=loc.col or None,
        source_line=loc.text or None,
        fix=fix,
    )


def _compact(root: Node, tr: _Tracer) -> tuple[Node, tuple[Param, ...], dict]:
    """Drop parameters that the result does not use, renumbering the rest in order."""
    live = {n for n in root.walk() if n.op in ir.PARAMS}
    kept = [p for p in tr.params if p.node in live]
    if len(kept) == len(tr.params):
        return root, tuple(tr.params), tr.locs
    mapping: dict[Node, Node] = {}
    params = []
    for i, p in enumerate(kept):
        a = p.node.arg
        n = ir.scalar(i, p.node.dtype) if p.node.op is Op.SCALAR else ir.tensor(i, a[1], a[2])
        mapping[p.node] = n
        params.append(Param(i, p.name, p.kind, n, p.value, p.getter))
    new_root = substitute(root, mapping)
    return new_root, tuple(params), dict(tr.locs)


def trace_function(fn, kind: str, name: str | None = None) -> TraceResult:
    """Trace ``fn`` (a plain function, partial, callable object or Mod) into a TraceResult."""
    names = arg_names(kind)
    name = name or getattr(fn, "__name__", None) or type(fn).__name__
    check_arity(fn, kind, name)
    constant_slots: frozenset = frozenset()
    for _ in range(_MAX_TRACES):
        tr = _Tracer(kind, constant_slots)
        stack = _state.__dict__.setdefault("stack", [])
        stack.append(tr)
        try:
            f = tr.callable(fn)
            out = f(*(Traced(_LEAF_OF[n]) for n in names))
            root = _finish(tr, out, fn, name)
        except _NeedConstant as e:
            if e.keys <= constant_slots:
                raise RuntimeError("attnforge tracer: baking parameters did not converge") from e
            constant_slots = constant_slots | e.keys
            continue
        finally:
            stack.pop()
        root, params, locs = _compact(root, tr)
        return TraceResult(root, params, locs, tuple(tr.guards))
    raise RuntimeError(f"attnforge tracer: {name} needed more than {_MAX_TRACES} traces")


__all__ = [
    "TraceResult",
    "trace_function",
    "guards_hold",
    "check_arity",
    "Traced",
    "TensorRef",
    "ScalarRef",
    "user_frame",
    "error_here",
    "error_at_def",
    "def_location",
    "substitute",
    "arg_names",
    "HANDLERS",
]
