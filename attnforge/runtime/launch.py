"""Kernel launch: tile configs, argument lists (strides, block mask, captured values), grids.

The argument order is the Kernel ABI of ``codegen/templates/fwd.py.tmpl`` (also in
``docs/architecture.md``).  Everything shape-, stride- or value-dependent is a runtime argument;
only head dims, tiles, block sizes and a few flags are constexprs, so a new length, window size
or cap never generates new source (Triton may still specialise a compile on divisibility).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, NamedTuple

import torch
from triton.runtime.errors import OutOfResources

from ..dsl.ir import Op
from . import autotune, blockmask, cache, knobs, loader, standins

__all__ = [
    "FwdConfig",
    "KernelCall",
    "KERNEL_OPTIONS",
    "IGNORED_FLEX_OPTIONS",
    "check_kernel_options",
    "choose_fwd_config",
    "param_values",
    "launch_fwd",
    "BwdConfig",
    "choose_bwd_config",
    "launch_bwd",
    "positions_f32",
]

# kernel_options keys attnforge honours -> what they set
KERNEL_OPTIONS: dict[str, str] = {
    "BLOCK_M": "forward query tile (power of two >= 16 dividing BLOCK_SIZE[0])",
    "BLOCK_N": "forward key tile (power of two >= 16 dividing BLOCK_SIZE[1])",
    "num_warps": "forward warps per program (also the backward's, unless num_warps1 is set)",
    "num_stages": "forward software-pipelining stages (also the backward's, unless num_stages1 "
    "is set)",
    "USE_TMA": "load tiles with the Hopper tensor-memory accelerator (bool; default on for "
    "16-bit inputs on sm_90+ in the forward and the backward's dQ loop; True also in the dK/dV "
    "loop; inputs it cannot describe fall back to pointer loads)",
    "BLOCK_M1": "backward dK/dV query tile (power of two >= 16 dividing BLOCK_SIZE[0])",
    "BLOCK_N1": "backward dK/dV key tile (power of two >= 16 dividing BLOCK_SIZE[1])",
    "BLOCK_M2": "backward dQ query tile (power of two >= 16 dividing BLOCK_SIZE[0])",
    "BLOCK_N2": "backward dQ key tile (power of two >= 16 dividing BLOCK_SIZE[1])",
    "num_warps1": "backward dK/dV kernel warps (default: num_warps); 4 with BLOCK_N1=64 "
    "fits two programs per SM at head dim 128",
    "num_stages1": "backward dK/dV kernel pipelining stages (default: num_stages)",
    "DP_FIRST": "backward dK/dV loop order (bool): the dP^T matmul before dV's, so exp2 and dT "
    "overlap the tensor cores (default True unless the mask reads captured tensors or "
    "DQ_ATOMIC is on: ptxas spills there)",
    "HEAD_GROUP": "program order: heads per group (int >= 1); each group runs its heaviest "
    "tiles first (default: sized so the grid ends on light tiles and a group's K/V fits in L2)",
    "FWD_WS": "forward on sm_90 (bool): the warp-specialised Gluon kernel (default where it "
    "applies: 16-bit, head dim 64 or 128, BLOCK_SIZE multiples of 128, no BLOCK_M/BLOCK_N/"
    "num_warps/num_stages given, and at head dim 64 no mask_mod unless FWD_WS=True is given); "
    "False runs the Triton kernel",
    "DQ_ATOMIC": "backward: True adds dQ into an fp32 buffer with atomics inside the dK/dV "
    "kernel (fewer matmuls, but an fp32 buffer to fill and cast; not under "
    "torch.use_deterministic_algorithms unless set here), False (default) computes it in its "
    "own kernel (bit-reproducible)",
    "DQ_TMA": "backward with DQ_ATOMIC on sm_90+ (bool, default True where Triton has "
    "descriptor reductions): each dQ tile is added by one TMA bulk reduce-add instead of "
    "element-wise atomics",
    "REFINE_BLOCKS": "backward (bool, default True): the dK/dV kernel, whose 64 x 64 tiles "
    "are smaller than the blocks, walks PARTIAL blocks split by mask_mod's analytic plan into "
    "sub-blocks it skips (nothing kept), runs without mask code (all kept) or masks, where "
    "that skips at least 2% of its sub-blocks; False walks the block mask as given",
    "PERSISTENT": "the warp-specialised forward (bool; default True without a block mask): one "
    "CTA per SM walks query tiles (in rounds; with a block mask, taken from an atomic counter "
    "in heaviest-first order), loading the next tile's Q and K/V while it finishes one; False "
    "launches one CTA per tile",
}
_BOOL_OPTIONS = frozenset({"DQ_ATOMIC", "USE_TMA", "DP_FIRST", "FWD_WS", "DQ_TMA",
                           "PERSISTENT", "REFINE_BLOCKS"})  # fmt: skip
# FlexAttention keys that only steer its own kernel choice; accepted so flex code runs unchanged
IGNORED_FLEX_OPTIONS = frozenset(
    {"PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "FORCE_USE_FLEX_ATTENTION",
     "BACKEND", "WRITE_DQ", "OUTPUT_LOGSUMEXP"}
)  # fmt: skip

_MIN_TILE = 16  # tl.dot needs every dimension >= 16


@dataclass(frozen=True)
class FwdConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    USE_TMA: bool = False


def check_kernel_options(kernel_options: dict | None) -> dict:
    if kernel_options is None:
        return {}
    if not isinstance(kernel_options, dict):
        raise ValueError(f"kernel_options must be a dict or None, got {type(kernel_options)}")
    unknown = sorted(set(kernel_options) - set(KERNEL_OPTIONS) - IGNORED_FLEX_OPTIONS)
    if unknown:
        valid = ", ".join(f"{k} ({v})" for k, v in KERNEL_OPTIONS.items())
        raise ValueError(
            f"unknown kernel_options {unknown}; valid keys: {valid}; accepted and ignored "
            f"(FlexAttention-only): {', '.join(sorted(IGNORED_FLEX_OPTIONS))}"
        )
    for k in _BOOL_OPTIONS:
        v = kernel_options.get(k)
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"kernel_options[{k!r}] must be True or False, got {v!r}")
    for k in KERNEL_OPTIONS.keys() - _BOOL_OPTIONS:
        v = kernel_options.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"kernel_options[{k!r}] must be a positive int, got {v!r}")
    return kernel_options


def _pow2_divisor(n: int) -> int:
    return n & -n


def _default_fwd(device: torch.device, dtype: torch.dtype, head_dim_pad: int) -> FwdConfig:
    if device.type != "cuda":
        # Interpreter: every tl op costs Python overhead, so fewer, larger tiles run faster.
        return FwdConfig(64, 64, 4, 1)
    if dtype == torch.float32:
        return FwdConfig(64, 32, 4, 2) if head_dim_pad <= 128 else FwdConfig(32, 32, 4, 1)
    # 16-bit, measured on H100 (bench/NOTES.md, bench/tune.py): D=64 prefers narrow kv tiles and
    # a deeper pipeline, D=128 full 128x128 tiles (fewer online-softmax rescales per key); TMA
    # loads on sm_90+ (fewer registers for addresses, no per-thread copies)
    tma = _has_tma(device)
    if head_dim_pad <= 64:
        return FwdConfig(128, 64, 4, 4, tma)
    if head_dim_pad <= 128:
        return FwdConfig(128, 128, 8, 3, tma)
    return FwdConfig(64, 32, 4, 2)


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """sm_90+ and a Triton with host tensor descriptors."""
    return (
        _descriptor_class() is not None
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


@functools.cache
def _has_tma_reduce() -> bool:
    """Triton lowers a descriptor's ``atomic_add`` to a TMA bulk reduce (Triton >= 3.4)."""
    try:
        from triton.language.core import tensor_descriptor_base
    except ImportError:
        return False
    return hasattr(tensor_descriptor_base, "atomic_add")


@functools.cache
def _descriptor_class():
    """Triton's host ``TensorDescriptor`` (Triton >= 3.3), or None."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def valid_tile(tile: int, block: int) -> bool:
    """A tile the kernels can walk a sparse block of ``block`` rows/columns with."""
    return tile >= _MIN_TILE and not tile & (tile - 1) and block % tile == 0


def _tile(name: str, want: int, block: int, which: str, explicit: bool) -> int:
    if explicit:
        if not valid_tile(want, block):
            raise ValueError(
                f"kernel_options[{name!r}]={want} must be a power of two >= {_MIN_TILE} that "
                f"divides the block mask's {which}={block}"
            )
        return want
    tile = min(want, _pow2_divisor(block))
    if tile < _MIN_TILE:
        raise ValueError(
            f"block mask {which}={block} is not a multiple of {_MIN_TILE}; the kernels walk "
            f"each block in tiles of at least {_MIN_TILE}: create the block mask with "
            f"BLOCK_SIZE a multiple of {_MIN_TILE} (128 is the default)"
        )
    return tile


def choose_fwd_config(
    q: torch.Tensor, v: torch.Tensor, block_size: tuple[int, int], options: dict
) -> FwdConfig:
    """Default tiles for the device/dtype/head dim, overridden by ``kernel_options``; tiles
    always divide the block mask's (Q_BLOCK, KV_BLOCK)."""
    d_pad = max(head_dim_pad(q.shape[-1]), head_dim_pad(v.shape[-1]))
    base = _default_fwd(q.device, q.dtype, d_pad)
    return FwdConfig(
        BLOCK_M=_tile("BLOCK_M", options.get("BLOCK_M", base.BLOCK_M), block_size[0],
                      "Q_BLOCK (BLOCK_SIZE[0])", "BLOCK_M" in options),
        BLOCK_N=_tile("BLOCK_N", options.get("BLOCK_N", base.BLOCK_N), block_size[1],
                      "KV_BLOCK (BLOCK_SIZE[1])", "BLOCK_N" in options),
        num_warps=options.get("num_warps", base.num_warps),
        num_stages=options.get("num_stages", base.num_stages),
        USE_TMA=options.get("USE_TMA", base.USE_TMA),
    )  # fmt: skip


