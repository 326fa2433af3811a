"""The examples run end to end (tiny sizes, Triton interpreter on CPU) and report small errors.

Each example prints ``max error vs reference...: <value>`` for every check it makes; here every
such value must be below the float32 tolerance. A few examples run in CI, the rest are ``slow``.
"""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ERROR_LINE = re.compile(r"max error vs reference[^:]*: (\S+)")
TOL = 2e-3  # float32 kernels vs the float64 reference, random inputs of unit scale
# bf16 inputs and outputs (8 mantissa bits) vs the float64 reference: gradients of magnitude
# 4-8 are 1/32 apart, so one rounding step of the accumulation order is 3.1e-2
TOL_GPU = 6e-2

FAST = ["sliding_window", "document_mask"]  # plus quickstart, below
SLOW = ["causal", "alibi", "softcap", "prefix_lm", "natten_2d", "learnable_bias"]
ALL = ["quickstart"] + FAST + SLOW


def run_example(name: str, small: bool = True) -> str:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *(["--small"] if small else [])],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"{name}.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def check_errors(name: str, stdout: str, tol: float = TOL) -> None:
    errors = [float(m) for m in ERROR_LINE.findall(stdout)]
    assert errors, f"{name}.py printed no 'max error vs reference' line:\n{stdout[-2000:]}"
    assert max(errors) < tol, f"{name}.py: errors {errors} exceed {tol}:\n{stdout[-2000:]}"


@pytest.mark.parametrize(
    "name", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW]
)  # fmt: skip
def test_example_runs_and_matches_reference(name):
    check_errors(name, run_example(name))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
def test_example_on_gpu_matches_reference_and_times_flex(name):
    if "parse_spec" in (EXAMPLES / f"{name}.py").read_text():
        pytest.importorskip("lark")  # the text DSL (a GPU image may lack it)
    out = run_example(name, small=False)  # the examples' GPU sizes, bf16
    check_errors(name, out, TOL_GPU)
    assert "FlexAttention (compiled)" in out, out[-2000:]


def test_quickstart_shows_ir_block_map_source_and_matches_reference():
    out = run_example("quickstart")
    check_errors("quickstart", out)
    for what in ("-- IR --", "-- block map", "-- generated forward kernel", "def mask_mod"):
        assert what in out, f"quickstart output lacks {what!r}"


@pytest.mark.parametrize("name", ALL)
def test_example_defines_a_module_level_variant(name, monkeypatch):
    from attnforge.runtime.variant import Variant

    monkeypatch.syspath_prepend(str(EXAMPLES))
    namespace = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="example_under_test")
    assert any(isinstance(v, Variant) for v in namespace.values()), name


def test_every_example_is_listed():
    on_disk = {p.stem for p in EXAMPLES.glob("*.py")} - {"_common", "train_tiny"}
    assert on_disk == set(ALL)


def test_readme_knobs_table_lists_every_knob():
    from attnforge.runtime import knobs

    readme = (ROOT / "README.md").read_text()
    table = {m for m in re.findall(r"^\| `(ATTNFORGE_\w+)`", readme, flags=re.M)}
    assert table == {k.name for k in knobs.all_knobs()}


def test_readme_test_command_matches_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0 -e '.[test]' && TRITON_INTERPRET=1 python -m pytest" in readme
    assert "torch==2.13.0" in ci and "TRITON_INTERPRET=1" in ci and "python -m pytest" in ci


def test_readme_python_snippets_run(capsys):
    """The README's API and inspection snippets run as written (in order, one namespace)."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"<README.md python block {i}>", "exec"), namespace)
    assert "def mask_mod" in capsys.readouterr().out  # attn.source("fwd") was printed
