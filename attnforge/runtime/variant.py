"""Compiled attention variants: ``af.variant(...)`` and ``af.parse_spec(...)``.

A :class:`Variant` bundles a score mod and a mask mod. Calling it JIT-compiles the kernels at
the first call (content-keyed: an identical variant defined elsewhere reuses them), builds and
caches the block mask for the input lengths, and runs :func:`attnforge.flex_attention`::

    import torch, attnforge as af

    @af.mask_mod
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    attn = af.variant(score_mod=lambda s, b, h, q, kv: 30.0 * torch.tanh(s / 30.0),
                      mask_mod=causal)
    q = k = v = torch.randn(1, 2, 256, 32)      # (B, H, L, E)
    out = attn(q, k, v)                         # (B, H, L, Ev)
    print(attn.ir)                              # score and mask IR, one node per line
    print(attn.source("fwd"))                   # the generated Triton source that runs
    print(attn.block_mask(256, 256))            # the block map (ASCII)

    variants = af.parse_spec('''
    variant softcap_causal(cap = 30.0):
        score = cap * tanh(score / cap)
        mask  = q_idx >= kv_idx
    ''')
    out = variants["softcap_causal"](q, k, v, cap=20.0)   # same kernel, another cap

Shape legend: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev); out (B, Hq, L, Ev);
lse (B, Hq, L).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from typing import Any

import torch

from ..dsl.ir import Node, Op, uses
from ..dsl.mod import Mod

__all__ = ["Variant", "VariantIR", "variant", "parse_spec"]

_BLOCK_MASK_CACHE = 16  # per variant: a few sequence lengths live at once in practice


def _as_mod(obj: Any, kind: str, what: str) -> Mod | None:
    if obj is None:
        return None
    if isinstance(obj, Mod):
        mod = obj
    elif callable(obj):
        from ..dsl.api import as_mod

        mod = as_mod(obj, kind)
    else:
        raise TypeError(f"{what} must be a callable or None, got {type(obj).__name__}: {obj!r}")
    if mod is not None and mod.kind != kind:
        raise ValueError(
            f"{what} got {mod.name!r}, a {mod.kind} mod; pass it as "
            f"{'score_mod' if mod.kind == 'score' else 'mask_mod'}= instead"
        )
    return mod


class VariantIR:
    """The IR of a variant: ``.score`` / ``.mask`` (root ``Node`` or None), ``.key``."""

    def __init__(self, score_mod: Mod | None, mask_mod: Mod | None, name: str):
        self.score_mod, self.mask_mod, self.name = score_mod, mask_mod, name

    @property
    def score(self) -> Node | None:
        return None if self.score_mod is None else self.score_mod.ir

    @property
    def mask(self) -> Node | None:
        return None if self.mask_mod is None else self.mask_mod.ir

    @property
    def key(self) -> str:
        """Structural key of the pair (names and captured values are not part of it)."""
        parts = [n.key if n is not None else "-" for n in (self.score, self.mask)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def __str__(self) -> str:
        lines = [f"variant {self.name}  ir key {self.key[:16]}"]
        for label, mod in (("score", self.score_mod), ("mask", self.mask_mod)):
            body = "(none: identity)" if label == "score" else "(none: attend everywhere)"
            if mod is not None:
                body = "\n".join("    " + line for line in mod.pretty().splitlines()).lstrip()
            lines.append(f"{label}_mod {mod.name if mod else ''}:".replace(" :", ":"))
            lines.append("    " + body)
        return "\n".join(lines)

    __repr__ = __str__


class Variant:
    """A callable attention variant. See the module docstring for an example.

    ``attn(q, k, v, scale=None, enable_gqa=False, return_lse=False, kernel_options=None,
    **params)``: ``params`` (spec variants only) override parameter values for this call.
    """

    def __init__(
        self,
        score_mod: Any = None,
        mask_mod: Any = None,
        *,
        block_size: int | tuple[int, int] = 128,
        name: str | None = None,
        spec: Any = None,
        **kernel_options: Any,
    ):
        self._score = _as_mod(score_mod, "score", "score_mod")
        self._mask = _as_mod(mask_mod, "mask", "mask_mod")
        self.block_size = block_size
        self.kernel_options = dict(kernel_options)
        self.name = (
            name or "_".join(m.name for m in (self._score, self._mask) if m is not None) or "noop"
        )
        self._spec = spec
        self._shared = _Shared()
        self._last_device = torch.device("cpu")

    # -- the mods --

    @property
    def score_mod(self) -> Mod | None:
        return self._score

    @property
    def mask_mod(self) -> Mod | None:
        return self._mask

    @property
    def ir(self) -> VariantIR:
        return VariantIR(self._score, self._mask, self.name)

    @property
    def params(self) -> dict[str, Any]:
        """Current parameter values by name (spec parameters, or captured Python values)."""
        if self._spec is not None:
            return dict(self._spec.params)
        mods = [m for m in (self._score, self._mask) if m is not None]
        return {p.name: p.current() for m in mods for p in m.params}

    # -- parameters (spec variants) --

    def bind(self, **values: Any) -> Variant:
        """A copy with new parameter values: same IR, so the same compiled kernels."""
        if self._spec is None:
            raise TypeError(
                f"variant {self.name!r} comes from Python functions: its captured values are "
                "re-read at every call, so change the variable itself (or build another variant)"
            )
        out = Variant._from_spec(self._spec.bind(**values), self.block_size, self.kernel_options)
        out._shared = self._shared  # same IR: share the lowering and the block-mask cache
        return out

    @classmethod
    def _from_spec(cls, spec: Any, block_size: Any = 128, options: dict | None = None) -> Variant:
        return cls(spec.score_mod, spec.mask_mod, block_size=block_size, name=spec.name,
                   spec=spec, **(options or {}))  # fmt: skip

    def _check_bound(self) -> None:
        missing = self._spec.missing() if self._spec is not None else []
        if missing:
            assign = ", ".join(f"{m}=..." for m in missing)
            raise ValueError(
                f"variant {self.name!r} needs values for parameter(s) {', '.join(missing)} "
                f"(declared without defaults); pass them to the call, attn(q, k, v, {assign}), "
                f"or bind once: variants[{self.name!r}].bind({assign})"
            )

    # -- compile and inspect --

    @property
    def lowered(self):
        """The codegen result (``attnforge.codegen.Lowered``), lowered once per IR."""
        # A traced mod re-traces when a value baked into its structure changes: key on the IR.
        irs = tuple(None if m is None else m.ir for m in (self._score, self._mask))
        shared = self._shared
        with shared.lock:
            if shared.lowered is None or any(a is not b for a, b in zip(shared.lowered[0], irs)):
                from ..codegen import lower

                shared.lowered = (irs, lower(self._score, self._mask))
            return shared.lowered[1]

    def kernels(self, device: Any = None) -> dict:
        """The loaded kernel modules ``{"fwd": ..., "bwd": ...}`` for ``device``."""
        from . import cache, loader

        device = self._last_device if device is None else torch.device(device)
        return cache.load_kernels(self.lowered, loader.device_kind(device))

    def source(self, kind: str = "fwd", device: Any = None) -> str:
        """The exact generated source that runs (``"fwd"`` or ``"bwd"``), read from its file."""
        from . import cache

        if kind not in ("fwd", "bwd"):
            raise ValueError(f"source kind must be 'fwd' or 'bwd', got {kind!r}")
        modules = self.kernels(device)
        if kind not in modules:
            raise ValueError(f"variant {self.name!r} has no generated {kind} kernel")
        return cache.source_of(modules[kind])

    def block_mask(self, L: int, S: int | None = None, *, B: int | None = None,
                   H: int | None = None, device: Any = None):  # fmt: skip
        """The BlockMask for query length ``L`` and key length ``S`` (``S`` defaults to ``L``);
        ``str()`` of it is the ASCII block map. None when the variant has no mask."""
        if self._mask is None:
            return None
        self._check_bound()
        S = L if S is None else S
        device = self._last_device if device is None else torch.device(device)
        return self._cached_block_mask(B, H, L, S, device)

    # -- running --

    def __call__(self, q, k, v, scale=None, enable_gqa=False, return_lse=False,
                 kernel_options=None, **params):  # fmt: skip
        target = self.bind(**params) if params else self
        return target._run(q, k, v, scale, enable_gqa, return_lse, kernel_options)

    def _run(self, q, k, v, scale, enable_gqa, return_lse, kernel_options):
        from .api import flex_attention

        self._check_bound()
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a 4-D tensor (B, H, len, dim), got {got}")
        self._last_device = q.device
        block_mask = None
        if self._mask is not None:
            B, Hq, L = q.shape[0], q.shape[1], q.shape[2]
            block_mask = self._cached_block_mask(B, Hq, L, k.shape[2], q.device)
        options = {**self.kernel_options, **(kernel_options or {})}
        return flex_attention(q, k, v, score_mod=self._score, block_mask=block_mask, scale=scale,
                              enable_gqa=enable_gqa, return_lse=return_lse,
                              kernel_options=options or None)  # fmt: skip

    def _cached_block_mask(self, B, H, L, S, device):
        from .blockmask import create_block_mask

        # Broadcast over batch/heads unless the mask reads b/h: one map serves every (b, h).
        ir = self._mask.ir
        reads_b, reads_h = _reads_b_h(ir)
        B = B if reads_b else None
        H = H if reads_h else None
        values = self._mask.param_values()
        key = (ir, B, H, L, S, device, self.block_size, _values_key(values))
        masks = self._shared.masks
        with self._shared.lock:
            hit = masks.get(key)
            if hit is not None and all(a is b for a, b in zip(hit[1], _tensors(values))):
                masks.move_to_end(key)
                return hit[0]
        bm = create_block_mask(self._mask, B, H, L, S, device=device, BLOCK_SIZE=self.block_size)
        if key[-1] is not None:
            with self._shared.lock:
                masks[key] = (bm, _tensors(values))
                while len(masks) > _BLOCK_MASK_CACHE:
                    masks.popitem(last=False)
        return bm

    def __repr__(self) -> str:
        kinds = [f"{k}={m.name}" for k, m in (("score_mod", self._score),
                                                ("mask_mod", self._mask)) if m]  # fmt: skip
        return f"<attnforge.Variant {self.name} {' '.join(kinds)} key={self.ir.key[:12]}>"


class _Shared:
    """What bindings of one variant share (same IR): the lowering and the block-mask cache,
    keyed by lengths, device, B/H (when the mask reads them), block size and captured values."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.lowered = None
        self.masks: OrderedDict = OrderedDict()


