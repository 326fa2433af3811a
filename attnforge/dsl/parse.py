"""The text DSL: named attention variants parsed (Lark, LALR) to the same IR as the Python tracer.

Example::

    from attnforge.dsl.parse import parse_spec
    variants = parse_spec('''
    variant softcap_causal(cap = 30.0):
        score = cap * tanh(score / cap)
        mask  = q_idx >= kv_idx

    variant doc_mask(doc: tensor[int32, 1]):
        mask = doc[q_idx] == doc[kv_idx]
    ''')
    variants["softcap_causal"].score_mod.ir.key     # == the traced Python twin's key
    variants["doc_mask"].bind(doc=torch.zeros(128, dtype=torch.int32))

Language, by example::

    variant name(p = 1.0, w: int = 8, bias: tensor[float32, 2], n: int):   # params
        let d = q_idx - kv_idx          # a local (`d = ...` works too)
        score = score + bias[h, d + w]  # the score mod; `score` is the scaled logit
        mask = (d >= 0) and (d < w)     # the mask mod; boolean

Expressions are Python expressions (same operators and precedence) over the leaves ``score b h
q_idx kv_idx``, parameters, literals (``inf``, ``pi``, ``true``/``false``) and the functions in
``FUNCTIONS``; ``and or not`` are logical aliases of ``& | ~`` on booleans, and comparisons
chain (``0 <= d < w``).  Each statement line is built exactly as Python would evaluate it, so a
spec and its Python twin give the same IR: literal arithmetic folds as in Python, parameters are
numbered per mod in order of first use.  Nothing in the user's text is ``eval``-ed.
"""

from __future__ import annotations

import difflib
import functools
import math
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import ir
from .errors import DSLError
from .ir import DType, Node, Op
from .mod import Mod, Param, SourceLoc

__all__ = ["parse_spec", "SpecVariant", "FUNCTIONS"]

LEAF_NAMES = {"score": ir.SCORE, "b": ir.B, "h": ir.H, "q_idx": ir.Q_IDX, "kv_idx": ir.KV_IDX}
CONSTANTS = {
    "inf": math.inf,
    "pi": math.pi,
    "true": True,
    "false": False,
    "True": True,
    "False": False,
}
OUTPUTS = ("score", "mask")

_UNARY_FUNCS = {
    "exp": Op.EXP, "exp2": Op.EXP2, "log": Op.LOG, "log2": Op.LOG2, "tanh": Op.TANH,
    "sigmoid": Op.SIGMOID, "abs": Op.ABS, "sqrt": Op.SQRT, "rsqrt": Op.RSQRT, "sin": Op.SIN,
    "cos": Op.COS, "erf": Op.ERF, "floor": Op.FLOOR, "ceil": Op.CEIL,
}  # fmt: skip

# Python-number versions, used to fold calls on literals as Python code would.
_FOLD_UNARY: dict[Op, Callable] = {
    Op.EXP: math.exp, Op.EXP2: lambda x: 2.0**x, Op.LOG: math.log, Op.LOG2: math.log2,
    Op.TANH: math.tanh, Op.SIGMOID: lambda x: 1.0 / (1.0 + math.exp(-x)), Op.ABS: abs,
    Op.SQRT: math.sqrt, Op.RSQRT: lambda x: 1.0 / math.sqrt(x), Op.SIN: math.sin,
    Op.COS: math.cos, Op.ERF: math.erf, Op.FLOOR: lambda x: float(math.floor(x)),
    Op.CEIL: lambda x: float(math.ceil(x)),
}  # fmt: skip

_BINOPS: dict[str, tuple[Op, Callable]] = {
    "add": (Op.ADD, operator.add),
    "sub": (Op.SUB, operator.sub),
    "mul": (Op.MUL, operator.mul),
    "truediv": (Op.DIV, operator.truediv),
    "floordiv": (Op.FLOORDIV, operator.floordiv),
    "mod": (Op.MOD, operator.mod),
    "pow": (Op.POW, operator.pow),
    "bit_and": (Op.AND, operator.and_),
    "bit_or": (Op.OR, operator.or_),
    "bit_xor": (Op.XOR, operator.xor),
}
_SYMBOL = {"bit_and": "&", "bit_or": "|", "bit_xor": "^"}
_COMPARE = {
    "<": (Op.LT, operator.lt), "<=": (Op.LE, operator.le), ">": (Op.GT, operator.gt),
    ">=": (Op.GE, operator.ge), "==": (Op.EQ, operator.eq), "!=": (Op.NE, operator.ne),
}  # fmt: skip
_LOGICAL = {"logical_and": (Op.AND, "and"), "logical_or": (Op.OR, "or")}

