"""Import a generated kernel ``.py`` file as a module, compiled or under the Triton interpreter.

Kernels are imported from real files (not ``exec`` of a string) so that Triton can read their
source (``@triton.jit`` needs ``inspect.getsource``) and tracebacks point at lines a user can open.

``@triton.jit`` decides *when the decorator runs* whether a function is compiled
(``JITFunction``) or interpreted (``InterpretedFunction``):

- triton 3.2/3.3: ``os.getenv("TRITON_INTERPRET", "0") == "1"``;
- triton >= 3.4: ``triton.knobs.runtime.interpret``, which reads the same variable unless a
  Python-level override was assigned (``triton.knobs.runtime.interpret = True``).

So ``load_module(path, name, interpret=...)`` sets both for the duration of the import and
restores them afterwards. Interpreted (CPU tensors) and compiled (CUDA tensors) modules of the
same kernel coexist in one process under distinct module names.

One more wrinkle: triton's own library functions (``tl.cdiv``, ``tl.max``, ``tl.sum``,
``tl.sigmoid``...) are ``@jit`` functions built once, when ``triton`` is first imported. If that
happened without ``TRITON_INTERPRET=1`` they are compiled-mode functions that refuse to be called
from interpreted code. Interpreted kernels loaded here therefore launch with calls to compiled-mode
jit functions routed to interpreted twins (see ``_jit_calls_interpreted``); nothing changes when
triton was imported in interpreter mode (the usual CPU-only setup).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import linecache
import operator
import os
import pickle
import sys
import threading
from pathlib import Path
from types import ModuleType

from . import knobs as _knobs
from . import tma_launch as _tma
from . import triton_key

_ENV = "TRITON_INTERPRET"
# The environment is process-global: serialize imports that flip it.
_LOCK = threading.RLock()
_MISSING = object()


def _runtime_knobs():
    """triton >= 3.4 keeps a Python-level override on ``triton.knobs.runtime``; older: None."""
    try:
        from triton import knobs
    except ImportError:
        return None
    return getattr(knobs, "runtime", None)


@contextlib.contextmanager
def triton_interpret(enabled: bool):
    """Make ``@triton.jit`` build interpreted (True) or compiled (False) functions inside."""
    with _LOCK:
        old_env = os.environ.get(_ENV)
        runtime = _runtime_knobs()
        old_override = _MISSING
        if runtime is not None and "interpret" in vars(runtime):
            old_override = vars(runtime)["interpret"]
        os.environ[_ENV] = "1" if enabled else "0"
        if old_override is not _MISSING:
            vars(runtime)["interpret"] = enabled
        try:
            yield
        finally:
            if old_env is None:
                os.environ.pop(_ENV, None)
            else:
                os.environ[_ENV] = old_env
            if old_override is not _MISSING:
                vars(runtime)["interpret"] = old_override


def module_name(key: str, kind: str, device_kind: str) -> str:
    """A unique, importable-looking name: one module per (kernel, fwd/bwd, device kind)."""
    safe = "".join(c if c.isalnum() else "_" for c in device_kind)
    return f"attnforge._kernels.{safe}.k{key[:24]}.{kind}"


def load_module(path: str | os.PathLike, name: str, interpret: bool) -> ModuleType:
    """Execute the file at ``path`` as a fresh module ``name`` (registered in ``sys.modules``).

    Raises whatever the import raises (SyntaxError, ImportError, ...) after unregistering the
    half-built module; the cache turns that into "corrupt entry, rebuild".
    """
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import a kernel module from {path}")
    module = importlib.util.module_from_spec(spec)
    # A rebuilt file may reuse a path whose old text is still in linecache (triton and
    # tracebacks read source through it).
    linecache.checkcache(str(path))
    previous = sys.modules.get(name, _MISSING)
    sys.modules[name] = module
    try:
        if not interpret and path.name in _GLUON_KERNEL_FILES:
            import_gluon()  # before the file's own Gluon imports (one thread at a time)
        with triton_interpret(interpret):
            spec.loader.exec_module(module)
        _check_jit_kind(module, interpret, path)
        if interpret:
            _make_launches_self_contained(module)
    except BaseException:
        if previous is _MISSING:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        raise
    return module


def _check_jit_kind(module: ModuleType, interpret: bool, path: Path) -> None:
    """Fail loudly if a triton version decides interpretation some other way."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # pragma: no cover - very old / very new triton
        return
    for attr, value in vars(module).items():
        is_interp = isinstance(value, InterpretedFunction)
        is_jit = isinstance(value, JITFunction) and not is_interp
        if (is_interp and not interpret) or (is_jit and interpret):
            want = "interpreted" if interpret else "compiled"
            raise RuntimeError(
                f"{path}: kernel {attr!r} was not built {want}; this triton version does not "
                f"honour {_ENV} at decoration time. Please report it with your triton version."
            )


# -- interpreted kernels in a process whose triton library was built compiled --

_TWINS: dict = {}


def _interpreted_twin(jit_fn):
    from triton.runtime.interpreter import InterpretedFunction

    # Keyed by id: hashing a JITFunction computes its cache key, which fails mid-interpretation.
    entry = _TWINS.get(id(jit_fn))
    if entry is None or entry[0] is not jit_fn:
        entry = _TWINS[id(jit_fn)] = (jit_fn, InterpretedFunction(jit_fn.fn))
    return entry[1]


@contextlib.contextmanager
def _jit_calls_interpreted():
    """While an interpreted kernel runs, a call to a compiled-mode ``@jit`` function (triton's
    library, tensor member functions) runs its interpreted twin instead of raising."""
    from triton.language.core import tensor
    from triton.runtime.jit import JITFunction

    original = JITFunction.__dict__.get("__call__")

    def call(self, *args, **kwargs):
        return _interpreted_twin(self)(*args, **kwargs)

    # Member functions (``x.sum()``) are stored on the tensor class as bare JITFunctions, which
    # do not bind ``self``; plain functions do.
    members = {n: m for n, m in vars(tensor).items() if isinstance(m, JITFunction)}
    JITFunction.__call__ = call
    for name, jit_fn in members.items():
        setattr(tensor, name, _as_method(jit_fn))
    try:
        yield
    finally:
        for name, jit_fn in members.items():
            setattr(tensor, name, jit_fn)
        if original is None:
            del JITFunction.__call__
        else:
            JITFunction.__call__ = original


def _as_method(jit_fn):
    def method(*args, **kwargs):
        return _interpreted_twin(jit_fn)(*args, **kwargs)

    return method


def _make_launches_self_contained(module: ModuleType) -> None:
    """Give every interpreted kernel of ``module`` a ``run`` that holds the lock (the interpreter
    keeps global state) and the library routing above, whatever the process's import order."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return
    cls = _self_contained_class(InterpretedFunction)
    for value in vars(module).values():
        for _ in range(8):  # through @triton.autotune / @triton.heuristics wrappers (``.fn``)
            if type(value) is InterpretedFunction:
                value.__class__ = cls
                break
            value = getattr(value, "fn", None) if _is_kernel_wrapper(value) else None


def _is_kernel_wrapper(value) -> bool:
    from triton.runtime.jit import KernelInterface

    return isinstance(value, KernelInterface)


_CLASS_CACHE: dict = {}


def _language_namespaces() -> list:
    import triton.language as tl

    spaces = [tl, tl.core, tl.math, tl.core.tensor]
    desc = getattr(tl.core, "tensor_descriptor_base", None)
    return spaces + ([desc] if desc is not None else [])


@contextlib.contextmanager
def _language_restored():
    """Undo the interpreter's patches of ``triton.language`` after an interpreted launch.

    The interpreter patches ``tl`` builtins for a device-function call (a kernel calling another
    ``@jit`` function) and, in triton 3.6 at least, never restores them; a kernel compiled for
    the GPU later in the same process then fails in the frontend ("'ir.value' object has no
    attribute 'dtype'"). Snapshot the namespaces and put every attribute back afterwards.
    """
    saved = [(ns, dict(vars(ns))) for ns in _language_namespaces()]
    try:
        yield
    finally:
        for ns, before in saved:
            for name in [n for n in vars(ns) if n not in before]:
                delattr(ns, name)
            for name, value in before.items():
                if vars(ns).get(name, _MISSING) is not value:
                    setattr(ns, name, value)


@contextlib.contextmanager
def _bool_splats():
    """Make the interpreter's splat of a scalar to an ``int1`` block hold bools.

    The interpreter tags a comparison's result with the operand dtype (``b < n`` on int32 is
    bool data tagged int32), and splatting a scalar fills the block with the *tag's* dtype, so
    ``(b < T0_size0) & (kv_idx < T0_size1)`` (a scalar and a block condition, as captured-tensor
    loads have) becomes int32 0/1 data typed int1. triton 3.6's masked load accepted that;
    triton 3.9's rejects it ("mask has unsupported dtype"). A splat whose result type is int1
    holding bools is right whatever the version, so this needs no version test; if the builder
    has no ``create_splat`` (another interpreter design) nothing is patched.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except ImportError:  # pragma: no cover - a triton without this interpreter
        yield
        return
    original = InterpreterBuilder.__dict__.get("create_splat")
    if original is None:  # pragma: no cover
        yield
        return

    def create_splat(self, ret_ty, arg):
        out = original(self, ret_ty, arg)
        if ret_ty.scalar == tl.int1 and out.data.dtype != np.bool_:
            return TensorHandle(out.data.astype(np.bool_), tl.int1)
        return out

    InterpreterBuilder.create_splat = create_splat
    try:
        yield
    finally:
        InterpreterBuilder.create_splat = original


