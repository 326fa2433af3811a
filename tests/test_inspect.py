"""``python -m attnforge``: inspect (finding variants in a file), knobs, cache."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnforge import __main__ as cli
from attnforge.runtime import cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_variant import E2E  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

FILE = """
import torch
from attnforge.dsl import ir
from attnforge.dsl.ir import Op, node
from attnforge.dsl.mod import Mod
from attnforge.runtime.variant import variant

causal = Mod("mask", node(Op.GE, ir.Q_IDX, ir.KV_IDX), name="causal")
half = Mod("score", node(Op.MUL, ir.SCORE, ir.const(0.5)), name="half")
attn = variant(score_mod=half, mask_mod=causal)
alias = attn
table = {"plain": variant(mask_mod=causal), "n": 3}


def generate_banded():
    return Mod("mask", node(Op.LE, node(Op.SUB, ir.Q_IDX, ir.KV_IDX), ir.const(2)), name="band")


def plain_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def bad_score(score, b, h, q_idx, kv_idx):
    if score > 0:  # Python `if` on a traced value: reported, the other items still print
        return score
    return -score


def generate_needs_args(w):
    raise AssertionError("factories with required arguments are not called")


if __name__ == "__main__":
    raise AssertionError("the demo must not run under inspect")
"""


@pytest.fixture
def example(tmp_path):
    path = tmp_path / "example_variants.py"
    path.write_text(FILE)
    return path


@pytest.fixture
def fake_block_masks(monkeypatch):
    from attnforge.runtime import blockmask

    def fake(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128):
        return f"<map of {mask_mod.name} {Q_LEN}x{KV_LEN}>"

    monkeypatch.setattr(blockmask, "create_block_mask", fake)


def test_find_variants_in_definition_order_once_each(example):
    found = cli.find_variants(cli.load_namespace(str(example)))
    names = [(name, kind) for name, kind, _ in found]
    assert names == [
        ("causal", "mod"),
        ("half", "mod"),
        ("attn", "variant"),
        ("table['plain']", "variant"),
        ("generate_banded()", "mod"),
        ("plain_mask", "mask_mod function"),
        ("bad_score", "score_mod function"),
    ]


def test_load_namespace_restores_sys_path_and_argv(example):
    before = (list(sys.path), list(sys.argv))
    cli.load_namespace(str(example))
    assert (list(sys.path), list(sys.argv)) == before


def test_inspect_prints_ir_and_block_map(example, fake_block_masks):
    out = io.StringIO()
    rc = cli.cmd_inspect(
        cli.build_parser().parse_args(
            ["inspect", str(example), "--len", "256", "--kv-len", "128", "--source", "none"]
        ),
        out,
    )
    text = out.getvalue()
    assert rc == 1, text  # bad_score does not trace
    head, bad = text.split("== bad_score (score_mod function) ")
    assert "error: DSLError" in bad and "torch.where" in bad and "error" not in head
    assert "<map of plain_mask 256x128>" in head
    assert "== attn (variant) ==" in text and "== generate_banded() (mod) ==" in text
    assert "%1 = mul %0, 0.5 : float" in text
    assert "-- block map L=256 S=128 --\n<map of causal 256x128>" in text
    assert "(no mask: every block is full)" in text  # the score-only mod `half`
    assert "source --" not in text


def test_inspect_name_filter_and_missing_file(example, fake_block_masks, tmp_path):
    out = io.StringIO()
    args = cli.build_parser().parse_args(
        ["inspect", str(example), "--name", "table", "--source", "none"]
    )
    assert cli.cmd_inspect(args, out) == 0
    assert out.getvalue().count("== ") == 1 and "table['plain']" in out.getvalue()
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["inspect", str(tmp_path / "nope.py")])
    with pytest.raises(SystemExit, match="--len must be >= 1"):
        cli.main(["inspect", str(example), "--len", "0"])


def test_inspect_reports_failures_and_keeps_going(example, monkeypatch):
    from attnforge.runtime import blockmask

    def broken(*args, **kwargs):
        raise RuntimeError("planner exploded")

    monkeypatch.setattr(blockmask, "create_block_mask", broken)
    out = io.StringIO()
    rc = cli.cmd_inspect(
        cli.build_parser().parse_args(["inspect", str(example), "--source", "none"]), out
    )
    assert rc == 1
    assert out.getvalue().count("error: RuntimeError: planner exploded") == 5  # the 5 masked items
    assert out.getvalue().count("-- IR --") == 6  # bad_score fails before its IR


def test_inspect_shows_the_source_that_loads(example, fake_block_masks, monkeypatch, tmp_path):
    from test_cache import FakeLowered

    import attnforge.codegen as codegen

    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(codegen, "lower", lambda s, m: FakeLowered(f"{s}{m}"), raising=False)
    cache.cache_clear()
    try:
        out = io.StringIO()
        args = cli.build_parser().parse_args(
            ["inspect", str(example), "--name", "attn", "--source", "bwd"]
        )
        assert cli.cmd_inspect(args, out) == 0
        text = out.getvalue()
        path = text.split("-- bwd source --\n# ")[1].splitlines()[0]
        assert Path(path).read_text() in text and path.endswith("bwd.py")
    finally:
        cache.cache_clear()


def test_knobs_and_cache_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(tmp_path / "c"))
    cache.cache_clear()
    assert cli.main(["knobs"]) == 0
    assert "ATTNFORGE_DUMP_DIR" in capsys.readouterr().out
    assert cli.main(["cache", "--clear"]) == 0
    text = capsys.readouterr().out
    assert "cleared" in text and f"cache_dir        {tmp_path / 'c'}" in text
    assert "disk_entries     0" in text


def _run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "attnforge", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_python_dash_m_runs():
    proc = _run_cli("knobs")
    assert proc.returncode == 0, proc.stderr
    assert "ATTNFORGE_CACHE_DIR" in proc.stdout


@E2E
def test_inspect_example_end_to_end(tmp_path):
    example = REPO / "examples" / "sliding_window.py"
    if not example.exists():
        pytest.skip("examples/sliding_window.py not written yet")
    env_dir = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-m", "attnforge", "inspect", str(example), "--len", "256"],
        env=dict(os.environ, PYTHONPATH=str(REPO), ATTNFORGE_CACHE_DIR=env_dir),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "== attn (variant) ==" in out and "-- IR --" in out
    assert "-- block map L=256 S=256 --" in out and "-- fwd source --" in out
    assert "@triton.jit" in out
    assert "max error" not in out  # the demo did not run
