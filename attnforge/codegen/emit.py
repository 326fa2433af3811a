"""Fill the hand-written kernel templates (``templates/*.py.tmpl``) with rendered holes.

A hole is ``${name}``.  On a line of its own it takes that line's indentation and may span
several lines (an empty value removes the line); inside a line its value must be one line.
Every hole must be filled and every value used, so a template and its filler cannot drift.

Forward holes: ``key``, ``mods`` (``HAS_SCORE_MOD``/``HAS_MASK_MOD`` constexprs and the
``score_mod``/``mask_mod`` functions), ``param_args`` (all captured-value arguments, each with a
trailing comma), ``score_params`` / ``mask_params`` (``", s0, T1, ..."`` for the call sites).
Every mod function takes the ``POS_F32`` constexpr after ``kv_idx``; the call sites pass it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources

from ..dsl.ir import DType, Node, Op
from .affine import affine_bias
from .grad import _jit_def
from .passes import literal
from .render import ParamSlot, render_body, render_function

__all__ = ["fill", "template", "emit_fwd", "param_arg_lines", "call_params", "mod_functions"]

_LINE_HOLE = re.compile(r"(?P<indent>[ \t]*)\$\{(?P<name>\w+)\}[ \t]*")
_INLINE_HOLE = re.compile(r"\$\{(\w+)\}")


@cache
def template(name: str) -> str:
    """The text of ``attnforge/codegen/templates/<name>`` (package data)."""
    return resources.files("attnforge.codegen").joinpath("templates", name).read_text()


def fill(text: str, holes: Mapping[str, str], what: str = "template") -> str:
    used: set[str] = set()

    def value(name: str) -> str:
        if name not in holes:
            raise KeyError(f"{what}: hole ${{{name}}} has no value (given: {sorted(holes)})")
        used.add(name)
        return holes[name]

    out: list[str] = []
    for line in text.splitlines():
        m = _LINE_HOLE.fullmatch(line)
        if m:
            v = value(m["name"])
            out.extend((m["indent"] + s) if s else "" for s in v.splitlines())
            continue

        def inline(mm: re.Match) -> str:
            v = value(mm[1])
            if "\n" in v:
                raise ValueError(f"{what}: inline hole ${{{mm[1]}}} got a multi-line value")
            return v

        out.append(_INLINE_HOLE.sub(inline, line))
    unused = set(holes) - used
    if unused:
        raise KeyError(f"{what}: values given for holes it does not have: {sorted(unused)}")
    return "\n".join(out) + "\n"


def param_arg_lines(slots: Sequence[ParamSlot], width: int = 88) -> str:
    """Every slot's kernel arguments, comma-terminated, wrapped to ``width``."""
    lines, cur = [], ""
    for slot in slots:
        for a in slot.args:
            piece = f"{a},"
            if cur and len(cur) + 1 + len(piece) > width:
                lines.append(cur)
                cur = piece
            else:
                cur = f"{cur} {piece}" if cur else piece
    if cur:
        lines.append(cur)
    return "\n".join(lines)


def call_params(slots: Sequence[ParamSlot]) -> str:
    """``", s0, T1, T1_size0, stride_t1_0"``: a mod's extra arguments at its call site."""
    return "".join(f", {a}" for s in slots for a in s.args)


def _score_result(expr: str, root: Node) -> str:
    # the template needs a fp32 [BLOCK_M, BLOCK_N] tile whatever the mod returns
    if root.op is Op.CONST:
        return f"tl.zeros_like(score) + {literal(float(root.arg))}"
    if root.dtype is not DType.FLOAT:
        expr = f"{expr}.to(tl.float32)"
    if not (_uses(root, {Op.SCORE}) or _uses(root, {Op.Q_IDX, Op.KV_IDX})):
        expr = f"{expr} + tl.zeros_like(score)"
    return expr


def _mask_result(expr: str, root: Node) -> str:
    if root.op is Op.CONST:  # a [1, 1] tile broadcasts against the scores
        return f"tl.full([1, 1], {bool(root.arg)}, tl.int1)"
    return expr if root.dtype is DType.BOOL else f"{expr} != 0"


def _uses(root: Node, ops: set[Op]) -> bool:
    return ops <= {n.op for n in root.walk()}


# the templates' prelude defines it: triton.jit when compiled, plain Python when interpreted
_DECORATOR = "@_device_fn"
# POS_F32 (positions < 2**24, set by the launcher) lets the renderer convert kv_idx - q_idx
# per index vector instead of per score (render._is_pos_sub)
POS_F32 = "POS_F32"
_POS_ARG = f"{POS_F32}: tl.constexpr"
_SCORE_ARGS = ["score", "b", "h", "q_idx", "kv_idx", _POS_ARG]
_MASK_ARGS = ["b", "h", "q_idx", "kv_idx", _POS_ARG]