def _self_contained_class(base):
    cls = _CLASS_CACHE.get(base)
    if cls is None:

        class SelfContainedInterpretedFunction(base):
            def run(self, *args, **kwargs):
                with _LOCK, triton_interpret(True), _jit_calls_interpreted(), _language_restored():
                    with _bool_splats():
                        return super().run(*args, **kwargs)

        cls = _CLASS_CACHE[base] = SelfContainedInterpretedFunction
    return cls


# -- which build a device gets --

_warned_stdlib = False


def triton_library_interpreted() -> bool:
    """True when ``triton`` was imported with ``TRITON_INTERPRET=1``: its library functions are
    then interpreter-only, so no kernel can be compiled for a GPU in this process."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(getattr(tl, "cdiv", None), InterpretedFunction)


_kinds: dict = {}
# ATTNFORGE_INTERPRET's text (device_kind's memo key with the device)
interpret_text = _knobs.environ_get_fast("ATTNFORGE_INTERPRET")


def device_kind(device) -> str:
    """Cache/loader label of a torch device: ``"cpu-interp"``, ``"cuda-sm90"``,
    ``"cuda-sm90-interp"`` (ATTNFORGE_INTERPRET=1, or triton imported in interpreter mode).
    Memoised per (device, ATTNFORGE_INTERPRET text): it runs on every attention call."""
    if getattr(device, "type", None) == "cpu":
        return "cpu-interp"
    try:
        kind = _kinds.get((device, interpret_text()))  # a torch.device seen before
    except TypeError:  # unhashable
        kind = None
    if kind is not None:
        return kind
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return "cpu-interp"
    key = (device, interpret_text())
    kind = _kinds.get(key)
    if kind is None:
        kind = _kinds[key] = _device_kind(device)
    return kind


def _device_kind(device) -> str:
    import torch

    from . import knobs

    if device.type != "cuda":
        raise ValueError(
            f"attnforge runs on CPU (Triton interpreter) or CUDA tensors, got device {device}; "
            "move q, k, v to 'cpu' or 'cuda'"
        )
    major, minor = torch.cuda.get_device_capability(device)
    vendor = "rocm-gfx" if getattr(torch.version, "hip", None) else "cuda-sm"
    arch = f"{vendor}{major}{minor}"
    if knobs.get("ATTNFORGE_INTERPRET") or _library_forces_interpreter():
        return arch + "-interp"
    return arch


def _library_forces_interpreter() -> bool:
    global _warned_stdlib
    if not triton_library_interpreted():
        return False
    if not _warned_stdlib:
        import warnings

        _warned_stdlib = True
        warnings.warn(
            "triton was imported with TRITON_INTERPRET=1, so CUDA tensors run under the (slow) "
            "Triton interpreter; unset TRITON_INTERPRET to compile GPU kernels (attnforge picks "
            "the interpreter for CPU tensors by itself)",
            RuntimeWarning,
            stacklevel=3,
        )
    return True


def is_interpreted(kind: str) -> bool:
    return kind.endswith("-interp")


# -- GPU launches without Triton's per-call and per-process front door --------------------------
#
# ``install_launchers`` replaces each kernel of a compiled module (a ``JITFunction`` that no other
# jit function of the module calls) with a :class:`Launcher`, which keeps ``kernel[grid](...)``,
# ``.warmup(...)``, ``.run(...)`` and every other attribute of the JITFunction, and adds:
#
# - direct launch: after the first normal launch of a (kernel, argument layout, keyword
#   arguments, specialisation inputs), later calls with the same inputs call the
#   ``CompiledKernel``'s launcher directly, skipping ``JITFunction.run``'s binder and cache key
#   (most of its ~15-25 µs for ~60 arguments). The lookup key *refines* Triton's
#   specialisation: the type of every argument, the value of every int/bool/None/str argument,
#   the dtype and the low 7 address bits of every tensor (Triton specialises on 16-byte
#   alignment), the keyword arguments (constexprs and options) and Triton's debug /
#   instrumentation knobs. Floats are not in it (Triton never specialises a float's value;
#   ``tests/test_direct_launch.py`` pins both). Equal keys therefore mean equal specialisation,
#   so the binary that ran before is the binary Triton would pick. Launch hooks, pre-run hooks,
#   a callable grid or an argument of any other type take Triton's path.
# - binaries kept in the kernel cache entry (``store``: ``cache.BinaryStore``): when Triton must
#   compile (its in-process cache missed), a binary kept in our entry for the same Triton kernel
#   key, kernel source, triton build, target, options and compile-affecting environment becomes
#   the ``CompiledKernel`` directly, so a warm process never runs ``triton.compile`` (whose
#   per-process ``triton_key()`` hashes all of ``libtriton.so``). Checksums are verified; any
#   mismatch or error compiles normally. New binaries are copied into the entry after their first
#   direct-launch registration.
#
# Both are CUDA-only (interpreted modules are never wrapped), feature-detected (triton >= 3.2
# internals differ: anything missing means Triton's own path) and switched off together by
# ``ATTNFORGE_DIRECT_LAUNCH=0``.

_DIRECT_KNOB = "ATTNFORGE_DIRECT_LAUNCH"
_SCALAR_TYPES = (int, bool, type(None), str)
_MAX_ENTRIES = 64  # specialisations remembered per argument layout (then start over)
_MAX_INDEX = 16  # launch-index records one Launcher writes per process
_INDEX_FILE = "index.json"


def install_launchers(module: ModuleType, store=None) -> list[str]:
    """Wrap the launchable kernels of a *compiled* module in :class:`Launcher` objects (module
    attributes are replaced; nothing happens for interpreted modules or without triton).
    Returns the wrapped names.  With a ``store``, what :func:`load_stand_ins` needs is kept
    beside the binaries."""
    path = getattr(module, "__file__", None)
    digest = _file_digest(path)
    kernels = _launchable(module)
    for name, value in kernels.items():
        setattr(module, name, Launcher(value, store, digest, path))
    if store is not None and kernels:
        _keep_stand_ins(store, digest, kernels)
    return list(kernels)


def _launchable(module: ModuleType) -> dict:
    """The module's kernels a Launcher wraps: its JITFunctions no other one calls."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:  # pragma: no cover
        return {}
    # Gluon kernels too (fwd_ws.py): same binder, same CompiledKernel; matched by name so a
    # module without them never imports Gluon
    jits = {n: v for n, v in vars(module).items()
            if type(v) is JITFunction or type(v).__name__ == "GluonJITFunction"}  # fmt: skip
    called: set = set()
    for value in jits.values():
        called |= _global_names(value.fn.__code__)
    return {n: v for n, v in jits.items() if n not in called}


# -- stand-ins: a warm start launches indexed binaries without executing the kernel module ------
# Executing a generated module costs ~35 ms per file on the H100 host (a JITFunction per jit
# function, each reading its source with inspect), and fwd_ws.py imports Gluon (0.19 s there).  A
# launch-index hit needs none of it: only each launchable kernel's name and parameters (names,
# constexpr, defaults) and the file's sha256.  ``install_launchers`` keeps those beside the
# binaries (``<store>/standins.json``, with the file's sha256 and Triton's build); a later
# process's ``load_stand_ins`` then registers the module with a :class:`Launcher` per kernel over a
# :class:`JitStandIn`, and executes the file only when anything else is asked of the module or
# of a kernel (a miss of the index, Triton's binder, a warm-up compile, the interpreter is never
# involved: compiled modules only, ``.fn``/``.src``/any attribute): then the real JITFunctions
# take the stand-ins' places inside the same Launcher objects (``Launcher._attach``).

_STAND_INS = "standins.json"


