"""A library of common attention variants, as ``generate_<name>(...)`` factories.

Each factory returns an attnforge mod (a traced ``mask_mod`` or ``score_mod``; it has ``.ir`` and
can be called eagerly like the plain FlexAttention function it wraps). Sizes, windows and caps are
*captured* Python scalars and tables are captured tensors: they are kernel arguments, so building
the same variant with another window size reuses the compiled kernel.

Shape legend used by every docstring::

    B batch, H query heads, L query length, S key/value length, E head dim
    b, h, q_idx, kv_idx   the index arguments a mod receives (int)
    score                 the scaled logit q.k * scale (float)

Docstring examples assume ``import torch, attnforge as af`` and
``from attnforge.library import *`` (a test runs every one of them). Quick example::

    import torch, attnforge as af
    from attnforge.library import generate_sliding_window, generate_tanh_softcap
    attn = af.variant(score_mod=generate_tanh_softcap(30.0), mask_mod=generate_sliding_window(64))
    q = k = v = torch.randn(1, 2, 256, 32)
    out = attn(q, k, v)                                   # (1, 2, 256, 32)

The conventions follow attention-gym and FlexAttention (documented per factory); where a
FlashAttention convention differs (bottom-right causal) it is offered as an option.
"""

from __future__ import annotations

import math

import torch

from .dsl.api import mask_mod, score_mod

__all__ = [
    "generate_causal_mask",
    "generate_sliding_window",
    "generate_sinks_window",
    "generate_dilated_sliding_window",
    "generate_chunked_mask",
    "generate_doc_mask",
    "document_ids",
    "generate_prefix_lm_mask",
    "generate_alibi_bias",
    "alibi_slopes",
    "generate_tanh_softcap",
    "generate_relative_bias",
    "generate_natten",
    "generate_sta_mask",
]

_ALIGNMENTS = ("top_left", "bottom_right")


# -- checks ---------------------------------------------------------------------------------------


def _positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _int_tuple(name: str, value, ndim: int | None = None) -> tuple[int, ...]:
    vals = (value,) if isinstance(value, int) else tuple(value)
    if ndim is not None and len(vals) == 1 and ndim > 1:
        vals = vals * ndim
    if ndim is not None and len(vals) != ndim:
        raise ValueError(f"{name} must have {ndim} entries (one per canvas dim), got {value!r}")
    return tuple(_positive_int(f"{name}[{i}]", v) for i, v in enumerate(vals))


# -- causal and windows ---------------------------------------------------------------------------


def generate_causal_mask(
    alignment: str = "top_left", q_len: int | None = None, kv_len: int | None = None
):
    """Causal mask.

    ``alignment="top_left"`` is FlexAttention's (and ``torch.tril``'s) convention:
    ``q_idx >= kv_idx``; query ``i`` sees keys ``0..i`` whatever ``L`` and ``S`` are.
    ``alignment="bottom_right"`` is FlashAttention's convention when ``L != S``: the last query
    is aligned with the last key, ``q_idx + (kv_len - q_len) >= kv_idx``. It needs the lengths
    (``q_len = L``, ``kv_len = S``); they are captured scalars, so other lengths reuse the
    kernel. With ``L > S`` the first ``L - S`` queries see no key (output 0, as in FlashAttention).

    Example::

        causal = generate_causal_mask("bottom_right", q_len=4, kv_len=6)
        af.create_mask(causal, 1, 1, 4, 6)[0, 0]   # row 0 sees keys 0..2

    Returns a mask mod ``(b, h, q_idx, kv_idx) -> bool``.
    """
    if alignment not in _ALIGNMENTS:
        raise ValueError(f"alignment must be one of {_ALIGNMENTS}, got {alignment!r}")
    if alignment == "top_left":

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        return mask_mod(causal)
    if q_len is None or kv_len is None:
        raise ValueError(
            "bottom_right causal needs the lengths: "
            "generate_causal_mask('bottom_right', q_len=L, kv_len=S)"
        )
    q_len = _positive_int("q_len", q_len)
    kv_len = _positive_int("kv_len", kv_len)

    def causal_bottom_right(b, h, q_idx, kv_idx):
        return q_idx + (kv_len - q_len) >= kv_idx

    return mask_mod(causal_bottom_right)


