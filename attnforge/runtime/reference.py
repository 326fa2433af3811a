"""Dense reference attention: the test oracle, with FlexAttention semantics.

It materializes the whole ``(B, Hq, L, S)`` score tensor, so use it for small shapes only.
Shape legend::

    q  (B, Hq, L, E)     k  (Bk, Hkv, S, E)     v  (Bk, Hkv, S, Ev)     Bk in {1, B}
    out (B, Hq, L, Ev)   lse (B, Hq, L)         Hq == Hkv, or Hq % Hkv == 0 with enable_gqa

Example::

    import torch
    from attnforge.runtime.reference import reference_attention, create_mask
    q = k = v = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    out, lse = reference_attention(q, k, v, mask_mod=lambda b, h, i, j: i >= j, return_lse=True)
    create_mask(lambda b, h, i, j: i >= j, None, None, 3, 3)   # bool (1, 1, 3, 3)

Mods are either attnforge ``Mod`` objects (their IR is evaluated with
``attnforge.dsl.evaluate.evaluate``) or plain FlexAttention-style callables, called once on
broadcast index tensors ``b (B,1,1,1)``, ``h (1,H,1,1)``, ``q_idx (1,1,L,1)``, ``kv_idx
(1,1,1,S)`` (equivalent to FlexAttention's vmap for elementwise mods).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from ..dsl.evaluate import evaluate

_SCORE_ARGS = ("score", "b", "h", "q_idx", "kv_idx")
_MASK_ARGS = ("b", "h", "q_idx", "kv_idx")


# -- mods -----------------------------------------------------------------------------------------


def _index_grids(B: int, H: int, L: int, S: int, device) -> dict[str, torch.Tensor]:
    def ar(n: int, dim: int) -> torch.Tensor:
        shape = [1, 1, 1, 1]
        shape[dim] = n
        return torch.arange(n, device=device).view(shape)

    return {"b": ar(B, 0), "h": ar(H, 1), "q_idx": ar(L, 2), "kv_idx": ar(S, 3)}


def _is_ir_mod(mod: Any) -> bool:
    return hasattr(mod, "ir") and hasattr(mod, "param_values")


def _param_values(mod: Any) -> tuple:
    values = tuple(mod.param_values())
    for p, val in zip(getattr(mod, "params", ()), values):
        if val is None:
            raise ValueError(
                f"parameter {p.name!r} of {getattr(mod, 'name', 'mod')} has no value; "
                f"bind one first (e.g. variant.bind({p.name}=...))"
            )
    return values


def _call_mod(mod: Any, args: dict[str, Any], float_dtype: torch.dtype) -> torch.Tensor:
    """Apply ``mod`` to the named leaves in ``args`` (ordered as the mod's signature)."""
    if _is_ir_mod(mod):
        return evaluate(mod.ir, args, _param_values(mod), float_dtype=float_dtype)
    if not callable(mod):
        raise TypeError(f"expected a mod (a callable or an attnforge Mod), got {mod!r}")
    out = mod(*args.values())
    device = next(iter(args.values())).device
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out, device=device)


def _mask_values(mask_mod: Any, grids: dict, float_dtype: torch.dtype) -> torch.Tensor:
    keep = _call_mod(mask_mod, grids, float_dtype)
    if keep.dtype != torch.bool:
        name = getattr(mask_mod, "name", getattr(mask_mod, "__name__", repr(mask_mod)))
        raise TypeError(
            f"mask_mod {name} returned dtype {keep.dtype}; a mask must be boolean "
            f"(use a comparison such as q_idx >= kv_idx)"
        )
    return keep


def _is_score_mod(fn: Any) -> bool:
    kind = getattr(fn, "kind", None)
    if kind in ("score", "mask"):
        return kind == "score"
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]  # fmt: skip
    return len(positional) == 5


def create_mask(
    mod_fn: Any,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: Any = "cpu",
) -> torch.Tensor:
    """The dense boolean mask ``[B, H, Q_LEN, KV_LEN]`` of a mask mod (True = attend).

    As FlexAttention's ``create_mask``: ``B``/``H`` may be None (meaning 1), and a score mod is
    accepted too (an element is kept unless the mod sends a zero score to ``-inf``).

    Example::

        create_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 4, 4)[0, 0]
    """
    B = 1 if B is None else int(B)
    H = 1 if H is None else int(H)
    device = "cpu" if device is None else device
    grids = _index_grids(B, H, Q_LEN, KV_LEN, device)
    if _is_score_mod(mod_fn):
        zeros = torch.zeros(B, H, Q_LEN, KV_LEN, device=device)
        out = _call_mod(mod_fn, {"score": zeros, **grids}, torch.float32)
        return ~torch.isneginf(out).expand(B, H, Q_LEN, KV_LEN)
    keep = _mask_values(mod_fn, grids, torch.get_default_dtype())
    return keep.expand(B, H, Q_LEN, KV_LEN).clone()


# -- block masks ----------------------------------------------------------------------------------


def _block_size(block_mask: Any) -> tuple[int, int]:
    bs = block_mask.BLOCK_SIZE
    if isinstance(bs, int):
        return bs, bs
    return int(bs[0]), int(bs[1])


