"""Direct launches of kernels with ``TensorDescriptor`` arguments, without Triton's per-launch
expansion.

Triton wraps the C launcher of a kernel whose signature has ``tensordesc`` arguments in
``wrap_handle_tensordesc``'s ``inner``: per launch, every descriptor is expanded by
``make_tensordesc_arg`` (``data_ptr()`` and a ``cuTensorMapEncodeTiled`` through
``fill_tma_descriptor``), and on triton 3.6 a Python loop walks all ~60 arguments to find them.
:func:`fast_run` gives the direct-launch paths (``loader.Launcher``) a callable with the
``CompiledKernel.run`` signature that

- keeps each descriptor's expansion (Triton's own ``make_tensordesc_arg`` output: the encoded
  tensor map plus shape and strides) keyed by everything it is made of (base address and dtype,
  shape, strides, block shape, padding; the kernel's descriptor metadata is fixed per kernel,
  so per-kernel caches), so a repeat launch encodes nothing; a new address, shape or stride
  misses and encodes anew: a stale map is never used;
- triton 3.6: calls the raw C launcher with the expanded argument list, built from slices at
  the descriptors' known positions (no per-argument loop);
- triton 3.9: calls the raw launcher through Triton's own (C++) ``make_tensordesc_args`` with the
  caching expansion above.

Feature-detected once per kernel: the launcher must be Triton's ``CudaLauncher`` whose
``__call__`` and ``inner`` read as the known source (whitespace aside), with no global or
profile scratch (their allocation is left to Triton), every descriptor lowered to a tensor map
(``tensordesc_meta``) and no im2col / GSan. Anything else, and ``ATTNFORGE_FAST_TMA_LAUNCH=0``
(read at every launch), takes Triton's launcher unchanged.
"""

from __future__ import annotations

import functools
import inspect

from . import knobs as _knobs

_KNOB = "ATTNFORGE_FAST_TMA_LAUNCH"
_MAX_MAPS = 64  # expansions kept per descriptor argument (then start over)


# ``knobs.get(_KNOB)``, read at every launch (as every knob is), cheaply
enabled = _knobs.reader(_KNOB)


# What the launchers this module replaces do, as source (whitespace-normalised). Triton 3.6:
_V36_CALL = (
    "self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, "
    "self.launch_pdl, global_scratch, profile_scratch, *args)",
)
_V36_INNER = (
    "final_args = list(args[:_BASE_ARGS_FORMAT_LEN]) tensordesc_idx = 0 for i, arg in "
    "enumerate(args[_BASE_ARGS_FORMAT_LEN:]): if i in tensordesc_indices: final_args.extend("
    "make_tensordesc_arg(arg, tensordesc_meta[tensordesc_idx])) tensordesc_idx += 1 else: "
    "final_args.append(arg) return launcher(*final_args)",
)
_V36_MAKE_NAMES = {
    "base", "shape", "strides", "padding", "list", "triton", "runtime", "driver", "active",
    "utils", "fill_tma_descriptor", "data_ptr", "TMA_DTYPE_DEVICE_TO_HOST",
}  # fmt: skip
# Triton 3.9 (what torch 2.13 installs; the im2col names: that branch is refused by _build):
_V39_CALL = (
    "self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, "
    "self.launch_pdl, kernel_metadata, launch_metadata, launch_enter_hook, launch_exit_hook, "
    "global_scratch, profile_scratch, self.arg_annotations, self.kernel_signature, kernel_args)",
    "kernel_args = args if self.gsan_enabled:",
)
_V39_INNER = (
    "base_args = args[:-1] kernel_args = args[-1] wrapped = make_tensordesc_args( kernel_args, "
    "signature, relevant_paths, tensordesc_meta, base_args, make_tensordesc_arg, ) return "
    "launcher(*base_args, wrapped)",
)
_V39_MAKE_NAMES = {
    "base", "shape", "strides", "padding", "list", "len", "get", "triton", "runtime", "driver",
    "active", "utils", "fill_tma_descriptor_tiled", "fill_tma_descriptor_im2col", "data_ptr",
    "TMA_DTYPE_DEVICE_TO_HOST", "TMA_TF32", "round_f32_to_tf32", "decompose_descriptor",
    "element_strides", "pixel_box_lower_corner", "pixel_box_upper_corner",
}  # fmt: skip