def generate_sliding_window(window: int, causal: bool = True):
    """Sliding-window (local) attention.

    Causal: query ``i`` sees keys ``i - window .. i`` (``window + 1`` keys, FlashAttention's
    ``window_size=(window, 0)``; attention-gym's convention). Non-causal: keys within
    ``|i - j| <= window`` on both sides. ``window`` is a captured scalar.

    Example::

        mask = generate_sliding_window(128)
        bm = af.create_block_mask(mask, 1, 1, 1024, 1024)     # a diagonal band of blocks

    Returns a mask mod ``(b, h, q_idx, kv_idx) -> bool``.
    """
    window = _positive_int("window", window, allow_zero=True)
    if causal:

        def sliding_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

        return mask_mod(sliding_window)

    def sliding_window_bidirectional(b, h, q_idx, kv_idx):
        return torch.abs(q_idx - kv_idx) <= window

    return mask_mod(sliding_window_bidirectional)


def generate_sinks_window(window: int, num_sinks: int, causal: bool = True):
    """Sliding window plus attention sinks (StreamingLLM).

    Every query also sees the first ``num_sinks`` keys; otherwise as
    :func:`generate_sliding_window` (``window`` keys to the left plus itself when causal).

    Example::

        mask = generate_sinks_window(window=256, num_sinks=4)
        af.create_mask(mask, 1, 1, 8, 8)

    Returns a mask mod ``(b, h, q_idx, kv_idx) -> bool``.
    """
    window = _positive_int("window", window, allow_zero=True)
    num_sinks = _positive_int("num_sinks", num_sinks, allow_zero=True)
    if causal:

        def sinks_window(b, h, q_idx, kv_idx):
            near = q_idx - kv_idx <= window
            return (q_idx >= kv_idx) & (near | (kv_idx < num_sinks))

        return mask_mod(sinks_window)

    def sinks_window_bidirectional(b, h, q_idx, kv_idx):
        return (torch.abs(q_idx - kv_idx) <= window) | (kv_idx < num_sinks)

    return mask_mod(sinks_window_bidirectional)


def generate_dilated_sliding_window(window: int, dilation: int, causal: bool = False):
    """Dilated sliding window: keys within ``|i - j| <= window`` whose distance is a multiple
    of ``dilation`` (LongNet-style dilation; attention-gym's convention). ``causal=True`` keeps
    only ``j <= i``.

    Example::

        mask = generate_dilated_sliding_window(window=8, dilation=2)
        af.create_mask(mask, 1, 1, 16, 16)

    Returns a mask mod ``(b, h, q_idx, kv_idx) -> bool``.
    """
    window = _positive_int("window", window, allow_zero=True)
    dilation = _positive_int("dilation", dilation)

    # one closure per branch: a Python `if` on a captured value would be traced
    def dilated_sliding_window(b, h, q_idx, kv_idx):
        dist = torch.abs(q_idx - kv_idx)
        return (dist <= window) & (dist % dilation == 0)

    def dilated_sliding_window_causal(b, h, q_idx, kv_idx):
        return dilated_sliding_window(b, h, q_idx, kv_idx) & (q_idx >= kv_idx)

    return mask_mod(dilated_sliding_window_causal if causal else dilated_sliding_window)


def generate_chunked_mask(chunk: int, causal: bool = False):
    """Chunked (block-diagonal) attention: positions attend only within their chunk of
    ``chunk`` tokens (``q_idx // chunk == kv_idx // chunk``). ``causal=True`` also requires
    ``kv_idx <= q_idx`` (Llama-4 style chunked local attention).

    Example::

        mask = generate_chunked_mask(128)
        af.create_block_mask(mask, 1, 1, 1024, 1024)   # 8 diagonal blocks, all FULL

    Returns a mask mod ``(b, h, q_idx, kv_idx) -> bool``.
    """
    chunk = _positive_int("chunk", chunk)

    def chunked(b, h, q_idx, kv_idx):
        return q_idx // chunk == kv_idx // chunk

    def chunked_causal(b, h, q_idx, kv_idx):
        return chunked(b, h, q_idx, kv_idx) & (q_idx >= kv_idx)

    return mask_mod(chunked_causal if causal else chunked)