def _param_record(params) -> list | None:
    out = []
    for p in params:
        default = p.default if p.has_default else None
        if type(default) not in _JSON_SCALARS:
            return None  # a default JSON would not give back: no stand-in
        out.append([p.name, bool(p.is_constexpr), bool(p.has_default), default])
    return out


def _stand_ins_record(digest: str, kernels: dict) -> dict | None:
    build = triton_build()
    if not digest or build is None:
        return None
    record = {"format": 1, "digest": digest, "triton": build, "kernels": {}}
    for name, jit in kernels.items():
        params = _param_record(jit.params)
        if params is None:
            return None
        record["kernels"][name] = {"params": params}
    return record


def _keep_stand_ins(store, digest: str, kernels: dict) -> None:
    try:
        record = _stand_ins_record(digest, kernels)
        if record is None:
            return
        path = Path(store.root) / _STAND_INS
        data = json.dumps(record, indent=1, sort_keys=True).encode()
        try:
            if path.read_bytes() == data:
                return
        except OSError:
            pass
        from . import cache

        path.parent.mkdir(parents=True, exist_ok=True)
        cache._atomic_write(path, data)
    except Exception as exc:  # noqa: BLE001 - a speed-up only
        _debug("cannot keep stand-ins for %s: %r", digest[:16], exc)


def stand_ins_allowed() -> bool:
    """A launch may go through the index now (else stand-ins would only be replaced at once)."""
    return (_direct_enabled() and bool(_knobs.get("ATTNFORGE_LAUNCH_INDEX"))
            and bool(_knobs.get("ATTNFORGE_STAND_INS")) and _store_allowed())  # fmt: skip


