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
import importlib.util
import linecache
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

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


def device_kind(device) -> str:
    """Cache/loader label of a torch device: ``"cpu-interp"``, ``"cuda-sm90"``,
    ``"cuda-sm90-interp"`` (ATTNFORGE_INTERPRET=1, or triton imported in interpreter mode).
    Memoised per (device, ATTNFORGE_INTERPRET text): it runs on every attention call."""
    if getattr(device, "type", None) == "cpu":
        return "cpu-interp"
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return "cpu-interp"
    key = (device, os.environ.get("ATTNFORGE_INTERPRET"))
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