@functools.cache
def head_dim_pad(d: int) -> int:
    return max(_MIN_TILE, 1 << max(0, math.ceil(math.log2(max(d, 1)))))


# -- program order ------------------------------------------------------------------------------
# The kernels walk a 1-D grid of tiles x heads in groups of HEAD_GROUP heads, heaviest tiles of a
# group first (``_program_tile`` in the template prelude).  With one head per group (tiles of a
# head adjacent) the last head's heaviest causal tile starts near the end of the grid and runs
# alone: the tail costs a few percent of the kernel.  Once a group's heavy tiles have started,
# the rest of the group (about G * n_tiles programs of half a heavy tile's work on average) must
# keep the other SMs busy as long as a heavy tile runs: G * n_tiles / 2 >= SMs.  The group stays
# small enough for the operands its programs stream (K/V, or Q/dO for dK/dV) to fit in L2.
_L2_BUDGET = 32 << 20  # bytes of a group's streamed operands (H100 L2: 50 MB)
_INTERPRETER_SMS = 4


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def head_group(
    call: KernelCall, n_tiles: int, n_heads: int, stream_bytes: int, device, per_sm: int = 1
) -> int:
    """Heads per group of the program order (``kernel_options["HEAD_GROUP"]`` if given);
    ``stream_bytes``: what one head's programs stream (K and V in the forward); ``per_sm``:
    programs resident per SM (the group must cover every slot).  Without a mask every tile has
    the same work: no tail to shorten, so one head per group (fewest heads' K/V in L2)."""
    if "HEAD_GROUP" in call.options:
        return call.options["HEAD_GROUP"]
    if call.block_mask._all_full:
        return 1
    want = -(-2 * _sm_count(device) * per_sm // max(n_tiles, 1))
    cap = max(2, _L2_BUDGET // max(stream_bytes, 1))
    size = max(1, min(want, cap, n_heads))
    # groups of equal size: a last group of a head or two would run its heavy tiles alone
    # (64 heads in groups of 9: the eighth holds one; H100 D=64 causal 369 vs 388-395 TF/s)
    return -(-n_heads // -(-n_heads // size))


# -- the call ----------------------------------------------------------------------------------


@dataclass
class KernelCall:
    """Everything a launch needs besides q, k, v and the captured tensors (which autograd must
    see as inputs).  Saved on ``ctx.call`` for the backward."""

    modules: dict[str, ModuleType]
    lowered: Any  # attnforge.codegen.Lowered
    block_mask: Any  # attnforge.runtime.blockmask.BlockMask (or the no-mask plan)
    scale: float
    gqa_group: int
    config: FwdConfig
    scalars: dict[int, Any] = field(default_factory=dict)  # slot -> value
    return_lse: bool = False
    options: dict = field(default_factory=dict)
    # per-call plan (runtime.api): launch_fwd keeps its recorded launch here (key "fwd"), so a
    # repeat call with the same plan rebuilds only what changes (tensors, captured values)
    memo: dict | None = field(default=None, repr=False, compare=False)

    def with_config(self, **kw) -> KernelCall:
        return replace(self, config=replace(self.config, **kw))

    def copy_with(self, **changes) -> KernelCall:
        """A copy with ``changes`` (cheaper than ``dataclasses.replace``: no re-validation)."""
        new = object.__new__(KernelCall)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new


def param_values(lowered, score_mod, mask_mod) -> tuple[dict[int, Any], list[torch.Tensor]]:
    """Current captured values: ``(scalars by slot, tensors in slot order)``."""
    return slot_values(
        lowered,
        score_mod.params if score_mod is not None else (),
        mask_mod.params if mask_mod is not None else (),
    )


def slot_values(lowered, score_params: tuple, mask_params: tuple) -> tuple[dict, list]:
    """Like :func:`param_values`, from the mods' parameter tables: every value the kernel
    reads is re-read now (through its getter), and only those."""
    scalars: dict[int, Any] = {}
    tensors: list[torch.Tensor] = []
    for slot in lowered.slots:
        v = mod_param(score_params if slot.mod == "score" else mask_params, slot.index).current()
        if slot.kind == "scalar":
            scalars[slot.slot] = _scalar(v, slot)
        else:
            tensors.append(_tensor(v, slot))
    return scalars, tensors


def mod_param(params: tuple, index: int):
    # parameters are numbered by position; search only if a table was built otherwise
    if index < len(params) and params[index].index == index:
        return params[index]
    return next(p for p in params if p.index == index)


def _scalar(v: Any, slot) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if slot.dtype == "float":
        return float(v)
    if slot.dtype == "int":
        return int(v)
    return bool(v)


def _tensor(v: Any, slot) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise ValueError(
            f"captured value for kernel parameter T{slot.slot} ({slot.mod} mod, param "
            f"{slot.index}) should be a tensor, got {type(v).__name__}; re-create the mod"
        )
    dtype = str(v.dtype).removeprefix("torch.")
    if v.dim() != slot.ndim or dtype != slot.dtype:
        raise ValueError(
            f"captured tensor (param {slot.index} of the {slot.mod} mod) is now {dtype} with "
            f"{v.dim()} dims, but the kernel was traced for {slot.dtype} with {slot.ndim}; "
            "re-create the mod after changing a captured tensor's dtype or rank"
        )
    return v


def _bm_strides(t: torch.Tensor) -> list[int]:
    """Strides with 0 on size-1 batch/head dims, so a B=1 or H=1 block mask broadcasts."""
    return [0 if (d < 2 and t.shape[d] == 1) else t.stride(d) for d in range(t.dim())]


def kv_block_lists(bm) -> tuple:
    """The forward (and dQ) block lists of a block mask."""
    return bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices


def q_block_lists(bm) -> tuple:
    """The transposed lists the dK/dV kernel walks."""
    return bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices


# the dK/dV kernel's tile (BLOCK_M1 x BLOCK_N1 by default at head dim 64 and 128), the block
# size its lists are refined to where that skips work (blockmask.refined)
_DKDV_FINE = (64, 64)


def dkdv_block_mask(bm, options: dict, cfg: BwdConfig | None = None):
    """The block mask the dK/dV kernel walks: ``bm`` split into 64 x 64 sub-blocks where that
    skips some (H100, sliding window 1024, D=128: dK/dV 1.105 -> 1.031 ms; document 0.764 ->
    0.665), else ``bm`` (causal: 0.8% skipped, not worth the longer lists: 3.65 -> 3.78 ms)."""
    if bm._all_full or not options.get("REFINE_BLOCKS", True):
        return bm
    if cfg is not None and (cfg.BLOCK_M1 > _DKDV_FINE[0] or cfg.BLOCK_N1 > _DKDV_FINE[1]):
        return bm
    return blockmask.refined(bm, _DKDV_FINE) or bm


def _block_args(bm, lists) -> tuple[tuple, tuple, bool]:
    """``(tensors, strides, has_full)`` for the kernels' block-list arguments: the four list
    tensors (PARTIAL twice as dummies when there are no FULL lists: that loop is compiled out)
    and their broadcasting strides.  Cached on the block mask (host overhead), keyed by the
    identity of the list tensors, so a reassigned field is picked up."""
    src = num, idx, fnum, fidx = lists(bm)
    seen = bm.__dict__.setdefault("_launch_args", {})
    hit = seen.get(lists)
    if hit is not None:
        was = hit[0]
        if was[0] is num and was[1] is idx and was[2] is fnum and was[3] is fidx:
            return hit[1]
    has_full = fnum is not None
    if not has_full:
        fnum, fidx = num, idx
    tensors = (num, idx, fnum, fidx)
    strides = tuple(s for t in tensors for s in _bm_strides(t))
    seen[lists] = (src, (tensors, strides, has_full))
    return tensors, strides, has_full


def _param_args(lowered, scalars: dict[int, Any], tensors: list[torch.Tensor]) -> list:
    args: list = []
    it = iter(tensors)
    for slot in lowered.slots:
        if slot.kind == "scalar":
            args.append(scalars[slot.slot])
        else:
            t = next(it)
            args += [t, *t.shape, *t.stride()]
    return args


def launch_fwd(
    call: KernelCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: list
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel: ``(out [B, Hq, L, Ev] in q's dtype, lse [B, Hq, L] fp32)``."""
    memo = call.memo
    if memo is not None:
        fast = memo.get("fwd")
        if fast is not None:
            done = fast(call, q, k, v, tensors)
            if done is not None:
                return done
    B, Hq, L, E = q.shape
    S, Ev = k.shape[2], v.shape[-1]
    out = torch.empty((B, Hq, L, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if L == 0 or B * Hq == 0:
        return out, lse
    stages = ws_stages(call, q, k, v)
    if stages:
        return _launch_fwd_ws(call, q, k, v, tensors, out, lse, stages)
    bm, cfg = call.block_mask, call.config
    q_block, kv_block = bm.BLOCK_SIZE
    lists, bm_strides, has_full = _block_args(bm, kv_block_lists)
    kz = 0 if k.shape[0] == 1 else k.stride(0)
    vz = 0 if v.shape[0] == 1 else v.stride(0)
    kernel = call.modules["fwd"]._attn_fwd
    head = (q, k, v, out, lse)
    args = (
        *lists,
        *q.stride(),
        kz, *k.stride()[1:],
        vz, *v.stride()[1:],
        *out.stride(),
        *bm_strides,
        Hq, call.gqa_group, L, S, call.scale,
        head_group(call, triton_cdiv(L, cfg.BLOCK_M), B * Hq,
                   S * (E + Ev) * q.element_size() // call.gqa_group, q.device,
                   _fwd_programs_per_sm(cfg, E, Ev)),
        *(params := _param_args(call.lowered, call.scalars, tensors)),
    )  # fmt: skip
    # sm_scale > 0: the softmax can take its max over raw q.k and fold the scale into exp2
    folded = call.scale > 0 and call.lowered.score is None
    shape_key = (E, Ev, q_block, kv_block, S % kv_block == 0, has_full, q.dtype, folded,
                 positions_f32(L, S))  # fmt: skip

    cfg = _fwd_effective_config(cfg, q, k, v)

    def run(cfg: FwdConfig) -> None:
        kernel[(triton_cdiv(L, cfg.BLOCK_M) * B * Hq,)](
            *_fwd_head(head, cfg), *args, **_fwd_constexprs(cfg, *shape_key)
        )

    start = cfg
    if autotune.active(q):  # the first launch of this shape class only: the plan keeps `ran`
        start = autotune.tune_fwd(call, q, k, cfg, shape_key, run)
    ran = launch_shrinking(kernel, start, shape_key, call.options, _FWD_SHRINK, run)
    if memo is not None:
        grid = (triton_cdiv(L, ran.BLOCK_M) * B * Hq,)
        kw = _fwd_constexprs(ran, *shape_key)
        memo["fwd"] = _FwdPlan(kernel, cfg, ran, grid, kw, args, len(params), out, lse)
    return out, lse


def _fwd_programs_per_sm(cfg: FwdConfig, E: int, Ev: int) -> int:
    """Forward programs an H100 SM holds: two of the 4-warp head-dim-64 default (83 KB shared,
    218 registers a thread), else one.  H100, D=64 causal: HEAD_GROUP 8-16 (two programs'
    worth) 394-398 TF/s vs 5 (one) 388-395, 2: 381 (bench/NOTES.md, session 10)."""
    return 2 if cfg.num_warps == 4 and max(head_dim_pad(E), head_dim_pad(Ev)) <= 64 else 1


def _fwd_effective_config(cfg: FwdConfig, q, k, v) -> FwdConfig:
    """``cfg``, with TMA off where an input cannot be described by a tensor descriptor."""
    box = (cfg.BLOCK_M, cfg.BLOCK_N, head_dim_pad(q.shape[-1]), head_dim_pad(v.shape[-1]))
    if cfg.USE_TMA and not _tma_describable(box, (q, k, v)):
        return replace(cfg, USE_TMA=False)
    return cfg


def _fwd_head(head: tuple, cfg: FwdConfig) -> tuple:
    """The forward's per-call leading arguments: ``q, k, v, out, lse`` and the descriptors."""
    q, k, v = head[:3]
    return (*head, *(_fwd_descriptors(q, k, v, cfg) if cfg.USE_TMA else (None, None, None)))


# tensors whose type is exactly torch's (no subclass hooks): raw launches may read their
# addresses directly; per-call plans key on them
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _output_layout(out: torch.Tensor, lse: torch.Tensor) -> tuple:
    """What :func:`_new_outputs` needs to allocate tensors laid out as ``out`` and ``lse``."""
    return tuple(out.shape), out.stride(), tuple(lse.shape), lse.stride(), out.dtype, out.device


def _new_outputs(layout: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh ``out`` and ``lse`` with a recorded layout (sizes and strides as the recorded
    launch's, so its arguments hold).  ``empty_strided`` with tuples: torch.empty parses a
    ``torch.Size`` through more overloads (CPU: 1.1 vs 2.1 µs each, bench/NOTES.md session 10)."""
    out_size, out_stride, lse_size, lse_stride, dtype, device = layout
    empty = torch.empty_strided
    return (empty(out_size, out_stride, dtype=dtype, device=device),
            empty(lse_size, lse_stride, dtype=torch.float32, device=device))  # fmt: skip


class _FwdPlan:
    """A forward launch as :func:`launch_fwd` made it, for the next call of the same per-call
    plan (``KernelCall.memo``, see ``runtime.api``): that call has the same shapes, strides,
    dtypes, block mask, scale and options, so only ``q, k, v``, a fresh ``out``/``lse``, the
    descriptors and the captured values are rebuilt, and the kernel is launched through
    ``Launcher.launch_planned`` (GPU) or ``kernel[grid]`` (interpreter).  Returns None (the
    caller takes the full path) where TMA eligibility changed or a new specialisation ran out
    of resources."""

    __slots__ = ("kernel", "requested", "cfg", "grid", "kwargs", "rest", "n_params", "outputs",
                 "planned", "memo")  # fmt: skip

    def __init__(self, kernel, requested, cfg, grid, kwargs, args, n_params, out, lse):
        self.kernel, self.requested, self.cfg, self.grid = kernel, requested, cfg, grid
        self.kwargs, self.n_params = kwargs, n_params
        self.rest = args[: len(args) - n_params]
        self.outputs = _output_layout(out, lse)
        self.planned = getattr(kernel, "launch_planned", None)
        self.memo: dict = {}

    def __call__(self, call: KernelCall, q, k, v, tensors: list):
        out, lse = _new_outputs(self.outputs)
        params = extra = ()
        if self.n_params:
            params = tuple(_param_args(call.lowered, call.scalars, tensors))
            # Triton specialises ints and bools, never floats; tensors are keyed by address
            extra = tuple([a for a in params if type(a) is int or type(a) is bool])
        raw = self.memo.get(loader.RAW_PLANNED) if self.planned is not None else None
        # the raw launch checks the tensors' low address bits against the recorded launch's,
        # which implies the alignment check below (TMA as recorded)
        if raw is not None and raw((q, k, v, out, lse), params, extra):
            return out, lse
        if call.config.USE_TMA:
            # shapes and strides are the plan's: only the addresses' alignment can change what
            # TMA allows, so the full check runs only when it disagrees with the recorded choice
            aligned = not (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15
            if aligned != self.cfg.USE_TMA and (
                _fwd_effective_config(call.config, q, k, v) != self.requested
            ):
                return None
        args = _fwd_head((q, k, v, out, lse), self.cfg) + self.rest + params
        try:
            if self.planned is None:
                self.kernel[self.grid](*args, **self.kwargs)
            else:
                # q, k, v, out, lse and their descriptors change, and the captured values
                self.planned(self.grid, args, self.kwargs, self.memo, extra, 5, len(params))
        except OutOfResources:  # a new specialisation of a captured value: shrink on full path
            call.memo.pop("fwd", None)
            return None
        return out, lse


# -- the warp-specialised Hopper forward (Gluon, fwd_ws.py) ------------------------------------
# Picked where it applies and nothing asks for the Triton kernel's knobs.  It reads Q in two
# 64-row halves of a 128-row tile and K/V in 128-key tiles, all through TMA; both warpgroups use
# the tile's one block-mask row, so the q block must be a multiple of 128.
_WS_ROWS, _WS_BLOCK_M, _WS_BLOCK_N = 64, 128, 128
_TRITON_FWD_KNOBS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def ws_stages(call: KernelCall, q, k, v) -> int:
    """The warp-specialised forward's K/V ring depth for this call, or 0: not applicable."""
    opts = call.options
    if not opts.get("FWD_WS", True) or any(o in opts for o in _TRITON_FWD_KNOBS):
        return 0
    E = q.shape[-1]
    if (
        E not in (64, 128)
        or v.shape[-1] != E
        or q.dtype not in (torch.float16, torch.bfloat16)
        or not knobs.get("ATTNFORGE_FWD_WS")
        or not _ws_device(q.device)
        or autotune.active(q)
    ):
        return 0
    q_block, kv_block = call.block_mask.BLOCK_SIZE
    mask = call.lowered.mask
    if q_block % _WS_BLOCK_M or kv_block % _WS_BLOCK_N:
        return 0
    if mask is not None and (E == 64 and not opts.get("FWD_WS") or mask.op is Op.CONST):
        # D=64 with a mask, unless FWD_WS=True asks: the Triton kernel's 64-key tiles skip more
        # of the partial blocks and measured faster (H100: causal 397 vs 367 TF/s, sliding
        # window 1.02 vs 0.89x flex; session 10: causal 385 vs 379-386); a constant mask's
        # [1, 1] tl.full tile has no Gluon layout
        return 0
    if not _tma_describable((_WS_ROWS, _WS_BLOCK_N, E, E), (q, k, v)):
        return 0
    return 2 if E == 128 else 3  # shared memory: Q 32 KB + stages x (K + V) of <= 64 KB


@functools.cache
def _ws_device(device: torch.device) -> bool:
    """sm_90 (wgmma, setmaxnreg), compiled kernels, and a Triton whose Gluon has
    warp_specialize and the Hopper modules (Triton >= 3.5; kept per Triton build, so a warm
    process does not import Gluon to know it: ``standins``)."""
    if loader.is_interpreted(loader.device_kind(device)):
        return False
    if _capability(device)[0] != 9:
        return False
    return standins.gluon_ws()


def _capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


def _launch_fwd_ws(call: KernelCall, q, k, v, tensors, out, lse, stages: int) -> tuple:
    B, Hq, L, E = q.shape
    S = k.shape[2]
    bm = call.block_mask
    q_block, kv_block = bm.BLOCK_SIZE
    lists, bm_strides, has_full = _block_args(bm, kv_block_lists)
    kernel = cache.load_ws(call.modules)._attn_fwd_ws
    n_tiles = triton_cdiv(L, _WS_BLOCK_M) * B * Hq
    # persistent (one CTA per SM: its shared memory and registers hold one) where every tile
    # has the same work: H100, no mask, D=128 573 vs 556 TF/s, D=64 419 vs 408.  With a block
    # mask the tiles' work differs: PERSISTENT=True then takes them from a counter (DYNAMIC),
    # but that lost too (causal 503 vs 544; static rounds 489 vs 537: bench/NOTES.md, sessions
    # 9 and 11), so one CTA per tile stays the default there
    persistent = call.options.get("PERSISTENT", bm._all_full)
    dynamic = persistent and not bm._all_full
    rest = (
        *lists,
        0 if k.shape[0] == 1 else k.stride(0), *out.stride()[:3],
        *bm_strides,
        Hq, call.gqa_group, L, S, call.scale,
        head_group(call, triton_cdiv(L, _WS_BLOCK_M), B * Hq,
                   S * 2 * E * q.element_size() // call.gqa_group, q.device),
        B * Hq,
    )  # fmt: skip
    params = tuple(_param_args(call.lowered, call.scalars, tensors))
    kw = dict(
        BLOCK_M=_WS_BLOCK_M,
        SPARSE_Q_BLOCK=q_block,
        SPARSE_KV_BLOCK=kv_block,
        EVEN_KV=S % kv_block == 0,
        HAS_FULL_BLOCKS=has_full,
        SCALE_FOLDED=call.scale > 0 and call.lowered.score is None,
        POS_F32=positions_f32(L, S),
        NUM_STAGES=stages,
        PINGPONG=False,
        PERSISTENT=persistent,
        DYNAMIC=dynamic,
        num_warps=4,
    )
    grid = min(n_tiles, _sm_count(q.device)) if persistent else n_tiles
    plan = _WsPlan(kernel, (grid,), kw, rest, len(params), out, lse)
    plan.launch(q, k, v, out, lse, params)
    if call.memo is not None:
        call.memo["fwd"] = plan
    return out, lse


class _WsPlan:
    """A warp-specialised forward launch, kept for the next call of the same per-call plan (see
    :class:`_FwdPlan`): only q, k, v, out, lse, their descriptors and the captured values are
    new.  Returns None (full path) where an address lost the 16-byte alignment TMA needs."""

    __slots__ = ("kernel", "grid", "kwargs", "rest", "n_params", "outputs", "dynamic")

    def __init__(self, kernel, grid, kwargs, rest, n_params, out, lse):
        self.kernel, self.grid, self.kwargs, self.rest = kernel, grid, kwargs, rest
        self.n_params = n_params
        self.outputs = _output_layout(out, lse)
        self.dynamic = kwargs["DYNAMIC"]

    def launch(self, q, k, v, out, lse, params: tuple) -> None:
        descs = (_ws_descriptor(q, _WS_ROWS), _ws_descriptor(k, _WS_BLOCK_N),
                 _ws_descriptor(v, _WS_BLOCK_N))  # fmt: skip
        # DYNAMIC: the tile counter starts at zero in every launch (its own tensor: launches
        # on other streams or in a CUDA graph never share one); else an argument never read
        counter = _zero_counter(q.device) if self.dynamic else _unused_counter(q.device)
        self.kernel[self.grid](*descs, out, lse, counter, *self.rest, *params, **self.kwargs)

    def __call__(self, call: KernelCall, q, k, v, tensors: list):
        if (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15:
            return None
        out, lse = _new_outputs(self.outputs)
        params = tuple(_param_args(call.lowered, call.scalars, tensors)) if self.n_params else ()
        self.launch(q, k, v, out, lse, params)
        return out, lse


def _zero_counter(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


_unused_counter = functools.cache(_zero_counter)  # one per device, never written


def _ws_descriptor(t: torch.Tensor, rows: int):
    # a Gluon host descriptor: _descriptor's fields plus the shared layout the kernel's rings
    # use (ws_stages checked what Gluon's __post_init__ would assert); stand-ins of both while
    # Gluon is not imported (standins: a launch-index hit needs only their key text)
    shape, strides, block = _tma_layout(t.shape, t.stride(), t.element_size(), rows)
    cls, layout = standins.ws_descriptor_parts(tuple(block), t.dtype)
    d = cls.__new__(cls)
    d.__dict__.update(base=t, shape=shape, strides=strides, block_shape=block, padding="zero",
                      layout=layout)  # fmt: skip
    return d


# -- TMA descriptors --------------------------------------------------------------------------
# A 4-D descriptor per input ([B, H, L, E], the tensor's own strides): any layout TMA can address
# works, also transposed views, and the hardware zero-fills rows past L and features past E, so
# no tile crosses into the next head.  TMA wants a 16-byte aligned base, a unit feature stride
# and 16-byte multiples as the other strides; anything else takes the pointer-load kernel.


_TMA_MAX_BOX = 256  # a TMA block is at most 256 elements along each dim


def _tma_describable(box: tuple, tensors: tuple) -> bool:
    """Descriptors with these block dims can cover every tensor of ``tensors``."""
    return (
        _descriptor_class() is not None
        and max(box) <= _TMA_MAX_BOX
        and all(_tma_ok(t) for t in tensors)
    )


def _tma_ok(t: torch.Tensor) -> bool:
    return not t.data_ptr() % 16 and _tma_layout_ok(t.shape, t.stride(), t.element_size())


@functools.lru_cache(maxsize=256)
def _tma_layout_ok(shape: tuple, strides: tuple, size: int) -> bool:
    if strides[-1] != 1 or 0 in shape:
        return False
    return all(n == 1 or (st > 0 and st * size % 16 == 0) for n, st in zip(shape[:-1], strides))


@functools.lru_cache(maxsize=256)
def _tma_layout(shape: tuple, strides: tuple, size: int, rows: int) -> tuple:
    """``(shape, strides, block_shape)`` of a descriptor (memoised: host overhead; Triton only
    reads these lists).  A size-1 dim is never stepped: it gets a stride TMA accepts (its own
    may be anything)."""
    fixed, inner = list(strides), shape[-1]
    for i in (2, 1, 0):
        if shape[i] == 1:
            fixed[i] = -(-inner * size // 16) * 16 // size
        inner = shape[i] * fixed[i]
    return list(shape), fixed, [1, 1, rows, head_dim_pad(shape[-1])]


def _fwd_descriptors(q, k, v, cfg: FwdConfig) -> tuple:
    return (_descriptor(q, cfg.BLOCK_M), _descriptor(k, cfg.BLOCK_N), _descriptor(v, cfg.BLOCK_N))


def _descriptor(t: torch.Tensor, rows: int, cls=None):
    # TensorDescriptor(t, ...) (Triton's, or ``cls``) without re-running its checks on every call
    # (~5 us each): what they assert (16-byte alignment and strides, unit feature stride,
    # positive sizes, power-of-two blocks of at most 256) _fwd_effective_config has checked
    shape, strides, block = _tma_layout(t.shape, t.stride(), t.element_size(), rows)
    cls = cls or _descriptor_class()
    d = cls.__new__(cls)
    d.__dict__.update(base=t, shape=shape, strides=strides, block_shape=block, padding="zero")
    return d


# -- shrink-and-retry on shared-memory overflow -------------------------------------------------
# The default tiles fill the shared memory with the pipelined tiles; a score/mask mod that needs
# scratch of its own (gathers from captured tensors, say) can push a compile past the limit
# (Triton raises OutOfResources when it loads the binary, before anything runs).  Then the
# launch retries with a smaller config, one step of the kernel's plan at a time, and remembers
# the config that worked per (kernel, requested config, shape class).  The kernel is kept alive
# in the value, so its id is not reused.  Fields the user set in kernel_options never change.
_SHRUNK: dict = {}

# (field, floor) steps, tried in order: tiles halve, num_stages drops by one.  Narrow the
# inner-loop tile first (it is what the pipeline stages multiply), then the stages, then the rest.
_FWD_SHRINK = (("BLOCK_N", 64), ("num_stages", 2), ("BLOCK_N", _MIN_TILE))
_DKDV_SHRINK = (("BLOCK_M1", 32), ("num_stages1", 1), ("BLOCK_M1", _MIN_TILE),
                ("BLOCK_N1", _MIN_TILE))  # fmt: skip
_DQ_SHRINK = (("BLOCK_N2", 32), ("num_stages", 1), ("BLOCK_N2", _MIN_TILE),
              ("BLOCK_M2", _MIN_TILE))  # fmt: skip


def _shrink(cfg, plan: tuple, fixed) -> Any:
    """The next smaller config along ``plan`` leaving ``fixed`` fields alone, or None."""
    for name, floor in plan:
        value = getattr(cfg, name)
        if name not in fixed and value is not None and value > floor:
            stages = name.startswith("num_stages")
            return replace(cfg, **{name: value - 1 if stages else value // 2})
    return None


def _fixed(options: dict, plan: tuple) -> frozenset:
    """The fields of ``plan`` the user set: num_stages given for both backward kernels fixes
    the dK/dV kernel's num_stages1 too."""
    names = set(options) | ({"num_stages1"} if "num_stages" in options else set())
    return frozenset(names).intersection(f for f, _ in plan)


def launch_shrinking(kernel, cfg, shape_key: tuple, options: dict, plan: tuple, run) -> Any:
    """``run(cfg)`` with the config remembered for this kernel/shape class, shrinking along
    ``plan`` while Triton reports OutOfResources; returns the config that ran."""
    fixed = _fixed(options, plan)
    key = (id(kernel), cfg, shape_key, fixed)
    tried = cfg = _SHRUNK.get(key, (None, cfg))[1]
    while True:
        try:
            run(cfg)
            return cfg
        except OutOfResources as e:
            smaller = _shrink(cfg, plan, fixed)
            if smaller is None:
                # name the options as the user wrote them (num_stages fixed num_stages1)
                named = {"num_stages" if f not in options else f for f in fixed}
                raise _too_big(kernel, tried, cfg, frozenset(named), e) from e
            _SHRUNK[key] = (kernel, smaller)
            cfg = smaller


# -- concurrent first compiles -------------------------------------------------------------------
# A new variant's backward compiles three kernels.  Triton spends most of a compile in C++ passes
# and the ptxas subprocess, so compiling them on threads overlaps most of it.  Triton >= 3.4 has
# the hook for that (``AsyncCompileMode``: ``kernel.warmup`` inside it submits the compile to an
# executor; leaving the block waits for all and fills each kernel's cache).  Older Triton, the
# interpreter, a user's own AsyncCompileMode or any failure: the launches compile as before.
_PRECOMPILED: set = set()


def _async_compile_mode():
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return None
    return AsyncCompileMode


def precompile(options: dict, jobs: list) -> None:
    """Compile ``jobs`` = ``[(kernel, args or args_of(cfg), kwargs or kwargs_of(cfg), shrink or
    None)]`` on threads the first time this process sees them; ``shrink = (cfg, shape_key,
    plan)`` picks the config :func:`launch_shrinking` will start from.  Only ever a speed-up:
    errors are left for the real launch to raise."""
    if not _knob("ATTNFORGE_PARALLEL_COMPILE"):
        return
    todo = []
    for kernel, args, kw, shrink in jobs:
        if shrink is not None:
            cfg, shape_key, plan = shrink
            fixed = _fixed(options, plan)
            cfg = _SHRUNK.get((id(kernel), cfg, shape_key, fixed), (None, cfg))[1]
            kw = kw(cfg)
            args = args(cfg) if callable(args) else args
        if not args[0].is_cuda:
            return
        key = (id(kernel), tuple(sorted(kw.items())))
        if key not in _PRECOMPILED and hasattr(kernel, "warmup"):
            todo.append((kernel, args, kw, key))
    mode = _async_compile_mode()
    if len(todo) < 2 or mode is None:
        return
    for kernel, *_, key in todo:
        _PRECOMPILED.add(key)
        _PRECOMPILED_KERNELS.append(kernel)  # alive while its id is in a key
    _compile_on_threads(mode, todo)


_PRECOMPILED_KERNELS: list = []


def _compile_on_threads(mode, todo: list) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(todo), thread_name_prefix="attnforge-compile") as pool:
        try:
            with mode(pool, ignore_errors=True):
                handles = [kernel.warmup(*args, grid=(1,), **kw) for kernel, args, kw, _ in todo]
        except Exception:  # noqa: BLE001 - a speed-up only: the launch compiles and reports
            return
        # each kernel's C launcher (built by the C compiler on a Triton cache miss) in parallel
        # too; the first launch then finds it in Triton's cache
        list(pool.map(_build_launcher, handles))


def _build_launcher(handle) -> None:
    try:
        kernel = handle.result(True) if hasattr(handle, "result") else handle
        if kernel is None or getattr(kernel, "_run", True) is not None:
            return  # failed, or already loaded (a kept binary)
        from triton.runtime.driver import driver

        driver.active.launcher_cls(kernel.src, kernel.metadata)
    except Exception:  # noqa: BLE001 - a speed-up only
        return


# -- the backward's kernels compiled while the forward compiles ---------------------------------
# At the first forward that needs a gradient (once per per-call plan), the backward's kernels are
# compiled on a background thread with the arguments the backward will most likely have (d_out
# laid out like out, as autograd makes it for out.sum() or a loss of out; d_lse like lse). The
# backward joins that thread before it compiles anything; a prediction that misses costs only the
# wasted compile, the backward then compiles what it needs.
_INFLIGHT: dict = {}  # id(bwd module) -> the thread compiling its kernels ahead


def compile_backward_ahead(call: KernelCall, q, k, v, tensors) -> None:
    memo = call.memo
    if memo is None or "bwd_ahead" in memo or not q.is_cuda or "bwd" not in call.modules:
        return
    memo["bwd_ahead"] = True
    if not _knob("ATTNFORGE_PARALLEL_COMPILE") or _async_compile_mode() is None:
        return
    import threading

    B, Hq, L, _ = q.shape
    out = torch.empty((B, Hq, L, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    # the transposes and the dK/dV kernel's finer lists, here (GPU work on the caller's stream)
    q_block_lists(dkdv_block_mask(call.block_mask, call.options))
    needs = [t.requires_grad for t in tensors]
    d_lse = lse if call.return_lse else None
    args = (call, q, k, v, out, lse, out, d_lse, list(tensors), needs, q.requires_grad)

    def work() -> None:
        try:
            with torch.cuda.device(q.device):
                launch_bwd(*args, dry=True)
        except Exception:  # noqa: BLE001 - a speed-up only: the backward compiles and reports
            return

    thread = threading.Thread(target=work, name="attnforge-bwd-ahead", daemon=True)
    _INFLIGHT[id(call.modules["bwd"])] = thread
    thread.start()


def _knob(name: str):
    from . import knobs

    return knobs.get(name)


def _too_big(kernel, first, last, fixed: frozenset, err: Exception) -> ValueError:
    name = getattr(kernel, "__name__", getattr(getattr(kernel, "fn", None), "__name__", "kernel"))
    how = f"tried {first} down to {last}" if first != last else f"tried {last}"
    fix = (
        f"choose smaller values for the kernel_options {sorted(fixed)} (or leave them out "
        "so attnforge can shrink them)"
        if fixed
        else "use a smaller head dim"
    )
    return ValueError(
        f"{name} needs more GPU resources than the device has ({err}); {how}; fix: {fix}"
    )


# Positions below this convert to fp32 exactly (24-bit significand), so float(kv - q) ==
# float(kv) - float(q) bit for bit: the kernels' POS_F32 constexpr
_POS_F32_LIMIT = 2**24


def positions_f32(L: int, S: int) -> bool:
    """POS_F32: every position (< L or < S) is exact in fp32, so generated mods may convert
    the index vectors and subtract in fp32 instead of converting each score's difference."""
    return max(L, S) <= _POS_F32_LIMIT


@functools.lru_cache(maxsize=256)
def _fwd_constexprs(
    cfg: FwdConfig, E, Ev, q_block, kv_block, even_kv, has_full, dtype, folded, pos_f32
) -> dict:
    """The forward's constexpr and launch keywords (memoised: host overhead)."""
    return dict(
        HEAD_DIM=E, HEAD_DIM_V=Ev, HEAD_DIM_PAD=head_dim_pad(E), HEAD_DIM_V_PAD=head_dim_pad(Ev),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        SPARSE_Q_BLOCK=q_block, SPARSE_KV_BLOCK=kv_block,
        EVEN_KV=even_kv, HAS_FULL_BLOCKS=has_full,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", SCALE_FOLDED=folded,
        USE_TMA=cfg.USE_TMA, POS_F32=pos_f32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- backward ------------------------------------------------------------------------------------
# Argument order: the Kernel ABI in ``codegen/templates/bwd.py.tmpl`` (its header documents the
# three kernels).  Captured-tensor gradients are fp32 buffers filled with atomics, then cast.


@dataclass(frozen=True)
class BwdConfig:
    BLOCK_M1: int  # dK/dV kernel: query rows per inner step
    BLOCK_N1: int  # dK/dV kernel: keys per program
    BLOCK_M2: int  # dQ kernel: query rows per program (also the preprocess tile)
    BLOCK_N2: int  # dQ kernel: keys per inner step
    num_warps: int  # dQ (and preprocess) kernel; also dK/dV's unless num_warps1 is set
    num_stages: int
    DQ_ATOMIC: bool = False  # dQ by atomics in the dK/dV kernel (see use_dq_atomic)
    USE_TMA: bool = False  # the loops' Q/dO (dK/dV) and K/V (dQ) tiles through TMA
    num_warps1: int | None = None  # dK/dV kernel (None: num_warps; choose_bwd_config fills it)
    num_stages1: int | None = None


def _default_bwd(
    device: torch.device, dtype: torch.dtype, head_dim_pad: int, costly_score: bool = False
) -> BwdConfig:
    if device.type != "cuda":
        # interpreter: few, large tiles; dQ in its own kernel, as on CUDA (the CPU tests cover
        # both paths through kernel_options)
        return BwdConfig(64, 64, 64, 64, 4, 1, DQ_ATOMIC=False)
    if dtype == torch.float32:
        return BwdConfig(32, 64, 64, 32, 4, 1)
    # 16-bit, measured on H100 (bench/NOTES.md): 64-row dK/dV and 64-key dQ inner steps; a mod
    # whose scratch overflows the shared memory shrinks them back (launch_shrinking).  dQ in its
    # own kernel: with the heavy-first program order it beats dQ by atomics at D=128 (the
    # atomics' fp32 buffer, zero-fill and cast cost more than the two matmuls they save), except
    # for a score mod with a non-constant derivative (softcap: evaluated once, not twice)
    tma = _has_tma(device)
    if head_dim_pad <= 64:
        return BwdConfig(64, 64, 64, 64, 4, 3, DQ_ATOMIC=False, USE_TMA=tma)
    if head_dim_pad <= 128:
        if costly_score:
            return BwdConfig(64, 128, 128, 64, 8, 3, DQ_ATOMIC=True, USE_TMA=tma)
        # dK/dV as one warpgroup over 64 keys, 2 CTAs per SM (98 KB shared, 255 registers x
        # 128 threads): one CTA's exp2/dS math overlaps the other's wgmma.  H100 A/B (session
        # 5): noop 420 vs 406-416 TF/s, causal 411 vs 401-408, document 276 vs 259-261, alibi
        # 386 vs 391-393 (noise is +-3%).  dQ keeps 128 query rows, 8 warps, 3 stages
        return BwdConfig(64, 64, 128, 64, 8, 3, DQ_ATOMIC=False, USE_TMA=tma,
                         num_warps1=4, num_stages1=2)  # fmt: skip
    return BwdConfig(32, 64, 64, 32, 4, 1)


def choose_bwd_config(
    q: torch.Tensor,
    v: torch.Tensor,
    block_size: tuple[int, int],
    options: dict,
    costly_score: bool = False,
) -> BwdConfig:
    """Backward tiles for the device/dtype/head dim, overridden by ``kernel_options``
    (``BLOCK_M1 BLOCK_N1 BLOCK_M2 BLOCK_N2 num_warps num_stages num_warps1 num_stages1``);
    tiles divide the block mask's (Q_BLOCK, KV_BLOCK)."""
    d_pad = max(head_dim_pad(q.shape[-1]), head_dim_pad(v.shape[-1]))
    base = _default_bwd(q.device, q.dtype, d_pad, costly_score)
    which = {"M": (block_size[0], "Q_BLOCK (BLOCK_SIZE[0])"),
             "N": (block_size[1], "KV_BLOCK (BLOCK_SIZE[1])")}  # fmt: skip

    def tile(name: str) -> int:
        block, what = which[name[-2]]
        return _tile(name, options.get(name, getattr(base, name)), block, what, name in options)

    def per_kernel(name: str) -> tuple[int, int]:
        # the dK/dV value: its own option, else the one for both kernels, else the default's
        both = options.get(name, getattr(base, name))
        own = getattr(base, name + "1") if name not in options else None
        return both, options.get(name + "1", own or both)

    (warps, warps1), (stages, stages1) = per_kernel("num_warps"), per_kernel("num_stages")
    return BwdConfig(
        *(tile(n) for n in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")),
        num_warps=warps,
        num_stages=stages,
        DQ_ATOMIC=options.get("DQ_ATOMIC", base.DQ_ATOMIC),
        USE_TMA=options.get("USE_TMA", base.USE_TMA),
        num_warps1=warps1,
        num_stages1=stages1,
    )


def use_dq_atomic(cfg: BwdConfig, options: dict, tensor_grads: int) -> bool:
    """dQ by atomics in the dK/dV kernel (FlashAttention-2's scheme: 5 matmuls per tile pair
    instead of 7) or by its own kernel, as ``cfg.DQ_ATOMIC`` (the per-head-dim default or
    ``kernel_options["DQ_ATOMIC"]``) says.  Always its own kernel when captured tensors need
    gradients (that kernel computes them anyway); not by default under
    torch.use_deterministic_algorithms(True) (the atomics' order varies)."""
    if tensor_grads != 0 or not cfg.DQ_ATOMIC:
        return False
    return "DQ_ATOMIC" in options or not torch.are_deterministic_algorithms_enabled()


def use_dq_tma(cfg: BwdConfig, options: dict, device: torch.device, d_pad: int) -> bool:
    """With dQ made in the dK/dV kernel: its tiles added by TMA bulk reduce-adds (sm_90+, a
    Triton with descriptor reductions; ``kernel_options["DQ_TMA"]``, default on): the adds
    happen in L2 from one shared-memory tile, where element-wise atomics send every value."""
    return (
        options.get("DQ_TMA", True)
        and device.type == "cuda"
        and _has_tma(device)
        and _has_tma_reduce()
        and d_pad <= _TMA_MAX_BOX
    )


def dp_first(options: dict) -> bool:
    """The dK/dV loop's order (``DP_FIRST``), as ``kernel_options["DP_FIRST"]`` says; off by
    default.  On the H100 (bench/NOTES.md, session 5 A/B) dP^T's matmul first was no faster
    (noop 395-406 vs 406-416 TF/s, alibi 346-382 vs 391-393), and with captured-tensor masks
    or dQ by atomics its early dP^T tile spills inside the loop (ptxas sm_90, D=128)."""
    return options.get("DP_FIRST", False)


def _grad_buffers(call: KernelCall, tensors: list, needs: list[bool], device) -> tuple:
    """fp32 buffers for the captured tensors whose grad is wanted, the kernel arguments for
    every gradient slot (a 1-element dummy where not wanted) and the ``TENSOR_GRADS`` bits."""
    from ..codegen.grad import grad_slots

    low = call.lowered
    position = {s.slot: i for i, s in enumerate(s for s in low.slots if s.kind == "tensor")}
    buffers: dict[int, torch.Tensor] = {}
    args: list = []
    bits = 0
    for gs in grad_slots(low.score, low.score_slots):
        i = position[gs.slot]
        if needs[i]:
            buffers[i] = torch.zeros(tensors[i].shape, dtype=torch.float32, device=device)
            args += [buffers[i], *buffers[i].stride()]
            bits |= 1 << gs.bit
        else:
            args += [torch.empty(1, dtype=torch.float32, device=device), *([0] * gs.ndim)]
    return buffers, args, bits


def launch_bwd(
    call: KernelCall,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    d_out: torch.Tensor, d_lse: torch.Tensor | None,
    tensors: list, needs: list[bool], need_dq: bool = True, *, dry: bool = False,
) -> tuple:  # fmt: skip
    """Run the backward kernels: ``(dq, dk, dv, grads)``, ``grads[i]`` the gradient of
    ``tensors[i]`` (in its dtype) or None where ``needs[i]`` is False or it has none; dq is
    None when ``need_dq`` is False.  ``dry=True`` (:func:`compile_backward_ahead`) only
    compiles the kernels these arguments would launch, with stand-ins for the buffers."""
    ahead = None if dry else _INFLIGHT.pop(id(call.modules.get("bwd")), None)
    if ahead is not None:
        ahead.join()  # its compiles fill the kernels' caches: nothing is compiled twice
    B, Hq, L, _ = q.shape
    S = v.shape[2]
    dev = q.device
    # Gradients laid out like out / lse (autograd hands out.sum()'s as a stride-0 expand): one
    # kernel specialisation whatever the loss, the one compile_backward_ahead predicted
    if d_out.stride() != out.stride():
        d_out = d_out.contiguous()
    if d_lse is not None and d_lse.stride() != lse.stride():
        d_lse = d_lse.contiguous()
    # a repeat backward of a per-call plan: its recorded launches (no captured-tensor grads)
    plans = call.memo.setdefault("bwd", {}) if call.memo is not None and not dry else None
    plan_key = None
    if plans is not None and not any(needs):
        plan_key = (need_dq, d_lse is not None, torch.are_deterministic_algorithms_enabled())
        plan = plans.get(plan_key)
        if plan is not None:
            given = (q, k, v, out, lse, d_out, d_lse if d_lse is not None else lse)
            done = plan(call, given, tensors)
            if done is not None:
                return done[0] if need_dq else None, done[1], done[2], [None] * len(tensors)
    # every row of dq, dk, dv is written by exactly one program (zeros where nothing attends)
    if dry:  # stand-ins of the same dtype, strides and (allocator) alignment
        dq, dk, dv = q, k, v
    else:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    buffers, grad_args, bits = _grad_buffers(call, tensors, needs, dev)
    if L == 0 or S == 0 or B * Hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), _cast_grads(buffers, tensors)
    cfg = choose_bwd_config(
        q, v, call.block_mask.BLOCK_SIZE, call.options, call.lowered.has_score_grad
    )
    params = _param_args(call.lowered, call.scalars, tensors)
    grads = _BwdGrads(d_out, d_lse, params, grad_args, bits, need_dq)
    if not dry and bits == 0 and autotune.active(q):  # no atomics into captured-tensor grads
        cfg = _tune_bwd(call, q, k, v, out, lse, grads, cfg)
    steps = [] if plan_key is not None else None
    _bwd_kernels(call, q, k, v, out, lse, grads, (dq, dk, dv), cfg, dry=dry, record=steps)
    if dry:
        return None
    if steps:
        plans[plan_key] = _BwdPlan(steps, call.block_mask)
    return dq if need_dq else None, dk, dv, _cast_grads(buffers, tensors)


class _BwdGrads(NamedTuple):
    """What a backward launch takes besides q, k, v, out, lse and the config."""

    d_out: torch.Tensor
    d_lse: torch.Tensor | None
    params: list  # the captured values' kernel arguments
    grad_args: list  # captured-tensor gradient buffers (or dummies), see _grad_buffers
    bits: int  # TENSOR_GRADS
    need_dq: bool


def _tune_bwd(call: KernelCall, q, k, v, out, lse, grads: _BwdGrads, cfg: BwdConfig) -> BwdConfig:
    """The autotuned backward config: candidates run whole backwards (dQ's kernel writes delta
    before dK/dV reads it, dq_acc zeroed each time) on scratch dq, dk, dv."""
    L, E = q.shape[2:]
    S, Ev = v.shape[2:]
    q_block, kv_block = call.block_mask.BLOCK_SIZE
    has_full = _block_args(call.block_mask, kv_block_lists)[2]
    shape = (E, Ev, q_block, kv_block, L % q_block == 0, S % kv_block == 0, q.dtype,
             positions_f32(L, S), has_full, grads.d_lse is not None)  # fmt: skip
    scratch = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))

    def run(c: BwdConfig) -> None:
        _bwd_kernels(call, q, k, v, out, lse, grads, scratch, c, tuning=True)

    return autotune.tune_bwd(call, q, k, cfg, shape, grads.need_dq, run)


def _bwd_kernels(
    call: KernelCall, q, k, v, out, lse, grads: _BwdGrads, outs: tuple, cfg: BwdConfig, *,
    dry: bool = False, tuning: bool = False, record: list | None = None,
) -> None:  # fmt: skip
    """Every backward kernel for ``cfg``, writing ``outs = (dq, dk, dv)``.  ``dry``: only
    compile (:func:`compile_backward_ahead`); ``tuning``: no shrinking (a config that does not
    fit raises) and no parallel precompile; ``record``: a list that gets the launches that ran,
    as :class:`_BwdStep` (for a :class:`_BwdPlan`)."""
    d_out, d_lse, params, grad_args, bits, need_dq = grads
    dq, dk, dv = outs
    B, Hq, L, E = q.shape
    Bkv, Hkv, S, Ev = v.shape
    dev = q.device
    bm, mod = call.block_mask, call.modules["bwd"]
    pos_f32 = positions_f32(L, S)

    def block_consts(block_size: tuple) -> tuple[dict, tuple]:
        # the constexprs and compile key that follow the block size a kernel's lists use
        q_block, kv_block = block_size
        even = (L % q_block == 0, S % kv_block == 0)
        key = (E, Ev, q_block, kv_block, *even, q.dtype, pos_f32)
        return dict(
            HEAD_DIM=E, HEAD_DIM_V=Ev, HEAD_DIM_PAD=head_dim_pad(E),
            HEAD_DIM_V_PAD=head_dim_pad(Ev), SPARSE_Q_BLOCK=q_block, SPARSE_KV_BLOCK=kv_block,
            EVEN_Q=even[0], EVEN_KV=even[1],
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", POS_F32=pos_f32,
        ), key  # fmt: skip

    consts, shape_key = block_consts(bm.BLOCK_SIZE)
    kz = 0 if Bkv == 1 else k.stride(0)
    vz = 0 if Bkv == 1 else v.stride(0)
    # -- delta = rowsum(dO * O) - dLSE --
    delta = lse if dry else torch.empty((B, Hq, L), dtype=torch.float32, device=dev)
    # -- dQ: atomics into dq_acc inside the dK/dV kernel, or the dQ kernel (see use_dq_atomic) --
    atomic = use_dq_atomic(cfg, call.options, bits)
    dq_in_dkdv = atomic and need_dq
    order = dp_first(call.options)
    run_dq_kernel = bits != 0 or (need_dq and not atomic)
    dq_acc = q  # a dummy pointer when dQ is not made in the dK/dV kernel (never touched)
    if dq_in_dkdv:
        dq_acc = _dq_buffer(q, "meta" if dry else dev)
    # dQ tiles by TMA bulk reduce-adds (see use_dq_tma), else element-wise atomics
    dq_tma = dq_in_dkdv and use_dq_tma(cfg, call.options, dev, head_dim_pad(E))
    has_dlse = d_lse is not None
    dl = d_lse if has_dlse else lse
    # every kernel's leading tensors, by name (a plan's replay supplies new ones)
    tensors = dict(q=q, k=k, v=v, out=out, lse=lse, d_out=d_out, dl=dl, delta=delta, dq=dq,
                   dk=dk, dv=dv, dq_acc=dq_acc)  # fmt: skip
    pre_rest = (*out.stride(), *d_out.stride(), *(dl.stride() if has_dlse else (0, 0, 0)), Hq, L)
    pre_consts = dict(HEAD_DIM_V=Ev, HEAD_DIM_V_PAD=head_dim_pad(Ev), BLOCK_M=cfg.BLOCK_M2,
                      HAS_DLSE=has_dlse)  # fmt: skip
    pre_args = (*[tensors[n] for n in _PRE_HEAD], *pre_rest)
    # -- dK, dV over the transposed lists (k/v broadcast over the batch: loop inside), of the
    #    finer block mask where there is one --
    fine = dkdv_block_mask(bm, call.options, cfg)
    q_lists, q_strides, has_full_q = _block_args(fine, q_block_lists)
    dkdv_consts, dkdv_shape = block_consts(fine.BLOCK_SIZE)
    z_per_kv = B if Bkv == 1 else 1
    dkdv = mod._attn_bwd_dkdv
    # TMA where every tensor a loop reads can be described (tiles checked per config).  The
    # dK/dV loop takes it only when asked: on sm_90 its Q/dO descriptor loads cost the
    # register-bound kernel more spills (ptxas: 24 -> 64 bytes, causal D=128) than they save
    tma = cfg.USE_TMA and _tma_describable((head_dim_pad(E), head_dim_pad(Ev)), (q, k, v, d_out))
    tma_dkdv = tma and call.options.get("USE_TMA", False)

    def dkdv_descs(c: BwdConfig) -> tuple:
        rows = c.BLOCK_M1
        qdo = (("q", rows), ("d_out", rows)) if _tma_on(tma_dkdv, rows) else (None, None)
        return (*qdo, ("dq_acc", rows) if _tma_on(dq_tma, rows) else None)

    def dkdv_args(c: BwdConfig) -> tuple:
        return _step_args(tensors, _DKDV_HEAD, dkdv_descs(c), dkdv_rest)

    dkdv_rest = (
        *q_lists,
        *q.stride(), kz, *k.stride()[1:], vz, *v.stride()[1:], *d_out.stride(),
        *dk.stride(), *dv.stride(), *dq_acc.stride(),
        *q_strides,
        Hq, Hkv, call.gqa_group, z_per_kv, L, S, call.scale,
        head_group(call, triton_cdiv(S, cfg.BLOCK_N1), Bkv * Hkv,
                   z_per_kv * call.gqa_group * L * (E + Ev) * q.element_size(), dev),
        *params,
    )  # fmt: skip

    def dkdv_kw(c: BwdConfig) -> dict:
        return dict(BLOCK_M=c.BLOCK_M1, BLOCK_N=c.BLOCK_N1, HAS_FULL_BLOCKS=has_full_q,
                    DQ_ATOMIC=dq_in_dkdv, USE_TMA=_tma_on(tma_dkdv, c.BLOCK_M1),
                    DP_FIRST=order, DQ_TMA=_tma_on(dq_tma, c.BLOCK_M1),
                    num_warps=c.num_warps1 or c.num_warps,
                    num_stages=c.num_stages1 or c.num_stages, **dkdv_consts)  # fmt: skip

    # -- dQ and captured-tensor gradients over the forward lists (an OutOfResources retry is
    #    safe for the atomics: it is raised when the binary loads, before anything runs) --
    kv_lists, kv_strides, has_full = _block_args(bm, kv_block_lists)
    dq_kernel = mod._attn_bwd_dq

    def dq_descs(c: BwdConfig) -> tuple:
        rows = c.BLOCK_N2
        return (("k", rows), ("v", rows)) if _tma_on(tma, rows) else (None, None)

    def dq_args(c: BwdConfig) -> tuple:
        return _step_args(tensors, _DQ_HEAD, dq_descs(c), dq_rest)

    dq_rest = (
        *kv_lists,
        *q.stride(), kz, *k.stride()[1:], vz, *v.stride()[1:], *out.stride(), *d_out.stride(),
        *dq.stride(), *(dl.stride() if has_dlse else (0, 0, 0)),
        *kv_strides,
        Hq, call.gqa_group, L, S, call.scale,
        head_group(call, triton_cdiv(L, cfg.BLOCK_M2), B * Hq,
                   S * (E + Ev) * q.element_size() // call.gqa_group, dev),
        *params, *grad_args,
    )  # fmt: skip

    def dq_kw(c: BwdConfig) -> dict:
        return dict(BLOCK_M=c.BLOCK_M2, BLOCK_N=c.BLOCK_N2, HAS_FULL_BLOCKS=has_full,
                    TENSOR_GRADS=bits, HAS_DLSE=has_dlse, USE_TMA=_tma_on(tma, c.BLOCK_N2),
                    num_warps=c.num_warps, num_stages=c.num_stages, **consts)  # fmt: skip

    dkdv_key = (*dkdv_shape, has_full_q, dq_in_dkdv, order, dq_tma)
    dq_key = (*shape_key, has_full, bits, has_dlse)
    # delta comes from the dQ kernel, which then runs first, or from the preprocess kernel
    jobs = [(dq_kernel, dq_args, dq_kw, (cfg, dq_key, _DQ_SHRINK))] if run_dq_kernel else [
        (mod._attn_bwd_preprocess, pre_args, pre_consts, None)]  # fmt: skip
    jobs.append((dkdv, dkdv_args, dkdv_kw, (cfg, dkdv_key, _DKDV_SHRINK)))
    if not tuning:
        precompile(call.options, jobs)
    if dry:
        return

    def dq_grid(c: BwdConfig) -> tuple:
        return (triton_cdiv(L, c.BLOCK_M2) * B * Hq,)

    def dkdv_grid(c: BwdConfig) -> tuple:
        return (triton_cdiv(S, c.BLOCK_N1) * Bkv * Hkv,)

    def launch(kernel, key: tuple, plan: tuple, grid, args, kw) -> BwdConfig:
        def run(c: BwdConfig) -> None:
            kernel[grid(c)](*args(c), **kw(c))

        if tuning:
            run(cfg)
            return cfg
        return launch_shrinking(kernel, cfg, key, call.options, plan, run)

    n = len(params)
    if run_dq_kernel:
        ran = launch(dq_kernel, dq_key, _DQ_SHRINK, dq_grid, dq_args, dq_kw)
        # (with no captured-tensor grads, grad_args are fixed dummies: the step's tail)
        first = _BwdStep(dq_kernel, dq_grid(ran), _DQ_HEAD, dq_descs(ran),
                         dq_rest[: len(dq_rest) - n - len(grad_args)], dq_kw(ran), n,
                         tuple(grad_args))  # fmt: skip
    else:
        pre_grid = (triton_cdiv(L, cfg.BLOCK_M2), B * Hq)
        mod._attn_bwd_preprocess[pre_grid](*pre_args, **pre_consts)
        first = _BwdStep(mod._attn_bwd_preprocess, pre_grid, _PRE_HEAD, (), pre_rest,
                         pre_consts, 0, ())  # fmt: skip
    ran = launch(dkdv, dkdv_key, _DKDV_SHRINK, dkdv_grid, dkdv_args, dkdv_kw)
    if dq_in_dkdv:
        dq.copy_(dq_acc)
    if record is not None and bits == 0:
        rest = dkdv_rest[: len(dkdv_rest) - n]
        record += [first, _BwdStep(dkdv, dkdv_grid(ran), _DKDV_HEAD, dkdv_descs(ran), rest,
                                   dkdv_kw(ran), n, (), fine)]  # fmt: skip


# the backward kernels' leading tensor arguments (the Kernel ABI in bwd.py.tmpl)
_PRE_HEAD = ("out", "d_out", "dl", "delta")
_DQ_HEAD = ("q", "k", "v", "out", "d_out", "dq", "lse", "delta", "dl")
_DKDV_HEAD = ("q", "k", "v", "d_out", "dk", "dv", "lse", "delta", "dq_acc")


def _dq_buffer(q: torch.Tensor, device) -> torch.Tensor:
    """dQ's fp32 accumulator for atomics, zeroed; its features padded to 16 bytes (a view of
    the first E), so a TMA reduce can describe it."""
    B, Hq, L, E = q.shape
    return torch.zeros((B, Hq, L, -(-E // 4) * 4), dtype=torch.float32, device=device)[..., :E]


def _step_args(tensors: dict, head: tuple, descs: tuple, rest: tuple) -> tuple:
    """A backward kernel's arguments: its leading tensors, the TMA descriptors (``(tensor name,
    rows)`` or None each) and the rest."""
    lead = [tensors[n] for n in head]
    return (*lead, *[None if d is None else _descriptor(tensors[d[0]], d[1]) for d in descs],
            *rest)  # fmt: skip


class _BwdStep(NamedTuple):
    """One backward launch as it ran: arguments = ``head`` tensors, descriptors over them,
    ``rest`` (fixed per plan), then the ``n_params`` captured-value arguments (0 or all) and
    ``tail`` (fixed)."""

    kernel: Any
    grid: tuple
    head: tuple  # tensor names, see _step_args
    descs: tuple
    rest: tuple
    kwargs: dict
    n_params: int
    tail: tuple  # what follows the captured values (dQ: the unused gradient slots' dummies)
    # the finer block mask whose lists ``rest`` holds (dkdv_block_mask), else None: it depends
    # on the captured values, so a replay checks it is still the current one
    fine: Any = None


class _BwdPlan:
    """A backward as :func:`launch_bwd` made it, for the next backward of the same per-call
    plan (``KernelCall.memo``) with the same gradients wanted: shapes, strides, dtypes, block
    mask, options and config are the recorded ones, so only the tensors (new dq, dk, dv, delta,
    dQ accumulator), their descriptors and the captured values are rebuilt, and each kernel is
    launched raw (``loader.RAW_PLANNED``), by ``Launcher.launch_planned`` or, interpreted, by
    ``kernel[grid]``.  Returns None (the caller takes the full path) where a layout or the
    TMA alignment changed, or a new specialisation of a captured value ran out of resources."""

    __slots__ = ("steps", "memos", "layouts", "dq_acc", "uses_tma", "planned", "fine")

    def __init__(self, steps: list, bm):
        self.steps = steps
        self.fine = [s for s in steps if s.fine is not None and s.fine is not bm]
        self.memos = [{} for _ in steps]  # launch_planned's, one per kernel
        self.dq_acc = any(s.kwargs.get("DQ_ATOMIC") for s in steps)
        described = {d[0] for s in steps for d in s.descs if d is not None}
        self.uses_tma = tuple(("q", "k", "v", "out", "lse", "d_out", "dl").index(n)
                              for n in described if n != "dq_acc")  # fmt: skip
        self.planned = [getattr(s.kernel, "launch_planned", None) for s in steps]
        self.layouts = None

    def __call__(self, call: KernelCall, given: tuple, captured: list):
        q, k, v, out, lse, d_out, dl = given
        layouts = tuple([(t.stride(), t.dtype) for t in (d_out, dl)])
        if self.layouts is None:
            self.layouts = layouts
        elif layouts != self.layouts:
            return None
        for i in self.uses_tma:  # shapes and strides are the plan's: only alignment can change
            if given[i].data_ptr() & 15:
                return None
        bm = call.block_mask
        for step in self.fine:  # a changed captured value: new finer lists, on the full path
            if blockmask.refined(bm, _DKDV_FINE) is not step.fine:
                return None
        # raw launches read fresh tensors' addresses by torch.Tensor's own data_ptr
        plain = type(d_out) in PLAIN_TENSORS and type(dl) in PLAIN_TENSORS
        dev = q.device
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        tensors = dict(q=q, k=k, v=v, out=out, lse=lse, d_out=d_out, dl=dl, dq=dq, dk=dk, dv=dv,
                       delta=torch.empty_like(lse),  # (lse: ours, fp32, contiguous)
                       dq_acc=_dq_buffer(q, dev) if self.dq_acc else q)  # fmt: skip
        params = ()
        if self.steps[-1].n_params:
            params = tuple(_param_args(call.lowered, call.scalars, captured))
        # Triton specialises ints and bools, never floats; tensors are keyed by address
        extra = tuple([a for a in params if type(a) is int or type(a) is bool]) if params else ()
        for step, memo, planned in zip(self.steps, self.memos, self.planned):
            head = tuple([tensors[n] for n in step.head])
            tail = (*params, *step.tail) if step.n_params else step.tail
            raw = memo.get(loader.RAW_PLANNED) if planned is not None and plain else None
            if raw is not None and raw(head, tail, extra):
                continue
            args = (*_step_args(tensors, step.head, step.descs, step.rest), *tail)
            try:
                if planned is None:
                    step.kernel[step.grid](*args, **step.kwargs)
                else:
                    planned(step.grid, args, step.kwargs, memo, extra, len(head), len(tail))
            except OutOfResources:  # a new specialisation: the full path shrinks
                return None
        if self.dq_acc:
            dq.copy_(tensors["dq_acc"])
        return dq, dk, dv


def _tma_on(tma: bool, rows: int) -> bool:
    return tma and rows <= _TMA_MAX_BOX


def _cast_grads(buffers: dict[int, torch.Tensor], tensors: list) -> list:
    return [buffers[i].to(t.dtype) if i in buffers else None for i, t in enumerate(tensors)]
