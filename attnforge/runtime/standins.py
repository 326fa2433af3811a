"""Gluon's host objects on a warm start, without importing Gluon.

The warp-specialised forward (``fwd_ws.py``) is launched with Gluon host descriptors
(``triton.experimental.gluon.nvidia.hopper.TensorDescriptor``, each with the
``NVMMASharedLayout`` its shared-memory ring uses).  Importing Gluon costs 0.19 s on the H100
host (no bytecode there), more than the rest of a warm first call.  A launch-index hit
(``loader.Launcher``) needs neither: the key is text, and the launch reads only the
descriptor's base, shape, strides, block shape and padding.  So:

- the facts a launch needs of Gluon are kept in ``<cache root>/gluon-<identity>.json``, written by
  a process that imported Gluon: whether the forward can use it (``gluon_ws``), and per (block,
  dtype) the exact key text (``loader._plain``) of the descriptor class and of
  ``NVMMASharedLayout.get_default_for(block, dtype)``.  The identity is Triton's build (as in
  the launch index) plus the size and mtime of Gluon's files those facts come from;
- while Gluon is not imported, :func:`ws_descriptor_parts` returns stand-ins whose key text is
  that kept text, so a launch-index lookup is bit-identical to the real one.  Any other path
  (``Launcher``: an index miss, Triton's binder, a warm-up) converts a stand-in descriptor to the
  real one first (``real()``: Gluon's own layout, its text checked against the stand-in's); once
  Gluon is imported, real objects are made again.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import sys
import threading
from pathlib import Path

from . import loader

_GLUON_TD = "triton.experimental.gluon.nvidia.hopper"
# the Gluon files the kept facts come from (with Triton's build: the table's identity)
_GLUON_FILES = (
    "experimental/gluon/__init__.py",
    "experimental/gluon/language/__init__.py",
    "experimental/gluon/language/_layouts.py",
    "experimental/gluon/language/nvidia/hopper/__init__.py",
    "experimental/gluon/nvidia/hopper.py",
)
_lock = threading.Lock()
_state: dict = {}  # "path" -> the table's file, "table" -> its content (read once)


# -- the table --


def _identity() -> str | None:
    try:
        import triton
    except ImportError:  # pragma: no cover
        return None
    build = loader.triton_build()
    if build is None:
        return None
    root = Path(triton.__file__).parent
    stats = []
    for rel in _GLUON_FILES:
        try:
            st = (root / rel).stat()
            stats.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            stats.append(f"{rel}:missing")
    return "attnforge-gluon-standins 1\n" + build + "\n" + " ".join(stats)


def _table() -> dict:
    """The kept facts of this Triton build (read once per process); {} when none."""
    table = _state.get("table")
    if table is None:
        with _lock:
            table = _state.get("table")
            if table is None:
                table = _read()
                _state["table"] = table
    return table


def _path() -> Path | None:
    if "path" not in _state:
        from . import cache

        identity = _identity()
        _state["identity"] = identity
        _state["path"] = None if identity is None else (
            cache.cache_root() / f"gluon-{hashlib.sha256(identity.encode()).hexdigest()[:24]}.json"
        )  # fmt: skip
    return _state["path"]


def _read() -> dict:
    path = _path()
    if path is None:
        return {}
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(table, dict) or table.get("identity") != _state["identity"]:
        return {}  # another build's (a hash collision): not ours
    return table


def _update(change) -> None:
    """Apply ``change(table)`` to the table on disk (merged with what another process wrote)."""
    with _lock:
        path = _path()
        if path is None:
            return
        table = _read()
        table["identity"] = _state["identity"]
        change(table)
        _state["table"] = table
        try:
            from . import cache

            path.parent.mkdir(parents=True, exist_ok=True)
            cache._atomic_write(path, json.dumps(table, indent=1, sort_keys=True).encode())
        except OSError as exc:  # a speed-up only
            loader._debug("cannot keep Gluon facts in %s: %s", path, exc)


# -- whether the warp-specialised forward can use Gluon --


def gluon_ws() -> bool:
    """Triton's Gluon has warp_specialize and the Hopper modules (as kept, else imported)."""
    known = _table().get("ws")
    if isinstance(known, bool):
        return known
    ok = _import_ws()
    _update(lambda table: table.__setitem__("ws", ok))
    return ok


