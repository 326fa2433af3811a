"""A catalogue of mods written as plain FlexAttention-style Python functions, for every test.

``ZOO: dict[str, ZooEntry]``; loop over it::

    from zoo import ZOO, MAX_B, MAX_H, MAX_LEN
    for name, e in ZOO.items():
        mod = af.trace(e.fn, e.kind)            # or pass e.fn straight to the runtime

Every entry works for ``B <= MAX_B``, ``H <= MAX_H`` and ``L, S <= MAX_LEN`` (tables are sized
for that), unless ``needs`` says more (``"square": True``: the mod assumes ``L == S``;
``"vmap": True``: called eagerly it needs per-element semantics, e.g. chained indexing
``t[h][q_idx]``, so broadcast index tensors do not work: use :func:`eager`, which vmaps).
Captured tensors are deterministic (seeded) CPU tensors.  ``factory`` (when set) rebuilds the
entry with other captured values: ``factory(**args)`` returns a new plain function, so
``factory(**args)`` with the entry's ``args`` is equivalent to ``fn``.

Tags: ``gym`` (attention-gym), ``flex`` (FlexAttention's tests), ``design`` (DESIGN.md section 1),
``data`` (reads captured tensors, so the mask is data-dependent), ``composite`` (calls other
mods / combinators), ``capture`` (exercises a capture mechanism: defaults, partial, objects...).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MAX_B = 2
MAX_H = 4
MAX_LEN = 300


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "score" | "mask"
    fn: Callable
    needs: dict = field(default_factory=dict)
    factory: Callable | None = None
    args: dict = field(default_factory=dict)
    tags: frozenset = frozenset()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- captured tables (deterministic) -------------------------------------------------------------

REL_TABLE = torch.randn(MAX_H, 2 * MAX_LEN - 1, generator=_gen(1))
SLOPES = torch.tensor([2.0 ** (-8.0 * (i + 1) / MAX_H) for i in range(MAX_H)])
HEAD_WINDOWS = torch.tensor([16, 48, 96, 200])
LENGTHS = torch.tensor([170, 300])
PREFIXES = torch.tensor([40, 111])
RANDOM_MASK = torch.rand(MAX_B, MAX_H, MAX_LEN, MAX_LEN, generator=_gen(2)) > 0.5
BLOCK_TABLE = torch.rand(MAX_LEN // 16 + 1, MAX_LEN // 16 + 1, generator=_gen(3)) > 0.6
GRAPH_DIST = torch.randint(0, 8, (MAX_B, MAX_LEN, MAX_LEN), generator=_gen(4))
GRAPH_BIAS = torch.randn(MAX_H, 8, generator=_gen(5))
BATCH_SCALE = torch.tensor([0.5, 2.0])
GATES = torch.randn(MAX_H, generator=_gen(6))
SINK_BIAS = torch.randn(4, generator=_gen(7))
T5_TABLE = torch.randn(MAX_H, 16, generator=_gen(8))
TEMPERATURE = torch.tensor(0.7)  # a 0-d tensor (a learnable-scalar stand-in)
THRESHOLD = torch.tensor(37)  # a 0-d int tensor


def _doc_ids(lengths) -> torch.Tensor:
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return torch.cat([ids, torch.full((MAX_LEN - len(ids),), len(lengths))])[:MAX_LEN]


DOC_LENGTHS = [37, 64, 5, 90, 70, 34]
DOC_IDS = _doc_ids(DOC_LENGTHS)
DOC_OFFSETS = torch.tensor([0, *itertools.accumulate(DOC_LENGTHS)])


# -- masks: attention-gym ------------------------------------------------------------------------


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def anti_causal(b, h, q_idx, kv_idx):
    return q_idx <= kv_idx


def noop(b, h, q_idx, kv_idx):
    return b.new_ones((), dtype=torch.bool)


def generate_sliding_window(window):
    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    return sliding_window


def generate_sliding_window_strict(window):
    def sliding_window_strict(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return sliding_window_strict


def generate_bidirectional_window(window):
    def bidirectional_window(b, h, q_idx, kv_idx):
        return torch.abs(q_idx - kv_idx) <= window

    return bidirectional_window


def generate_prefix_lm(prefix):
    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx <= prefix) | (q_idx >= kv_idx)

    return prefix_lm


def prefix_lm_per_batch(b, h, q_idx, kv_idx):
    return (kv_idx < PREFIXES[b]) | (q_idx >= kv_idx)


def document(b, h, q_idx, kv_idx):
    return DOC_IDS[q_idx] == DOC_IDS[kv_idx]


def document_causal(b, h, q_idx, kv_idx):
    return (DOC_IDS[q_idx] == DOC_IDS[kv_idx]) & (q_idx >= kv_idx)


def generate_doc_mask_mod(inner, document_id, offsets):
    """attention-gym's jagged-sequence wrapper: ``inner`` sees positions inside the document."""

    def doc_mask_mod(b, h, q_idx, kv_idx):
        same_doc = document_id[q_idx] == document_id[kv_idx]
        q_logical = q_idx - offsets[document_id[q_idx]]
        kv_logical = kv_idx - offsets[document_id[kv_idx]]
        return same_doc & inner(b, h, q_logical, kv_logical)

    return doc_mask_mod