def _text(fn) -> str:
    return " ".join(inspect.getsource(fn).split())


@functools.cache
def _reads_as(fn, snippets: tuple) -> bool:
    try:
        text = _text(fn)
    except (OSError, TypeError):
        return False
    return all(" ".join(s.split()) in text for s in snippets)


def _closure(fn) -> dict:
    cells = fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


def fast_run(kernel):
    """A callable like ``kernel.run`` (``(gridX, gridY, gridZ, stream, function, packed
    metadata, launch metadata, enter hook, exit hook, *kernel arguments)``) that skips Triton's
    per-launch descriptor expansion, or ``kernel.run`` itself where that does not apply."""
    run = kernel.run
    try:
        fast = _build(run)
    except Exception:  # noqa: BLE001 - a speed-up only: anything unexpected keeps Triton's
        fast = None
    return run if fast is None else fast


def _build(run):
    cls = type(run)
    inner = getattr(run, "launch", None)
    if cls.__name__ != "CudaLauncher" or getattr(inner, "__name__", None) != "inner":
        return None  # no descriptor argument (the raw launcher), or another backend
    if run.global_scratch_size or run.profile_scratch_size or getattr(run, "gsan_enabled", False):
        return None
    env = _closure(inner)
    metas = env.get("tensordesc_meta")
    if not metas or any(m is None or m.get("is_im2col") for m in metas):
        return None
    if _reads_as(cls.__call__, _V36_CALL) and _reads_as(inner, _V36_INNER):
        return _build36(run, inner, env, metas)
    if _reads_as(cls.__call__, _V39_CALL) and _reads_as(inner, _V39_INNER):
        return _build39(run, inner, env, metas)
    return None


def _make_ok(make, names: set) -> bool:
    """Triton's ``make_tensordesc_arg`` reads nothing of a descriptor but what the key has."""
    return set(make.__code__.co_names) <= names


class _Maps:
    """One descriptor argument's expansions, keyed by everything Triton's expansion reads."""

    __slots__ = ("make", "meta", "maps")

    def __init__(self, make, meta):
        self.make, self.meta, self.maps = make, meta, {}

    def get(self, d) -> list:
        base = d.base
        key = (base.data_ptr(), base.dtype, tuple(d.shape), tuple(d.strides),
               tuple(d.block_shape), d.padding, getattr(d, "round_f32_to_tf32", False))  # fmt: skip
        found = self.maps.get(key)
        if found is None:
            found = self.make(d, self.meta)
            if len(self.maps) >= _MAX_MAPS:
                self.maps.clear()
            self.maps[key] = found
        return found


def _build36(run, inner, env, metas):
    make = inner.__globals__.get("make_tensordesc_arg")
    n_base = inner.__globals__.get("_BASE_ARGS_FORMAT_LEN")
    positions = env.get("tensordesc_indices")
    if make is None or n_base != 13 or not _make_ok(make, _V36_MAKE_NAMES):
        return None
    if not positions or len(positions) != len(metas):
        return None
    return _Fast36(run, env["launcher"], sorted(positions), [_Maps(make, m) for m in metas])


