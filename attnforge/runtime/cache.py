"""Kernel cache: an in-memory map in front of a content-keyed disk cache.

Layout under ``ATTNFORGE_CACHE_DIR`` (default ``~/.cache/attnforge``)::

    <device_kind>-<fingerprint>/<key>/fwd.py      generated forward kernel
                                      bwd.py      generated backward kernel (when present)
                                      ir.txt      the IR it was generated from
                                      meta.json   the kernel ABI (codegen's)
                                      entry.json  sha256 of every file above; written last
                                      bin/        GPU binaries Triton compiled for these kernels
                                                  (``BinaryStore``; own manifests and checksums)

``key`` is the codegen's content key (``Lowered.key``: IR structure, never names or captured
values). The fingerprint hashes attnforge's own code generator (``codegen/**/*.py``, its templates,
``dsl/ir.py``) and the torch and triton versions, and the directory name carries the device kind
(``cpu-interp``, ``cuda-sm90``...), so editing the compiler or upgrading triton never serves a stale
kernel. Every file is published with temp file + fsync + ``os.replace`` and ``entry.json`` goes
last, so a reader never uses a half-written entry and concurrent writers (who write identical
bytes) cannot corrupt each other. A damaged entry warns and is rebuilt; an unwritable directory
warns once and the kernels are built in a private temp directory instead.

``lowered.files`` is only read on a miss: a codegen whose ``Lowered`` computes ``files`` lazily
skips code generation entirely on a disk hit (``cache_info().codegen_seconds`` measures it).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from . import knobs, loader, triton_key

log = logging.getLogger("attnforge")

_ENTRY = "entry.json"
_KERNELS = ("fwd", "bwd")
_BINARIES = "bin"  # compiled GPU binaries of the entry's kernels (BinaryStore)
_MANIFEST = "manifest.json"
_FORMAT = 1


class CacheInfo(NamedTuple):
    hits: int  # served from memory
    misses: int  # not in memory (then found on disk, or compiled)
    disk_hits: int  # misses served from disk
    compiles: int  # misses that ran codegen and wrote a new entry
    entries: int  # kernels loaded in memory
    disk_entries: int  # complete entries on disk for the current compiler fingerprint
    codegen_seconds: float  # total time producing sources (``lowered.files``)
    import_seconds: float  # total time importing kernel modules
    cache_dir: str
    binary_loads: int = 0  # GPU kernels loaded from binaries kept in an entry (no Triton compile)
    binary_saves: int = 0  # GPU binaries copied into an entry


class _Stats:
    def __init__(self) -> None:
        self.hits = self.misses = self.disk_hits = self.compiles = 0
        self.binary_loads = self.binary_saves = 0
        self.codegen_seconds = self.import_seconds = 0.0


_lock = threading.RLock()
_memory: dict[tuple[str, str], dict[str, ModuleType]] = {}
_stats = _Stats()
_warned_dirs: set[str] = set()
_private_dir: Path | None = None


# -- public --


def load_kernels(lowered: Any, device_kind: str) -> dict[str, ModuleType]:
    """Modules ``{"fwd": ..., "bwd": ...}`` ("bwd" only when generated) for ``lowered``.

    ``lowered`` needs ``.key`` (hex content key) and ``.files`` (name -> text, with "fwd.py").
    ``device_kind`` comes from ``loader.device_kind(tensor.device)``; kinds ending in
    ``-interp`` get Triton-interpreter modules.
    """
    mem_key = (device_kind, lowered.key)
    with _lock:
        modules = _memory.get(mem_key)
        if modules is not None:
            _stats.hits += 1
            _debug("hit %s %s", device_kind, lowered.key[:16])
            return modules
        _stats.misses += 1
        modules = _load_or_build(lowered, device_kind)
        _memory[mem_key] = modules
        return modules


def load_ws(modules: dict[str, ModuleType]) -> ModuleType:
    """The warp-specialised forward module (``fwd_ws.py``, Gluon) of the entry ``modules`` came
    from, imported on its first use: importing Gluon costs time and only sm_90 launches need it."""
    module = modules.get("fwd_ws")
    if module is None:
        fwd = modules["fwd"]
        with _lock:
            module = modules.get("fwd_ws")
            if module is None:
                t0 = time.perf_counter()
                path = Path(fwd.__file__).with_name("fwd_ws.py")
                module = _import_kernel(path, fwd.__name__ + "_ws", fwd.__attnforge_key__, False)
                modules["fwd_ws"] = module
                _stats.import_seconds += time.perf_counter() - t0
    return module


def cache_info() -> CacheInfo:
    """Counters and sizes of the kernel cache (``af.cache_info()``)."""
    with _lock:
        return CacheInfo(
            hits=_stats.hits,
            misses=_stats.misses,
            disk_hits=_stats.disk_hits,
            compiles=_stats.compiles,
            entries=len(_memory),
            disk_entries=_count_disk_entries(),
            codegen_seconds=_stats.codegen_seconds,
            import_seconds=_stats.import_seconds,
            cache_dir=str(cache_root()),
            binary_loads=_stats.binary_loads,
            binary_saves=_stats.binary_saves,
        )


def cache_clear(disk: bool = False) -> None:
    """Forget loaded kernels and reset the counters; ``disk=True`` also deletes this compiler's
    entries (every device kind) from the cache directory."""
    global _stats
    with _lock:
        _memory.clear()
        _stats = _Stats()
        if disk:
            for fp_dir in _fingerprint_dirs():
                shutil.rmtree(fp_dir, ignore_errors=True)


def cache_root() -> Path:
    if knobs.get("ATTNFORGE_DISABLE_CACHE"):
        return _private_root()
    return knobs.get("ATTNFORGE_CACHE_DIR")


def entry_dir(key: str, device_kind: str) -> Path:
    """Where the entry for ``key`` lives (or would live) on disk."""
    return cache_root() / fingerprint_dir_name(device_kind) / key


@functools.cache
def compiler_fingerprint() -> str:
    """Hash of attnforge's code generator sources and templates and the torch/triton versions."""
    import torch
    import triton

    pkg = Path(__file__).resolve().parent.parent
    files = sorted((pkg / "codegen").rglob("*.py")) + sorted((pkg / "codegen").rglob("*.tmpl"))
    files.append(pkg / "dsl" / "ir.py")
    h = hashlib.sha256(
        f"format={_FORMAT};torch={torch.__version__};triton={triton.__version__}".encode()
    )
    for path in files:
        h.update(str(path.relative_to(pkg)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def fingerprint_dir_name(device_kind: str) -> str:
    safe = "".join(c if c.isalnum() or c == "-" else "_" for c in device_kind)
    return f"{safe}-{compiler_fingerprint()}"


def source_of(module: ModuleType) -> str:
    """The exact text of a loaded kernel module (the file it was imported from)."""
    return Path(module.__file__).read_text()


# -- lookup and build --


def _load_or_build(lowered: Any, device_kind: str) -> dict[str, ModuleType]:
    root = cache_root()
    directory = root / fingerprint_dir_name(device_kind) / lowered.key
    modules = _try_disk(directory, lowered.key, device_kind)
    if modules is not None:
        _stats.disk_hits += 1
        _dump(directory)
        return modules
    compiled = not loader.is_interpreted(device_kind)
    if compiled:  # a new entry: its kernels compile soon
        triton_key.start()  # Triton's build hash, meanwhile
    files = _generate(lowered)
    if compiled and loader._direct_enabled():
        from . import compile_pool

        compile_pool.prestart()  # helpers start now
    directory = _publish(directory, files, lowered.key, device_kind)
    try:
        modules = _import_entry(directory, lowered.key, device_kind)
    except Exception:
        _discard(directory / _ENTRY)  # fresh source that does not import: never serve it later
        raise
    _stats.compiles += 1
    _dump(directory)
    return modules


def _try_disk(directory: Path, key: str, device_kind: str) -> dict[str, ModuleType] | None:
    """Modules from a complete, intact entry; None when absent. Damage warns and returns None."""
    marker = directory / _ENTRY
    if not marker.exists():
        return None  # absent, or a writer has not finished: build it ourselves
    try:
        _verify(directory, marker)
        modules = _import_entry(directory, key, device_kind)
    except Exception as exc:  # any damage: rebuild rather than serve it
        warnings.warn(
            f"attnforge: corrupt kernel cache entry {directory} ({type(exc).__name__}: {exc}); "
            "rebuilding it",
            RuntimeWarning,
            stacklevel=4,
        )
        _discard(marker)
        return None
    _debug("disk hit %s %s (%s)", device_kind, key[:16], directory)
    return modules


def _verify(directory: Path, marker: Path) -> None:
    entry = json.loads(marker.read_text())
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
        raise ValueError(f"{marker} has no file table")
    if "fwd.py" not in entry["files"]:
        raise ValueError(f"{marker} lists no fwd.py")
    for name, digest in entry["files"].items():
        path = directory / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing")
        if _sha256(path.read_bytes()) != digest:
            raise ValueError(f"{path} does not match its checksum")


def _generate(lowered: Any) -> dict[str, str]:
    t0 = time.perf_counter()
    files = dict(lowered.files)
    dt = time.perf_counter() - t0
    _stats.codegen_seconds += dt
    if "fwd.py" not in files:
        raise ValueError(
            f"lowered kernel {lowered.key[:16]} has no fwd.py (files: {sorted(files)})"
        )
    _debug("miss %s: codegen %.1f ms", lowered.key[:16], dt * 1e3)
    return files


def _publish(directory: Path, files: dict[str, str], key: str, device_kind: str) -> Path:
    """Write the entry; on an unwritable cache directory fall back to a private temp dir."""
    try:
        _write_entry(directory, files)
        return directory
    except OSError as exc:
        root = str(cache_root())
        if root not in _warned_dirs:
            _warned_dirs.add(root)
            warnings.warn(
                f"attnforge: kernel cache directory {root} is not writable ({exc}); compiling in "
                "memory for this process. Set ATTNFORGE_CACHE_DIR to a writable directory.",
                RuntimeWarning,
                stacklevel=5,
            )
        fallback = _private_root() / fingerprint_dir_name(device_kind) / key
        _write_entry(fallback, files)
        return fallback


def _write_entry(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name in sorted(files):
        data = files[name].encode()
        _atomic_write(directory / name, data)
        digests[name] = _sha256(data)
    entry = {"format": _FORMAT, "files": digests, "fingerprint": compiler_fingerprint()}
    _atomic_write(directory / _ENTRY, json.dumps(entry, indent=1, sort_keys=True).encode())


def _import_entry(directory: Path, key: str, device_kind: str) -> dict[str, ModuleType]:
    interpret = loader.is_interpreted(device_kind)
    modules = {}
    t0 = time.perf_counter()
    for kind in _KERNELS:
        path = directory / f"{kind}.py"
        if kind == "fwd" or path.exists():
            name = loader.module_name(key, kind, device_kind)
            modules[kind] = _import_kernel(path, name, key, interpret)
    dt = time.perf_counter() - t0
    _stats.import_seconds += dt
    _debug("import %s %s: %.1f ms", device_kind, key[:16], dt * 1e3)
    return modules


def _import_kernel(path: Path, name: str, key: str, interpret: bool) -> ModuleType:
    """One kernel module of an entry (``<kind>.py``), with direct launchers on the GPU: stand-ins
    where an earlier process kept them (executed on first need, ``loader.load_stand_ins``)."""
    if interpret:
        module = loader.load_module(path, name, interpret)
    else:  # GPU: direct launches, binaries kept in this entry under bin/<kind>
        store = BinaryStore(path.parent / _BINARIES / path.stem)
        module = loader.load_stand_ins(path, name, store)
        if module is None:
            module = loader.load_module(path, name, interpret)
            loader.install_launchers(module, store)
    module.__attnforge_key__ = key
    return module


# -- compiled GPU binaries kept in an entry --


class BinaryStore:
    """Triton's compiled artefacts (metadata ``.json`` and ``.cubin``) of one kernel module,
    kept inside its cache entry so a new process can load them without ``triton.compile``::

        <entry>/bin/<fwd|bwd>/<sha256(key)[:32]>/<name>.json, <name>.cubin, manifest.json

    ``key`` is built by ``loader.Launcher`` (Triton's kernel key, the kernel source's sha256,
    triton build, target, options, compile-affecting environment); the manifest repeats it in
    full (a hash collision is a miss) with a sha256 per file, and is written last. A damaged
    or mismatching binary warns, is discarded and Triton compiles instead.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def _dir(self, key: str) -> Path:
        return self.root / _sha256(key.encode())[:32]

    def has(self, key: str) -> bool:
        """Something complete is kept under ``key``'s directory (not verified: see get)."""
        return (self._dir(key) / _MANIFEST).exists()

    def get(self, key: str, count: bool = True) -> tuple[dict[str, Path], dict] | None:
        """``({file name: path}, meta)`` of a complete, intact binary for ``key``; else None.
        ``count=False``: not a binary (a launch-index record), not in ``cache_info()``."""
        directory = self._dir(key)
        marker = directory / _MANIFEST
        try:
            text = marker.read_text()
        except OSError:
            return None
        try:
            manifest = json.loads(text)
            if manifest.get("format") != _FORMAT or manifest.get("key") != key:
                return None  # another build's binary (or a collision): not ours to use
            paths = {}
            for name, digest in manifest["files"].items():
                path = directory / name
                if _sha256(path.read_bytes()) != digest:
                    raise ValueError(f"{path} does not match its checksum")
                paths[name] = path
            if not any(n.endswith(".json") for n in paths):
                raise ValueError("no kernel metadata (.json)")
            meta = manifest["meta"]
        except Exception as exc:  # noqa: BLE001 - damage of any kind: compile instead
            warnings.warn(
                f"attnforge: corrupt compiled binary {directory} ({type(exc).__name__}: {exc}); "
                "recompiling it",
                RuntimeWarning,
                stacklevel=2,
            )
            _discard(marker)
            return None
        if count:
            with _lock:
                _stats.binary_loads += 1
        _debug("binary hit %s", directory)
        return paths, meta

    def put(self, key: str, files: dict[str, bytes], meta: dict, count: bool = True) -> bool:
        """Keep ``files`` for ``key``; False (never an exception) when it cannot be written."""
        directory = self._dir(key)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            digests = {}
            for name, data in sorted(files.items()):
                if "/" in name or name.startswith(".") or name == _MANIFEST:
                    raise ValueError(f"bad binary file name {name!r}")
                _atomic_write(directory / name, data)
                digests[name] = _sha256(data)
            manifest = {"format": _FORMAT, "key": key, "files": digests, "meta": meta}
            _atomic_write(directory / _MANIFEST, json.dumps(manifest, indent=1).encode())
        except (OSError, ValueError) as exc:
            _debug("cannot keep binary in %s: %s", directory, exc)
            return False
        if count:
            with _lock:
                _stats.binary_saves += 1
        _debug("binary kept %s", directory)
        return True

    def discard(self, key: str) -> None:
        _discard(self._dir(key) / _MANIFEST)


# -- files --


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _discard(marker: Path) -> None:
    with contextlib.suppress(OSError):
        marker.unlink()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dump(directory: Path) -> None:
    """ATTNFORGE_DUMP_DIR: copy the entry's files (not the marker) to ``<dump>/<key>/``."""
    dump = knobs.get("ATTNFORGE_DUMP_DIR")
    if dump is None:
        return
    target = Path(dump) / directory.name
    try:
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.name != _ENTRY and not path.name.startswith("."):
                _atomic_write(target / path.name, path.read_bytes())
    except OSError as exc:
        warnings.warn(
            f"attnforge: cannot dump kernels to {target}: {exc}", RuntimeWarning, stacklevel=5
        )
        return
    _debug("dumped %s", target)


def _private_root() -> Path:
    global _private_dir
    if _private_dir is None:
        _private_dir = Path(tempfile.mkdtemp(prefix="attnforge-kernels-"))
        atexit.register(shutil.rmtree, _private_dir, True)
    return _private_dir


def _fingerprint_dirs() -> list[Path]:
    root = cache_root()
    suffix = "-" + compiler_fingerprint()
    try:
        return [p for p in root.iterdir() if p.is_dir() and p.name.endswith(suffix)]
    except OSError:
        return []


def _count_disk_entries() -> int:
    return sum(
        1
        for fp_dir in _fingerprint_dirs()
        for entry in fp_dir.iterdir()
        if (entry / _ENTRY).exists()
    )


def _debug(msg: str, *args: Any) -> None:
    # on every attention call (memory hits): skip the knob's parsing while it is unset
    if os.environ.get("ATTNFORGE_DEBUG") is None or not knobs.get("ATTNFORGE_DEBUG"):
        return
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[attnforge] %(message)s"))
        log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.DEBUG:
        log.setLevel(logging.DEBUG)
    log.debug(msg, *args)