@functools.lru_cache(maxsize=256)
def _reads_b_h(ir: Node) -> tuple[bool, bool]:
    """Whether a mask reads the batch / head index (an IR walk: memoised per interned node)."""
    return uses(ir, Op.B), uses(ir, Op.H)


def _tensors(values) -> tuple:
    return tuple(v for v in values if isinstance(v, torch.Tensor))


def _values_key(values) -> tuple | None:
    """Captured values as a key: scalars by value, tensors by identity and version (an in-place
    edit changes the mask). None when a value cannot be keyed (then nothing is cached)."""
    parts = []
    for v in values:
        if isinstance(v, torch.Tensor):
            parts.append(("t", id(v), v._version, tuple(v.shape), str(v.device)))
        else:
            try:
                hash(v)
            except TypeError:
                return None
            parts.append((type(v).__name__, v))
    return tuple(parts)


def variant(score_mod: Any = None, mask_mod: Any = None, *, block_size: int | tuple = 128,
            name: str | None = None, **kernel_options: Any) -> Variant:  # fmt: skip
    """A compiled-on-first-call attention variant: ``attn = af.variant(score_mod, mask_mod)``,
    then ``attn(q, k, v)``. ``block_size`` is the BlockMask block; ``kernel_options`` (BLOCK_M,
    BLOCK_N, num_warps, num_stages) are defaults for every call. See the module docstring."""
    return Variant(score_mod, mask_mod, block_size=block_size, name=name, **kernel_options)


def parse_spec(text: str, filename: str = "<spec>") -> dict[str, Variant]:
    """Parse a text spec into callable :class:`Variant` objects by name.

    Parameters with defaults are set; the others must be given per call (``attn(q, k, v,
    n=4)``) or once with ``variants["x"].bind(n=4)``. New values never compile a new kernel.

    Example::

        variants = af.parse_spec('''
        variant window(w: int):
            mask = (q_idx >= kv_idx) and (q_idx - kv_idx <= w)
        ''')
        attn = variants["window"].bind(w=64)
    """
    from ..dsl.parse import parse_spec as parse

    return {name: Variant._from_spec(spec) for name, spec in parse(text, filename).items()}