def load_stand_ins(path, name: str, store) -> ModuleType | None:
    """The compiled module of the file at ``path`` as stand-ins (see above), registered as
    ``name``; None (import it) where nothing is kept for this file and Triton build, or a
    launch could not use the index."""
    if store is None or not stand_ins_allowed():
        return None
    path = Path(path)
    try:
        record = json.loads((Path(store.root) / _STAND_INS).read_text())
        digest = _file_digest(path)
        if (record.get("format") != 1 or record.get("digest") != digest or not digest
                or record.get("triton") != triton_build()):  # fmt: skip
            return None
        params = {k: tuple(_Param(*p) for p in v["params"]) for k, v in record["kernels"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    launchers = {}
    for kernel, ps in params.items():
        stand_in = JitStandIn(kernel, ps, functools.partial(_materialize, module))
        launchers[kernel] = Launcher(stand_in, store, digest, path)
    vars(module).update(launchers)
    module.__attnforge_stand_ins__ = (spec, launchers)

    def __getattr__(attr: str):  # anything else: the real module
        return getattr(_materialize(module), attr)

    module.__getattr__ = __getattr__
    sys.modules[name] = module
    return module


def _materialize(module: ModuleType) -> ModuleType:
    """Execute a stand-in module's file (once): its real JITFunctions go into the Launchers."""
    with _LOCK:
        found = vars(module).get("__attnforge_stand_ins__")
        if found is None:
            return module
        spec, launchers = found
        path = Path(module.__file__)
        saved = dict(vars(module))
        for attr in ("__getattr__", *launchers):
            vars(module).pop(attr, None)
        linecache.checkcache(str(path))
        try:
            if path.name in _GLUON_KERNEL_FILES:
                import_gluon()
            with triton_interpret(False):
                spec.loader.exec_module(module)
            _check_jit_kind(module, False, path)
            real = _launchable(module)
            for kernel, launcher in launchers.items():
                jit = real.get(kernel)
                if jit is None or [p.name for p in jit.params] != list(launcher.jit.arg_names):
                    raise RuntimeError(f"{path}: kernel {kernel!r} is not what was kept for it")
        except BaseException:
            vars(module).clear()
            vars(module).update(saved)
            raise
        for kernel, launcher in launchers.items():
            launcher._attach(real[kernel])
            setattr(module, kernel, launcher)
        del module.__attnforge_stand_ins__
        return module


class _Param:
    """What a Launcher reads of a kernel parameter (Triton's ``KernelParam``)."""

    __slots__ = ("name", "is_constexpr", "has_default", "default")

    def __init__(self, name, is_constexpr, has_default, default):
        self.name, self.is_constexpr = name, is_constexpr
        self.has_default, self.default = has_default, default


class JitStandIn:
    """What a launch-index hit reads of a kernel's JITFunction (name, parameters, no hooks, no
    globals read at compile time, per-device kernel caches); any other attribute executes the
    module (``materialize``) and is the real JITFunction's."""

    def __init__(self, name: str, params: tuple, materialize):
        self.__name__ = name
        self.params = params
        self.arg_names = [p.name for p in params]
        self.pre_run_hooks: list = []
        self.used_global_vals: dict = {}
        self.device_caches = _StandInCaches()
        self._materialize = materialize

    def __getattr__(self, name: str):
        if name in ("_materialize", "_real_jit"):  # (not set yet: copy/unpickle)
            raise AttributeError(name)
        self._materialize()
        return getattr(self._real_jit, name)  # (set by Launcher._attach)

    def __repr__(self) -> str:
        return f"JitStandIn({self.__name__})"


class _StandInCaches(dict):
    """``JITFunction.device_caches`` as the launch index reads it: (kernels by Triton's key, -,
    target, backend, -), without Triton's binder."""

    def __missing__(self, device):
        from triton.compiler import make_backend
        from triton.runtime.driver import driver

        target = driver.active.get_current_target()
        caches = self[device] = ({}, {}, target, make_backend(target), None)
        return caches


# Gluon's modules, imported by one thread at a time (import_gluon)
_GLUON_MODULES = (
    "triton.experimental.gluon",
    "triton.experimental.gluon.language",
    "triton.experimental.gluon.language._layouts",
    "triton.experimental.gluon.language._semantic",
    "triton.experimental.gluon.language.nvidia.hopper",
    "triton.experimental.gluon.language.nvidia.hopper.tma",
    "triton.experimental.gluon.language.amd.gfx1250.tdm",
    "triton.experimental.gluon.nvidia.hopper",
    "triton.experimental.gluon._runtime",
)
_GLUON_KERNEL_FILES = ("fwd_ws.py",)  # kernel modules that import Gluon
_gluon_lock = threading.Lock()
_gluon_imported = False


def import_gluon() -> None:
    """Import Gluon's modules under one lock, once.  Triton's binder imports Gluon on its first
    call, the warp-specialised forward's module and descriptors need it, and two threads
    importing it at once deadlock on its package's circular imports (H100: ``_DeadlockError``
    on ``triton.experimental.gluon.nvidia``, a forward's descriptors in the main thread against
    the backward compiled ahead on its thread).  Every path to Triton's binder (``_real_args``)
    and to Gluon's objects comes here first; a warm start whose launches all hit the launch
    index never does."""
    global _gluon_imported
    if _gluon_imported:
        return
    with _gluon_lock:
        if not _gluon_imported:
            for name in _GLUON_MODULES:
                try:
                    importlib.import_module(name)
                except ImportError:  # older Triton, or a backend it does not ship
                    pass
            _gluon_imported = True


def torch_cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


def _real_args(args: tuple, kwargs: dict) -> tuple:
    """``(args, kwargs)`` with Gluon stand-ins (``standins``) replaced by the real objects (the
    same objects where there are none).  Called before every use of Triton's binder: Gluon is
    imported first where CUDA is in use (see import_gluon)."""
    if not _gluon_imported and torch_cuda_initialized():
        import_gluon()
    if any(getattr(type(a), "_stand_in_for", None) for a in args):
        args = tuple(a.real() if getattr(type(a), "_stand_in_for", None) else a for a in args)
    if any(getattr(type(a), "_stand_in_for", None) for a in kwargs.values()):
        kwargs = {k: a.real() if getattr(type(a), "_stand_in_for", None) else a
                  for k, a in kwargs.items()}  # fmt: skip
    return args, kwargs


def _global_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _global_names(const)
    return names


def _file_digest(path) -> str:
    import hashlib

    if path is None:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


# ``knobs.get("ATTNFORGE_DIRECT_LAUNCH")``, read at every call (as every knob is), cheaply
_direct_enabled = _knobs.reader(_DIRECT_KNOB)


class _Layout:
    """How to read the specialisation inputs of one argument layout (types + keywords)."""

    __slots__ = ("values", "tensors", "descs", "tail", "kernels")

    def __init__(self, values, tensors, tail, descs=None):
        self.values = values  # args -> the int/bool/None/str arguments (itemgetter)
        self.tensors = tensors  # args -> the tensor arguments (itemgetter)
        self.descs = descs  # args -> the TensorDescriptor arguments (itemgetter), or None
        self.tail = tail  # parameter values after the positional ones (keywords, defaults)
        self.kernels: dict = {}  # key() -> (launcher, function, packed metadata, kernel)

    def key(self, device, args: tuple) -> tuple:
        """What Triton's specialisation of ``args`` depends on, and more (a refinement)."""
        tensors = self.tensors(args)
        low_bits = tuple([p & 127 for p in map(_data_ptr, tensors)])
        key = device, self.values(args), tuple(map(_dtype_of, tensors)), low_bits
        if self.descs is not None:
            key += tuple(map(_desc_key, self.descs(args)))
        return key


def _desc_key(d) -> tuple:
    """Everything a ``TensorDescriptor`` argument consists of (its base by dtype, type and low
    address bits): Triton's specialisation of it can depend on nothing else."""
    base = d.base
    return (type(base), base.dtype, base.data_ptr() & 127, tuple(d.shape), tuple(d.strides),
            tuple(d.block_shape), d.padding, getattr(d, "layout", None))  # fmt: skip


_UNSUPPORTED = object()  # a layout that always takes Triton's path
_LOW_BITS = (127).__and__  # an address's low 7 bits (Triton specialises on 16-byte alignment)
_dtype_of = operator.attrgetter("dtype")
_data_ptr = operator.methodcaller("data_ptr")


def _getter(positions: list):
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)


def _plain(x) -> str:
    """Exact text of a launch-key part (TypeError for anything not known to print exactly)."""
    t = type(x)
    if t is tuple:
        return "(" + ",".join(map(_plain, x)) + ")"
    if t is list:
        return "[" + ",".join(map(_plain, x)) + "]"
    if x is None or t in (int, bool, float, str):
        return f"{t.__name__}:{x!r}"
    if isinstance(x, type):  # (torch.Tensor's metaclass is not ``type``); a stand-in class
        # (``standins``) keys as the class it stands for
        return "type:" + (getattr(x, "_stand_in_for", None) or f"{x.__module__}.{x.__qualname__}")
    if t is _torch_dtype():
        return repr(x)
    if _is_gluon_layout(t):  # a Gluon descriptor's shared layout: a frozen dataclass, by fields
        fields = ",".join(f"{f.name}={_plain(getattr(x, f.name))}" for f in _fields(x))
        return f"{t.__module__}.{t.__qualname__}({fields})"
    if getattr(t, "_stand_in_layout", False):  # a Gluon layout's stand-in: its text
        return x.text
    raise TypeError(f"no exact text for {t.__name__}")


def _is_gluon_layout(t: type) -> bool:
    params = getattr(t, "__dataclass_params__", None)
    return (params is not None and params.frozen
            and t.__module__.startswith("triton.experimental.gluon"))  # fmt: skip


def _fields(x) -> tuple:
    import dataclasses

    return dataclasses.fields(x)


def _torch_dtype():
    import torch

    return torch.dtype


_JSON_SCALARS = (int, bool, float, str, type(None))


def _spec_record(kernel) -> dict | None:
    """The specialisation a CompiledKernel was built for (its ASTSource) as JSON-able lists,
    or None where a part would not come back from JSON unchanged."""
    src = getattr(kernel, "src", None)
    sig = getattr(src, "signature", None)
    if not isinstance(sig, dict) or not all(type(v) is str for v in sig.values()):
        return None
    constants = [[list(k), v] for k, v in src.constants.items()]
    attrs = [[list(k), v] for k, v in src.attrs.items()]
    if not all(type(v) in _JSON_SCALARS for _, v in constants):
        return None
    record = {"signature": sig, "constants": constants, "attrs": attrs}
    if json.loads(json.dumps(record)) != record:
        return None
    return record


class Launcher:
    """A compiled Triton kernel with a direct-launch fast path and binaries kept in our cache
    (see the comment above :func:`install_launchers`). Behaves like the ``JITFunction`` it wraps
    (``.jit``): ``kernel[grid](*args, **kw)``, ``.warmup(*args, grid=..., **kw)``, ``.run``,
    attribute access (``.fn``, ``.params``, ...)."""

    def __init__(self, jit, store=None, source_digest: str = "", path=None):
        self.jit = jit
        self.store = store
        self.source_digest = source_digest
        self.path = path  # the module's file (compile helpers import it)
        self._layouts: dict = {}
        self._saved: dict = {}  # id(kernel) -> (kernel, store key or None, Triton's key)
        self._indexed_n = 0  # launch-index records written by this process (capped)
        self._index_done: set = set()  # index keys read or written here
        self._options: dict = {}  # Triton kernel key -> the parsed options it was compiled with
        self._runs: dict = {}  # id(kernel) -> (kernel, what a direct launch calls)
        self._device = self._stream = None
        self._globals = (None, ())  # (jit.used_global_vals checked, ((dict, name, object), ...))
        # (a stand-in is hooked when the real JITFunction replaces it: _attach)
        self._hooked = type(jit) is not JitStandIn and _hook_compile(self)

    def _attach(self, real) -> None:
        """Put the real JITFunction in place of this Launcher's stand-in (see
        :func:`load_stand_ins`): what the stand-in held (kernels the launch index loaded, pre-run
        hooks) moves to it."""
        stand_in = self.jit
        if type(stand_in) is not JitStandIn:
            return
        real.pre_run_hooks.extend(stand_in.pre_run_hooks)
        for device, caches in stand_in.device_caches.items():
            kernels = real.device_caches[device][0] if caches[0] else {}
            for key, kernel in caches[0].items():
                src = getattr(kernel, "src", None)
                if getattr(src, "fn", None) is stand_in:
                    src.fn = real
                kernels.setdefault(key, kernel)
        stand_in._real_jit = self.jit = real
        self._hooked = _hook_compile(self)

    # -- JITFunction look-alike --

    def __getattr__(self, name: str):
        if name == "jit":  # not set yet (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.jit, name)

    def __repr__(self) -> str:
        return f"Launcher({self.jit!r})"

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def warmup(self, *args, grid, **kwargs):
        if self.store is not None and _direct_enabled():
            tk = _triton_knobs()
            if tk is not None and not self.jit.pre_run_hooks and _hooks_empty(tk.runtime):
                try:
                    lkey = (tuple(map(type, args)), tuple(kwargs.items()), tk.runtime.debug,
                            tk.compilation.instrumentation_mode)  # fmt: skip
                    found = self._indexed(args, kwargs, lkey, self._layouts.get(lkey), None)
                except TypeError:
                    found = None
                if found is not None:
                    return found[0][3]
        args, kwargs = _real_args(args, kwargs)
        return self.jit.warmup(*args, grid=grid, **kwargs)

    # -- launch --

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            args, kwargs = _real_args(args, kwargs)
            return self.jit.run(*args, grid=grid, warmup=True, **kwargs)
        return self._launch(grid, *args, **kwargs)

    def _triton_run(self, grid, args, kwargs):
        """Triton's own launch (real objects for any stand-in argument: ``standins``)."""
        args, kwargs = _real_args(args, kwargs)
        return self.jit.run(*args, grid=grid, warmup=False, **kwargs)

    def _launch(self, grid, *args, **kwargs):
        jit = self.jit
        if type(grid) is not tuple or jit.pre_run_hooks or not _direct_enabled():
            return self._triton_run(grid, args, kwargs)
        tk = _knobs_module if _knobs_module is not _MISSING_KNOBS else _triton_knobs()
        if tk is None or not _hooks_empty(tk.runtime):
            return self._triton_run(grid, args, kwargs)
        try:
            lkey = (tuple(map(type, args)), tuple(kwargs.items()), tk.runtime.debug,
                    tk.compilation.instrumentation_mode)  # fmt: skip
            layout = self._layouts.get(lkey)
            if layout is None or layout is _UNSUPPORTED:
                return self._slow(args, grid, kwargs, lkey, layout)
            device = self._device()
            sub = layout.key(device, args)
            entry = layout.kernels.get(sub)
        except TypeError:  # an unhashable argument: Triton's path decides
            return self._triton_run(grid, args, kwargs)
        if entry is None:
            return self._slow(args, grid, kwargs, lkey, layout, sub)
        if not self._globals_current():  # Triton's path raises the error
            return self._triton_run(grid, args, kwargs)
        launcher, function, packed, kernel = entry
        n = len(grid)
        launcher(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, self._stream(device),
                 function, packed, None, None, None, *args, *layout.tail)  # fmt: skip
        return kernel

    def _globals_current(self) -> bool:
        """The globals the kernel read at compile time are the objects seen last time (cheap),
        or else still equal (Triton's check, then remembered)."""
        used, seen = self._globals
        stale = used is not self.jit.used_global_vals
        for globals_dict, name, value in seen:
            if globals_dict.get(name, _MISSING) is not value:
                stale = True
        return not stale or self._globals_unchanged()

    def _planned_ok(self, tk) -> bool:
        """A planned direct launch may run now (Triton's knobs ``tk`` known): no pre-run or
        launch hooks, ATTNFORGE_DIRECT_LAUNCH on, the globals the kernel read unchanged."""
        return (tk is not None and not self.jit.pre_run_hooks and _direct_enabled()
                and _hooks_empty(tk.runtime) and self._globals_current())  # fmt: skip

    def launch_planned(self, grid: tuple, args: tuple, kwargs: dict, memo: dict, extra=(),
                       fresh: int = 0, n_tail: int = 0):  # fmt: skip
        """``self[grid](*args, **kwargs)`` for a caller whose calls sharing ``memo`` (a dict the
        caller owns, one per argument layout) differ only in their tensor arguments (same
        types, dtypes and positions) and in ``extra`` (a hashable of every other argument that
        may change; the caller vouches for the rest: ``runtime.launch``'s per-call plans).

        The kernel is looked up by device, Triton's debug knobs, the tensors' low address bits
        and ``extra``; a miss takes :meth:`_launch` once and remembers the kernel it ran.  The
        launcher gets the tensors' addresses as ints (no ``data_ptr()`` call and no
        ``cuPointerGetAttribute`` per tensor in Triton's C launcher).

        ``fresh`` > 0 also vouches that only ``args[:fresh]`` (tensors), the descriptors over
        them (same shape, strides, block shape, padding) and ``args[-n_tail:]`` change between
        calls; then a direct launch also leaves a :class:`_RawPlanned` in
        ``memo[RAW_PLANNED]``."""
        tk = _knobs_module if _knobs_module is not _MISSING_KNOBS else _triton_knobs()
        if self._device is None or not self._planned_ok(tk):
            return self._launch(grid, *args, **kwargs)
        pos = memo.get(_POSITIONS)
        if pos is None:
            pos = memo[_POSITIONS] = tuple(
                i for i, a in enumerate(args) if isinstance(a, _torch_tensor())
            )
        ptrs = [args[i].data_ptr() for i in pos]
        device = self._device()
        try:
            key = (device, tk.runtime.debug, tk.compilation.instrumentation_mode,
                   tuple([p & 127 for p in ptrs]), extra)  # fmt: skip
            entry = memo.get(key)
        except TypeError:  # unhashable extra
            return self._launch(grid, *args, **kwargs)
        if entry is None:
            kernel = self._launch(grid, *args, **kwargs)
            if len(memo) > _MAX_ENTRIES:
                memo.clear()  # (the raw launches go too: they are remade on the next hits)
                memo[_POSITIONS] = pos
            memo[key] = self._entry(args, kwargs) or False
            return kernel
        if entry is False:
            return self._launch(grid, *args, **kwargs)
        launcher, function, packed, tail, kernel = entry
        if fresh:
            raws = memo.get(RAW_PLANNED)
            if raws is None:
                raws = memo[RAW_PLANNED] = _RawPlans()
            raws.add(self, grid, args, entry, key, fresh, n_tail, ptrs, pos)
        call_args = list(args)
        for i, p in zip(pos, ptrs):
            call_args[i] = p
        n = len(grid)
        launcher(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, self._stream(device),
                 function, packed, None, None, None, *call_args, *tail)  # fmt: skip
        return kernel

    def _entry(self, args: tuple, kwargs: dict):
        """``(launcher, function, packed metadata, tail, kernel)`` of the kernel a direct launch
        of ``args``/``kwargs`` would run now, or None (unknown, or not directly launchable)."""
        tk = _triton_knobs()
        if tk is None or self._device is None:
            return None
        try:
            lkey = (tuple(map(type, args)), tuple(kwargs.items()), tk.runtime.debug,
                    tk.compilation.instrumentation_mode)  # fmt: skip
            layout = self._layouts.get(lkey)
            if layout is None or layout is _UNSUPPORTED:
                return None
            found = layout.kernels.get(layout.key(self._device(), args))
        except TypeError:
            return None
        if found is None:
            return None
        launcher, function, packed, kernel = found
        return launcher, function, packed, layout.tail, kernel

    def _globals_unchanged(self) -> bool:
        """Triton's check that the globals a kernel read at compile time are unchanged; on
        success remember the objects now bound, so the next calls only compare identities."""
        used = self.jit.used_global_vals
        for (name, _), (val, globals_dict) in used.items():
            if globals_dict.get(name, _MISSING) != val:
                return False
        seen = tuple((gd, name, gd.get(name, _MISSING)) for (name, _), (_, gd) in used.items())
        self._globals = (used, seen)
        return True

    def _slow(self, args, grid, kwargs, lkey, layout, sub=None):
        """Triton's launch; then remember the kernel it ran for this layout/specialisation.
        A kept binary indexed by this launch's key (an earlier process ran it) is launched
        directly instead: no binder, no ``triton.compile``."""
        if layout is not _UNSUPPORTED and self.store is not None:
            found = self._indexed(args, kwargs, lkey, layout, sub)
            if found is not None:
                entry, device, tail = found
                launcher, function, packed, kernel = entry
                n = len(grid)
                launcher(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                         self._stream(device), function, packed, None, None, None, *args,
                         *tail)  # fmt: skip
                return kernel
        real_args, real_kwargs = _real_args(args, kwargs)
        if real_args is not args or real_kwargs is not kwargs:  # stand-ins: keyed as real ones
            return self._launch(grid, *real_args, **real_kwargs)
        kernel = self.jit.run(*args, grid=grid, warmup=False, **kwargs)
        if layout is _UNSUPPORTED:
            return kernel
        try:
            self._record(kernel, args, kwargs, lkey, layout, sub)
        except Exception as exc:  # noqa: BLE001 - a speed-up only
            _debug("direct launch disabled for %s: %r", self.jit, exc)
            self._layouts[lkey] = _UNSUPPORTED
        return kernel

    def _record(self, kernel, args, kwargs, lkey, layout, sub) -> None:
        from triton.compiler import CompiledKernel

        if not isinstance(kernel, CompiledKernel) or kernel.function is None or kernel._run is None:
            return
        if self._device is None:
            self._bind_driver()
        if layout is None:
            layout = self._layouts[lkey] = self._make_layout(lkey[0], args, kwargs)
            if layout is _UNSUPPORTED:
                return
            sub = None
        if sub is None:
            sub = layout.key(self._device(), args)
        if len(layout.kernels) >= _MAX_ENTRIES:
            layout.kernels.clear()
        layout.kernels[sub] = (self._run_of(kernel), kernel.function, kernel.packed_metadata,
                               kernel)  # fmt: skip
        try:
            saved = self._save(kernel, sub[0])
            if saved is not None:
                self._write_index(kernel, lkey, sub, saved)
        except Exception as exc:  # noqa: BLE001 - keeping the binary is a speed-up only
            _debug("cannot keep the binary of %s: %r", self.jit, exc)

    def _run_of(self, kernel):
        """What a direct launch calls for ``kernel``: its launcher, or one that reuses encoded
        tensor-descriptor arguments (``tma_launch``), built once per kernel."""
        known = self._runs.get(id(kernel))
        if known is None or known[0] is not kernel:
            known = self._runs[id(kernel)] = (kernel, _tma.fast_run(kernel))
        return known[1]

    def _make_layout(self, types: tuple, args: tuple, kwargs: dict):
        import torch

        params = self.jit.params
        if len(args) > len(params):
            return _UNSUPPORTED
        values, tensors, descs = [], [], []
        desc_type = _tensor_descriptor_type()
        for i, t in enumerate(types):
            if issubclass(t, torch.Tensor):
                tensors.append(i)
            elif t is float:
                continue  # Triton types a float as fp32 whatever its value
            elif t in _SCALAR_TYPES:
                values.append(i)
            elif t is desc_type or _is_gluon_descriptor_type(t):
                descs.append(i)
            else:
                return _UNSUPPORTED
        tail = []
        for p in params[len(args) :]:
            if p.name in kwargs:
                tail.append(kwargs[p.name])
            elif p.has_default:
                tail.append(p.default)
            else:
                return _UNSUPPORTED
        return _Layout(
            _getter(values), _getter(tensors), tuple(tail), _getter(descs) if descs else None
        )

    def _bind_driver(self) -> None:
        from triton.runtime.driver import driver

        active = driver.active
        self._stream = active.get_current_stream
        self._device = _fast_current_device(active.get_current_device)

    # -- binaries kept in our cache entry --

    def _save(self, kernel, device) -> tuple | None:
        """Keep ``kernel``'s binary in the store (once): ``(kernel, store key or None, Triton's
        kernel key)``, or None where it cannot be kept."""
        if self.store is None:
            return None
        known = self._saved.get(id(kernel))
        if known is not None:
            return known
        caches = self.jit.device_caches.get(device)
        if caches is None:
            return None
        kernel_cache, _, target, backend, _ = caches
        key = next((k for k, v in kernel_cache.items() if v is kernel), None)
        if key is None:
            return None
        store_key = self._store_key(key, target, self._options.get(key))
        saved = self._saved[id(kernel)] = (kernel, store_key, key)  # the kernel pins its id
        if store_key is None:
            return saved
        files = {}
        for name, path in kernel.metadata_group.items():
            if name.endswith(".json") or name.endswith("." + backend.binary_ext):
                files[name] = Path(path).read_bytes()
        meta = {"hash": kernel.hash, "name": kernel.name}
        if not self.store.put(store_key, files, meta):
            saved = self._saved[id(kernel)] = (kernel, None, key)
        return saved

    def _store_key(self, key: str, target, options) -> str | None:
        env = _compile_env()
        if env is None or options is None:
            return None
        return "\n".join([
            "attnforge-triton-binary 1", self.jit.__name__, self.source_digest, env,
            repr(target), options.hash(), key,
        ])  # fmt: skip

    def _load(self, key, signature, device, constexprs, options, attrs):
        """A CompiledKernel from the store for Triton's ``_do_compile`` arguments, or None."""
        if self.store is None or not _direct_enabled() or not _store_allowed():
            return None
        kernel_cache, _, target, _, _ = self.jit.device_caches[device]
        store_key = self._store_key(key, target, options)
        if store_key is None:
            return None
        kernel = self._from_files(store_key, key, signature, constexprs, attrs, kernel_cache)
        if kernel is not None:
            self._options[key] = options
        return kernel

    def _from_files(self, store_key, key, signature, constexprs, attrs, kernel_cache,
                    load: bool = True):  # fmt: skip
        """The kept binary of ``store_key`` as Triton's kernel for ``key``, or None.
        ``load=False``: not loaded onto the GPU here (a fresh compile; the launch loads it on
        the launching thread's device)."""
        from triton.compiler import ASTSource, CompiledKernel
        from triton.runtime.errors import OutOfResources

        found = self.store.get(store_key)
        if found is None:
            return None
        paths, meta = found
        try:
            src = ASTSource(self.jit, signature, constexprs, attrs)
            kernel = CompiledKernel(src, {n: str(p) for n, p in paths.items()}, meta["hash"])
            try:
                if load:
                    kernel._init_handles()  # load the binary now: a bad one compiles instead
            except OutOfResources:
                pass  # as after a compile: the launch raises it (launch_shrinking retries)
        except Exception as exc:  # noqa: BLE001
            _debug("kept binary for %s not usable (%r): compiling", self.jit, exc)
            self.store.discard(store_key)
            return None
        self._saved[id(kernel)] = (kernel, store_key, key)
        kernel_cache[key] = kernel
        return kernel

    def _remote(self, key, signature, device, constexprs, options, attrs):
        """Triton's compile for ``_do_compile``'s arguments done by a helper process
        (``compile_pool``): the kernel, a future of it (under ``AsyncCompileMode``), or None
        (compile in this process)."""
        from . import compile_pool

        if (self.store is None or self.path is None or not compile_pool.workers()
                or not _direct_enabled() or not _store_allowed()):  # fmt: skip
            return None
        import triton
        from triton._C.libtriton import get_cache_invalidating_env_vars
        from triton.runtime import _async_compile

        kernel_cache, _, target, backend, _ = self.jit.device_caches[device]
        store_key = self._store_key(key, target, options)
        if store_key is None:
            return None
        job = {
            "path": str(self.path), "digest": self.source_digest, "kernel": self.jit.__name__,
            "signature": signature, "constexprs": constexprs, "attrs": attrs,
            "options": dict(options.__dict__), "binary_ext": backend.binary_ext,
            "target": (target.backend, target.arch, target.warp_size),
            "env": dict(get_cache_invalidating_env_vars()),
            "triton": (triton.__file__, triton.__version__),
        }  # fmt: skip
        try:
            pickle.dumps(job)
        except Exception:  # noqa: BLE001 - something only this process can hold
            return None

        def compiled(wait: bool):
            reply = compile_pool.compile(job, wait)
            if reply is None:
                return None
            if "error" in reply:
                _debug("compile helper failed on %s: %s", self.jit, reply["error"])
                return None
            meta = {"hash": reply["hash"], "name": reply["name"]}
            if not self.store.put(store_key, reply["files"], meta):
                return None
            return self._from_files(store_key, key, signature, constexprs, attrs, kernel_cache,
                                    load=False)  # fmt: skip

        mode = _async_compile.active_mode.get()
        if mode is None:  # on the launching thread: a helper only if one is ready now
            try:
                return compiled(wait=False)
            except Exception as exc:  # noqa: BLE001 - compile here instead
                _debug("compile helper lost for %s: %r", self.jit, exc)
                return None

        def compile_fn():  # on the AsyncCompileMode's executor: waits for a helper
            try:
                kernel = compiled(wait=True)
            except Exception as exc:  # noqa: BLE001
                _debug("compile helper lost for %s: %r", self.jit, exc)
                kernel = None
            if kernel is None:  # what Triton's own async compile would have run
                triton_key.wait()
                src = self.jit.ASTSource(self.jit, signature, constexprs, attrs)
                kernel = self.jit.compile(src, target=target, options=options.__dict__)
            return kernel

        def finalize(kernel) -> None:
            kernel_cache[key] = kernel

        if _submit_takes_cleanup(mode):  # Triton >= 3.7: a cleanup for a failed compile
            return mode.submit(store_key, compile_fn, finalize, lambda _future: None)
        return mode.submit(store_key, compile_fn, finalize)

    # -- kept binaries indexed by the launch key: a new process skips the binder --
    # A record maps this Launcher's own launch key (the argument layout and specialisation
    # inputs ``_launch`` looks kernels up by, as exact text: a refinement of Triton's
    # specialisation) to the kept binary Triton picked for it and the specialisation Triton
    # computed (signature, constexprs, attributes), so a new process launches it without ever
    # running ``JITFunction.run``'s binder (whose first call imports triton.experimental.gluon)
    # or ``triton.compile``.  Written by the process that ran the launch through Triton's path.

    def _index_key(self, lkey: tuple, sub: tuple, target) -> str | None:
        env = _compile_env()
        if env is None:
            return None
        types, kw, debug, mode = lkey
        return "\n".join([
            "attnforge-launch-index 1", self.jit.__name__, self.source_digest, env, repr(target),
            _plain(types), _plain(kw), _plain(debug), _plain(mode), _plain(sub[1:]),
        ])  # fmt: skip

    def _indexed(self, args, kwargs, lkey, layout, sub):
        """``((launcher, function, packed, kernel), device, tail)`` of a kept binary indexed by
        this launch's key, remembered for later launches; None (Triton's path) otherwise."""
        if not _store_allowed() or not _knobs.get("ATTNFORGE_LAUNCH_INDEX"):
            return None
        if self._device is None:
            self._bind_driver()
        if layout is None:
            layout = self._make_layout(lkey[0], args, kwargs)
            if layout is _UNSUPPORTED:
                return None
        device = self._device()
        if sub is None:
            sub = layout.key(device, args)
        # (device_caches builds the binder; it is never called here)
        kernel_cache, _, target, _, _ = self.jit.device_caches[device]
        try:
            text = self._index_key(lkey, sub, target)
        except TypeError:  # a value without exact text: never indexed
            return None
        found = self.store.get(text, count=False) if text is not None else None
        if found is None:
            return None
        paths, _ = found
        try:
            rec = json.loads(paths[_INDEX_FILE].read_text())
            key = rec["key"]
            kernel = kernel_cache.get(key)
            if kernel is None:
                constexprs = {tuple(k): v for k, v in rec["constants"]}
                attrs = {tuple(k): v for k, v in rec["attrs"]}
                kernel = self._from_files(rec["store_key"], key, rec["signature"], constexprs,
                                          attrs, kernel_cache)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a damaged record: Triton's path
            _debug("launch index of %s not usable (%r)", self.jit, exc)
            self.store.discard(text)
            return None
        if kernel is None or kernel.function is None or not self._globals_current():
            return None  # not kept, or it raised at load (Triton's path raises it again)
        entry = (self._run_of(kernel), kernel.function, kernel.packed_metadata, kernel)
        if len(layout.kernels) >= _MAX_ENTRIES:
            layout.kernels.clear()
        layout.kernels[sub] = entry
        self._layouts[lkey] = layout
        self._index_done.add(text)
        return entry, device, layout.tail

    def _write_index(self, kernel, lkey: tuple, sub: tuple, saved: tuple) -> None:
        _, store_key, key = saved
        if store_key is None or self._indexed_n >= _MAX_INDEX:
            return  # a bound: shapes that change every call must not write a record each
        if not _knobs.get("ATTNFORGE_LAUNCH_INDEX"):
            return
        try:
            text = self._index_key(lkey, sub, self.jit.device_caches[sub[0]][2])
        except TypeError:
            return
        if text is None or text in self._index_done:
            return
        self._index_done.add(text)
        record = _spec_record(kernel)
        if record is None or self.store.has(text):
            return
        self._indexed_n += 1
        record.update(key=key, store_key=store_key)
        self.store.put(text, {_INDEX_FILE: json.dumps(record).encode()}, {"index": 1}, count=False)


# torch.cuda.current_device (Triton's driver's get_current_device) as known: ``_lazy_init()``,
# whose first line returns at once when is_initialized(), then the C getter
_CURRENT_DEVICE_SNIPPETS = (
    ("current_device", "_lazy_init() return torch._C._cuda_getDevice()"),
    ("is_initialized", "return _initialized and not _is_in_bad_fork()"),
    ("_lazy_init", 'if is_initialized() or hasattr(_tls, "is_initializing"): return'),
)


def _fast_current_device(get):
    """``get``, the driver's current-device function; where that is ``torch.cuda.current_device``
    reading as known, the same answer without its three Python frames once CUDA is initialised
    (and this process is no bad fork: else ``get`` itself runs, and raises as ever).  Called at
    every direct launch (~0.2 µs less on the H100 host)."""
    try:
        import torch

        cuda = torch.cuda
        c_get = torch._C._cuda_getDevice
        if get is not cuda.current_device or not all(
            _tma._reads_as(getattr(cuda, name), (snippet,))
            for name, snippet in _CURRENT_DEVICE_SNIPPETS
        ):
            return get
    except (ImportError, AttributeError):
        return get

    def current_device() -> int:
        if cuda._initialized and not cuda._is_in_bad_fork():
            return c_get()
        return get()

    return current_device


_POSITIONS = object()  # launch_planned's memo key for the tensor argument positions
# launch_planned's memo key: the _RawPlans of its direct launches with ``fresh`` (or absent)
RAW_PLANNED = object()


class _RawPlans:
    """A planned launch's :class:`_RawPlanned` by the fresh and tail tensors' low address bits
    and ``extra``: ``plans(fresh, tail, extra)`` launches and returns True, or launches nothing
    and returns False (then the caller takes ``launch_planned``).  The fresh tensors must be
    plain tensors (``torch.Tensor`` or ``Parameter``): their addresses are read with
    ``torch.Tensor.data_ptr`` itself (no bound-method lookup; a subclass's Python-level
    ``data_ptr`` would not be asked)."""

    __slots__ = ("by", "tried", "tail_tensor", "data_ptr")

    def __init__(self):
        self.by: dict = {}  # (low bits, extra) -> _RawPlanned
        self.tried: dict = {}  # launch_planned's lookup key -> _RawPlanned or False
        self.tail_tensor = None  # which tail arguments are tensors (one layout per memo)
        self.data_ptr = _torch_tensor().data_ptr

    def add(self, launcher, grid, args, entry, key, fresh, n_tail, ptrs, pos) -> None:
        raw = self.tried.get(key)
        if raw and raw.fixed_ptrs != [ptrs[pos.index(i)] for i in raw.fixed_at]:
            raw = None  # a fixed tensor moved (set_) within its alignment class: made anew
        if raw is None:
            try:
                raw = _RawPlanned.make(launcher, grid, args, entry, key, fresh, n_tail, ptrs, pos)
            except Exception as exc:  # noqa: BLE001 - a speed-up only
                _debug("no raw planned launch for %s: %r", launcher.jit, exc)
                raw = None
            if len(self.tried) >= _MAX_ENTRIES:
                self.tried.clear()
                self.by.clear()
            raw = self.tried[key] = raw or False
        if raw:
            if self.tail_tensor is None:
                self.tail_tensor = raw.tail_tensor
            if raw.tail_tensor == self.tail_tensor:
                self.by[raw.low, key[4]] = raw

    def __call__(self, fresh: tuple, tail: tuple, extra) -> bool:
        ptrs = list(map(self.data_ptr, fresh))
        if tail:
            low = list(map(_LOW_BITS, ptrs))
            values = list(tail)
            for i, is_tensor in enumerate(self.tail_tensor):
                if is_tensor:
                    values[i] = p = values[i].data_ptr()
                    low.append(p & 127)
            raw = self.by.get((tuple(low), extra))
        else:
            values = ()
            raw = self.by.get((tuple(map(_LOW_BITS, ptrs)), extra))
        return raw is not None and raw.launch(fresh, ptrs, values)


class _RawPlanned:
    """One planned launch (``Launcher.launch_planned`` with ``fresh``) reduced to one call of the
    C launcher.  The argument list is kept with every fixed argument in place (fixed tensors as
    their addresses, re-read and compared at every call); a call fills in the fresh tensors'
    addresses, the descriptors' expansions (Triton's ``make_tensordesc_arg`` output, kept per
    descriptor by base address: shape, strides, block shape and padding are fixed by the
    caller's promise, the descriptor metadata by the kernel) and the tail.  A call launches
    nothing and returns False unless everything ``launch_planned``'s lookup key holds is as
    recorded (knobs, hooks, globals, device, Triton's debug knobs, every tensor's low address
    bits, ``extra``); the caller then takes ``launch_planned``."""

    __slots__ = ("launcher", "jit", "key", "c_launch", "template", "fresh_at", "fresh_end",
                 "descs", "tail_at", "tail_tensor", "fixed", "fixed_ptrs", "low", "has_descs",
                 "device", "debug", "instrumentation", "data_ptr", "fixed_at")  # fmt: skip

    @classmethod
    def make(cls, launcher, grid, args, entry, key, fresh, n_tail, ptrs, pos):
        run, function, packed, tail, _ = entry
        parts = _tma.raw_parts(run)
        tail_start = len(args) - n_tail
        if parts is None or len(grid) > 3 or not 0 < fresh <= tail_start:
            return None
        c_launch, coop, pdl, desc_meta = parts
        tensor_type, desc_type = _torch_tensor(), _tensor_descriptor_type()
        address = dict(zip(pos, ptrs))
        n = len(grid)
        # CudaLauncher.__call__'s C-launcher call: grid, stream, function, flags, no scratch;
        # then packed metadata, no launch metadata, no hooks (as launch_planned passes them)
        template = [grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, None, function,
                    coop, pdl, None, None, packed, None, None, None]  # fmt: skip
        self = cls()
        self.fresh_at, self.fresh_end = len(template), len(template) + fresh
        self.descs, self.fixed, self.fixed_ptrs, self.fixed_at = [], [], [], []
        self.tail_at = None
        for i, a in enumerate(args):
            at = len(template)
            if i == tail_start:
                self.tail_at = at
            if i < fresh:
                if not isinstance(a, tensor_type):
                    return None
                template.append(None)  # args[:fresh]: template[13 : 13 + fresh]
            elif i >= tail_start:
                template.append(None)
            elif i in desc_meta:
                base = next((j for j in range(fresh) if args[j] is a.base), None)
                if type(a) is not desc_type or base is None:
                    return None
                make, meta = desc_meta[i]
                expansion = list(make(a, meta))
                fields = dict(shape=list(a.shape), strides=list(a.strides),
                              block_shape=list(a.block_shape), padding=a.padding)  # fmt: skip
                if set(vars(a)) != {"base", *fields}:
                    return None  # a descriptor with more to it than the fields kept here
                # (where, end, which fresh tensor, expansions by address, how to expand anew)
                self.descs.append((at, at + len(expansion), base, {address[base]: expansion},
                                   (make, meta, fields, desc_type)))  # fmt: skip
                template += expansion
            elif isinstance(a, tensor_type):
                self.fixed.append(a)
                self.fixed_ptrs.append(address[i])
                self.fixed_at.append(i)
                template.append(address[i])
            elif a is None or type(a) in (int, bool, float, str):
                template.append(a)
            else:
                return None
        if len(self.descs) != len(desc_meta):
            return None  # a descriptor in the keyword tail
        template += tail
        tail_args = args[tail_start:]
        self.tail_tensor = tuple(isinstance(a, tensor_type) for a in tail_args)
        self.low = tuple(
            [address[i] & 127 for i in range(fresh)]
            + [address[tail_start + j] & 127 for j, t in enumerate(self.tail_tensor) if t]
        )
        self.launcher, self.jit, self.key = launcher, launcher.jit, key
        self.device, self.debug, self.instrumentation = key[0], key[1], key[2]
        self.c_launch, self.template, self.has_descs = c_launch, template, bool(desc_meta)
        self.data_ptr = tensor_type.data_ptr  # (a subclass's own data_ptr: a mismatch, no launch)
        return self

    def launch(self, fresh: tuple, ptrs: list, tail: list) -> bool:
        """Launch with the fresh tensors (``ptrs``: their addresses) and the tail's values
        (tensors as addresses), or return False where the recorded key does not hold."""
        tk, launcher = _knobs_module, self.launcher
        # launch_planned's checks (_planned_ok, device, Triton's debug knobs), inline
        if (tk is None or self.jit.pre_run_hooks or not _direct_enabled()
                or (self.has_descs and not _tma.enabled())):  # fmt: skip
            return False
        rt = tk.runtime
        if (rt.debug != self.debug or tk.compilation.instrumentation_mode != self.instrumentation
                or not _hooks_empty(rt) or not launcher._globals_current()):  # fmt: skip
            return False
        device = launcher._device()
        if device != self.device:
            return False
        if self.fixed and list(map(self.data_ptr, self.fixed)) != self.fixed_ptrs:
            return False  # moved storage (set_, .data =): launch_planned reads it anew
        args = self.template.copy()
        args[3] = launcher._stream(device)
        args[self.fresh_at : self.fresh_end] = ptrs
        for at, end, base, maps, how in self.descs:
            expansion = maps.get(ptrs[base])
            if expansion is None:
                expansion = _expand_anew(fresh[base], ptrs[base], maps, end - at, how)
                if expansion is None:
                    return False
            args[at:end] = expansion
        if tail:
            at = self.tail_at
            args[at : at + len(tail)] = tail
        self.c_launch(*args)
        return True


def _expand_anew(base, address: int, maps: dict, n: int, how: tuple) -> list | None:
    """A raw launch's descriptor over ``base`` (at ``address``), expanded by Triton's own
    ``make_tensordesc_arg`` and kept in ``maps``; None where it no longer has ``n`` parts."""
    make, meta, fields, desc_type = how
    d = desc_type.__new__(desc_type)
    d.__dict__.update(fields, base=base)
    expansion = list(make(d, meta))
    if len(expansion) != n:
        return None
    if len(maps) >= _MAX_MAPS:
        maps.clear()
    maps[address] = expansion
    return expansion


_MAX_MAPS = 64  # descriptor expansions kept per _RawPlanned descriptor (then start over)


def _torch_tensor():
    import torch

    return torch.Tensor


def _is_gluon_descriptor_type(t: type) -> bool:
    # Gluon's host TensorDescriptor (it adds the shared-memory layout, part of _desc_key), or
    # its stand-in, recognised without importing Gluon
    name = getattr(t, "_stand_in_for", None) or f"{t.__module__}.{t.__name__}"
    return name.startswith("triton.experimental.gluon") and name.endswith(".TensorDescriptor")


def _tensor_descriptor_type():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - a triton without host tensor descriptors
        return None
    return TensorDescriptor


_MISSING_KNOBS = object()
_knobs_module = _MISSING_KNOBS
_HookChain = None


def _triton_knobs():
    """``triton.knobs`` where direct launch matches this triton's own launch; else None (then
    every launch takes Triton's path)."""
    global _knobs_module, _HookChain
    if _knobs_module is _MISSING_KNOBS:
        try:
            from triton import knobs as tk

            tk.runtime.debug, tk.compilation.instrumentation_mode  # noqa: B018
            _HookChain = getattr(tk, "HookChain", None)
            _knobs_module = tk if _same_launch_convention() else None
        except (ImportError, AttributeError):
            _knobs_module = None
    return _knobs_module


# What ``JITFunction.run`` does at launch in triton 3.4-3.6 (and the direct path repeats): the
# CompiledKernel's launcher gets the grid, stream, function, packed metadata, launch metadata,
# the knobs' hooks and *every* bound argument, constexprs included (3.2/3.3 passed only the
# non-constexpr ones and kept the hooks on CompiledKernel). Checked once, in the source.
_LAUNCH_SNIPPETS = (
    "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,",
    "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())",
    "kernel_cache, kernel_key_cache, target, backend, binder = self.device_caches[device]",
)


def _same_launch_convention() -> bool:
    import inspect

    try:
        from triton.runtime.jit import JITFunction

        source = " ".join(inspect.getsource(JITFunction.run).split())
    except (ImportError, OSError, TypeError):
        return False
    return all(" ".join(snippet.split()) in source for snippet in _LAUNCH_SNIPPETS)


def _hooks_empty(rt) -> bool:
    """No launch hook to call (triton 3.6 keeps an empty ``HookChain``; older: None)."""
    hook = rt.launch_enter_hook
    if hook is not None and (type(hook) is not _HookChain or hook.calls):
        return False
    hook = rt.launch_exit_hook
    return hook is None or (type(hook) is _HookChain and not hook.calls)


def _store_allowed() -> bool:
    """No user compile hooks and no forced recompiles: Triton's compile must run then."""
    tk = _triton_knobs()
    if tk is None:
        return False
    rt, comp = tk.runtime, tk.compilation
    return (
        rt.jit_cache_hook is None
        and rt.jit_post_compile_hook is None
        and not getattr(comp, "always_compile", False)
        and not getattr(comp, "override", False)
        and not getattr(comp, "dump_ir", False)
    )


_env_text = None


def _compile_env() -> str | None:
    """What else Triton's compile cache key hashes, cheaply: triton version and build (the
    installed files' sizes and times instead of ``triton_key()``'s sha256 of them) and the
    compile-affecting environment variables."""
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
    except ImportError:
        return None
    build = triton_build()
    if build is None:
        return None
    env = sorted(get_cache_invalidating_env_vars().items())
    return f"{build}\n{env}"


def triton_build() -> str | None:
    """Triton's version, path and build (sizes and times of libtriton and of the compiler and
    runtime sources), cheaply; None without triton."""
    global _env_text
    try:
        import triton
    except ImportError:
        return None
    if _env_text is None:
        root = Path(triton.__file__).parent
        stats = []
        for rel in sorted(p for p in (root / "_C").iterdir() if p.name.startswith("libtriton")):
            st = rel.stat()
            stats.append(f"{rel.name}:{st.st_size}:{st.st_mtime_ns}")
        for rel in ("compiler/compiler.py", "backends/nvidia/compiler.py", "runtime/jit.py"):
            p = root / rel
            if p.exists():
                st = p.stat()
                stats.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
        _env_text = f"triton {triton.__version__} {root} {' '.join(stats)}"
    return _env_text


_DO_COMPILE_PARAMS = ("key", "signature", "device", "constexprs", "options", "attrs", "warmup")


def _hook_compile(launcher: Launcher) -> bool:
    """Route the JITFunction's compile through the store (instance attribute over the method);
    only where ``_do_compile`` has the triton 3.4-3.6 signature."""
    import inspect

    jit = launcher.jit
    original = getattr(jit, "_do_compile", None)
    if original is None or not hasattr(jit, "device_caches"):
        return False
    try:
        names = tuple(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        return False
    if names != _DO_COMPILE_PARAMS:
        return False

    def _do_compile(key, signature, device, constexprs, options, attrs, warmup):
        try:
            kernel = launcher._load(key, signature, device, constexprs, options, attrs)
        except Exception as exc:  # noqa: BLE001 - never worse than Triton's compile
            _debug("binary store lookup failed for %s: %r", jit, exc)
            kernel = None
        if kernel is not None:
            return kernel
        launcher._options[key] = options
        try:
            kernel = launcher._remote(key, signature, device, constexprs, options, attrs)
        except Exception as exc:  # noqa: BLE001 - never worse than Triton's compile
            _debug("compile helper not used for %s: %r", jit, exc)
            kernel = None
        if kernel is not None:
            return kernel
        triton_key.wait()  # Triton's cache key needs it: kept or hashed ahead, never twice
        return original(key, signature, device, constexprs, options, attrs, warmup)

    jit._do_compile = _do_compile
    return True


def _debug(msg: str, *args) -> None:
    from . import cache

    cache._debug(msg, *args)


@functools.cache
def _submit_params(mode_type: type) -> int:
    import inspect

    return len(inspect.signature(mode_type.submit).parameters)


def _submit_takes_cleanup(mode) -> bool:
    # AsyncCompileMode.submit(key, compile_fn, finalize_fn[, cleanup_fn]): the cleanup runs when
    # the compile raised; nothing is registered before finalize here, so it has nothing to undo
    return _submit_params(type(mode)) >= 5
