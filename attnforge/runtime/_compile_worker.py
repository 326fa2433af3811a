"""attnforge's compile helper process (started by ``compile_pool``; never imported by attnforge).

Reads pickled jobs from stdin, compiles each with ``triton.compile`` and writes back the pickled
binary files (metadata ``.json`` and the binary).  Imports nothing but triton and the kernel file
(generated kernels import only triton), so it starts in the time ``import triton`` takes; it
gets ``triton_key()`` (kept by an earlier process, else hashed) before it says ``ready``.
Exits on end of input (the parent closed the pipe or died) or after ``IDLE_S`` without a job.
"""

import hashlib
import importlib.util
import os
import pickle
import select
import sys
from pathlib import Path

IDLE_S = 120.0


def _load(path: str, digest: str, modules: dict):
    """The kernel module of ``path``, checked against the parent's sha256 of the file."""
    found = modules.get(path)
    if found is not None and found[0] == digest:
        return found[1]
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise RuntimeError(f"{path} is not the source the parent compiles")
    name = f"attnforge_compile_worker.k{len(modules)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    modules[path] = (digest, module)
    return module


def _compile(job: dict, modules: dict) -> dict:
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # what else Triton's compile reads must be the parent's, or the binary could differ
    if job["triton"] != (triton.__file__, triton.__version__):
        raise RuntimeError("another triton than the parent's")
    if dict(get_cache_invalidating_env_vars()) != job["env"]:
        raise RuntimeError("compile-affecting environment differs from the parent's")
    fn = getattr(_load(job["path"], job["digest"], modules), job["kernel"])
    if fn.is_gluon():  # fwd_ws.py: Gluon's frontend (Triton's would reject the kernel)
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    kernel = triton.compile(src, target=GPUTarget(*job["target"]), options=job["options"])
    ext = "." + job["binary_ext"]
    files = {
        name: Path(p).read_bytes()
        for name, p in kernel.metadata_group.items()
        if name.endswith(".json") or name.endswith(ext)
    }
    return {"files": files, "hash": kernel.hash, "name": kernel.name}


def _triton_key() -> None:
    """Triton's build hash: the value an earlier process kept (``triton_key.py`` beside this
    file, loaded by path: no attnforge package is imported here), else hashed (~0.3-0.45 s)."""
    try:
        path = Path(sys.argv[1]).with_name("triton_key.py")
        spec = importlib.util.spec_from_file_location("attnforge_compile_worker_key", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module._ensure(replace=True)  # helpers run only with direct launch on
    except Exception:  # noqa: BLE001 - Triton's own function, as ever
        from triton.runtime.cache import triton_key

        triton_key()


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # the reply pipe carries replies only
    os.environ["TRITON_INTERPRET"] = "0"  # kernels compiled, whatever the parent's shell set
    import triton.compiler  # noqa: F401

    _triton_key()  # before the first job, not during it
    stdout.write(b"ready\n")
    stdout.flush()
    modules: dict = {}
    while True:
        # one job at a time, each answered before the next is sent: the buffered reader never
        # holds a whole unread job, so waiting on the descriptor is right
        if not select.select([stdin], [], [], IDLE_S)[0]:
            return
        try:
            job = pickle.load(stdin)
        except EOFError:
            return
        try:
            reply = _compile(job, modules)
        except BaseException as exc:  # noqa: BLE001 - the parent compiles it and reports
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        pickle.dump(reply, stdout)
        stdout.flush()


if __name__ == "__main__":
    main()
