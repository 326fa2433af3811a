"""Opt-in autotuning of the tile configs (``ATTNFORGE_AUTOTUNE=1``, compiled CUDA kernels only).

The first launch of a kernel for a shape class times a few configs around the heuristic one
(``launch._default_fwd`` / ``_default_bwd`` with the kernel_options applied) on the real
arguments and keeps the fastest.  Winners are written next to the kernel, in its cache entry::

    <entry dir>/tune-<device name>.json   {"format", "device", "torch", "triton",
                                           "winners": {shape class: config fields}}

so a later process with the knob on reads them and times nothing.  Fields the user set in
kernel_options are never tuned (and are part of the shape class).  Elsewhere (knob off, CPU,
the interpreter) nothing here runs: the launch uses the heuristic config as before.

``device_ok`` and ``bench`` are module-level so tests can replace them (tuning on CPU with a
fake timer).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import cache, knobs, loader

_KNOB = "ATTNFORGE_AUTOTUNE"
_FORMAT = 1

_lock = threading.RLock()
_tables: dict[Path, dict[str, dict]] = {}  # tune file -> winners (disk contents + our own)


def active(q: torch.Tensor) -> bool:
    """Tune here?  Reads the environment only when the variable is set (the off path is one
    dict lookup)."""
    return os.environ.get(_KNOB) is not None and knobs.get(_KNOB) and device_ok(q)


def device_ok(q: torch.Tensor) -> bool:
    """Timings mean something only for compiled kernels on a GPU, never the interpreter; and
    none while a CUDA graph is being captured (timing synchronises)."""
    return (
        q.is_cuda
        and not loader.is_interpreted(loader.device_kind(q.device))
        and not torch.cuda.is_current_stream_capturing()
    )


def bench(fn: Callable[[], None], cfg: Any) -> float:
    """Milliseconds per ``fn()`` (``cfg`` is what it runs: for tests and logs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25)


def clear_memory() -> None:
    """Forget the winners loaded or found in this process (the files stay)."""
    with _lock:
        _tables.clear()


# -- the two launch points ----------------------------------------------------------------------


def tune_fwd(call, q, k, base, shape: tuple, run: Callable) -> Any:
    """The forward config for ``shape`` (``launch_fwd``'s shape class): remembered, or the
    fastest of the candidates around ``base``; ``run(cfg)`` launches the forward once."""
    choices = {"BLOCK_N": (64, 128), "num_stages": (2, 3, 4), "num_warps": (4, 8)}
    tiles = {"BLOCK_N": call.block_mask.BLOCK_SIZE[1]}
    found = candidates(base, choices, call.options, tiles)
    return _tuned("fwd", call, q, k, base, shape, found, run)


def tune_bwd(call, q, k, base, shape: tuple, need_dq: bool, run: Callable) -> Any:
    """Like :func:`tune_fwd` for the backward; ``run(cfg)`` runs every backward kernel once
    on scratch outputs (the caller tunes only when no captured tensor needs a gradient: those
    buffers accumulate)."""
    choices = {"DQ_ATOMIC": (False, True), "num_stages": (2, 3), "BLOCK_M1": (32, 64)}
    options = dict(call.options)
    if not need_dq or torch.are_deterministic_algorithms_enabled():
        # no dQ, or no atomics unless asked (launch.use_dq_atomic): DQ_ATOMIC changes nothing
        options.setdefault("DQ_ATOMIC", base.DQ_ATOMIC)
    tiles = {"BLOCK_M1": call.block_mask.BLOCK_SIZE[0]}
    found = candidates(base, choices, options, tiles)
    if "num_stages1" not in options and base.num_stages1 == base.num_stages:
        # the stages axis moves both kernels' stages (dK/dV's own num_stages1 follows it)
        found = list(dict.fromkeys(dataclasses.replace(c, num_stages1=c.num_stages) for c in found))
    return _tuned("bwd", call, q, k, base, (*shape, need_dq), found, run)


def candidates(base, choices: dict[str, tuple], options: dict, tiles: dict[str, int]) -> list:
    """``base`` first, then every combination of ``choices`` (fields in ``options`` keep
    their value) whose tiles are powers of two >= 16 dividing the block size in ``tiles``."""
    from .launch import valid_tile  # launch imports this module

    names = list(choices)
    axes = [(getattr(base, n),) if n in options else (getattr(base, n), *choices[n]) for n in names]
    found: list = []
    for combo in itertools.product(*axes):
        cfg = dataclasses.replace(base, **dict(zip(names, combo)))
        if cfg not in found and all(valid_tile(getattr(cfg, n), b) for n, b in tiles.items()):
            found.append(cfg)
    return found