def _import_ws() -> bool:
    loader.import_gluon()  # (one thread at a time: see there)
    try:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia import hopper
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    # the calls fwd_ws.py.tmpl makes (Triton 3.5-3.6): Triton 3.9 keeps the TMA copy's name
    # only as a stub that raises ("call async_load instead"), so its parameters are checked
    names = ("fence_async_shared", "mbarrier", "tma", "warpgroup_mma", "warpgroup_mma_init",
             "warpgroup_mma_wait")  # fmt: skip
    if not hasattr(gl, "warp_specialize") or not all(hasattr(hopper, n) for n in names):
        return False
    copy = getattr(hopper.tma, "async_copy_global_to_shared", None)
    try:
        return copy is not None and "tensor_desc" in inspect.signature(copy).parameters
    except (TypeError, ValueError):
        return False


# -- descriptors --


def ws_descriptor_parts(block: tuple, dtype) -> tuple:
    """``(descriptor class, shared layout)`` of a warp-specialised forward descriptor of
    ``block`` over ``dtype`` data: Gluon's, or stand-ins while Gluon is not imported and the
    table knows their text."""
    return _parts(block, dtype, _GLUON_TD in sys.modules)


@functools.lru_cache(maxsize=64)
def _parts(block: tuple, dtype, gluon_loaded: bool) -> tuple:
    if not gluon_loaded:
        known = _table().get("layouts", {}).get(_layout_key(block, dtype))
        if isinstance(known, dict) and known.get("descriptor") and known.get("layout"):
            return _stand_in_class(known["descriptor"]), LayoutStandIn(known["layout"], block,
                                                                      dtype)  # fmt: skip
    cls, layout = real_parts(block, dtype)
    _remember(block, dtype, cls, layout)
    return cls, layout


@functools.lru_cache(maxsize=64)
def real_parts(block: tuple, dtype) -> tuple:
    """Gluon's descriptor class and ``NVMMASharedLayout.get_default_for(block, dtype)``."""
    import torch

    loader.import_gluon()
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor, gl.NVMMASharedLayout.get_default_for(list(block), gl_dtype)


def _layout_key(block: tuple, dtype) -> str:
    return f"{tuple(block)!r}|{dtype}"


def _texts(cls, layout) -> tuple | None:
    try:
        return loader._plain(cls)[len("type:") :], loader._plain(layout)
    except TypeError:  # no exact text: never a stand-in (nor indexed)
        return None


def _remember(block: tuple, dtype, cls, layout) -> None:
    texts = _texts(cls, layout)
    if texts is None:
        return
    entry = {"descriptor": texts[0], "layout": texts[1]}
    if _table().get("layouts", {}).get(_layout_key(block, dtype)) == entry:
        return
    _update(lambda table: table.setdefault("layouts", {}).__setitem__(
        _layout_key(block, dtype), entry))  # fmt: skip


class LayoutStandIn:
    """A Gluon shared layout as its key text (equal and hashed by it)."""

    __slots__ = ("text", "block", "dtype")
    _stand_in_layout = True

    def __init__(self, text: str, block: tuple, dtype):
        self.text, self.block, self.dtype = text, block, dtype

    def __eq__(self, other) -> bool:
        return type(other) is LayoutStandIn and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"LayoutStandIn({self.text})"


class DescriptorStandIn:
    """A Gluon host descriptor's fields (base, shape, strides, block_shape, padding, layout: a
    :class:`LayoutStandIn`); its class keys as the Gluon class (``_stand_in_for``).  The launch
    reads nothing else (``round_f32_to_tf32``: the dataclass default of Triton >= 3.7)."""

    _stand_in_for: str | None = None
    round_f32_to_tf32 = False

    def real(self):
        """The Gluon descriptor this one stands for (imports Gluon)."""
        stand_in = self.layout
        cls, layout = real_parts(stand_in.block, stand_in.dtype)
        if _texts(cls, layout) != (self._stand_in_for, stand_in.text):
            # a table that does not match this Triton: nothing launched on it (its text found
            # no record, or the record of the same text); keep the right facts from now on
            loader._debug("Gluon stand-in %s is stale: keeping the real layout", stand_in.text)
            _remember(stand_in.block, stand_in.dtype, cls, layout)
            _parts.cache_clear()
        d = cls.__new__(cls)
        d.__dict__.update(self.__dict__, layout=layout)
        return d

    def __repr__(self) -> str:
        return f"DescriptorStandIn({self._stand_in_for}, {self.__dict__})"


@functools.cache
def _stand_in_class(text: str) -> type:
    return type("TensorDescriptor", (DescriptorStandIn,), {"_stand_in_for": text})