def _blocks_to_dense(num: torch.Tensor, idx: torch.Tensor, n_kv: int) -> torch.Tensor:
    """kv block lists ``[B',H',nQ,W]`` (first ``num`` valid) -> bool ``[B',H',nQ,n_kv]``."""
    valid = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
    col = torch.where(valid & (idx < n_kv), idx.long(), n_kv)  # invalid -> a scratch column
    dense = torch.zeros(*idx.shape[:-1], n_kv + 1, dtype=torch.bool, device=idx.device)
    dense.scatter_(-1, col, True)
    return dense[..., :n_kv]


def _expand_blocks(dense: torch.Tensor, qb: int, kvb: int, L: int, S: int) -> torch.Tensor:
    return dense.repeat_interleave(qb, dim=2)[:, :, :L].repeat_interleave(kvb, dim=3)[..., :S]


def _check_block_mask_shape(block_mask: Any, L: int, S: int, qb: int, kvb: int) -> None:
    seq = getattr(block_mask, "seq_lengths", None)
    if seq is not None and tuple(int(x) for x in seq) != (L, S):
        raise ValueError(
            f"block_mask was created for (Q_LEN, KV_LEN)={tuple(seq)} but got q_len={L} and "
            f"kv_len={S}; create the block mask for the lengths you use"
        )
    n_q = block_mask.kv_num_blocks.shape[-1]
    if n_q * qb < L:
        raise ValueError(
            f"block_mask has {n_q} query blocks of {qb} (covers {n_q * qb}) but q_len={L}; "
            f"create the block mask for the lengths you use"
        )


def _block_mask_keep(block_mask: Any, grids: dict, shape: tuple, float_dtype) -> torch.Tensor:
    """Element-level keep mask of a FlexAttention-style block mask, broadcastable to ``shape``.

    An element is kept iff its block is FULL, or PARTIAL and ``mask_mod`` keeps it.
    """
    B, H, L, S = shape
    qb, kvb = _block_size(block_mask)
    _check_block_mask_shape(block_mask, L, S, qb, kvb)
    n_kv = -(-S // kvb)
    partial = _blocks_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, n_kv)
    partial = _expand_blocks(partial, qb, kvb, L, S)
    mask_mod = getattr(block_mask, "mask_mod", None)
    if mask_mod is not None:
        partial = partial & _mask_values(mask_mod, grids, float_dtype)
    full_num = getattr(block_mask, "full_kv_num_blocks", None)
    if full_num is None:
        return partial
    full = _blocks_to_dense(full_num, block_mask.full_kv_indices, n_kv)
    return partial | _expand_blocks(full, qb, kvb, L, S)


# -- attention ------------------------------------------------------------------------------------


def _check_inputs(q, k, v, enable_gqa: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, E), got shape {tuple(t.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k head dims differ: E={q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in (B, Hkv, S)")
    if k.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"k/v batch {k.shape[0]} must be 1 or equal q's batch {q.shape[0]}")
    hq, hkv = q.shape[1], k.shape[1]
    if not enable_gqa and hq != hkv:
        raise ValueError(
            f"q has Hq={hq} heads but k/v have Hkv={hkv}; pass enable_gqa=True for GQA"
        )
    if enable_gqa and hq % hkv != 0:
        raise ValueError(f"GQA needs Hq % Hkv == 0, got Hq={hq} and Hkv={hkv}")


def _safe_softmax(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scores) @ v`` and logsumexp; all -inf rows -> out 0, lse -inf, finite grads."""
    # The row max is a constant shift (it cancels in value and gradient), so detach it; a fully
    # masked row has max -inf, replaced by 0 to avoid (-inf) - (-inf).
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    alive = denom > 0
    safe_denom = torch.where(alive, denom, torch.ones_like(denom))
    out = (p @ v) / safe_denom
    lse = torch.where(alive, torch.log(safe_denom) + row_max, torch.full_like(denom, -math.inf))
    return out, lse.squeeze(-1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Any = None,
    block_mask: Any = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    mask_mod: Any = None,
):
    """Dense attention with FlexAttention semantics; ``out`` or ``(out, lse)``.

    Computes in the inputs' dtype. ``scale`` defaults to ``1/sqrt(E)`` and ``score_mod`` sees
    the scaled logit. ``block_mask`` keeps an element iff its block is full, or partial and the
    block mask's ``mask_mod`` keeps it; ``mask_mod`` (not part of FlexAttention's signature)
    is applied to every element. Masked entries are ``-inf`` before the softmax; a query row
    with nothing kept gives ``out = 0`` and ``lse = -inf``.

    Example::

        q = k = v = torch.randn(2, 4, 17, 16, dtype=torch.float64)
        out = reference_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + (i - j))
    """
    _check_inputs(q, k, v, enable_gqa)
    B, hq, L, E = q.shape
    S = k.shape[2]
    if hq != k.shape[1]:
        group = hq // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    grids = _index_grids(B, hq, L, S, q.device)
    fdt = q.dtype if q.dtype.is_floating_point else torch.float32
    if score_mod is not None:
        modded = _call_mod(score_mod, {"score": scores, **grids}, fdt)
        scores = modded.to(scores.dtype).expand(B, hq, L, S)
    keep = None
    if block_mask is not None:
        keep = _block_mask_keep(block_mask, grids, (B, hq, L, S), fdt)
    if mask_mod is not None:
        extra = _mask_values(mask_mod, grids, fdt)
        keep = extra if keep is None else keep & extra
    if keep is not None:
        scores = torch.where(keep, scores, torch.full_like(scores, -math.inf))
    out, lse = _safe_softmax(scores, v)
    return (out, lse) if return_lse else out