def mod_functions(
    score: Node | None,
    mask: Node | None,
    score_slots: Sequence[ParamSlot],
    mask_slots: Sequence[ParamSlot],
) -> str:
    """The generated section: constexpr flags and the two mod functions (stubs when absent)."""
    flags = (
        f"HAS_SCORE_MOD = tl.constexpr({score is not None})\n"
        f"HAS_MASK_MOD = tl.constexpr({mask is not None})"
    )
    by_index = lambda slots: {s.index: s for s in slots}  # noqa: E731
    score_args = _SCORE_ARGS + [a for s in score_slots for a in s.args]
    mask_args = _MASK_ARGS + [a for s in mask_slots for a in s.args]
    if score is not None:
        score_fn = render_function("score_mod", score_args, score, by_index(score_slots),
                                   result=_score_result, decorator=_DECORATOR,
                                   pos_f32=POS_F32)  # fmt: skip
    else:
        score_fn = _stub("score_mod", score_args, "score", "no score_mod")
    if mask is not None:
        mask_fn = render_function("mask_mod", mask_args, mask, by_index(mask_slots),
                                  result=_mask_result, decorator=_DECORATOR,
                                  pos_f32=POS_F32)  # fmt: skip
    else:
        mask_fn = _stub("mask_mod", mask_args, "True", "no mask_mod: every block is FULL")
    affine_fn = affine_bias_function(score, score_slots)
    return "\n\n\n".join(b.rstrip("\n") for b in (flags, score_fn, mask_fn, affine_fn))


def affine_bias_function(score: Node | None, score_slots) -> str:
    """``AFFINE_BIAS`` and ``score_bias_affine(b, h, q_idx, kv_idx, ...)``: for a score mod
    ``score + B`` with ``B`` affine in the positions (:mod:`.affine`), ``B`` at the given point
    and its two slopes, as fp32 scalars (the kernels take the tile origin as the point)."""
    split = affine_bias(score)
    flag = f"AFFINE_BIAS = tl.constexpr({split is not None})  # see score_bias_affine"
    args = _MASK_ARGS + [a for s in score_slots for a in s.args]
    if split is None:
        body = ["# never called (the score mod is not score + an affine bias)"]
        body.append("return 0.0, 0.0, 0.0")
    else:
        roots = [split.bias, split.d_q, split.d_kv]
        lines, exprs = render_body(roots, {s.index: s for s in score_slots}, pos_f32=POS_F32)
        out = []
        for root, expr in zip(roots, exprs):
            if root.op is Op.CONST:
                out.append(literal(float(root.arg)))
            elif root.dtype is not DType.FLOAT:
                out.append(f"({expr}).to(tl.float32)")
            else:
                out.append(expr)
        body = [*lines, f"return {', '.join(out)}"]
    return flag + "\n\n\n" + _jit_def("score_bias_affine", args, body)


def _stub(name: str, args: list[str], ret: str, why: str) -> str:
    return (
        f"{_DECORATOR}\ndef {name}({', '.join(args)}):\n"
        f"    # never called ({why}); defined so the kernel source reads the same\n"
        f"    return {ret}\n"
    )


def emit_fwd(
    key: str,
    score: Node | None,
    mask: Node | None,
    score_slots: Sequence[ParamSlot],
    mask_slots: Sequence[ParamSlot],
) -> str:
    """The forward kernel module source (see ``templates/fwd.py.tmpl`` for the ABI)."""
    holes = {
        "key": key,
        "mods": mod_functions(score, mask, score_slots, mask_slots),
        "param_args": param_arg_lines([*score_slots, *mask_slots]),
        "score_params": call_params(score_slots),
        "mask_params": call_params(mask_slots),
    }
    return fill(template("fwd.py.tmpl"), holes, "fwd.py.tmpl")


def emit_fwd_ws(fwd_source: str, score_slots, mask_slots) -> str:
    """The warp-specialised Hopper forward (Gluon, ``templates/fwd_ws.py.tmpl``) appended to the
    forward module ``fwd_source``, whose prelude and mods it calls.  A file of its own: importing
    Gluon costs time, and only an sm_90 launch needs it."""
    holes = {
        "param_args": param_arg_lines([*score_slots, *mask_slots]),
        "score_params": call_params(score_slots),
        "mask_params": call_params(mask_slots),
    }
    return fwd_source + fill(template("fwd_ws.py.tmpl"), holes, "fwd_ws.py.tmpl")
