"""Triton compiles in helper processes, for the first call of a new variant.

A new variant's first forward + backward compiles three kernels.  On threads of one process they
barely overlap: Triton's C++ passes (MLIR, LLVM) hold the GIL, so only ptxas runs beside them
(bench/exp/compile_concurrency.py, 2-core box: threads 4.0 s vs serial 6.1-6.6 s for ~2.4 s per
kernel; a probe thread got 38-55% of its speed during a compile).  Here each compile can go to a
helper process (``_compile_worker.py``: imports triton only) that returns the binary files; the
caller (``loader.Launcher``) keeps them in the cache entry's ``BinaryStore`` and builds the
``CompiledKernel`` from them, as for a kept binary.  The helpers never touch a GPU.

Policy: ``prestart`` (a new cache entry for a CUDA device: compiles are coming) spawns the
helpers while the variant is traced and lowered; a compile on the launching thread goes to a
helper only if one is ready (else it compiles in-process as before: no wait for a start), a
compile submitted under Triton's ``AsyncCompileMode`` (``launch.precompile``: the backward's
kernels, on a background thread) waits for one.  Anything unexpected (no helper, a dead helper,
an error reply, another triton or environment) makes the caller compile in-process, so errors
are reported exactly as before.  ``ATTNFORGE_COMPILE_WORKERS`` = number of helpers (0: off).
"""

from __future__ import annotations

import atexit
import os
import pickle
import select
import subprocess
import sys
import threading
from pathlib import Path

_WORKER = Path(__file__).with_name("_compile_worker.py")
# run the worker file without its directory first on sys.path (runtime/'s modules would shadow)
_BOOT = "import sys; del sys.path[0]; p = sys.argv[1]; exec(compile(open(p).read(), p, 'exec'))"
_KNOB = "ATTNFORGE_COMPILE_WORKERS"


class _Worker:
    def __init__(self) -> None:
        from . import knobs

        env = dict(os.environ, TRITON_INTERPRET="0")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(_WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if knobs.get("ATTNFORGE_DEBUG") else subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float | None) -> bool:
        """Ready for a job (its ``ready`` line read within ``timeout`` s; None: wait)."""
        if not self.ready and self.alive():
            if select.select([self.proc.stdout], [], [], timeout)[0]:
                self.ready = self.proc.stdout.readline() == b"ready\n"
        return self.ready and self.alive()

    def call(self, job: dict) -> dict:
        if not self.wait_ready(None):
            raise RuntimeError("compile helper did not start")
        pickle.dump(job, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.flush()
        return pickle.load(self.proc.stdout)

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the helper exits at end of input
        except OSError:
            pass


_lock = threading.Condition()
_idle: list[_Worker] = []
_count = 0  # helpers alive or lent out
_broken = False  # a helper could not be started: in-process for the rest of the process


def workers() -> int:
    """Helpers allowed now (0: compile in-process); POSIX only (select on pipes)."""
    if _broken or os.name != "posix":
        return 0
    from . import knobs

    return max(0, knobs.get(_KNOB))


def _spawn() -> _Worker | None:
    global _broken
    try:
        return _Worker()
    except OSError:
        _broken = True
        return None


def prestart() -> None:
    """Start the helpers now (returns at once) so that they are ready when compiles come."""
    global _count
    n = workers()
    with _lock:
        while _count < n:
            worker = _spawn()
            if worker is None:
                return
            _idle.append(worker)
            _count += 1


def _take(wait: bool) -> _Worker | None:
    """A ready helper; ``wait``: start one / wait for one if none is ready."""
    global _count
    n = workers()
    if n == 0:
        return None
    with _lock:
        while True:
            for worker in list(_idle):
                if not worker.alive():  # idle timeout, or killed
                    _idle.remove(worker)
                    _count -= 1
                elif worker.wait_ready(0):
                    _idle.remove(worker)
                    return worker
            if not wait:
                return None
            if _idle:  # starting: lend one and let the caller wait for it outside the lock
                return _idle.pop(0)
            if _count < n:
                worker = _spawn()
                if worker is None:
                    return None
                _count += 1
                return worker
            _lock.wait()


def _give_back(worker: _Worker, ok: bool) -> None:
    global _count
    with _lock:
        if ok and worker.alive():
            _idle.append(worker)
        else:
            worker.close()
            _count -= 1
        _lock.notify()


def compile(job: dict, wait: bool) -> dict | None:
    """A helper's reply to ``job`` (``{"files", "hash", "name"}`` or ``{"error"}``), or None
    when no helper is ready (``wait=False``) or helpers are off.  Raises if the helper dies."""
    worker = _take(wait)
    if worker is None:
        return None
    ok = False
    try:
        reply = worker.call(job)
        ok = True
        return reply
    finally:
        _give_back(worker, ok)


@atexit.register
def _shutdown() -> None:
    with _lock:
        for worker in _idle:
            worker.close()
