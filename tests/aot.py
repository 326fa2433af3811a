"""Building generated kernels for sm_90 on a machine without a GPU (CI has none)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def run_sm90_build(template: str, tmp_path, timeout: int) -> str:
    """Run ``template`` (a script with a ``{tests}`` hole; it compiles through Triton's CUDA
    backend) in a process where triton is not in interpreter mode; its stdout.  Skips where this
    Triton has no CUDA backend or no ptxas."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton has no CUDA backend here")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=str(TESTS.parent))  # fmt: skip
    code = template.format(tests=str(TESTS))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas available")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