def _tuned(which: str, call, q, k, base, shape: tuple, found: list, run: Callable) -> Any:
    path = tune_file(call.modules, q.device)
    key = shape_class(which, base, shape, q.shape[2], k.shape[2], call.options)
    table = _winners(path, q.device)
    known = table.get(key)
    if known is not None:
        cfg = _from_fields(base, known)
        if cfg in found:
            return cfg
    t0 = time.perf_counter()
    best = fastest(found, run)
    cache._debug("autotune %s %s: %d configs in %.1f s -> %s", which, call.lowered.key[:16],
                 len(found), time.perf_counter() - t0, best)  # fmt: skip
    if best is None:  # nothing ran: the launch shrinks or reports as without tuning
        return base
    _record(path, q.device, key, best)
    return best


def fastest(found: list, run: Callable) -> Any:
    """The config of ``found`` whose ``run`` takes least time; one that raises is skipped
    (OutOfResources, a compile error).  Each runs once untimed first: compiles stay out of the
    timing and a failure shows before ``bench``."""
    best, best_ms = None, float("inf")
    for cfg in found:
        try:
            run(cfg)
            ms = bench(functools.partial(run, cfg), cfg)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is not a winner
            cache._debug("autotune: skip %s (%s: %s)", cfg, type(exc).__name__, exc)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best


def shape_class(which: str, base, shape: tuple, L: int, S: int, options: dict) -> str:
    """The winners' key: kernel, the launch's shape class, power-of-two buckets of L and S,
    the requested config and which of its fields the user fixed."""
    fixed = sorted(f.name for f in dataclasses.fields(base) if f.name in options)
    req = ",".join(f"{k}={v}" for k, v in dataclasses.asdict(base).items())
    parts = (which, ",".join(map(str, shape)), f"L{_bucket(L)}", f"S{_bucket(S)}", req,
             "fixed=" + ",".join(fixed))  # fmt: skip
    return "|".join(parts)


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _from_fields(base, fields: Any) -> Any:
    """A config of ``base``'s type from stored fields, or None if they do not fit it."""
    names = {f.name: type(getattr(base, f.name)) for f in dataclasses.fields(base)}
    if not isinstance(fields, dict) or set(fields) != set(names):
        return None
    if any(type(v) is not names[n] for n, v in fields.items()):
        return None
    return type(base)(**fields)


# -- the tune file --------------------------------------------------------------------------------


@functools.cache
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def tune_file(modules: dict, device: torch.device) -> Path:
    """Next to the kernel: the directory its module was imported from (the cache entry, or the
    private fallback when the cache directory is unwritable)."""
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in device_name(device))
    return Path(modules["fwd"].__file__).parent / f"tune-{safe}.json"


def _stamp(device: torch.device) -> dict:
    import triton

    return {"format": _FORMAT, "device": device_name(device), "torch": torch.__version__,
            "triton": triton.__version__}  # fmt: skip


def _winners(path: Path, device: torch.device) -> dict[str, dict]:
    with _lock:
        table = _tables.get(path)
        if table is None:
            table = _tables[path] = _load(path, device, warn=True)
        return table


def _load(path: Path, device: torch.device, warn: bool) -> dict[str, dict]:
    """Winners in ``path`` for this device and versions; {} when absent, damaged (warns) or
    written for another GPU or version (then retuned and overwritten)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        if warn:
            warnings.warn(f"attnforge: ignoring unreadable autotune file {path} ({exc}); "
                          "retuning", RuntimeWarning, stacklevel=2)  # fmt: skip
        return {}
    stamp = _stamp(device)
    ok = isinstance(data, dict) and isinstance(data.get("winners"), dict)
    if not ok:
        if warn:
            warnings.warn(f"attnforge: ignoring malformed autotune file {path}; retuning",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
        return {}
    if any(data.get(k) != v for k, v in stamp.items()):
        return {}  # another GPU, torch or triton: its timings say nothing here
    return dict(data["winners"])


def _record(path: Path, device: torch.device, key: str, cfg: Any) -> None:
    """Add a winner: merged with what other processes wrote meanwhile, published atomically."""
    with _lock:
        table = _winners(path, device)
        table[key] = dataclasses.asdict(cfg)
        merged = {**_load(path, device, warn=False), **table}
        table.update(merged)
        data = {**_stamp(device), "winners": merged}
        try:
            cache._atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode())
        except OSError as exc:  # the winner still serves this process
            warnings.warn(f"attnforge: cannot write autotune file {path}: {exc}",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