class _Fast36:
    """Triton 3.6: the raw C launcher, descriptors expanded from the per-argument caches."""

    __slots__ = ("run", "c_launch", "coop", "pdl", "spans", "maps", "positions")

    def __init__(self, run, c_launch, positions, maps):
        self.run, self.c_launch, self.maps, self.positions = run, c_launch, maps, positions
        self.coop, self.pdl = run.launch_cooperative_grid, run.launch_pdl
        # kernel argument i is args[4 + i] of __call__'s *args (packed metadata, launch
        # metadata and the two hooks come first): slices between the descriptors
        starts = [0] + [4 + p + 1 for p in positions]
        self.spans = tuple(zip(starts, [4 + p for p in positions] + [None], [*maps, None]))

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        if not enabled():
            return self.run(gridX, gridY, gridZ, stream, function, *args)
        out = [gridX, gridY, gridZ, stream, function, self.coop, self.pdl, None, None]
        for start, stop, maps in self.spans:
            out += args[start:stop]
            if maps is not None:
                out += maps.get(args[stop])
        return self.c_launch(*out)


def raw_parts(run):
    """``(C launcher, cooperative-grid flag, PDL flag, {kernel argument position: (Triton's
    make_tensordesc_arg, its descriptor metadata)})`` of a direct-launch callable (what
    :func:`fast_run` returned) that can be replaced by one call of the C launcher with
    ``(gridX, gridY, gridZ, stream, function, coop, pdl, None, None, *args)``, the descriptors
    in ``args`` expanded: a triton 3.6 raw TMA launch, or Triton 3.6's ``CudaLauncher`` of a
    kernel without descriptors and scratch.  None otherwise (triton 3.9 expands in C++)."""
    if type(run) is _Fast36:
        return run.c_launch, run.coop, run.pdl, {
            p: (m.make, m.meta) for p, m in zip(run.positions, run.maps)
        }  # fmt: skip
    try:
        cls, c_launch = type(run), run.launch
        if (cls.__name__ != "CudaLauncher" or getattr(c_launch, "__name__", None) == "inner"
                or run.global_scratch_size or run.profile_scratch_size
                or getattr(run, "gsan_enabled", False)
                or not _reads_as(cls.__call__, _V36_CALL)):  # fmt: skip
            return None
        return c_launch, run.launch_cooperative_grid, run.launch_pdl, {}
    except Exception:  # noqa: BLE001 - a speed-up only
        return None


def _build39(run, inner, env, metas):
    make = env.get("make_tensordesc_arg")
    expand = inner.__globals__.get("make_tensordesc_args")
    needed = ("launcher", "signature", "relevant_paths")
    if make is None or expand is None or any(n not in env for n in needed):
        return None
    if not _make_ok(make, _V39_MAKE_NAMES):
        return None
    return _Fast39(run, env, expand, {id(m): _Maps(lambda d, m, _make=make: _make(d, m, None), m)
                                      for m in metas})  # fmt: skip


class _Fast39:
    """Triton 3.9: Triton's own (C++) expansion, with the per-argument caches as its
    ``make_tensordesc_arg``."""

    __slots__ = ("run", "c_launch", "coop", "pdl", "tail", "expand", "sig", "paths", "metas",
                 "maps", "make")  # fmt: skip

    def __init__(self, run, env, expand, maps):
        self.run, self.c_launch, self.expand, self.maps = run, env["launcher"], expand, maps
        self.sig, self.paths, self.metas = env["signature"], env["relevant_paths"], env[
            "tensordesc_meta"]  # fmt: skip
        self.coop, self.pdl = run.launch_cooperative_grid, run.launch_pdl
        self.tail = (None, None, run.arg_annotations, run.kernel_signature)
        self.make = self._make

    def _make(self, d, meta, _base_args):
        return self.maps[id(meta)].get(d)

    def __call__(self, gridX, gridY, gridZ, stream, function, packed, launch_metadata, enter,
                 exit_, *args):  # fmt: skip
        if not enabled():
            return self.run(gridX, gridY, gridZ, stream, function, packed, launch_metadata,
                            enter, exit_, *args)  # fmt: skip
        base = (gridX, gridY, gridZ, stream, function, self.coop, self.pdl, packed,
                launch_metadata, enter, exit_, *self.tail)  # fmt: skip
        return self.c_launch(*base, self.expand(args, self.sig, self.paths, self.metas, base,
                                                self.make))  # fmt: skip