# -- documents and prefixes -----------------------------------------------------------------------


def _lengths_from(lengths, offsets) -> torch.Tensor:
    if (lengths is None) == (offsets is None):
        raise ValueError("generate_doc_mask needs exactly one of lengths=... or offsets=...")
    if lengths is not None:
        t = torch.as_tensor(lengths, dtype=torch.int64).flatten().cpu()
        name = "lengths"
    else:
        off = torch.as_tensor(offsets, dtype=torch.int64).flatten().cpu()
        if off.numel() < 2 or int(off[0]) != 0:
            raise ValueError(
                f"offsets must start at 0 and end at the total length, e.g. [0, 5, 12]; "
                f"got {off.tolist()}"
            )
        t = torch.diff(off)
        name = "offsets (differences)"
    if t.numel() == 0 or bool((t <= 0).any()):
        raise ValueError(f"document {name} must be positive, got {t.tolist()}")
    return t


def document_ids(lengths=None, offsets=None, device=None) -> torch.Tensor:
    """The per-token document id (int32, length ``sum(lengths)``) used by
    :func:`generate_doc_mask`; ``[2, 3] -> [0, 0, 1, 1, 1]``."""
    lens = _lengths_from(lengths, offsets)
    ids = torch.repeat_interleave(torch.arange(lens.numel(), dtype=torch.int32), lens)
    return ids.to(device) if device is not None else ids


def generate_doc_mask(lengths=None, offsets=None, causal: bool = True, device=None):
    """Document (packed-sequence) mask: tokens attend only within their own document.

    Give the documents as ``lengths`` (``[5, 7, 4]``) or as ``offsets`` (cumulative starts
    ending at the total, ``[0, 5, 12, 16]``), as a list or a tensor. The mask reads a captured
    int32 doc-id tensor of length ``T = sum(lengths)`` (``doc_id[q_idx] == doc_id[kv_idx]``), so
    use it with ``L == S == T``. ``causal=True`` (the usual packed-training mask) also requires
    ``kv_idx <= q_idx``. ``device`` is where the doc-id tensor lives: the device of q/k/v.

    Example::

        mask = generate_doc_mask(lengths=[100, 60, 96], device="cpu")     # T = 256
        q = k = v = torch.randn(1, 2, 256, 32)          # (B, H, T, E)
        out = af.variant(mask_mod=mask)(q, k, v)

    Returns a mask mod ``(b, h, q_idx, kv_idx) -> bool``.
    """
    doc_id = document_ids(lengths, offsets, device)
    if causal:

        def document_causal(b, h, q_idx, kv_idx):
            return (doc_id[q_idx] == doc_id[kv_idx]) & (q_idx >= kv_idx)

        return mask_mod(document_causal)

    def document(b, h, q_idx, kv_idx):
        return doc_id[q_idx] == doc_id[kv_idx]

    return mask_mod(document)


def generate_prefix_lm_mask(prefix_length):
    """Prefix-LM mask: every query sees the first ``prefix_length`` keys (bidirectional prefix)
    and causally everything before it: ``(kv_idx < prefix_length) | (q_idx >= kv_idx)``.

    ``prefix_length`` is an int (captured scalar) or an int tensor of shape ``(B,)`` with one
    prefix length per batch element (indexed by ``b``; put it on the device of q/k/v).

    Example::

        mask = generate_prefix_lm_mask(64)
        af.create_mask(mask, 1, 1, 128, 128)

    Returns a mask mod ``(b, h, q_idx, kv_idx) -> bool``.
    """
    if isinstance(prefix_length, torch.Tensor):
        if prefix_length.ndim != 1 or prefix_length.is_floating_point():
            raise ValueError(
                f"prefix_length tensor must be a 1-D int tensor of shape (B,), got "
                f"shape {tuple(prefix_length.shape)} dtype {prefix_length.dtype}"
            )
        prefix = prefix_length

        def prefix_lm_per_batch(b, h, q_idx, kv_idx):
            return (kv_idx < prefix[b]) | (q_idx >= kv_idx)

        return mask_mod(prefix_lm_per_batch)
    prefix_length = _positive_int("prefix_length", prefix_length, allow_zero=True)

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_length) | (q_idx >= kv_idx)

    return mask_mod(prefix_lm)