SCALAR_TYPES = {"int": DType.INT, "float": DType.FLOAT}
TENSOR_DTYPES = tuple("bool uint8 int8 int16 int32 int64 float16 bfloat16 float32 float64".split())

# name -> (min args, max args or None); documented in the module docstring.
FUNCTIONS: dict[str, tuple[int, int | None]] = {
    **{name: (1, 1) for name in _UNARY_FUNCS},
    "where": (3, 3),
    "min": (2, None),
    "max": (2, None),
    "clamp": (3, 3),
    "float": (1, 1),
    "int": (1, 1),
}


# -- public types ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamDecl:
    """A declared parameter: a scalar (``dtype``) or a tensor (``torch_dtype``, ``ndim``)."""

    name: str
    kind: str  # "scalar" | "tensor"
    dtype: DType
    default: Any = None
    torch_dtype: str | None = None
    ndim: int | None = None

    @property
    def type_name(self) -> str:
        if self.kind == "tensor":
            return f"tensor[{self.torch_dtype}, {self.ndim}]"
        return self.dtype.value

    def node(self, index: int) -> Node:
        if self.kind == "tensor":
            return ir.tensor(index, self.ndim, self.torch_dtype)
        return ir.scalar(index, self.dtype)

    def check(self, value: Any, variant: str) -> Any:
        """``value`` converted for this parameter, or a ``ValueError`` naming the fix."""
        if value is None:
            return None
        where = f"parameter {self.name!r} of variant {variant!r}"
        if self.kind == "tensor":
            return self._check_tensor(value, where)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{where} is {self.type_name}; got {value!r}")
        if self.dtype is DType.INT:
            if not isinstance(value, numbers.Integral):
                raise ValueError(f"{where} is int; got {value!r} (pass an integer)")
            return int(value)
        return float(value)

    def _check_tensor(self, value: Any, where: str) -> Any:
        import torch

        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where} is {self.type_name}; got {type(value).__name__}")
        got = str(value.dtype).removeprefix("torch.")
        if got != self.torch_dtype or value.dim() != self.ndim:
            raise ValueError(
                f"{where} is declared {self.type_name} but got a {got} tensor of shape "
                f"{tuple(value.shape)}; pass a matching tensor (e.g. t.to(torch."
                f"{self.torch_dtype})) or change the declaration"
            )
        return value


@dataclass(frozen=True, eq=False)
class SpecVariant:
    """A parsed variant: its score and mask mods (``Mod`` or None) and parameter values.

    ``params`` maps each parameter name to its value (the default, None when a value must be
    supplied with :meth:`bind`).
    """

    name: str
    score_mod: Mod | None
    mask_mod: Mod | None
    params: dict[str, Any]
    decls: dict[str, ParamDecl] = field(repr=False, default_factory=dict)
    loc: SourceLoc | None = field(repr=False, default=None)

    @property
    def param_types(self) -> dict[str, str]:
        return {name: d.type_name for name, d in self.decls.items()}

    def bind(self, **values: Any) -> SpecVariant:
        """A copy with some parameter values replaced (same IR, so the same compiled kernels)."""
        for name in values:
            if name not in self.decls:
                raise TypeError(
                    f"variant {self.name!r} has no parameter {name!r}"
                    f"{_suggest(name, self.decls)} (parameters: {', '.join(self.decls) or 'none'})"
                )
        new = dict(self.params)
        for name, value in values.items():
            new[name] = self.decls[name].check(value, self.name)
        return SpecVariant(
            self.name,
            _rebind(self.score_mod, new),
            _rebind(self.mask_mod, new),
            new,
            self.decls,
            self.loc,
        )

    def missing(self) -> list[str]:
        """Parameters that still need a value."""
        return [name for name, value in self.params.items() if value is None]


def _rebind(mod: Mod | None, values: dict[str, Any]) -> Mod | None:
    if mod is None:
        return None
    params = tuple(_param(p.index, p.name, p.kind, p.node, values) for p in mod.params)
    return Mod(mod.kind, mod.ir, params, None, mod.name, mod.locs)


def _param(index: int, name: str, kind: str, node: Node, values: dict[str, Any]) -> Param:
    return Param(index, name, kind, node, values[name], lambda: values[name])


# -- entry point ----------------------------------------------------------------------------------


