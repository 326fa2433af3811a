"""``attnforge.flex_attention``: drop-in for ``torch.nn.attention.flex_attention.flex_attention``.

Shape legend::

    q    (B, Hq, L, E)        k (Bkv, Hkv, S, E)      v (Bkv, Hkv, S, Ev)
    out  (B, Hq, L, Ev)       lse (B, Hq, L), fp32, natural log
    Bkv in {1, B}; Hkv == Hq, or Hq % Hkv == 0 with enable_gqa=True

Example::

    import torch, attnforge as af
    q, k, v = (torch.randn(1, 2, 200, 40) for _ in range(3))

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def alibi(score, b, h, q_idx, kv_idx):
        return score - 0.5 * (h + 1) * (q_idx - kv_idx)

    bm = af.create_block_mask(causal, None, None, 200, 200, device="cpu")
    out, lse = af.flex_attention(q, k, v, score_mod=alibi, block_mask=bm, return_lse=True)

The data path: mods -> ``dsl.api.as_mod`` (trace, cached per function) -> ``codegen.lower``
(cached per IR) -> ``runtime.cache.load_kernels`` (content-keyed, disk + memory) ->
``runtime.launch`` (config, arguments) -> ``runtime.autograd``.  There is no fallback to dense
math: anything unsupported raises.
"""

from __future__ import annotations

import math
import operator
import threading
import weakref
from typing import Any

import torch

from ..codegen import lower
from ..dsl.api import current_mod
from ..dsl.ir import Op
from . import cache, launch, loader
from .autograd import attention, needs_grad
from .blockmask import BlockMask
from .bounds import check_index_bounds

__all__ = ["flex_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Any = None,
    block_mask: Any = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict | None = None,
    *,
    return_aux: Any = None,
):
    """Attention with a score mod and a block-sparse mask, FlexAttention semantics.

    ``score_mod(score, b, h, q_idx, kv_idx)`` sees the scaled logit; ``block_mask`` (from
    :func:`attnforge.create_block_mask`, or a torch ``BlockMask``) skips empty blocks and
    applies its ``mask_mod`` in partial ones; ``scale`` defaults to ``1 / sqrt(E)``.  A query
    row with every key masked gives output 0 and lse ``-inf``.  Returns ``out``, or
    ``(out, lse)`` with ``return_lse=True``.  ``kernel_options`` may set ``BLOCK_M``,
    ``BLOCK_N``, ``num_warps``, ``num_stages``.  As in recent torch, ``return_aux=
    AuxRequest(lse=True)`` returns ``(out, AuxOutput(lse=lse, max_scores=None))`` instead.
    """
    pkey = _plan_key(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                     kernel_options, return_aux)  # fmt: skip
    if pkey is not None:
        try:
            plan = _plans.get(pkey)
        except TypeError:  # an unhashable value (a kernel_options value, say): never planned
            plan = pkey = None
        if plan is not None:
            done = plan.run(query, key, value, score_mod, block_mask)
            if done is not None:
                return done
    q, k, v = query, key, value
    user_mask = block_mask
    geo = _geometry(q, k, v, enable_gqa)
    want_lse = _check_aux(return_lse, return_aux)
    options = launch.check_kernel_options(kernel_options)
    if block_mask is None:
        block_mask = geo.full_plan()
    else:
        block_mask = _check_block_mask(block_mask, geo)
    scale = geo.scale if scale is None else _check_scale(scale)

    score, score_ir, score_params = current_mod(score_mod, "score")
    mask, mask_ir, mask_params = current_mod(block_mask.mask_mod, "mask")
    lowered = _lower(score, mask, score_ir, mask_ir)
    scalars, tensors = launch.slot_values(lowered, score_params, mask_params)
    # captured tensors indexed out of bounds (the kernels would read 0); a score mod only
    # without a mask: a masked position's score may index anywhere, it is never used
    extents = {Op.B: q.shape[0], Op.H: q.shape[1], Op.Q_IDX: q.shape[2], Op.KV_IDX: k.shape[2]}
    if mask_ir is None or (mask_ir.op is Op.CONST and mask_ir.arg):
        check_index_bounds("score", score_ir, score_params, extents)
    check_index_bounds("mask", mask_ir, mask_params, extents)
    for t in tensors:
        if t.device != geo.device:
            raise ValueError(
                f"a captured tensor is on {t.device} but q is on {q.device}; move the tensor "
                f"the mod captures to {q.device}"
            )
    kind = loader.device_kind(geo.device)
    call = launch.KernelCall(
        modules=cache.load_kernels(lowered, kind),
        lowered=lowered,
        block_mask=block_mask,
        scale=scale,
        gqa_group=geo.gqa_group,
        config=geo.fwd_config(q, v, block_mask.BLOCK_SIZE, options),
        scalars=scalars,
        return_lse=want_lse,
        options=options,
    )
    if pkey is not None:
        plan = _Plan.make(call, kind, geo.device, user_mask, score_mod, score_ir, mask_ir)
        if plan is not None:
            call.memo = plan.memo
            _remember_plan(pkey, plan, user_mask)
    out, lse = attention(call, q, k, v, tensors)
    if return_aux is not None:
        return out, _aux_output(lse if want_lse else None)
    return (out, lse) if return_lse else out


