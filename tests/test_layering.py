"""Layers are strict: dsl imports nothing from codegen/runtime; codegen nothing from runtime."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "attnforge"

# layer -> packages it must never import
FORBIDDEN = {
    "dsl": ("attnforge.codegen", "attnforge.runtime"),
    "codegen": ("attnforge.runtime",),
}


def _loaded_after_import(module: str) -> list[str]:
    code = (
        f"import sys, json, {module}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('attnforge'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "", "TRITON_INTERPRET": "1"},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_dsl_alone_loads_no_codegen_or_runtime():
    loaded = _loaded_after_import("attnforge.dsl, attnforge.dsl.api, attnforge.dsl.trace")
    assert "attnforge.dsl.api" in loaded
    bad = [m for m in loaded if m.startswith(FORBIDDEN["dsl"])]
    assert bad == [], f"importing attnforge.dsl pulled in {bad}"


def test_importing_codegen_loads_no_runtime():
    if not (PKG / "codegen" / "__init__.py").exists():
        pytest.skip("no codegen package yet")
    loaded = _loaded_after_import("attnforge.codegen")
    bad = [m for m in loaded if m.startswith(FORBIDDEN["codegen"])]
    assert bad == [], f"importing attnforge.codegen pulled in {bad}"


def _imports(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[tuple[int, str]]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, ast.Import):
            found += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - n.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.append((n.lineno, base))
            found += [(n.lineno, f"{base}.{a.name}") for a in n.names]
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_source_files_do_not_import_upper_layers(layer):
    files = sorted((PKG / layer).rglob("*.py"))
    violations = [
        f"{f.relative_to(ROOT)}:{line}: imports {name}"
        for f in files
        for line, name in _imports(f)
        if name.startswith(FORBIDDEN[layer])
    ]
    assert violations == []


def test_the_scanner_sees_relative_imports(tmp_path):
    probe = tmp_path / "attnforge" / "dsl" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..runtime import api\nfrom . import ir\nimport attnforge.codegen\n")
    names = [n for _, n in _imports(probe, tmp_path)]
    assert "attnforge.runtime.api" in names and "attnforge.dsl.ir" in names
    assert "attnforge.codegen" in names