def parse_spec(text: str, filename: str = "<spec>") -> dict[str, SpecVariant]:
    """Parse a spec into its variants by name. Mistakes raise :class:`DSLError` (line, col)."""
    src = _Source(text, filename)
    tree = _parse_tree(src)
    variants: dict[str, SpecVariant] = {}
    for vtree in tree.children:
        name_tok = vtree.children[0]
        if name_tok in variants:
            first = variants[name_tok].loc
            src.fail(
                f"duplicate variant {str(name_tok)!r} (first defined on line {first.line})",
                name_tok,
            )
        variants[str(name_tok)] = _VariantBuilder(src, vtree).build()
    return variants


# -- source text and errors -----------------------------------------------------------------------


class _Source:
    def __init__(self, text: str, filename: str):
        self.text = text
        self.filename = filename
        self.lines = text.splitlines()

    def loc(self, line: int, col: int) -> SourceLoc:
        return SourceLoc(self.filename, line, col, self.line_text(line))

    def line_text(self, line: int) -> str:
        return self.lines[line - 1] if 0 < line <= len(self.lines) else ""

    def error(self, message: str, at: Any, fix: str | None = None) -> DSLError:
        """``at``: a lark Token, Tree (meta) or ``(line, col[, end_col])``."""
        line, col, end_col = _position(at)
        return DSLError(
            message,
            file=self.filename,
            line=line,
            col=col,
            source_line=self.line_text(line) or None,
            fix=fix,
            end_col=end_col,
        )

    def fail(self, message: str, at: Any, fix: str | None = None):
        raise self.error(message, at, fix)


def _position(at: Any) -> tuple[int, int, int | None]:
    if isinstance(at, tuple):
        return (*at, None)[:3] if len(at) == 2 else at
    meta = getattr(at, "meta", None)
    if meta is not None and not getattr(meta, "empty", True):
        end = meta.end_column if meta.end_line == meta.line else None
        return meta.line, meta.column, end
    line, col = getattr(at, "line", None), getattr(at, "column", None)
    end = getattr(at, "end_column", None) if getattr(at, "end_line", None) == line else None
    return line, col, end


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- Lark: grammar, indentation, syntax errors ----------------------------------------------------


@functools.lru_cache(maxsize=1)
def _lark():
    # Imported here so that the rest of attnforge works without lark installed.
    try:
        import lark
        import lark.indenter
    except ImportError as e:  # pragma: no cover - exercised only without lark
        raise ImportError("the attnforge text DSL needs lark: pip install 'lark>=1.1.9'") from e
    from importlib import resources

    grammar = resources.files("attnforge.dsl").joinpath("grammar.lark").read_text()
    postlex = _make_postlex(lark)
    parser = lark.Lark(
        grammar,
        parser="lalr",
        lexer="basic",
        propagate_positions=True,
        postlex=postlex,
        maybe_placeholders=True,
    )
    return lark, parser, postlex


class _LayoutError(Exception):
    def __init__(self, message: str, token: Any):
        super().__init__(message)
        self.message = message
        self.token = token


def _make_postlex(lark):
    """Python-style INDENT/DEDENT with positions in errors, and a record of recent tokens."""

    class Layout(lark.indenter.Indenter):
        NL_type = "_NL"
        OPEN_PAREN_types = ["LPAR", "LSQB"]
        CLOSE_PAREN_types = ["RPAR", "RSQB"]
        INDENT_type = "_INDENT"
        DEDENT_type = "_DEDENT"
        tab_len = 8

        def process(self, stream):
            self.opened = []
            self.recent = []
            return super().process(self._track(stream))

        def _track(self, stream):
            for tok in stream:
                if tok.type in self.OPEN_PAREN_types:
                    self.opened.append(tok)
                elif tok.type in self.CLOSE_PAREN_types:
                    if not self.opened:
                        raise _LayoutError(f"unmatched {tok.value!r}", tok)
                    self.opened.pop()
                if tok.type != self.NL_type:
                    self.recent = [*self.recent[-2:], tok]
                yield tok
            if self.opened:
                raise _LayoutError(f"{self.opened[-1].value!r} was never closed", self.opened[-1])

        def handle_NL(self, token):
            indent = token.rsplit("\n", 1)[1]
            width = indent.count(" ") + indent.count("\t") * self.tab_len
            if self.paren_level == 0 and width < self.indent_level[-1]:
                if width not in self.indent_level:
                    at = (token.end_line, width + 1)
                    raise _LayoutError("unindent does not match any outer indentation level", at)
            yield from super().handle_NL(token)

    return Layout()


