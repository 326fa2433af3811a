"""Triton's build hash kept across processes (``runtime/triton_key.py``): the same value as
Triton's own ``triton_key()``, never a stale one."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from attnforge.runtime import triton_key as tk

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json
import triton.runtime.cache as c
from attnforge.runtime import triton_key as tk
original = c.triton_key
tk.wait()
print(json.dumps({"replaced": c.triton_key is not original, "value": c.triton_key(),
                  "hashed": original.cache_info().currsize}))
"""


def _child(env) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kept_value_is_tritons_own(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    env.pop("ATTNFORGE_DIRECT_LAUNCH", None)
    first = _child(env)  # hashes (Triton's function) and keeps the value
    assert not first["replaced"] and first["hashed"] == 1
    assert len(list((tmp_path / "attnforge-triton-key").glob("*.json"))) == 1
    second = _child(env)  # reads it: nothing hashed, the same string
    assert second["replaced"] and second["hashed"] == 0
    assert second["value"] == first["value"]
    off = _child(dict(env, ATTNFORGE_DIRECT_LAUNCH="0"))  # Triton's own path: not replaced
    assert not off["replaced"] and off["hashed"] == 1 and off["value"] == first["value"]


def _fake_triton(calls: list):
    import triton.runtime.cache as real

    @functools.lru_cache
    def triton_key():
        calls.append(1)
        return "value-1"

    return types.SimpleNamespace(__file__=real.__file__, triton_key=triton_key)


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(tk, "_cache_dir", lambda: tmp_path)
    monkeypatch.delenv("ATTNFORGE_DIRECT_LAUNCH", raising=False)
    return tmp_path


def test_kept_value_is_used_only_while_every_file_is_unchanged(fake_cache, monkeypatch):
    calls: list = []
    extra = fake_cache / "libtriton_extra.so"
    extra.write_bytes(b"1")
    files = tk._files
    monkeypatch.setattr(tk, "_files", lambda root: [*files(root), extra])
    first = _fake_triton(calls)
    tk._ensure(first)
    assert calls == [1] and not getattr(first.triton_key, "__attnforge__", False)
    second = _fake_triton(calls)
    tk._ensure(second)
    assert calls == [1] and second.triton_key() == "value-1"  # kept value, nothing hashed
    # a file that changed (size or mtime): hashed again, and kept under the new identity
    extra.write_bytes(b"22")
    third = _fake_triton(calls)
    tk._ensure(third)
    assert calls == [1, 1] and not getattr(third.triton_key, "__attnforge__", False)
    assert len(list((fake_cache / "attnforge-triton-key").glob("*.json"))) == 2


def test_damaged_or_foreign_record_is_not_used(fake_cache):
    calls: list = []
    tk._ensure(_fake_triton(calls))
    (record,) = (fake_cache / "attnforge-triton-key").glob("*.json")
    data = json.loads(record.read_text())
    for bad in ({**data, "value": "value-2"}, {**data, "identity": "other"}, {"value": "x"}):
        record.write_text(json.dumps(bad))
        fake = _fake_triton(calls)
        tk._ensure(fake)
        assert not getattr(fake.triton_key, "__attnforge__", False)
    record.write_text("not json")
    tk._ensure(_fake_triton(calls))
    assert len(calls) == 5


def test_not_replaced_once_computed_or_with_direct_launch_off(fake_cache, monkeypatch):
    calls: list = []
    tk._ensure(_fake_triton(calls))
    done = _fake_triton(calls)
    done.triton_key()  # this process computed it already: left alone
    tk._ensure(done)
    assert not getattr(done.triton_key, "__attnforge__", False)
    monkeypatch.setenv("ATTNFORGE_DIRECT_LAUNCH", "0")
    fake = _fake_triton(calls)
    tk._ensure(fake)
    assert not getattr(fake.triton_key, "__attnforge__", False) and fake.triton_key() == "value-1"