# -- per-call plans (host overhead) ------------------------------------------------------------
# A repeat call (same tensor shapes, strides, dtypes and devices, same mod objects, block mask
# object and fields, scale, flags and kernel_options) is served by the plan its first call made:
# every check above passed for that key and is a pure function of it, so the repeat call only
# re-reads what can change without changing the key (the mods' guards and IR, the captured
# values, the block mask's fields, the interpreter knob, grad mode) and launches the recorded
# forward (launch._FwdPlan).  Anything that does not match takes the full path, which raises
# the same errors at the user's line as before and makes a new plan.

_PLAN_LIMIT = 64
_is = operator.is_
_PLAIN_TENSORS = launch.PLAIN_TENSORS
_plans: dict[tuple, _Plan] = {}
# BlockMask fields a plan depends on, compared by identity at every call (a reassigned field
# makes a new plan; the lists' contents are read by the kernels, so in-place edits need none)
_BM_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "mask_mod", "BLOCK_SIZE", "seq_lengths")  # fmt: skip


def _plan_key(q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse, options, aux):
    """The key of a call's plan, or None where a call is never planned (tensor subclasses,
    tensor scale, ``return_aux``; unhashable values: the lookup raises TypeError)."""
    if (type(q) not in _PLAIN_TENSORS or type(k) not in _PLAIN_TENSORS
            or type(v) not in _PLAIN_TENSORS or aux is not None
            or (scale is not None and isinstance(scale, torch.Tensor))):  # fmt: skip
        return None
    try:
        opts = None if options is None else tuple(options.items())
        return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype,
                k.dtype, v.dtype, q.device, k.device, v.device, id(score_mod), id(block_mask),
                scale, enable_gqa, return_lse, opts)  # fmt: skip
    except (TypeError, AttributeError):
        return None