def _parse_tree(src: _Source):
    lark, parser, postlex = _lark()
    try:
        return parser.parse(src.text + "\n")
    except _LayoutError as e:
        raise src.error(e.message, e.token) from None
    except lark.exceptions.UnexpectedCharacters as e:
        raise src.error(_bad_character(src.text[e.pos_in_stream]), (e.line, e.column)) from None
    except lark.exceptions.UnexpectedToken as e:
        prev = _previous(postlex.recent, e.token)
        message, at = _explain(e.token, set(e.expected), prev, postlex.opened)
        raise src.error(message, at) from None


def _previous(recent: list, tok):
    """The token before the unexpected one (newlines and indentation excluded)."""
    if recent and recent[-1] is tok:
        recent = recent[:-1]
    return recent[-1] if recent else None


def _bad_character(ch: str) -> str:
    hints = {
        "!": " (use `not` or ~ for negation)",
        "?": " (use where(cond, a, b))",
        "'": " (strings are not supported)",
        '"': " (strings are not supported)",
    }
    return f"unexpected character {ch!r}{hints.get(ch, '')}"


_EXPR_START = {"INT", "FLOAT", "LPAR"}
_READABLE = {
    "_NL": "end of line", "$END": "end of input", "_INDENT": "indent", "_DEDENT": "dedent",
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "COMP_OP": "a comparison",
}  # fmt: skip


def _describe(tok) -> str:
    if tok.type in ("_NL", "$END", "_INDENT", "_DEDENT"):
        return _READABLE[tok.type]
    return repr(str(tok.value))


def _after(prev) -> tuple[int, int]:
    """The position just after token ``prev`` (where a missing piece belongs)."""
    return prev.end_line, prev.end_column


def _explain(tok, expected: set[str], prev, opened: list) -> tuple[str, Any]:
    """A labelled message for an unexpected token, and where to put the caret."""
    prev_text = repr(str(prev.value)) if prev is not None else None
    missing_at = _after(prev) if prev is not None and tok.type in ("_NL", "$END") else tok
    if tok.type == "_INDENT":
        return "unexpected indent", (tok.end_line, tok.end_column)  # the indented line
    if "_INDENT" in expected:
        return "expected an indented block after the variant header", tok
    if opened and "RPAR" in expected | {"RSQB"} and tok.line > opened[-1].line:
        return f"{opened[-1].value!r} was never closed", opened[-1]
    if _EXPR_START <= expected:
        if prev_text is None:
            return "expected an expression", missing_at
        return f"expected an expression after {prev_text}", missing_at
    if "VARIANT" in expected and "NAME" not in expected:
        return "expected `variant name(...):` at the top level", tok
    if expected >= {"LET", "NAME"}:
        return ("expected a statement such as `score = ...`, `mask = ...` or `let x = ...`", tok)
    if "EQUAL" in expected and prev is not None and prev.type == "NAME" and "COLON" not in expected:
        return f"expected '=' after {prev_text}", missing_at
    if "COLON" in expected and prev is not None and prev.type == "RPAR":
        return "expected ':' after the variant header", missing_at
    if expected == {"NAME"} and prev is not None and prev.type == "VARIANT":
        return "expected a variant name after 'variant'", missing_at
    if "RPAR" in expected and "COMMA" in expected and "NAME" not in expected:
        return f"expected ',' or ')' before {_describe(tok)}", tok
    if tok.type in ("_NL", "$END") and expected & {"RPAR", "RSQB"}:
        return f"unexpected {_describe(tok)}", missing_at
    wanted = ", ".join(sorted(_READABLE.get(t, t.lower()) for t in expected))
    return f"unexpected {_describe(tok)} (expected one of: {wanted})", tok


# -- building IR ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorRef:
    decl: ParamDecl
    at: Any  # the NAME token, for errors


@dataclass(frozen=True)
class _ScalarRef:
    """A scalar parameter not yet used by an op (the tracer numbers parameters at first use)."""

    decl: ParamDecl


@dataclass
class _Stmt:
    target: str
    expr: Any  # lark Tree
    tree: Any
    deps: set[int] = field(default_factory=set)


