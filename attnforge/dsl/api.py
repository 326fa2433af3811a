"""Public frontend API: decorators, ``trace``, ``as_mod`` and mask combinators.

Example::

    import torch, attnforge as af

    @af.score_mod
    def softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    window = 128
    sliding = af.mask_mod(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < window))
    print(sliding.pretty())          # the IR, one node per line; `window` is scalar[0]
    sliding.ir.key                   # structural: the same for window = 256
    both = af.and_masks(sliding, lambda b, h, q_idx, kv_idx: kv_idx % 2 == 0)

Arguments seen by a mod: ``score`` (float, the scaled logit), ``b`` (batch), ``h`` (query head),
``q_idx`` (query position), ``kv_idx`` (key position); each is a 0-d int/float tensor when the
mod is called eagerly, or a traced proxy when attnforge compiles it.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

from .errors import DSLError
from .mod import Mod
from .trace import TraceResult, arg_names, def_location, guards_hold, trace_function

__all__ = [
    "TracedMod",
    "trace",
    "score_mod",
    "mask_mod",
    "as_mod",
    "current_mod",
    "and_masks",
    "or_masks",
    "noop_mask",
]


class TracedMod(Mod):
    """A :class:`Mod` traced from a Python callable.

    ``.ir``, ``.params`` and ``.locs`` come from the trace, redone automatically when a value
    that was baked into the structure changes (a captured bool, a captured tensor's rank or
    dtype, a called function).  Calling the object calls the original function eagerly.
    """

    def __init__(self, fn, kind: str, name: str | None = None):
        arg_names(kind)
        self.kind = kind
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__
        self._result: TraceResult | None = None
        try:
            functools.update_wrapper(self, fn, updated=())
        except (AttributeError, TypeError):
            pass

    def traced(self) -> TraceResult:
        """The current trace (tracing now if there is none or its guards fail)."""
        r = self._result
        if r is None or not guards_hold(r):
            r = self._result = trace_function(self.fn, self.kind, self.name)
        return r

    @property
    def ir(self):  # type: ignore[override]
        return self.traced().ir

    @property
    def params(self):  # type: ignore[override]
        return self.traced().params

    @property
    def locs(self):  # type: ignore[override]
        return self.traced().locs

    def param_values(self) -> tuple:
        return tuple(p.current() for p in self.traced().params)

    def __call__(self, *args):
        from .trace import Proxy, active_tracer

        tracer = active_tracer()
        if tracer is not None and any(isinstance(a, Proxy) for a in args):
            # called from inside another mod being traced: trace through the original function
            return tracer.callable(self.fn)(*args)
        return self.fn(*args)

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other

    def __repr__(self) -> str:
        try:
            key = self.ir.key[:12]
        except Exception:  # repr must not raise on an untraceable mod
            key = "?"
        return f"<{self.kind}_mod {self.name} key={key}>"


def trace(fn, kind: str, name: str | None = None) -> Mod:
    """Trace ``fn`` now and return it as a :class:`Mod` (``kind``: ``"score"`` or ``"mask"``).

    Raises :class:`DSLError` (with the user's file:line:col) for anything that cannot be traced.
    """
    if isinstance(fn, Mod):
        _check_kind(fn, kind)
        return fn
    mod = TracedMod(fn, kind, name)
    mod.traced()
    return mod


def _decorate(fn, kind: str) -> Mod:
    if isinstance(fn, Mod):
        _check_kind(fn, kind)
        return fn
    if not callable(fn):
        raise TypeError(f"@{kind}_mod expects a function, got {type(fn).__name__}")
    mod = TracedMod(fn, kind)
    try:
        mod.traced()
    except DSLError:
        raise
    except Exception:
        # e.g. a global the mod reads is defined later in the module: trace on first use
        mod._result = None
    return mod


def score_mod(fn) -> Mod:
    """Decorator: ``score_mod(score, b, h, q_idx, kv_idx) -> new score``, traced to IR.

    Example: ``@af.score_mod`` over ``def alibi(score, b, h, q_idx, kv_idx): ...``, or
    ``af.score_mod(lambda score, b, h, q_idx, kv_idx: score * 2)``.
    """
    return _decorate(fn, "score")


def mask_mod(fn) -> Mod:
    """Decorator: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True keeps the entry), traced to IR.

    Example: ``causal = af.mask_mod(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)``.
    """
    return _decorate(fn, "mask")


def _check_kind(mod: Mod, kind: str) -> None:
    if mod.kind == kind:
        return
    file, line, col = def_location(mod.fn) if mod.fn is not None else (None, None, None)
    raise DSLError(
        f"`{mod.name}` is a {mod.kind}_mod but is used as a {kind}_mod",
        file=file,
        line=line,
        col=col,
        fix=f"pass it as {mod.kind}_mod, or define it with the {kind}_mod signature "
        f"({', '.join(arg_names(kind))})",
    )


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def as_mod(obj, kind: str) -> Mod | None:
    """``obj`` as a :class:`Mod` of ``kind``: None stays None, a Mod passes (kind checked), any
    other callable is traced, cached per callable object (re-traced only when a baked value
    changes; parameter values are re-read at every call through ``Mod.param_values()``)."""
    mod = _lookup(obj, kind)
    if isinstance(mod, TracedMod):
        mod.traced()
    return mod


def current_mod(obj, kind: str) -> tuple[Mod | None, Any, tuple]:
    """``(as_mod(obj, kind), its current IR, its current parameter table)``, checking a traced
    mod's guards once for all three (the runtime calls this on every attention call).
    ``(None, None, ())`` for None."""
    mod = _lookup(obj, kind)
    if mod is None:
        return None, None, ()
    if isinstance(mod, TracedMod):
        r = mod.traced()
        return mod, r.ir, r.params
    return mod, mod.ir, mod.params


def _lookup(obj, kind: str) -> Mod | None:
    """as_mod without the guard check of an already traced mod."""
    if obj is None:
        return None
    if isinstance(obj, Mod):
        _check_kind(obj, kind)
        return obj
    if not callable(obj):
        raise TypeError(f"{kind}_mod must be callable or None, got {type(obj).__name__}")
    try:
        per_kind = _CACHE.get(obj)
    except TypeError:  # not weak-referenceable (e.g. some callable objects): no cache
        return trace(obj, kind)
    if per_kind is None:
        per_kind = {}
        try:
            _CACHE[obj] = per_kind
        except TypeError:
            return trace(obj, kind)
    mod = per_kind.get(kind)
    if mod is None:
        mod = per_kind[kind] = trace(obj, kind)
    return mod


def _combine(mods, kind_name: str, identity: bool):
    ms = tuple(as_mod(m, "mask") for m in mods)

    def combined(b, h, q_idx, kv_idx):
        if not ms:
            return b.new_full((), identity, dtype=torch.bool)
        result = ms[0](b, h, q_idx, kv_idx)
        for m in ms[1:]:
            r = m(b, h, q_idx, kv_idx)
            result = (result & r) if kind_name == "and_masks" else (result | r)
        return result

    name = f"{kind_name}({', '.join(m.name for m in ms)})"
    combined.__name__ = kind_name
    return TracedMod(combined, "mask", name=name)


def and_masks(*mods) -> Mod:
    """The intersection of mask mods (``and_masks()`` keeps everything), as a mask Mod.

    Example: ``af.and_masks(causal, lambda b, h, q_idx, kv_idx: q_idx - kv_idx < 256)``.
    """
    return _combine(mods, "and_masks", True)


def or_masks(*mods) -> Mod:
    """The union of mask mods (``or_masks()`` masks everything), as a mask Mod.

    Example: ``af.or_masks(sliding_window, lambda b, h, q_idx, kv_idx: kv_idx < 4)``.
    """
    return _combine(mods, "or_masks", False)


def _noop_mask(b, h, q_idx, kv_idx):
    return b.new_ones(size=(), dtype=torch.bool, device=b.device)


noop_mask = TracedMod(_noop_mask, "mask", name="noop_mask")
"""A mask that keeps every entry (eager call: a 0-d True bool tensor)."""
