"""Triton's build hash, ``triton.runtime.cache.triton_key()``, off the first compile's path.

Every ``triton.compile`` puts ``triton_key()`` in its cache key: a sha256 of Triton's compiler,
backend and language sources and of all of ``libtriton.so`` (415 MB), computed once per process
(0.33 s on the 2-core box, ~0.45 s on the H100 host).  The first compile of a process pays it, on
the critical path of a new variant's first call; and the forward and the backward's two compiles
start together, so each computes it (its ``lru_cache`` does not lock).

Here, when a new cache entry for a GPU is built (compiles are coming), :func:`start` gets the
value on a daemon thread while the variant is written, imported and bound, and :func:`wait`
(called by ``loader`` before it lets Triton compile) joins that thread:

- the value is kept in a file under Triton's own cache directory, named by the identity of
  every file ``triton_key()`` reads (path, size, mtime, inode: one ``stat`` each, ~3 ms): a
  reinstall or an edit of any of them changes the name, so a kept value is never stale.  When
  one is found, ``triton.runtime.cache.triton_key`` (the name Triton's ``get_cache_key`` calls)
  is replaced by a function returning it: the same string, without hashing;
- otherwise Triton's own function computes it (filling its own cache) and the value is kept.

Triton's function is never replaced under ``ATTNFORGE_DIRECT_LAUNCH=0`` (Triton's own compile
path; the value is still computed ahead), nor once it has computed the value in this process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from pathlib import Path

_FORMAT = "attnforge-triton-key 1"
_lock = threading.Lock()
_thread: threading.Thread | None = None


def start() -> None:
    """Get ``triton_key()``'s value on a background thread (once per process; returns at once)."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_quiet, name="attnforge-triton-key", daemon=True)
            _thread.start()


def wait() -> None:
    """Return once ``triton_key()`` answers without hashing (starts the work if nobody has)."""
    start()
    thread = _thread
    if thread is not threading.current_thread():
        thread.join()


def _quiet() -> None:
    try:
        _ensure()
    except Exception:  # noqa: BLE001 - a speed-up only: the compile hashes (or raises) itself
        pass


def _ensure(tcache=None, replace: bool | None = None) -> None:
    if tcache is None:
        try:
            from triton.runtime import cache as tcache
        except ImportError:  # pragma: no cover - no triton
            return
    current = tcache.triton_key
    if getattr(current, "__attnforge__", False):
        return
    info = getattr(current, "cache_info", None)
    if info is not None and info().currsize:  # computed in this process already
        return
    try:
        path, identity = _memo_path(tcache)
    except Exception:  # noqa: BLE001 - unusual install: Triton's function as ever
        current()
        return
    if replace is None:
        replace = _replace_allowed()
    value = _read(path, identity) if replace else None
    if value is not None:
        _install(tcache, value)
        return
    value = current()  # Triton's own: hashes once, fills its lru_cache
    _write(path, identity, value)


def _replace_allowed() -> bool:
    from . import loader

    return loader._direct_enabled()


def _files(root: Path) -> list[Path]:
    """Every file ``triton_key()`` reads (and a few more): ``runtime/cache.py``, the modules
    under ``compiler/``, ``backends/`` and ``language/``, and ``_C/libtriton*``."""
    out = [root / "runtime" / "cache.py"]
    for sub in ("compiler", "backends", "language"):
        for d, dirs, names in os.walk(root / sub):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__")
            out += [Path(d) / n for n in sorted(names) if n.endswith((".py", ".so", ".pyd"))]
    out += sorted(p for p in (root / "_C").iterdir() if p.name.startswith("libtriton"))
    return out


def _memo_path(tcache) -> tuple[Path, str]:
    import triton

    root = Path(tcache.__file__).resolve().parent.parent
    lines = [_FORMAT, triton.__version__, str(root)]
    for p in _files(root):
        st = p.stat()
        lines.append(f"{p} {st.st_size} {st.st_mtime_ns} {st.st_ino}")
    identity = "\n".join(lines)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:32]
    return _cache_dir() / "attnforge-triton-key" / f"{digest}.json", identity


def _cache_dir() -> Path:
    try:
        from triton import knobs

        return Path(knobs.cache.dir)
    except (ImportError, AttributeError):  # triton < 3.4
        from triton.runtime.cache import default_cache_dir

        return Path(default_cache_dir())


def _read(path: Path, identity: str) -> str | None:
    try:
        rec = json.loads(path.read_text())
        value = rec["value"]
        ok = rec["identity"] == identity and rec["sha256"] == _sha(value)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if ok and isinstance(value, str) else None


def _write(path: Path, identity: str, value: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps({"identity": identity, "value": value, "sha256": _sha(value)}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: computed again by the next process, as without this module


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _install(tcache, value: str) -> None:
    @functools.lru_cache
    def triton_key() -> str:
        return value

    triton_key.__attnforge__ = True
    tcache.triton_key = triton_key
