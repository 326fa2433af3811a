"""Pin the generated forward source of three variants (tests/golden/*.py).

Codegen is deterministic, so any change to the template, the renderer or the passes shows up
here as a diff to review.  After an intended change, regenerate with::

    ATTNFORGE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest
import torch

from attnforge.codegen import lower
from attnforge.dsl.api import as_mod

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("ATTNFORGE_UPDATE_GOLDEN", "") not in ("", "0")

ALIBI_SLOPES = torch.tensor([2.0 ** (-8.0 * (i + 1) / 8) for i in range(8)])


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def alibi(score, b, h, q_idx, kv_idx):
    return score + ALIBI_SLOPES[h] * (kv_idx - q_idx)


def softcap(score, b, h, q_idx, kv_idx):
    cap = 30.0
    return cap * torch.tanh(score / cap)


VARIANTS = {
    "causal": (None, causal),
    "alibi_causal": (alibi, causal),
    "softcap": (softcap, None),
}


def _source(name: str) -> str:
    score, mask = VARIANTS[name]
    return lower(as_mod(score, "score"), as_mod(mask, "mask")).files["fwd.py"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_generated_forward_source_is_pinned(name):
    path = GOLDEN / f"{name}_fwd.py"
    got = _source(name)
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(got)
    if not path.exists():
        pytest.fail(f"{path} is missing; create it with ATTNFORGE_UPDATE_GOLDEN=1")
    want = path.read_text()
    if got != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                            str(path), "generated", n=2))  # fmt: skip
        pytest.fail(f"generated source changed (ATTNFORGE_UPDATE_GOLDEN=1 to accept):\n{diff}")


def test_codegen_is_deterministic_and_value_independent():
    first = _source("alibi_causal")
    assert _source("alibi_causal") == first
    global ALIBI_SLOPES
    old = ALIBI_SLOPES
    try:
        ALIBI_SLOPES = torch.linspace(0.1, 1.0, 8)  # other captured values: same kernel
        assert _source("alibi_causal") == first
    finally:
        ALIBI_SLOPES = old