# -- score mods -----------------------------------------------------------------------------------


def alibi_slopes(num_heads: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The ALiBi paper's head slopes ``2 ** (-8 (h + 1) / num_heads)``, shape ``(num_heads,)``."""
    num_heads = _positive_int("num_heads", num_heads)
    h = torch.arange(1, num_heads + 1, dtype=torch.float64)
    return torch.exp2(-8.0 * h / num_heads).to(device=device, dtype=dtype)


def generate_alibi_bias(
    num_heads: int, slopes: torch.Tensor | None = None, device=None, learnable: bool = False
):
    """ALiBi bias: ``score + slope[h] * (kv_idx - q_idx)`` (FlexAttention / attention-gym
    convention; with a causal mask the bias is <= 0).

    The slopes are a captured float tensor of shape ``(num_heads,)`` (default
    :func:`alibi_slopes`), so they can be learnable: pass ``learnable=True`` (sets
    ``requires_grad``) or your own ``slopes`` parameter, and ``out.backward()`` fills
    ``slopes.grad``. The tensor is available as ``mod.slopes``. ``device``: that of q/k/v.

    Example::

        alibi = generate_alibi_bias(8, learnable=True)
        attn = af.variant(score_mod=alibi, mask_mod=generate_causal_mask())
        q = k = v = torch.randn(1, 8, 128, 32)          # (B, H = num_heads, L, E)
        attn(q, k, v).sum().backward()
        alibi.slopes.grad                               # (8,)

    Returns a score mod ``(score, b, h, q_idx, kv_idx) -> float``.
    """
    num_heads = _positive_int("num_heads", num_heads)
    if slopes is None:
        slopes = alibi_slopes(num_heads, device=device)
        if learnable:
            slopes.requires_grad_(True)
    elif tuple(slopes.shape) != (num_heads,) or not slopes.is_floating_point():
        raise ValueError(
            f"slopes must be a float tensor of shape ({num_heads},), got shape "
            f"{tuple(slopes.shape)} dtype {slopes.dtype}"
        )

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    mod = score_mod(alibi)
    _attach(mod, slopes=slopes)
    return mod


def generate_tanh_softcap(cap: float, approx: bool = False):
    """Logit soft-capping (Gemma 2, Grok): ``cap * tanh(score / cap)``.

    ``approx=True`` writes tanh through exp2 (``1 - 2 / (exp2(2 log2(e) x) + 1)``), which maps
    to the GPU's fast exp2 unit instead of a libdevice tanh call; it is exact in real arithmetic
    and saturates correctly at +-inf. ``cap`` is a captured scalar.

    Example::

        softcap = generate_tanh_softcap(30.0)
        softcap(torch.tensor([100.0]), 0, 0, 0, 0)    # tensor([29.9...])

    Returns a score mod ``(score, b, h, q_idx, kv_idx) -> float``.
    """
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"cap must be a positive number, got {cap!r}")
    cap = float(cap)
    if not approx:

        def tanh_softcap(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

        return score_mod(tanh_softcap)
    two_log2e = 2.0 * math.log2(math.e)

    def tanh_softcap_exp2(score, b, h, q_idx, kv_idx):
        return cap - (2.0 * cap) / (torch.exp2(score * (two_log2e / cap)) + 1.0)

    return score_mod(tanh_softcap_exp2)


def generate_relative_bias(table: torch.Tensor):
    """Learnable relative-position bias: ``score + table[h, clamp(q - kv) + max_len - 1]``.

    ``table`` is a float tensor of shape ``(H, 2 * max_len - 1)`` (per head) or
    ``(2 * max_len - 1,)`` (shared by all heads); entry ``max_len - 1 + d`` is the bias at
    relative distance ``d = q_idx - kv_idx``. Distances beyond ``+-(max_len - 1)`` use the edge
    entries (clamped, never an out-of-bounds read). Make it an ``nn.Parameter`` (or
    ``requires_grad``) to learn it: ``out.backward()`` fills ``table.grad``.

    Example::

        table = torch.zeros(4, 2 * 256 - 1, requires_grad=True)   # max_len 256
        attn = af.variant(score_mod=generate_relative_bias(table))
        q = k = v = torch.randn(1, 4, 128, 32)          # (B, H, L, E)
        attn(q, k, v).sum().backward()
        table.grad.shape                                # (4, 511)

    Returns a score mod ``(score, b, h, q_idx, kv_idx) -> float``.
    """
    if not isinstance(table, torch.Tensor) or not table.is_floating_point():
        raise TypeError(f"table must be a float tensor, got {type(table).__name__}")
    if table.ndim not in (1, 2) or table.shape[-1] % 2 != 1:
        raise ValueError(
            f"table must have shape (H, 2*max_len - 1) or (2*max_len - 1,) (odd last dim), "
            f"got {tuple(table.shape)}"
        )
    max_dist = (table.shape[-1] - 1) // 2

    if table.ndim == 2:

        def relative_bias(score, b, h, q_idx, kv_idx):
            d = torch.clamp(q_idx - kv_idx, -max_dist, max_dist)
            return score + table[h, d + max_dist]

        mod = score_mod(relative_bias)
    else:

        def relative_bias_shared(score, b, h, q_idx, kv_idx):
            d = torch.clamp(q_idx - kv_idx, -max_dist, max_dist)
            return score + table[d + max_dist]

        mod = score_mod(relative_bias_shared)
    _attach(mod, table=table)
    return mod


# -- neighbourhoods on a canvas -------------------------------------------------------------------


def _in_window(q, kv, n, k):
    """Along one canvas axis of size ``n``: is ``kv`` in the ``k``-wide window of ``q``?

    The window is centred on ``q`` (``k // 2`` to the left) and shifted inward at the borders so
    it always holds ``k`` positions: start = clamp(q - k // 2, 0, n - k). This is NATTEN's
    clamped neighbourhood (a centred window clamped to the canvas).
    """
    start = torch.clamp(q - k // 2, 0, n - k)
    return (kv >= start) & (kv < start + k)


def _natten_1d(n0, k0):
    def natten_1d(b, h, q_idx, kv_idx):
        return _in_window(q_idx, kv_idx, n0, k0)

    return natten_1d


def _natten_2d(n0, n1, k0, k1):
    def natten_2d(b, h, q_idx, kv_idx):
        q0, q1 = q_idx // n1, q_idx % n1
        kv0, kv1 = kv_idx // n1, kv_idx % n1
        return _in_window(q0, kv0, n0, k0) & _in_window(q1, kv1, n1, k1)

    return natten_2d


def _natten_3d(n0, n1, n2, k0, k1, k2):
    def natten_3d(b, h, q_idx, kv_idx):
        q0, q1, q2 = q_idx // (n1 * n2), (q_idx // n2) % n1, q_idx % n2
        kv0, kv1, kv2 = kv_idx // (n1 * n2), (kv_idx // n2) % n1, kv_idx % n2
        return (
            _in_window(q0, kv0, n0, k0) & _in_window(q1, kv1, n1, k1) & _in_window(q2, kv2, n2, k2)
        )

    return natten_3d


_NATTEN = {1: _natten_1d, 2: _natten_2d, 3: _natten_3d}


def generate_natten(kernel_size, canvas):
    """Neighbourhood attention (NATTEN) on a 1-D, 2-D or 3-D canvas.

    Tokens are the canvas positions in row-major order (``L == S == prod(canvas)``). Along each
    axis a query sees the ``kernel_size`` positions of a window centred on it, shifted inward at
    the borders so every query sees exactly ``prod(kernel_size)`` keys (NATTEN's clamped
    neighbourhood, attention-gym's ``natten``). Canvas and kernel sizes are captured scalars.

    ``kernel_size``: int (same on every axis) or a tuple, each ``<= `` its canvas dim.
    ``canvas``: ``(W,)``, ``(H, W)`` or ``(T, H, W)``.

    Example::

        mask = generate_natten(kernel_size=5, canvas=(16, 16))      # L = S = 256
        q = k = v = torch.randn(1, 2, 256, 32)          # (B, H, 16 * 16, E)
        out = af.variant(mask_mod=mask)(q, k, v)

    Returns a mask mod ``(b, h, q_idx, kv_idx) -> bool``.
    """
    canvas = _int_tuple("canvas", canvas)
    if len(canvas) not in _NATTEN:
        raise ValueError(f"canvas must have 1, 2 or 3 dims, got {canvas!r}")
    kernel = _int_tuple("kernel_size", kernel_size, len(canvas))
    for i, (n, k) in enumerate(zip(canvas, kernel)):
        if k > n:
            raise ValueError(f"kernel_size[{i}] = {k} is larger than canvas[{i}] = {n}")
    return mask_mod(_NATTEN[len(canvas)](*canvas, *kernel))


def _sta_2d(g0, g1, w0, w1, tile_numel):
    def sta_2d(b, h, q_idx, kv_idx):
        qt, kt = q_idx // tile_numel, kv_idx // tile_numel
        return _in_window(qt // g1, kt // g1, g0, w0) & _in_window(qt % g1, kt % g1, g1, w1)

    return sta_2d


def _sta_3d(g0, g1, g2, w0, w1, w2, tile_numel):
    def sta_3d(b, h, q_idx, kv_idx):
        qt, kt = q_idx // tile_numel, kv_idx // tile_numel
        return (
            _in_window(qt // (g1 * g2), kt // (g1 * g2), g0, w0)
            & _in_window((qt // g2) % g1, (kt // g2) % g1, g1, w1)
            & _in_window(qt % g2, kt % g2, g2, w2)
        )

    return sta_3d


_STA = {2: _sta_2d, 3: _sta_3d}


def generate_sta_mask(canvas, tile, window):
    """Sliding Tile Attention (STA, video DiTs) on a 2-D or 3-D canvas, tile-major token order.

    The canvas ``(H, W)`` / ``(T, H, W)`` is cut into tiles ``tile`` (each canvas dim a multiple
    of its tile dim); tokens are numbered tile by tile (tiles row-major, then row-major inside
    a tile), so one tile is ``prod(tile)`` consecutive tokens. A query tile attends to every
    token of the ``window`` (in tiles per axis) of tiles centred on it, shifted inward at the
    borders like NATTEN. With ``prod(tile)`` a multiple of the kernel blocks every block is
    FULL or EMPTY: no mask code runs. Sizes are captured scalars.

    Example::

        mask = generate_sta_mask(canvas=(8, 32, 32), tile=(4, 8, 8), window=(1, 3, 3))
        af.create_block_mask(mask, 1, 1, 8192, 8192)

    Returns a mask mod ``(b, h, q_idx, kv_idx) -> bool``.
    """
    canvas = _int_tuple("canvas", canvas)
    if len(canvas) not in _STA:
        raise ValueError(f"canvas must have 2 or 3 dims, got {canvas!r}")
    tile = _int_tuple("tile", tile, len(canvas))
    window = _int_tuple("window", window, len(canvas))
    grid = []
    for i, (n, t, w) in enumerate(zip(canvas, tile, window)):
        if n % t:
            raise ValueError(f"canvas[{i}] = {n} is not a multiple of tile[{i}] = {t}")
        if w > n // t:
            raise ValueError(f"window[{i}] = {w} tiles exceeds the {n // t} tiles along dim {i}")
        grid.append(n // t)
    return mask_mod(_STA[len(canvas)](*grid, *window, math.prod(tile)))


# -- helpers --------------------------------------------------------------------------------------


def _attach(mod, **tensors) -> None:
    """Expose captured tensors on the returned mod (``mod.slopes``) for optimisers and tests."""
    for name, t in tensors.items():
        try:
            setattr(mod, name, t)
        except AttributeError:  # a frozen mod type: the tensor stays reachable via mod.params
            pass