class _Plan:
    """What a call computed that its repeats can reuse (see the comment above)."""

    __slots__ = ("call", "kind", "device", "bm_ref", "bm_fields", "bm_getter", "bm", "score_mod",
                 "score_ir", "mask_ir", "memo", "interpret", "slots")  # fmt: skip

    @classmethod
    def make(cls, call, kind, device, user_mask, score_mod, score_ir, mask_ir) -> _Plan | None:
        plan = cls()
        plan.score_mod = score_mod  # held: its id is in the key
        plan.kind, plan.device = kind, device
        plan.interpret = loader.interpret_text()  # (what the kind was made with: see run)
        plan.slots = bool(call.lowered.slots)
        plan.score_ir, plan.mask_ir = score_ir, mask_ir
        plan.bm_ref = plan.bm_fields = plan.bm_getter = None
        # The user's block mask is held weakly (the plan goes with it, see _remember_plan); a
        # converted torch mask or the no-mask plan is ours to hold.
        plan.bm = None if call.block_mask is user_mask else call.block_mask
        plan.memo = {}
        plan.call = call.copy_with(block_mask=None, memo=plan.memo)
        if user_mask is not None:
            try:
                plan.bm_ref = weakref.ref(user_mask)
                plan.bm_getter = operator.attrgetter(*_BM_FIELDS)
                plan.bm_fields = plan.bm_getter(user_mask)
            except (TypeError, AttributeError):
                return None
        return plan

    def run(self, q, k, v, score_mod, block_mask):
        """The call's result, or None where something the key does not cover changed."""
        if score_mod is not self.score_mod:
            return None
        if block_mask is not None:
            if self.bm_ref() is not block_mask or not all(
                map(_is, self.bm_getter(block_mask), self.bm_fields)
            ):
                return None
        bm = block_mask if self.bm is None else self.bm
        score_ir, score_params = None, ()  # (current_mod's answer for None)
        if score_mod is not None:
            _, score_ir, score_params = current_mod(score_mod, "score")
        _, mask_ir, mask_params = current_mod(bm.mask_mod, "mask")
        if score_ir is not self.score_ir or mask_ir is not self.mask_ir:
            return None
        # the device kind depends on the device (the plan's) and ATTNFORGE_INTERPRET's text only
        if (
            loader.interpret_text() != self.interpret
            and loader.device_kind(self.device) != self.kind
        ):
            return None
        call = self.call
        tensors = ()
        if self.slots:
            scalars, tensors = launch.slot_values(call.lowered, score_params, mask_params)
            for t in tensors:
                if t.device != self.device:
                    return None  # the full path raises
            call = call.copy_with(scalars=scalars)
        # no gradient needed: the recorded forward launch directly
        # (it reads neither the block mask nor anything else of ``call`` a repeat call changes)
        fwd = self.memo.get("fwd")
        if fwd is not None and not needs_grad(q, k, v, tensors):
            done = fwd(call, q, k, v, tensors)
            if done is not None:
                return done if call.return_lse else done[0]
        out, lse = attention(call.copy_with(block_mask=bm), q, k, v, tensors)
        return (out, lse) if call.return_lse else out


def _remember_plan(key, plan: _Plan, user_mask) -> None:
    # plans dropped here are released after the lock: the last reference to a user's block
    # mask may go with them, and its finalizer (_forget_mask) takes the lock
    dropped = None
    with _memo_lock:
        if len(_plans) >= _PLAN_LIMIT:
            dropped = list(_plans.values())
            _plans.clear()
        replaced = _plans.get(key)
        _plans[key] = plan
    del dropped, replaced
    if user_mask is not None:  # the plan holds the mask's lists: drop it with the mask
        weakref.finalize(user_mask, _forget_mask, id(user_mask))


def _forget_mask(mask_id: int) -> None:
    with _memo_lock:
        for key in [key for key in _plans if key[13] == mask_id]:
            del _plans[key]


# -- memos on the per-call path (host overhead) ------------------------------------------------
# Everything below is a pure function of its key; captured values are never memoised (they are
# re-read through the mods' getters at every call, in ``launch.slot_values``).

_MEMO_LIMIT = 256
_memo_lock = threading.RLock()  # (a finalizer may run while it is held)


def _remember(memo: dict, key, value):
    with _memo_lock:
        if len(memo) >= _MEMO_LIMIT:
            memo.clear()  # a process cycling through shapes: start over rather than grow
        memo[key] = value
    return value