class _VariantBuilder:
    def __init__(self, src: _Source, vtree):
        self.src = src
        name_tok, *param_trees, body = vtree.children
        self.name = str(name_tok)
        self.loc = src.loc(name_tok.line, name_tok.column)
        self.decls = self._declare(p for p in param_trees if p is not None)
        self.stmts = [_Stmt(str(t.children[0]), t.children[1], t) for t in body.children]

    # -- parameters --

    def _declare(self, trees) -> dict[str, ParamDecl]:
        decls: dict[str, ParamDecl] = {}
        for t in trees:
            name_tok, ptype, default = t.children
            name = str(name_tok)
            if name in decls:
                self.src.fail(f"duplicate parameter {name!r} in variant {self.name!r}", name_tok)
            if name in LEAF_NAMES or name in OUTPUTS or name in CONSTANTS or name in FUNCTIONS:
                self.src.fail(
                    f"parameter name {name!r} is reserved", name_tok, fix="choose another name"
                )
            decls[name] = self._decl(name, name_tok, ptype, default)
        return decls

    def _decl(self, name: str, name_tok, ptype, default) -> ParamDecl:
        value = None if default is None else self._constant(default, name)
        if ptype is not None and ptype.data == "tensor_type":
            if default is not None:
                self.src.fail(
                    f"tensor parameter {name!r} cannot have a default",
                    default,
                    fix="supply the tensor when calling the variant (bind)",
                )
            return self._tensor_decl(name, ptype)
        if ptype is None:
            if value is None:
                self.src.fail(
                    f"parameter {name!r} needs a type or a default",
                    name_tok,
                    fix=f"write `{name}: float`, `{name}: int = 0` or `{name} = 1.0`",
                )
            dtype = _dtype_of(value)
            if dtype is DType.BOOL:
                # The tracer bakes captured bools into the structure; a spec says so explicitly.
                self.src.fail(
                    f"parameter {name!r} is a bool; bool parameters are not supported",
                    default,
                    fix="write two variants, or use an int parameter (0/1) in the expressions",
                )
        else:
            type_tok = ptype.children[0]
            if str(type_tok) not in SCALAR_TYPES:
                self.src.fail(
                    f"unknown type {str(type_tok)!r}{_suggest(str(type_tok), SCALAR_TYPES)}",
                    type_tok,
                    fix="use int, float or tensor[dtype, ndim]",
                )
            dtype = SCALAR_TYPES[str(type_tok)]
        decl = ParamDecl(name, "scalar", dtype)
        try:
            value = decl.check(value, self.name)
        except ValueError as e:
            self.src.fail(str(e), default)
        return ParamDecl(name, "scalar", dtype, value)

    def _tensor_decl(self, name: str, ptype) -> ParamDecl:
        kw, dtype_tok, ndim_tok = ptype.children
        if str(kw) != "tensor":
            self.src.fail(f"unknown type {str(kw)!r}; only tensor[dtype, ndim] takes brackets", kw)
        if str(dtype_tok) not in TENSOR_DTYPES:
            self.src.fail(
                f"unknown tensor dtype {str(dtype_tok)!r}{_suggest(str(dtype_tok), TENSOR_DTYPES)}",
                dtype_tok,
                fix=f"use one of {', '.join(TENSOR_DTYPES)}",
            )
        ndim = int(ndim_tok)
        if ndim < 1:
            self.src.fail(f"tensor parameter {name!r} needs at least 1 dim", ndim_tok)
        kind = ir.tensor(0, ndim, str(dtype_tok)).dtype
        return ParamDecl(name, "tensor", kind, None, str(dtype_tok), ndim)

    def _constant(self, tree, name: str):
        value = _Evaluator(self.src, {}, None).value(tree)
        if isinstance(value, Node | _ScalarRef | _TensorRef):
            self.src.fail(f"the default of {name!r} must be a constant", tree)
        return value

    # -- statements --

    def build(self) -> SpecVariant:
        self._check_statements()
        values = {name: d.default for name, d in self.decls.items()}
        mods = {out: self._mod(out, values) for out in OUTPUTS}
        if mods["score"] is None and mods["mask"] is None:
            self.src.fail(
                f"variant {self.name!r} sets neither score nor mask",
                self.loc_tuple(),
                fix="add a line `score = ...` or `mask = ...`",
            )
        return SpecVariant(
            self.name, mods["score"], mods["mask"], values, dict(self.decls), self.loc
        )

    def loc_tuple(self) -> tuple[int, int]:
        return self.loc.line, self.loc.col

    def _check_statements(self) -> None:
        """Evaluate every statement once: report errors in source order, record dependencies."""
        ev = _Evaluator(self.src, self.decls, None)
        bound: dict[str, int] = {}
        for i, stmt in enumerate(self.stmts):
            self._check_target(stmt)
            ev.reads = set()
            ev.env[stmt.target] = ev.value(stmt.expr)
            stmt.deps = {bound[n] for n in ev.reads if n in bound}
            bound[stmt.target] = i

    def _check_target(self, stmt: _Stmt) -> None:
        target_tok = stmt.tree.children[0]
        what = None
        if stmt.target in LEAF_NAMES and stmt.target != "score":
            what = "the index leaf"
        elif stmt.target in self.decls:
            what = "the parameter"
        elif stmt.target in CONSTANTS or stmt.target in FUNCTIONS:
            what = "the builtin"
        if what:
            self.src.fail(
                f"cannot assign to {what} {stmt.target!r}",
                target_tok,
                fix="use another name for a local",
            )

    def _closure(self, last: int) -> list[int]:
        need, todo = set(), [last]
        while todo:
            i = todo.pop()
            if i not in need:
                need.add(i)
                todo.extend(self.stmts[i].deps)
        return sorted(need)

    def _mod(self, kind: str, values: dict[str, Any]) -> Mod | None:
        assigned = [i for i, s in enumerate(self.stmts) if s.target == kind]
        if not assigned:
            return None
        ev = _Evaluator(self.src, self.decls, kind)
        for i in self._closure(assigned[-1]):
            ev.env[self.stmts[i].target] = ev.value(self.stmts[i].expr)
        final = self.stmts[assigned[-1]]
        root = ev.node(ev.env[kind])
        self._check_result(kind, root, final.expr)
        params = tuple(
            _param(index, d.name, d.kind, d.node(index), values)
            for d, index in sorted(ev.numbering.items(), key=lambda kv: kv[1])
        )
        return Mod(kind, root, params, None, f"{self.name}.{kind}_mod", ev.locs)

    def _check_result(self, kind: str, root: Node, expr) -> None:
        if kind == "mask" and root.dtype is not DType.BOOL:
            self.src.fail(
                f"mask must be boolean, got {root.dtype.value}",
                expr,
                fix="use a comparison such as q_idx >= kv_idx",
            )
        if kind == "score" and root.dtype is DType.BOOL:
            self.src.fail(
                "score must be a number, got bool",
                expr,
                fix="use where(cond, score, -inf) to mask by score",
            )


