"""Every ``ATTNFORGE_*`` environment variable, declared once.

Values are read from ``os.environ`` at call time (never cached at import), so tests can
``monkeypatch.setenv`` and a long-lived process picks up changes::

    from attnforge.runtime import knobs
    if knobs.get("ATTNFORGE_DEBUG"): ...
    knobs.debug                      # same thing: attribute name = lower-case suffix
    print(knobs.describe())          # table of all knobs (``python -m attnforge knobs``)

To add a knob, add one ``_declare(...)`` line below.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse_bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{name}={text!r} is not a boolean: use 1/0 (or true/false, yes/no, on/off)")


def _parse_path(name: str, text: str) -> Path | None:
    text = text.strip()
    return Path(text).expanduser() if text else None


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer: set it to a whole number") from None


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "bool": _parse_bool,
    "path": _parse_path,
    "int": _parse_int,
}


@dataclass(frozen=True)
class Knob:
    name: str
    type: str  # "bool" | "path" | "int"
    default: Any
    doc: str

    def get(self) -> Any:
        text = os.environ.get(self.name)
        if text is None:
            return self.default() if callable(self.default) else self.default
        return _PARSERS[self.type](self.name, text)

    def default_text(self) -> str:
        if callable(self.default):
            return str(self.default())
        return "unset" if self.default is None else str(self.default)


_REGISTRY: dict[str, Knob] = {}


def environ_get_fast(name: str):
    """A zero-argument ``os.environ.get(name)`` for reads on every launch: a plain dict lookup
    where ``os.environ`` keeps one (CPython on POSIX: ``_data`` with encoded keys, through which
    every ``os.environ`` read and write goes, so the answer is the same; ~1 µs less a read)."""
    fast = _environ_data(name)
    if fast is None:
        env = os.environ
        return lambda: env.get(name)
    data, key, decode = fast

    def get() -> str | None:
        raw = data.get(key)
        return None if raw is None else decode(raw)

    return get


def _environ_data(name: str):
    """``(os.environ's dict, name's key in it, decode)``, or None where it keeps none."""
    env = os.environ
    data, encode, decode = (getattr(env, n, None) for n in ("_data", "encodekey", "decodevalue"))
    if type(data) is not dict or encode is None or decode is None:
        return None
    return data, encode(name), decode


def reader(name: str) -> Callable[[], Any]:
    """A zero-argument ``get(name)`` for knobs read on every call: one dict lookup in
    ``os.environ``'s own dict (as :func:`environ_get_fast`), and the parsed value remembered
    per raw text (a changed variable is parsed anew; a bad value raises, as ``get`` does)."""
    knob = _REGISTRY[name]
    parse = _PARSERS[knob.type]
    seen: dict = {}
    fast = _environ_data(name)
    if fast is None or callable(knob.default):
        return knob.get
    data, key, decode = fast
    default = knob.default

    def read() -> Any:
        raw = data.get(key)
        if raw is None:
            return default
        value = seen.get(raw, seen)
        if value is seen:
            value = parse(name, decode(raw))
            if len(seen) >= 16:
                seen.clear()
            seen[raw] = value
        return value

    return read


def _declare(name: str, type: str, default: Any, doc: str) -> Knob:
    if not name.startswith("ATTNFORGE_"):
        raise ValueError(f"knob {name!r} must start with ATTNFORGE_")
    if type not in _PARSERS:
        raise ValueError(f"knob {name}: unknown type {type!r}, expected one of {sorted(_PARSERS)}")
    knob = Knob(name, type, default, doc)
    _REGISTRY[name] = knob
    return knob


def _default_cache_dir() -> Path:
    return Path("~/.cache/attnforge").expanduser()


# -- the knobs --
_declare(
    "ATTNFORGE_DEBUG",
    "bool",
    False,
    "log cache hits/misses and compile timings to the 'attnforge' logger (DEBUG level)",
)
_declare("ATTNFORGE_CACHE_DIR", "path", _default_cache_dir, "root of the on-disk kernel cache")
_declare(
    "ATTNFORGE_DISABLE_CACHE",
    "bool",
    False,
    "keep kernels in memory only (a private temp dir); never read or write the disk cache",
)
_declare(
    "ATTNFORGE_DUMP_DIR",
    "path",
    None,
    "write ir.txt, fwd.py, bwd.py and meta.json of every kernel loaded to <dir>/<key>/",
)
_declare(
    "ATTNFORGE_PARALLEL_COMPILE",
    "bool",
    True,
    "compile the backward's GPU kernels concurrently on their first call (Triton's ptxas and C++ "
    "passes overlap); 0 compiles them one by one at launch",
)
_declare(
    "ATTNFORGE_COMPILE_WORKERS",
    "int",
    3,
    "GPU: helper processes that compile a new variant's kernels (Triton's C++ passes hold the "
    "GIL, so threads of one process barely overlap; H100 host: cold first call 1.77 s with 3 "
    "vs 2.18 s without); 0 compiles in this process",
)
_declare(
    "ATTNFORGE_DIRECT_LAUNCH",
    "bool",
    True,
    "GPU: launch a kernel already run with the same argument specialisation directly (skipping "
    "Triton's per-call binding), and load binaries kept in the kernel cache entry instead of "
    "calling triton.compile in a new process; 0 uses Triton's launch and compile path",
)
_declare(
    "ATTNFORGE_LAUNCH_INDEX",
    "bool",
    True,
    "GPU (with ATTNFORGE_DIRECT_LAUNCH): index kept binaries by attnforge's launch key, so a new "
    "process launches them without Triton's argument binder; 0 finds them through Triton's path",
)
_declare(
    "ATTNFORGE_STAND_INS",
    "bool",
    True,
    "GPU (with ATTNFORGE_LAUNCH_INDEX): a warm process registers a kernel module by stand-ins and "
    "executes it (and imports Gluon) only when a launch misses the index; 0 always executes it",
)
_declare(
    "ATTNFORGE_FAST_TMA_LAUNCH",
    "bool",
    True,
    "GPU (with ATTNFORGE_DIRECT_LAUNCH): a direct launch of a kernel with tensor-descriptor "
    "arguments reuses each descriptor's encoded TMA map (keyed by address, dtype, shape, "
    "strides, block, padding) and calls Triton's C launcher with the expanded arguments; 0 "
    "leaves the expansion to Triton's launcher at every launch",
)
_declare(
    "ATTNFORGE_AUTOTUNE",
    "bool",
    False,
    "compiled CUDA kernels: time a few tile configs at the first launch of each kernel and shape "
    "class and keep the fastest, cached as tune-<GPU>.json in the kernel's cache entry (read, "
    "not retimed, by later processes); 0 uses the heuristic configs",
)
_declare(
    "ATTNFORGE_FWD_WS",
    "bool",
    True,
    "sm_90, 16-bit, head dim 64 or 128: run the forward as the warp-specialised Gluon kernel "
    "(fwd_ws.py; each warpgroup its own partition); 0 uses the Triton kernel (fwd.py)",
)
_declare(
    "ATTNFORGE_INTERPRET",
    "bool",
    False,
    "run kernels under the Triton interpreter even for CUDA tensors (debugging)",
)


def _lookup(name: str) -> Knob:
    full = name if name.startswith("ATTNFORGE_") else "ATTNFORGE_" + name.upper()
    try:
        return _REGISTRY[full]
    except KeyError:
        raise KeyError(f"unknown knob {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def get(name: str) -> Any:
    """Current value of knob ``name`` ("ATTNFORGE_DEBUG" or "DEBUG"), parsed to its type."""
    knob = _REGISTRY.get(name)  # the full name: no string work (read on every attention call)
    return (knob or _lookup(name)).get()


def all_knobs() -> list[Knob]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def describe() -> str:
    """One line per knob: name, type, default, current value when set, doc."""
    lines = []
    for knob in all_knobs():
        now = os.environ.get(knob.name)
        cur = f" (now {now!r})" if now is not None else ""
        lines.append(
            f"{knob.name:<24} {knob.type:<5} default {knob.default_text()}{cur}\n    {knob.doc}"
        )
    return "\n".join(lines)


def __getattr__(attr: str) -> Any:
    # ``knobs.debug`` == ``knobs.get("ATTNFORGE_DEBUG")``, read at access time.
    full = "ATTNFORGE_" + attr.upper()
    if full in _REGISTRY:
        return _REGISTRY[full].get()
    raise AttributeError(f"module 'attnforge.runtime.knobs' has no attribute {attr!r}")