class _Geometry:
    """Shapes, dtype and device of one ``(q, k, v, enable_gqa)`` combination, validated once;
    holds what depends on nothing else (default scale, no-mask plan, tile configs)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor):
        self.B, self.Hq, self.L, self.E = q.shape
        self.S = k.shape[2]
        self.Bkv = k.shape[0]
        self.gqa_group = self.Hq // k.shape[1]
        self.scale = 1.0 / math.sqrt(self.E)
        self.device = q.device
        self._full_plan = None
        self._configs: dict = {}

    def full_plan(self):
        if self._full_plan is None:
            self._full_plan = _full_plan(self.L, self.S, self.device)
        return self._full_plan

    def fwd_config(self, q, v, block_size: tuple[int, int], options: dict):
        """``launch.choose_fwd_config``, memoised per block size and kernel_options (it depends
        on q's and v's shapes, dtype and device only, which this geometry fixes)."""
        try:
            key = (block_size, tuple(sorted(options.items())) if options else None)
            hash(key)
        except TypeError:  # an unhashable (ignored) FlexAttention option value
            return launch.choose_fwd_config(q, v, block_size, options)
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = _remember(self._configs, key, launch.choose_fwd_config(q, v, block_size, options))
        return cfg


_geometries: dict[tuple, _Geometry] = {}


def _geometry(q, k, v, enable_gqa: bool) -> _Geometry:
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
            and isinstance(v, torch.Tensor)):  # fmt: skip
        _check_tensors(q, k, v, enable_gqa)  # raises
    key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
           bool(enable_gqa))  # fmt: skip
    geo = _geometries.get(key)
    if geo is None:
        _check_tensors(q, k, v, enable_gqa)
        if k.shape[0] not in (1, q.shape[0]):
            raise ValueError(
                f"key/value batch Bkv={k.shape[0]} must equal the query batch B={q.shape[0]} "
                f"or be 1"
            )
        geo = _remember(_geometries, key, _Geometry(q, k))
    return geo


_lowered: dict[tuple, Any] = {}


def _lower(score, mask, score_ir, mask_ir):
    """``codegen.lower``, memoised per (score IR, mask IR) node identity: IR nodes are interned,
    so identity is structural equality, and a re-traced mod brings new nodes."""
    key = (score_ir, mask_ir)
    low = _lowered.get(key)
    if low is None:
        low = _remember(_lowered, key, lower(score, mask))
    return low


def _check_aux(return_lse: bool, return_aux: Any) -> bool:
    if return_aux is None:
        return bool(return_lse)
    if return_lse:
        raise ValueError("pass either return_lse=True or return_aux=AuxRequest(lse=True), not both")
    if getattr(return_aux, "max_scores", False):
        raise NotImplementedError(
            "return_aux=AuxRequest(max_scores=True) is not supported by attnforge yet; "
            "request lse only"
        )
    return bool(getattr(return_aux, "lse", False))


def _aux_output(lse):
    try:
        from torch.nn.attention.flex_attention import AuxOutput
    except ImportError:  # older torch: a look-alike
        from collections import namedtuple

        AuxOutput = namedtuple("AuxOutput", ["lse", "max_scores"], defaults=(None, None))
    return AuxOutput(lse=lse, max_scores=None)


# -- checks ------------------------------------------------------------------------------------


def _check_tensors(q, k, v, enable_gqa: bool) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (B, H, seq_len, head_dim), got shape {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"query, key and value must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.dtype not in _DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"query, key and value must be on the same device, got {q.device}, {k.device}, "
            f"{v.device}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"query and key must have the same head dim, got E={q.shape[-1]} and E={k.shape[-1]}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"key {tuple(k.shape)} and value {tuple(v.shape)} must agree in (B, H, seq_len)"
        )
    Hq, Hkv = q.shape[1], k.shape[1]
    if not enable_gqa and Hq != Hkv:
        raise ValueError(
            f"query and key/value must have the same number of heads, got Hq={Hq} and "
            f"Hkv={Hkv}; set enable_gqa=True for grouped-query attention"
        )
    if enable_gqa and (Hkv == 0 or Hq % Hkv):
        raise ValueError(
            f"with enable_gqa the number of query heads must be a multiple of the kv heads, "
            f"got Hq={Hq} and Hkv={Hkv}"
        )
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be positive, got E={q.shape[-1]}, Ev={v.shape[-1]}")


def _check_scale(scale: Any) -> float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number, got a tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    try:
        return float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a float or None, got {scale!r}") from None


def _check_block_mask(block_mask: Any, geo: _Geometry):
    if not isinstance(block_mask, BlockMask):
        if type(block_mask).__name__ == "BlockMask" and hasattr(block_mask, "kv_num_blocks"):
            block_mask = _from_torch(block_mask)
        else:
            raise ValueError(
                f"block_mask must be an attnforge BlockMask (af.create_block_mask) or None, "
                f"got {type(block_mask).__name__}"
            )
    B, Hq, L, S = geo.B, geo.Hq, geo.L, geo.S
    bl, bs = block_mask.seq_lengths
    if L > bl or S > bs:
        raise ValueError(
            f"block_mask was created for (Q_LEN, KV_LEN)=({bl}, {bs}) but got q_len={L} and "
            f"kv_len={S}: the block mask is smaller than the input; create a new block mask "
            f"for these lengths"
        )
    if L != bl or S != bs:
        raise ValueError(
            f"block_mask was created for (Q_LEN, KV_LEN)=({bl}, {bs}) but got q_len={L} and "
            f"kv_len={S}: create a block mask with the lengths you use"
        )
    num = block_mask.kv_num_blocks
    Bm, Hm = num.shape[:2]
    if Bm not in (1, B) or Hm not in (1, Hq):
        raise ValueError(
            f"block_mask has (B, H)=({Bm}, {Hm}); it must be 1 or match the query's "
            f"(B, Hq)=({B}, {Hq})"
        )
    if num.device != geo.device:
        raise ValueError(
            f"block_mask is on {num.device} but q is on {geo.device}; "
            f"use block_mask.to({str(geo.device)!r})"
        )
    return block_mask


_converted: dict[int, tuple] = {}


def _from_torch(torch_mask: Any) -> BlockMask:
    """``BlockMask.from_torch`` (which validates the lists), once per torch BlockMask object and
    lists; the entry goes when the torch mask does."""
    src = (torch_mask.kv_num_blocks, torch_mask.kv_indices, torch_mask.full_kv_num_blocks,
           torch_mask.full_kv_indices, torch_mask.mask_mod)  # fmt: skip
    hit = _converted.get(id(torch_mask))
    if hit is not None and hit[0]() is torch_mask and all(a is b for a, b in zip(hit[1], src)):
        return hit[2]
    bm = BlockMask.from_torch(torch_mask)
    try:
        ref = weakref.ref(torch_mask)
        weakref.finalize(torch_mask, _converted.pop, id(torch_mask), None)
    except TypeError:  # not weak-referenceable: convert at every call
        return bm
    return _remember(_converted, id(torch_mask), (ref, src, bm))[2]


# -- the no-mask plan used when block_mask is None ---------------------------------------------

_FULL_BLOCK = 128
_full_plans: dict[tuple, Any] = {}
_full_lock = threading.Lock()


def _full_plan(L: int, S: int, device: torch.device):
    """A BlockMask listing every kv block (no mask code runs: there is no mask_mod), cached per
    (L, S, device).  The blocks are listed as PARTIAL and there are no FULL lists, so each
    kernel compiles one block loop, not two identical ones (with no mask_mod the PARTIAL loop
    applies none): the backward's two kernels compile in 20-30% less time (sm_90 AOT on
    CPU, fresh Triton cache, bench/NOTES.md session 10)."""
    key = (L, S, str(device))
    plan = _full_plans.get(key)
    if plan is not None:
        return plan
    n_q = max(1, -(-L // _FULL_BLOCK))
    n_kv = -(-S // _FULL_BLOCK)
    num = torch.full((1, 1, n_q), n_kv, dtype=torch.int32, device=device)
    idx = torch.arange(max(n_kv, 1), dtype=torch.int32, device=device)
    idx = idx.expand(1, 1, n_q, -1).contiguous()
    # The transposes (what the dK/dV kernel walks) are known too: every kv column lists every
    # q row. Built here, the first backward launches no sort/search kernels and never
    # synchronises to size them (BlockMask would compute the same lists lazily on the GPU).
    transposed = (None,) * 4
    if n_kv > 0:
        q_idx = torch.arange(n_q, dtype=torch.int32, device=device)
        transposed = (
            torch.full((1, 1, n_kv), n_q, dtype=torch.int32, device=device),
            q_idx.expand(1, 1, n_kv, -1).contiguous(),
            None,
            None,
        )
    plan = BlockMask(
        (max(L, 1), max(S, 1)), num, idx, None, None, *transposed,
        BLOCK_SIZE=(_FULL_BLOCK, _FULL_BLOCK), mask_mod=None, _ascending=True, _all_full=True,
    )  # fmt: skip
    with _full_lock:
        if len(_full_plans) > 64:
            _full_plans.clear()
        _full_plans[key] = plan
    return plan
