"""Codegen: IR -> passes -> rendered holes -> Triton kernel sources. Imports only ``dsl``.

``lower(score_mod, mask_mod)`` is the whole pipeline for one variant::

    from attnforge.codegen import lower
    low = lower(score, mask)          # Mods (or None)
    low.key                           # content key of the (canonical) IR structure
    print(low.files["fwd.py"])        # the generated forward kernel module
    low.meta["params"]                # the kernel ABI: one entry per captured value

The steps, in order (each pass says why it runs in :data:`passes.PASSES`):

1. ``run_passes``: fold constants, canonicalize (commutative operand order, identities,
   compare normalisation), fold again;
2. drop trivial mods (``score_mod`` returning ``score``, a mask that is always True), so they
   share the kernel of "no mod";
3. ``split_mask``: index-only and data-dependent conjuncts (recorded in ``meta``; the block
   analysis reasons about the index-only part);
4. number captured values into kernel slots (score mod first, then mask mod);
5. render and fill the templates (:data:`EMITTERS`; files are produced lazily, on a cache miss).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..dsl.ir import Node, Op, params_of, pretty
from . import emit, grad, passes
from .render import ParamSlot

__all__ = ["Lowered", "lower", "ABI_VERSION", "EMITTERS"]

ABI_VERSION = 2


@dataclass(eq=False)
class Lowered:
    """One variant, ready to render: canonical IR, kernel parameter slots and the sources.

    ``score`` / ``mask`` are the canonical IRs (None: no score mod / every block FULL);
    ``score_slots`` / ``mask_slots`` the captured values each reads, in kernel order.
    """

    key: str
    score: Node | None
    mask: Node | None
    score_slots: tuple[ParamSlot, ...]
    mask_slots: tuple[ParamSlot, ...]
    mask_index: Node | None = None
    mask_data: Node | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def slots(self) -> tuple[ParamSlot, ...]:
        return self.score_slots + self.mask_slots

    @cached_property
    def has_score_grad(self) -> bool:
        """The score mod's derivative is not the constant 1 (it costs work per score)."""
        return grad.has_score_grad(self.score)

    @cached_property
    def meta(self) -> dict:
        """The kernel ABI, JSON-serialisable (also written as ``meta.json``)."""
        return {
            "abi": ABI_VERSION,
            "key": self.key,
            "kernels": {"fwd": "_attn_fwd", "bwd": list(grad.BWD_KERNELS)},
            "has_score_mod": self.score is not None,
            "has_mask_mod": self.mask is not None,
            "mask_data_dependent": self.mask_data is not None,
            "lse": "natural log, fp32 [Z, H, Q_LEN] contiguous; -inf for rows with no key",
            "params": [s.as_json() for s in self.slots],
            "grads": [g.as_json() for g in grad.grad_slots(self.score, self.score_slots)],
            **self.extra,
        }

    @cached_property
    def fwd_source(self) -> str:
        """fwd.py; also the head of fwd_ws.py (rendered once for both)."""
        return emit.emit_fwd(self.key, self.score, self.mask, self.score_slots, self.mask_slots)

    @cached_property
    def files(self) -> dict[str, str]:
        out = {name: make(self) for name, make in EMITTERS.items()}
        out["ir.txt"] = self.ir_text()
        out["meta.json"] = json.dumps(self.meta, indent=1, sort_keys=True) + "\n"
        return out

    def ir_text(self) -> str:
        def show(title: str, root: Node | None) -> str:
            return f"# {title}\n" + (pretty(root) if root is not None else "(none)") + "\n"

        parts = [show("score_mod (canonical)", self.score), show("mask_mod (canonical)", self.mask)]
        if self.mask is not None:
            parts.append(show("mask: index-only part", self.mask_index))
            parts.append(show("mask: data-dependent part", self.mask_data))
        return "\n".join(parts)


def _emit_fwd(low: Lowered) -> str:
    return low.fwd_source


def _emit_fwd_ws(low: Lowered) -> str:
    return emit.emit_fwd_ws(low.fwd_source, low.score_slots, low.mask_slots)


# file name -> source builder
EMITTERS: dict[str, Callable[[Lowered], str]] = {
    "fwd.py": _emit_fwd,
    "bwd.py": grad.emit_bwd,
    "fwd_ws.py": _emit_fwd_ws,
}


def _slots(root: Node | None, mod: str, first: int) -> tuple[ParamSlot, ...]:
    if root is None:
        return ()
    out = []
    for i, p in enumerate(params_of(root)):
        if p.op is Op.SCALAR:
            out.append(ParamSlot(first + i, mod, p.arg[0], "scalar", p.dtype.value))
        else:
            out.append(ParamSlot(first + i, mod, p.arg[0], "tensor", p.arg[2], p.arg[1]))
    return tuple(out)


def _key(score: Node | None, mask: Node | None) -> str:
    text = f"attnforge-abi{ABI_VERSION}|score={score.key if score else '-'}|" \
           f"mask={mask.key if mask else '-'}"  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_CACHE: dict[tuple, Lowered] = {}


def _ir_of(mod: Any, kind: str) -> Node | None:
    if mod is None:
        return None
    ir = getattr(mod, "ir", None)
    if not isinstance(ir, Node):
        raise TypeError(f"lower: {kind} mod {mod!r} has no IR (.ir); trace it first (as_mod)")
    mod_kind = getattr(mod, "kind", kind)
    if mod_kind != kind:
        raise ValueError(f"lower: expected a {kind} mod, got a {mod_kind} mod {mod!r}")
    return ir


def lower(score: Any, mask: Any) -> Lowered:
    """Lower a score mod and a mask mod (``Mod`` objects or None) for the kernels.

    Cached per IR structure: equal mods written twice share one ``Lowered`` (and one kernel).
    """
    score_ir, mask_ir = _ir_of(score, "score"), _ir_of(mask, "mask")
    ck = (score_ir.key if score_ir else None, mask_ir.key if mask_ir else None)
    hit = _CACHE.get(ck)
    if hit is not None:
        return hit
    score_c = passes.run_passes(score_ir)
    mask_c = passes.run_passes(mask_ir)
    if passes.is_identity_score(score_c):
        score_c = None
    if passes.is_trivial_mask(mask_c):
        mask_c = None
    mask_index, mask_data = passes.split_mask(mask_c)
    score_slots = _slots(score_c, "score", 0)
    mask_slots = _slots(mask_c, "mask", len(score_slots))
    low = Lowered(
        key=_key(score_c, mask_c),
        score=score_c,
        mask=mask_c,
        score_slots=score_slots,
        mask_slots=mask_slots,
        mask_index=mask_index,
        mask_data=mask_data,
    )
    _CACHE[ck] = low
    return low