def _dtype_of(value: Any) -> DType:
    if isinstance(value, bool):
        return DType.BOOL
    return DType.INT if isinstance(value, int) else DType.FLOAT


class _Evaluator:
    """Evaluates expression trees as Python would: literals stay Python numbers (and fold),
    anything touching a leaf or parameter becomes IR. ``kind`` None = checking only."""

    def __init__(self, src: _Source, decls: dict[str, ParamDecl], kind: str | None):
        self.src = src
        self.decls = decls
        self.kind = kind
        self.env: dict[str, Any] = {}
        self.numbering: dict[ParamDecl, int] = {}
        self.locs: dict[Node, SourceLoc] = {}
        self.reads: set[str] = set()

    # -- values --

    def node(self, value: Any) -> Node:
        """The IR for ``value``; a parameter gets its index at its first use, as in the tracer."""
        if isinstance(value, Node):
            return value
        if isinstance(value, _ScalarRef):
            return self._param_node(value.decl)
        if isinstance(value, _TensorRef):
            self.src.fail(
                f"tensor {value.decl.name!r} must be indexed, e.g. "
                f"{value.decl.name}[{', '.join(['q_idx'] * value.decl.ndim)}]",
                value.at,
            )
        return ir.const(value)

    def _param_node(self, decl: ParamDecl) -> Node:
        if decl not in self.numbering:
            self.numbering[decl] = len(self.numbering)
        return decl.node(self.numbering[decl])

    def dtype(self, value: Any) -> DType:
        if isinstance(value, _ScalarRef | _TensorRef):
            return value.decl.dtype
        return value.dtype if isinstance(value, Node) else _dtype_of(value)

    def emit(self, op: Op, values: list, tree, arg: Any = None, right_first=False) -> Node:
        """Build ``op(values)``. Operands are lifted to IR (numbering parameters) left to right
        as torch functions do, or right first as Python operators do: ``a.__op__(b)`` lifts
        ``b`` before ``a``."""
        order = reversed(values) if right_first else values
        lifted = {id(v): self.node(v) for v in order}
        out = ir.node(op, *(lifted[id(v)] for v in values), arg=arg)
        if out not in self.locs:
            line, col, _ = _position(tree)
            self.locs[out] = self.src.loc(line, col)
        return out

    # -- dispatch over the parse tree --

    def value(self, tree) -> Any:
        rule = getattr(tree, "data", None)
        if rule is None:
            raise AssertionError(f"unexpected token {tree!r}")  # the grammar wraps all tokens
        handler = getattr(self, f"_r_{rule}", None)
        if handler is not None:
            return handler(tree)
        if rule in _BINOPS:
            return self._binary(rule, tree)
        raise AssertionError(f"no rule for {rule}")

    def _r_int(self, tree) -> int:
        return int(tree.children[0])

    def _r_float(self, tree) -> float:
        return float(tree.children[0])

    def _r_name(self, tree) -> Any:
        tok = tree.children[0]
        name = str(tok)
        self.reads.add(name)
        if name in self.env:
            return self.env[name]
        if name == "score" and self.kind == "mask":
            self.src.fail(
                "a mask cannot use 'score' (mask mods see only b, h, q_idx, kv_idx)",
                tok,
                fix="move score-dependent logic into `score = ...`, e.g. where(cond, score, -inf)",
            )
        if name in LEAF_NAMES:
            return LEAF_NAMES[name]
        if name in self.decls:
            decl = self.decls[name]
            return _TensorRef(decl, tok) if decl.kind == "tensor" else _ScalarRef(decl)
        if name in CONSTANTS:
            return CONSTANTS[name]
        if name in FUNCTIONS:
            self.src.fail(f"{name!r} is a function; call it as {name}(...)", tok)
        known = [*self.env, *LEAF_NAMES, *self.decls, *CONSTANTS]
        self.src.fail(f"unknown name {name!r}{_suggest(name, known)}", tok)

    def _binary(self, rule: str, tree) -> Any:
        op, fold = _BINOPS[rule]
        a, b = (self.value(t) for t in tree.children)
        if op in (Op.AND, Op.OR, Op.XOR):
            self._need_integral(_SYMBOL[rule], tree, a, b)
        return self._operator(op, fold, a, b, tree)

    def _operator(self, op: Op, fold: Callable, a: Any, b: Any, tree) -> Any:
        """``a <op> b`` as Python evaluates it on traced values."""
        if _is_number(a) and not _is_number(b) and op in _SWAPPED:
            # `0 <= d`: int.__le__ gives up and Python calls d.__ge__(0)
            op, a, b = _SWAPPED[op], b, a
        return self._apply(op, fold, [a, b], tree, right_first=False)

    def _apply(self, op: Op, fold: Callable, args: list, tree, arg=None, right_first=False):
        if all(_is_number(v) for v in args):
            try:
                return fold(*args)
            except (ZeroDivisionError, OverflowError, ValueError) as e:
                self.src.fail(f"cannot compute this constant: {e}", tree)
        return self.emit(op, args, tree, arg, right_first)

    def _need_integral(self, symbol: str, tree, *values) -> None:
        for v in values:
            if self.dtype(v) is DType.FLOAT:
                self.src.fail(
                    f"{symbol!r} needs boolean or integer operands, got float",
                    tree,
                    fix="compare first, e.g. (x > 0) & (y > 0)",
                )

    def _r_neg(self, tree) -> Any:
        return self._apply(Op.NEG, operator.neg, [self.value(tree.children[0])], tree)

    def _r_pos(self, tree) -> Any:
        return self.value(tree.children[0])

    def _r_invert(self, tree) -> Any:
        v = self.value(tree.children[0])
        self._need_integral("~", tree, v)
        return self._apply(Op.NOT, _fold_invert, [v], tree)

    def _r_compare(self, tree) -> Any:
        # `a < b < c` means `(a < b) & (b < c)` (b evaluated once), as a reader expects.
        items = tree.children
        left = self.value(items[0])
        result = None
        for i in range(1, len(items), 2):
            right = self.value(items[i + 1])
            op, fold = _COMPARE[str(items[i])]
            cmp = self._operator(op, fold, left, right, tree)
            result = cmp if result is None else self._operator(Op.AND, _fold_and, result, cmp, tree)
            left = right
        return result

    def _r_logical_and(self, tree) -> Any:
        return self._logical("logical_and", tree)

    def _r_logical_or(self, tree) -> Any:
        return self._logical("logical_or", tree)

    def _logical(self, rule: str, tree) -> Any:
        op, word = _LOGICAL[rule]
        a, b = (self.value(t) for t in tree.children)
        self._need_bool(word, tree, a, b)
        return self._operator(op, _fold_and if op is Op.AND else _fold_or, a, b, tree)

    def _r_logical_not(self, tree) -> Any:
        v = self.value(tree.children[0])
        self._need_bool("not", tree, v)
        return self._apply(Op.NOT, operator.not_, [v], tree)

    def _need_bool(self, word: str, tree, *values) -> None:
        for v in values:
            if self.dtype(v) is not DType.BOOL:
                self.src.fail(
                    f"{word!r} needs boolean operands, got {self.dtype(v).value}",
                    tree,
                    fix=f"compare first (x != 0), or use the bitwise {_BITWISE[word]!r} on ints",
                )

    def _r_index(self, tree) -> Any:
        base_tree, *index_trees = tree.children
        base = self.value(base_tree)
        if not isinstance(base, _TensorRef):
            self.src.fail(
                "only tensor parameters can be indexed",
                base_tree,
                fix="declare it as `name: tensor[dtype, ndim]`",
            )
        indices = [self.value(t) for t in index_trees]
        decl = base.decl
        if len(indices) != decl.ndim:
            self.src.fail(
                f"tensor {decl.name!r} has {decl.ndim} dim(s) but is indexed with "
                f"{len(indices)} index(es)",
                tree,
            )
        for t, v in zip(index_trees, indices):
            if self.dtype(v) is not DType.INT:
                self.src.fail(
                    f"a tensor index must be an integer, got {self.dtype(v).value}",
                    t,
                    fix="convert with int(...) or floor(...)",
                )
        index_nodes = [self.node(v) for v in indices]  # the tracer lifts indices first
        return self.emit(Op.LOAD, [self._param_node(decl), *index_nodes], tree)

    def _r_call(self, tree) -> Any:
        name_tok, *arg_trees = tree.children
        arg_trees = [t for t in arg_trees if t is not None]
        name = str(name_tok)
        if name not in FUNCTIONS:
            hint = _suggest(name, FUNCTIONS)
            self.src.fail(
                f"unknown function {name!r}{hint}",
                name_tok,
                fix=None if hint else f"available: {', '.join(sorted(FUNCTIONS))}",
            )
        lo, hi = FUNCTIONS[name]
        if len(arg_trees) < lo or (hi is not None and len(arg_trees) > hi):
            want = str(lo) if lo == hi else f"at least {lo}"
            self.src.fail(f"{name}() takes {want} argument(s), got {len(arg_trees)}", tree)
        args = [self.value(t) for t in arg_trees]
        return self._call(name, args, tree)

    def _call(self, name: str, args: list, tree) -> Any:
        if name in _UNARY_FUNCS:
            op = _UNARY_FUNCS[name]
            return self._apply(op, _FOLD_UNARY[op], args, tree)
        if name in ("min", "max"):
            op, fold = (Op.MIN, min) if name == "min" else (Op.MAX, max)
            out = args[0]
            for a in args[1:]:
                out = self._apply(op, fold, [out, a], tree)
            return out
        if name == "clamp":
            x, lo, hi = args
            return self._apply(Op.MIN, min, [self._apply(Op.MAX, max, [x, lo], tree), hi], tree)
        if name == "where":
            if self.dtype(args[0]) is not DType.BOOL:
                self.src.fail(
                    f"where() needs a boolean condition, got {self.dtype(args[0]).value}",
                    tree.children[1],
                )
            return self._apply(Op.WHERE, _fold_where, args, tree)
        target = DType.FLOAT if name == "float" else DType.INT
        if not _is_number(args[0]) and self.dtype(args[0]) is target:
            return self.node(args[0])  # like x.float() on a float: no cast node
        return self._apply(Op.CAST, float if name == "float" else int, args, tree, arg=target)


_BITWISE = {"and": "&", "or": "|", "not": "~"}
_SWAPPED = {Op.LT: Op.GT, Op.GT: Op.LT, Op.LE: Op.GE, Op.GE: Op.LE, Op.EQ: Op.EQ, Op.NE: Op.NE}


def _is_number(v: Any) -> bool:
    return isinstance(v, bool | int | float)


def _fold_invert(x):
    return (not x) if isinstance(x, bool) else ~x


def _fold_and(a, b):
    return a & b


def _fold_or(a, b):
    return a | b


def _fold_where(c, a, b):
    return a if c else b