def generate_dilated_window(window, dilation):
    def dilated_sliding_window(b, h, q_idx, kv_idx):
        diff = torch.abs(q_idx - kv_idx)
        return (diff <= window) & (diff % dilation == 0)

    return dilated_sliding_window


def generate_natten_1d(kernel, length):
    def natten_1d(b, h, q_idx, kv_idx):
        center = q_idx.clamp(kernel // 2, (length - 1) - kernel // 2)
        return (center - kv_idx).abs() <= kernel // 2

    return natten_1d


def generate_natten_2d(width, kernel_w, kernel_h):
    def natten_2d(b, h, q_idx, kv_idx):
        q_x, q_y = q_idx // width, q_idx % width
        kv_x, kv_y = kv_idx // width, kv_idx % width
        kernel_x = q_x.clamp(kernel_w // 2, (width - 1) - kernel_w // 2)
        kernel_y = q_y.clamp(kernel_h // 2, (width - 1) - kernel_h // 2)
        hori = (kernel_x - kv_x).abs() <= kernel_w // 2
        vert = (kernel_y - kv_y).abs() <= kernel_h // 2
        return hori & vert

    return natten_2d


def generate_tiled_natten_2d(width, tile, kernel):
    """NATTEN on a tiled layout: position -> (tile, offset) -> 2D coordinate."""

    def tiled_natten(b, h, q_idx, kv_idx):
        tiles_per_row = width // tile

        def coords(idx):
            t, r = idx // (tile * tile), idx % (tile * tile)
            return (t // tiles_per_row) * tile + r // tile, (t % tiles_per_row) * tile + r % tile

        q_x, q_y = coords(q_idx)
        kv_x, kv_y = coords(kv_idx)
        cx = q_x.clamp(kernel // 2, (width - 1) - kernel // 2)
        cy = q_y.clamp(kernel // 2, (width - 1) - kernel // 2)
        return ((cx - kv_x).abs() <= kernel // 2) & ((cy - kv_y).abs() <= kernel // 2)

    return tiled_natten


def generate_sta_2d(width, tile, window_tiles):
    """Sliding tile attention: tiles attend to the tiles within a window of tiles."""

    def sta_2d(b, h, q_idx, kv_idx):
        tiles_per_row = width // tile
        q_t, kv_t = q_idx // (tile * tile), kv_idx // (tile * tile)
        q_tx, q_ty = q_t // tiles_per_row, q_t % tiles_per_row
        kv_tx, kv_ty = kv_t // tiles_per_row, kv_t % tiles_per_row
        cx = q_tx.clamp(window_tiles // 2, (tiles_per_row - 1) - window_tiles // 2)
        cy = q_ty.clamp(window_tiles // 2, (tiles_per_row - 1) - window_tiles // 2)
        return ((cx - kv_tx).abs() <= window_tiles // 2) & ((cy - kv_ty).abs() <= window_tiles // 2)

    return sta_2d


def generate_chunked(chunk):
    def chunked(b, h, q_idx, kv_idx):
        return q_idx // chunk == kv_idx // chunk

    return chunked


def generate_chunked_causal(chunk):
    def chunked_causal(b, h, q_idx, kv_idx):
        return (q_idx // chunk == kv_idx // chunk) & (q_idx >= kv_idx)

    return chunked_causal


def generate_sinks_window(sinks, window):
    def sinks_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((kv_idx < sinks) | (q_idx - kv_idx < window))

    return sinks_window


def global_tokens(b, h, q_idx, kv_idx):
    """Longformer-style: every 64th token is global, plus a local window."""
    is_global = (q_idx % 64 == 0) | (kv_idx % 64 == 0)
    return is_global | (torch.abs(q_idx - kv_idx) < 16)


def head_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < HEAD_WINDOWS[h])


def batch_lengths(b, h, q_idx, kv_idx):
    return (kv_idx < LENGTHS[b]) & (q_idx < LENGTHS[b])


def random_bool_mask(b, h, q_idx, kv_idx):
    return RANDOM_MASK[b, h, q_idx, kv_idx]


def block_sparse_table(b, h, q_idx, kv_idx):
    """BigBird-like: a random block table, unioned with the diagonal blocks."""
    return BLOCK_TABLE[q_idx // 16, kv_idx // 16] | (q_idx // 16 == kv_idx // 16)


def strided(b, h, q_idx, kv_idx):
    """Sparse Transformer strided pattern."""
    return (q_idx >= kv_idx) & (((q_idx - kv_idx) % 32 == 0) | (q_idx - kv_idx < 8))


def generate_causal_offset(offset):
    """Causal for a query block that sits ``offset`` tokens into the keys (decoding)."""

    def causal_offset(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal_offset


def frame_causal(b, h, q_idx, kv_idx):
    """Video: whole frames of 20 tokens attend causally frame by frame."""
    return q_idx // 20 >= kv_idx // 20


def logical_forms(b, h, q_idx, kv_idx):
    keep = torch.logical_and(q_idx >= kv_idx, torch.logical_not(kv_idx % 3 == 1))
    return torch.logical_or(keep, torch.eq(q_idx, kv_idx))


def xor_mask(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) ^ (kv_idx % 5 == 0)


def head_parity(b, h, q_idx, kv_idx):
    return torch.where(h % 2 == 0, q_idx >= kv_idx, q_idx <= kv_idx)


def nested_causal_window(b, h, q_idx, kv_idx):
    """A mask that calls other masks (module-level functions)."""
    return causal(b, h, q_idx, kv_idx) & generate_sliding_window(24)(b, h, q_idx, kv_idx)


def generate_flag_mask(is_causal):
    """Python branching on a captured bool: legitimate, baked into the structure."""

    def flag_mask(b, h, q_idx, kv_idx):
        if is_causal:
            return q_idx >= kv_idx
        return torch.abs(q_idx - kv_idx) < 40

    return flag_mask


def default_arg_window(b, h, q_idx, kv_idx, window=50):
    return (q_idx - kv_idx).abs() < window


def _partial_window(b, h, q_idx, kv_idx, window):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < window)


class WindowObject:
    """A callable object: attributes are captured like closure cells."""

    def __init__(self, window, lengths):
        self.window = window
        self.lengths = lengths

    def __call__(self, b, h, q_idx, kv_idx):
        return (torch.abs(q_idx - kv_idx) < self.window) & (kv_idx < self.lengths[b])


def threshold_tensor(b, h, q_idx, kv_idx):
    return q_idx - kv_idx < THRESHOLD


# -- score mods: FlexAttention's tests -----------------------------------------------------------


def identity(score, b, h, q_idx, kv_idx):
    return score


def times_two(score, b, h, q_idx, kv_idx):
    return score * 2


def squared(score, b, h, q_idx, kv_idx):
    return score * score


def causal_score(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score, -float("inf"))


def inverse_causal(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx <= kv_idx, score, float("-inf"))


def rel_bias(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx)


def rel_causal(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score + (q_idx - kv_idx), float("-inf"))


def head_offset(score, b, h, q_idx, kv_idx):
    return score + h


def times_q(score, b, h, q_idx, kv_idx):
    return score * q_idx


def exp2_bias(score, b, h, q_idx, kv_idx):
    return score + torch.exp2(-(q_idx - kv_idx).abs() / 64.0)


def even_rows(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx % 2 == 0, score, -float("inf"))


def trig(score, b, h, q_idx, kv_idx):
    return torch.sin(torch.cos(score)) + torch.tan(b)


def trig2(score, b, h, q_idx, kv_idx):
    return torch.cos(score) * torch.sin(score) * torch.tan(b)


def generate_alibi_slope_fn(num_heads):
    """ALiBi with the slope computed in the mod (FlexAttention test style)."""

    def alibi_computed(score, b, h, q_idx, kv_idx):
        scale = torch.exp2(-((h + 1) * 8.0 / num_heads))
        return score + (kv_idx - q_idx) * scale

    return alibi_computed


# -- score mods: attention-gym and friends --------------------------------------------------------


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def generate_softcap(cap):
    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return softcap


def generate_softcap_causal(cap):
    def softcap_causal(score, b, h, q_idx, kv_idx):
        capped = cap * torch.tanh(score / cap)
        return torch.where(q_idx >= kv_idx, capped, -float("inf"))

    return softcap_causal


def softcap_exp(score, b, h, q_idx, kv_idx):
    """tanh written with exp (a common fast-softcap formulation)."""
    x = score / 20.0
    return 20.0 * (1 - 2 / (torch.exp(2 * x) + 1))


def relative_table(score, b, h, q_idx, kv_idx):
    return score + REL_TABLE[h, q_idx - kv_idx + (MAX_LEN - 1)]


def relative_table_shape(score, b, h, q_idx, kv_idx):
    """Offsets from the table's own shape (a traced size, not a baked constant)."""
    return score + REL_TABLE[h][q_idx - kv_idx + REL_TABLE.shape[1] // 2]


def graphormer(score, b, h, q_idx, kv_idx):
    return score + GRAPH_BIAS[h, GRAPH_DIST[b, q_idx, kv_idx]]


def batch_scale(score, b, h, q_idx, kv_idx):
    return score * BATCH_SCALE[b]


def head_gate(score, b, h, q_idx, kv_idx):
    return score * torch.sigmoid(GATES[h])


def sink_bias(score, b, h, q_idx, kv_idx):
    return score + torch.where(kv_idx < 4, SINK_BIAS[kv_idx.clamp(max=3)], 0.0)


def t5_bucket(score, b, h, q_idx, kv_idx):
    """T5-style log-bucketed relative position bias: float math feeding an int index."""
    rel = (q_idx - kv_idx).abs()
    large = 8 + (torch.log(rel.clamp(min=1).float() / 8) / math.log(128 / 8) * 8).long()
    bucket = torch.where(rel < 8, rel, large.clamp(max=15))
    return score + T5_TABLE[h, bucket]


def generate_distance_penalty(alpha):
    def distance_penalty(score, b, h, q_idx, kv_idx):
        return score - alpha * (q_idx - kv_idx).abs()

    return distance_penalty


def generate_temperature(temperature):
    def temperature_scale(score, b, h, q_idx, kv_idx):
        return score / temperature

    return temperature_scale


def learnable_temperature(score, b, h, q_idx, kv_idx):
    return score * TEMPERATURE


def unary_zoo(score, b, h, q_idx, kv_idx):
    d = (q_idx - kv_idx).abs().float()
    return (
        score * torch.rsqrt(1 + d)
        + torch.sqrt(d) * 0.01
        + torch.erf(d / 50)
        + torch.cos(d * 0.1)
        + torch.log2(d + 1) * 0.1
    )


def floor_ceil(score, b, h, q_idx, kv_idx):
    return score + torch.floor((q_idx - kv_idx) / 3.0) - torch.ceil(kv_idx / 7.0)


def clamp_forms(score, b, h, q_idx, kv_idx):
    return score.clamp(-1.5, 1.5) + torch.clamp(score, min=-0.5) + score.clamp(max=0.25)


def min_max(score, b, h, q_idx, kv_idx):
    floor = torch.full_like(score, -1.0)
    return torch.maximum(score, floor) + torch.minimum(score, torch.zeros_like(score))


def power(score, b, h, q_idx, kv_idx):
    return score**2 - torch.pow(score, 3) + 2 ** (-(q_idx % 4))


def method_forms(score, b, h, q_idx, kv_idx):
    return score.tanh() + score.sigmoid() + score.abs().exp().log() + (-score).exp() * 0.1


def bool_to_float(score, b, h, q_idx, kv_idx):
    return score + (q_idx >= kv_idx).float() * 2 + (kv_idx % 2 == 0).to(torch.float32)


def int_bitwise(score, b, h, q_idx, kv_idx):
    return score + ((q_idx ^ kv_idx) & 1) + (q_idx | 2) - (~kv_idx & 3)


def floordiv_mod(score, b, h, q_idx, kv_idx):
    return score + (q_idx // 4 - kv_idx // 4) % 3


def where_zero(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx > kv_idx, score, 0.0)


def negate_abs(score, b, h, q_idx, kv_idx):
    return -abs(score) + (-score)


def tensor_constant(score, b, h, q_idx, kv_idx):
    return score * torch.tensor(0.5) + torch.tensor(2)


def nested_score(score, b, h, q_idx, kv_idx):
    """A score mod calling other score mods."""
    return generate_softcap(25.0)(alibi(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)


# -- registry ------------------------------------------------------------------------------------

_ENTRIES: list[ZooEntry] = []


def _add(name, kind, fn=None, *, factory=None, args=None, needs=None, tags=()):
    args = args or {}
    if fn is None:
        fn = factory(**args)
    _ENTRIES.append(
        ZooEntry(name, kind, fn, dict(needs or {}), factory, dict(args), frozenset(tags))
    )


# masks
_add("causal", "mask", causal, tags={"gym", "flex", "design"})
_add("anti_causal", "mask", anti_causal, tags={"flex"})
_add("noop", "mask", noop, tags={"gym", "flex"})
_add("sliding_window", "mask", factory=generate_sliding_window, args={"window": 64}, tags={"gym"})
_add(
    "sliding_window_strict",
    "mask",
    factory=generate_sliding_window_strict,
    args={"window": 64},
    tags={"gym"},
)
_add(
    "bidirectional_window",
    "mask",
    factory=generate_bidirectional_window,
    args={"window": 32},
    tags={"gym"},
)
_add("prefix_lm", "mask", factory=generate_prefix_lm, args={"prefix": 50}, tags={"gym"})
_add("prefix_lm_per_batch", "mask", prefix_lm_per_batch, tags={"gym", "data"})
_add("document", "mask", document, tags={"gym", "data"})
_add("document_causal", "mask", document_causal, tags={"gym", "data"})
_add(
    "jagged_sliding",
    "mask",
    factory=generate_doc_mask_mod,
    args={"inner": generate_sliding_window(16), "document_id": DOC_IDS, "offsets": DOC_OFFSETS},
    tags={"gym", "data", "composite"},
)
_add(
    "dilated_window",
    "mask",
    factory=generate_dilated_window,
    args={"window": 64, "dilation": 4},
    tags={"gym"},
)
_add(
    "natten_1d",
    "mask",
    factory=generate_natten_1d,
    args={"kernel": 15, "length": 300},
    needs={"square": True},
    tags={"gym"},
)
_add(
    "natten_2d",
    "mask",
    factory=generate_natten_2d,
    args={"width": 16, "kernel_w": 5, "kernel_h": 3},
    needs={"square": True},
    tags={"gym"},
)
_add(
    "tiled_natten_2d",
    "mask",
    factory=generate_tiled_natten_2d,
    args={"width": 16, "tile": 4, "kernel": 5},
    needs={"square": True},
    tags={"gym"},
)
_add(
    "sta_2d",
    "mask",
    factory=generate_sta_2d,
    args={"width": 16, "tile": 4, "window_tiles": 3},
    needs={"square": True},
    tags={"gym"},
)
_add("chunked", "mask", factory=generate_chunked, args={"chunk": 48}, tags={"gym"})
_add("chunked_causal", "mask", factory=generate_chunked_causal, args={"chunk": 48}, tags={"gym"})
_add(
    "sinks_window",
    "mask",
    factory=generate_sinks_window,
    args={"sinks": 4, "window": 32},
    tags={"gym"},
)
_add("global_tokens", "mask", global_tokens, tags={"gym"})
_add("head_window", "mask", head_window, tags={"data"})
_add("batch_lengths", "mask", batch_lengths, tags={"gym", "data"})
_add("random_bool_mask", "mask", random_bool_mask, tags={"data"})
_add("block_sparse_table", "mask", block_sparse_table, tags={"data"})
_add("strided", "mask", strided, tags={"gym"})
_add("causal_offset", "mask", factory=generate_causal_offset, args={"offset": 7})
_add("frame_causal", "mask", frame_causal, tags={"gym"})
_add("logical_forms", "mask", logical_forms)
_add("xor_mask", "mask", xor_mask)
_add("head_parity", "mask", head_parity)
_add("nested_causal_window", "mask", nested_causal_window, tags={"composite"})
_add("flag_mask", "mask", factory=generate_flag_mask, args={"is_causal": False}, tags={"capture"})
_add("default_arg_window", "mask", default_arg_window, tags={"capture"})
_add("partial_window", "mask", functools.partial(_partial_window, window=40), tags={"capture"})
_add("window_object", "mask", WindowObject(30, LENGTHS), tags={"capture", "data"})
_add("threshold_tensor", "mask", threshold_tensor, tags={"capture", "data"})
# score mods
_add("identity", "score", identity, tags={"flex"})
_add("times_two", "score", times_two, tags={"flex"})
_add("squared", "score", squared, tags={"flex"})
_add("causal_score", "score", causal_score, tags={"flex"})
_add("inverse_causal", "score", inverse_causal, tags={"flex"})
_add("rel_bias", "score", rel_bias, tags={"flex", "gym"})
_add("rel_causal", "score", rel_causal, tags={"flex"})
_add("head_offset", "score", head_offset, tags={"flex"})
_add("times_q", "score", times_q, tags={"flex"})
_add("exp2_bias", "score", exp2_bias, tags={"flex"})
_add("even_rows", "score", even_rows, tags={"flex"})
_add("trig", "score", trig, tags={"flex"})
_add("trig2", "score", trig2, tags={"flex"})
_add(
    "alibi_computed",
    "score",
    factory=generate_alibi_slope_fn,
    args={"num_heads": MAX_H},
    tags={"flex", "gym"},
)
_add("alibi", "score", alibi, tags={"gym", "data"})
_add("softcap", "score", factory=generate_softcap, args={"cap": 30.0}, tags={"gym", "design"})
_add(
    "softcap_causal",
    "score",
    factory=generate_softcap_causal,
    args={"cap": 30.0},
    tags={"gym", "design"},
)
_add("softcap_exp", "score", softcap_exp, tags={"gym"})
_add("relative_table", "score", relative_table, tags={"gym", "data"})
_add("relative_table_shape", "score", relative_table_shape, needs={"vmap": True}, tags={"data"})
_add("graphormer", "score", graphormer, tags={"data"})
_add("batch_scale", "score", batch_scale, tags={"data"})
_add("head_gate", "score", head_gate, tags={"data"})
_add("sink_bias", "score", sink_bias, tags={"data"})
_add("t5_bucket", "score", t5_bucket, tags={"data"})
_add("distance_penalty", "score", factory=generate_distance_penalty, args={"alpha": 0.05})
_add("temperature", "score", factory=generate_temperature, args={"temperature": 1.3})
_add("learnable_temperature", "score", learnable_temperature, tags={"capture", "data"})
_add("unary_zoo", "score", unary_zoo)
_add("floor_ceil", "score", floor_ceil)
_add("clamp_forms", "score", clamp_forms)
_add("min_max", "score", min_max)
_add("power", "score", power)
_add("method_forms", "score", method_forms)
_add("bool_to_float", "score", bool_to_float)
_add("int_bitwise", "score", int_bitwise)
_add("floordiv_mod", "score", floordiv_mod)
_add("where_zero", "score", where_zero)
_add("negate_abs", "score", negate_abs)
_add("tensor_constant", "score", tensor_constant)
_add("nested_score", "score", nested_score, tags={"composite", "data"})

ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}
MASKS = {k: e for k, e in ZOO.items() if e.kind == "mask"}
SCORES = {k: e for k, e in ZOO.items() if e.kind == "score"}


def eager(entry: ZooEntry, *args):
    """Call ``entry.fn`` eagerly on broadcastable index tensors (``score`` first for score mods),
    vmapping over every element when the entry needs per-element semantics."""
    if not entry.needs.get("vmap"):
        return torch.as_tensor(entry.fn(*args))
    shape = torch.broadcast_shapes(*(torch.as_tensor(a).shape for a in args))
    flat = [torch.as_tensor(a).expand(shape).reshape(-1) for a in args]
    out = torch.vmap(entry.fn)(*flat)
    return out.reshape(shape)
