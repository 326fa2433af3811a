"""Kernel cache, loader and knobs, with fake lowered kernels (no codegen needed).

A fake ``Lowered`` carries a trivial Triton kernel; every test gets its own cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attnforge.runtime import cache, knobs, loader

REPO = Path(__file__).resolve().parent.parent

FWD = """\
import triton
import triton.language as tl


@triton.jit
def _twice(x):
    return x * 2.0


@triton.jit
def kernel(X, Y, N, C, BLOCK: tl.constexpr):
    # y = 2 * x * C; library calls (cdiv, max, member sum) must work under the interpreter too
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m, other=0.0)
    zero = tl.max(x, axis=0) * 0.0 + x.sum() * 0.0 + tl.cdiv(N, BLOCK) * 0.0
    tl.store(Y + offs, _twice(x) * C + zero, mask=m)
"""
BWD = FWD.replace("_twice(x) * C", "x * C")  # y = x * C


class FakeLowered:
    """Stands in for ``attnforge.codegen.Lowered``; counts how often ``files`` is produced."""

    def __init__(self, salt: str = "", bwd: bool = True):
        self._files = {
            "fwd.py": FWD + f"# {salt}\n",
            "ir.txt": f"ir {salt}\n",
            "meta.json": json.dumps({"salt": salt}),
        }
        if bwd:
            self._files["bwd.py"] = BWD + f"# {salt}\n"
        self.key = hashlib.sha256(json.dumps(self._files, sort_keys=True).encode()).hexdigest()
        self.codegen_calls = 0

    @property
    def files(self):
        self.codegen_calls += 1
        return dict(self._files)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(d))
    for name in ("ATTNFORGE_DUMP_DIR", "ATTNFORGE_DISABLE_CACHE", "ATTNFORGE_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    cache.cache_clear()
    yield d
    cache.cache_clear()


def _run(module, n=37, c=3.0):
    x = torch.randn(n)
    y = torch.empty(n)
    module.kernel[(triton_cdiv(n, 16),)](x, y, n, c, BLOCK=16)
    return x, y


def triton_cdiv(a, b):
    return -(-a // b)


def _check_fwd(module):
    x, y = _run(module)
    torch.testing.assert_close(y, 2 * x * 3.0)


def _entry(low, kind="cpu-interp"):
    return cache.entry_dir(low.key, kind)


# -- memory and disk hits --


def test_miss_then_memory_hits_and_kernel_runs(cache_dir):
    low = FakeLowered("a")
    first = cache.load_kernels(low, "cpu-interp")
    for _ in range(3):
        assert cache.load_kernels(low, "cpu-interp") is first
    info = cache.cache_info()
    assert (info.misses, info.hits, info.compiles, info.disk_hits) == (1, 3, 1, 0)
    assert info.entries == 1 and info.disk_entries == 1
    assert low.codegen_calls == 1
    _check_fwd(first["fwd"])
    x, y = _run(first["bwd"])
    torch.testing.assert_close(y, x * 3.0)


def test_disk_hit_skips_codegen(cache_dir):
    cache.load_kernels(FakeLowered("b"), "cpu-interp")
    cache.cache_clear()  # a fresh process: memory empty, disk warm
    low = FakeLowered("b")
    mods = cache.load_kernels(low, "cpu-interp")
    info = cache.cache_info()
    assert (info.misses, info.disk_hits, info.compiles) == (1, 1, 0)
    assert low.codegen_calls == 0
    _check_fwd(mods["fwd"])


def test_entry_layout_and_checksums(cache_dir):
    low = FakeLowered("c")
    cache.load_kernels(low, "cpu-interp")
    d = _entry(low)
    assert d.parent.parent == cache_dir
    assert d.parent.name == f"cpu-interp-{cache.compiler_fingerprint()}"
    assert sorted(p.name for p in d.iterdir()) == [
        "bwd.py",
        "entry.json",
        "fwd.py",
        "ir.txt",
        "meta.json",
    ]
    entry = json.loads((d / "entry.json").read_text())
    for name, text in low._files.items():
        assert (d / name).read_text() == text
        assert entry["files"][name] == hashlib.sha256(text.encode()).hexdigest()


def test_fwd_only_entry(cache_dir):
    mods = cache.load_kernels(FakeLowered("fwd-only", bwd=False), "cpu-interp")
    assert sorted(mods) == ["fwd"]


def test_source_of_is_the_file_that_runs(cache_dir):
    low = FakeLowered("src")
    mods = cache.load_kernels(low, "cpu-interp")
    assert cache.source_of(mods["fwd"]) == low._files["fwd.py"]
    assert Path(mods["fwd"].__file__) == _entry(low) / "fwd.py"


def test_device_kinds_are_separate_entries(cache_dir):
    low = FakeLowered("kinds")
    a = cache.load_kernels(low, "cpu-interp")
    b = cache.load_kernels(low, "cuda-sm90-interp")
    assert a["fwd"] is not b["fwd"]
    assert cache.cache_info().disk_entries == 2
    _check_fwd(b["fwd"])


def test_new_compiler_fingerprint_never_serves_old_entry(cache_dir, monkeypatch):
    cache.load_kernels(FakeLowered("fp"), "cpu-interp")
    cache.cache_clear()
    monkeypatch.setattr(cache, "compiler_fingerprint", lambda: "0" * 20)
    cache.load_kernels(FakeLowered("fp"), "cpu-interp")
    info = cache.cache_info()
    assert (info.disk_hits, info.compiles) == (0, 1)


def test_fingerprint_tracks_versions(monkeypatch):
    import triton

    before = cache.compiler_fingerprint()
    cache.compiler_fingerprint.cache_clear()
    monkeypatch.setattr(triton, "__version__", "0.0.0-test")
    try:
        assert cache.compiler_fingerprint() != before
    finally:
        cache.compiler_fingerprint.cache_clear()


def test_cache_clear_disk(cache_dir):
    cache.load_kernels(FakeLowered("clr"), "cpu-interp")
    assert cache.cache_info().disk_entries == 1
    cache.cache_clear(disk=True)
    info = cache.cache_info()
    assert (info.entries, info.disk_entries, info.misses) == (0, 0, 0)


# -- damage and recovery --


def _damage_file(d):
    (d / "fwd.py").write_text(FWD.replace("2.0", "5.0"))


def _damage_marker(d):
    (d / "entry.json").write_text("{not json")


def _remove_file(d):
    (d / "bwd.py").unlink()


def _bad_source_good_checksum(d):
    bad = b"import triton\ndef broken(:\n"
    (d / "fwd.py").write_bytes(bad)
    entry = json.loads((d / "entry.json").read_text())
    entry["files"]["fwd.py"] = hashlib.sha256(bad).hexdigest()
    (d / "entry.json").write_text(json.dumps(entry))


@pytest.mark.parametrize(
    "damage", [_damage_file, _damage_marker, _remove_file, _bad_source_good_checksum]
)
def test_corrupt_entry_warns_and_rebuilds(cache_dir, damage):
    low = FakeLowered("corrupt")
    cache.load_kernels(low, "cpu-interp")
    d = _entry(low)
    damage(d)
    cache.cache_clear()
    with pytest.warns(RuntimeWarning, match="corrupt kernel cache entry") as rec:
        mods = cache.load_kernels(low, "cpu-interp")
    assert str(d) in str(rec[0].message)
    assert cache.cache_info().compiles == 1
    _check_fwd(mods["fwd"])  # the rebuilt kernel, not the damaged one
    assert (d / "fwd.py").read_text() == low._files["fwd.py"]
    cache.cache_clear()  # and the rebuilt entry is healthy
    cache.load_kernels(low, "cpu-interp")
    assert cache.cache_info().disk_hits == 1


def test_half_written_entry_is_ignored_silently(cache_dir, recwarn):
    low = FakeLowered("half")
    d = _entry(low)
    d.mkdir(parents=True)
    (d / "fwd.py").write_text("garbage from a writer that died")  # no entry.json
    mods = cache.load_kernels(low, "cpu-interp")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    _check_fwd(mods["fwd"])
    assert (d / "entry.json").exists()


def test_unwritable_dir_warns_once_and_runs(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", str(blocker / "cache"))
    cache.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="not writable") as rec:
            mods = cache.load_kernels(FakeLowered("ro1"), "cpu-interp")
            cache.load_kernels(FakeLowered("ro2"), "cpu-interp")
        assert len([w for w in rec if "not writable" in str(w.message)]) == 1
        assert str(blocker / "cache") in str(rec[0].message)
        _check_fwd(mods["fwd"])
        assert not str(mods["fwd"].__file__).startswith(str(blocker))
    finally:
        cache.cache_clear()


def test_disable_cache_keeps_disk_clean(cache_dir, monkeypatch):
    monkeypatch.setenv("ATTNFORGE_DISABLE_CACHE", "1")
    mods = cache.load_kernels(FakeLowered("nodisk"), "cpu-interp")
    _check_fwd(mods["fwd"])
    assert not cache_dir.exists()


def test_dump_dir_writes_files(cache_dir, tmp_path, monkeypatch):
    dump = tmp_path / "dump"
    monkeypatch.setenv("ATTNFORGE_DUMP_DIR", str(dump))
    low = FakeLowered("dump")
    cache.load_kernels(low, "cpu-interp")
    got = {p.name: p.read_text() for p in (dump / low.key).iterdir()}
    assert got == low._files


def test_debug_logs_hits_and_misses(cache_dir, monkeypatch, caplog):
    monkeypatch.setenv("ATTNFORGE_DEBUG", "1")
    low = FakeLowered("dbg")
    with caplog.at_level(logging.DEBUG, logger="attnforge"):
        cache.load_kernels(low, "cpu-interp")
        cache.load_kernels(low, "cpu-interp")
    text = caplog.text
    assert "miss" in text and "hit" in text and "import" in text and "ms" in text


def test_public_cache_info(cache_dir):
    import attnforge as af

    info = af.cache_info()
    assert info.cache_dir == str(cache_dir)
    assert info._asdict()["hits"] == 0


# -- processes --


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from test_cache import FakeLowered, _check_fwd
from attnforge.runtime import cache
from attnforge.runtime.loader import triton_library_interpreted
mods = cache.load_kernels(FakeLowered({salt!r}), "cpu-interp")
_check_fwd(mods["fwd"])
print(json.dumps(dict(cache.cache_info()._asdict(), lib_interp=triton_library_interpreted())))
"""


def _spawn(cache_dir, salt, triton_interpret=True):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(
        ATTNFORGE_CACHE_DIR=str(cache_dir),
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    if triton_interpret:
        env["TRITON_INTERPRET"] = "1"
    code = textwrap.dedent(_CHILD.format(tests=str(REPO / "tests"), salt=salt))
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_concurrent_processes_share_one_entry(cache_dir):
    """Two processes build the same entry at once; one imported triton without
    TRITON_INTERPRET (its tl.max / tl.cdiv / x.sum() are compiled-mode) and must still run the
    kernel interpreted. Afterwards this process finds the entry on disk and compiles nothing."""
    writers = [_spawn(cache_dir, "shared"), _spawn(cache_dir, "shared", triton_interpret=False)]
    infos = [_result(w) for w in writers]
    assert [i["lib_interp"] for i in infos] == [True, False]
    for info in infos:
        assert info["misses"] == 1 and info["compiles"] + info["disk_hits"] == 1
    assert not list(cache_dir.rglob("*.tmp"))
    low = FakeLowered("shared")
    _check_fwd(cache.load_kernels(low, "cpu-interp")["fwd"])
    info = cache.cache_info()
    assert (info.disk_hits, info.compiles, info.disk_entries, low.codegen_calls) == (1, 0, 1, 0)


# -- loader --


def test_loader_builds_interpreted_and_compiled_modules_side_by_side(tmp_path):
    from triton.runtime.interpreter import InterpretedFunction

    path = tmp_path / "k.py"
    path.write_text(FWD)
    before = os.environ.get("TRITON_INTERPRET")
    interp = loader.load_module(path, "attnforge_test.k_interp", interpret=True)
    compiled = loader.load_module(path, "attnforge_test.k_cuda", interpret=False)
    assert os.environ.get("TRITON_INTERPRET") == before
    assert isinstance(interp.kernel, InterpretedFunction)
    assert not isinstance(compiled.kernel, InterpretedFunction)
    assert sys.modules["attnforge_test.k_interp"] is interp
    _check_fwd(interp)


# A scalar condition (per program: the batch index) and a block condition in one load mask, as
# the generated loads of captured tensors have: the interpreter used to splat the scalar as int32
# data, which triton 3.9's masked load rejects ("mask has unsupported dtype").
ROW_GATHER = """\
import triton
import triton.language as tl


@triton.jit
def kernel(T, Y, ROWS, COLS, stride_t, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)[None, :]
    x = tl.load(T + b * stride_t + offs, mask=(b < ROWS) & (offs < COLS), other=-1.0)
    tl.store(Y + b * BLOCK + offs, x)
"""


def test_interpreted_load_mask_of_scalar_and_block_conditions(tmp_path):
    from triton.runtime.interpreter import InterpreterBuilder

    path = tmp_path / "gather.py"
    path.write_text(ROW_GATHER)
    mod = loader.load_module(path, "attnforge_test.gather", interpret=True)
    splat = InterpreterBuilder.create_splat
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    y = torch.zeros(4, 8)
    mod.kernel[(4,)](t, y, 3, 4, t.stride(0), BLOCK=8)
    want = torch.full((4, 8), -1.0)
    want[:3, :4] = t
    torch.testing.assert_close(y, want)
    assert InterpreterBuilder.create_splat is splat  # the launch's interpreter fix is scoped


def test_loader_honours_and_restores_triton_knob_override(tmp_path):
    triton_knobs = pytest.importorskip("triton.knobs")
    from triton.runtime.interpreter import InterpretedFunction

    path = tmp_path / "k.py"
    path.write_text(FWD)
    triton_knobs.runtime.interpret = False  # a Python-level override beats the env var
    try:
        mod = loader.load_module(path, "attnforge_test.k_override", interpret=True)
        assert isinstance(mod.kernel, InterpretedFunction)
        assert vars(triton_knobs.runtime)["interpret"] is False
    finally:
        del triton_knobs.runtime.interpret
        if os.environ.get("TRITON_INTERPRET") == "0":  # the knob setter also wrote the env
            os.environ["TRITON_INTERPRET"] = "1"


def test_loader_import_error_unregisters_module(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def broken(:\n")
    with pytest.raises(SyntaxError):
        loader.load_module(path, "attnforge_test.bad", interpret=True)
    assert "attnforge_test.bad" not in sys.modules


def test_device_kind():
    assert loader.device_kind("cpu") == "cpu-interp"
    assert loader.is_interpreted("cpu-interp") and not loader.is_interpreted("cuda-sm90")
    with pytest.raises(ValueError, match="meta"):
        loader.device_kind("meta")


# -- knobs --


def test_knobs_read_at_call_time(monkeypatch):
    monkeypatch.setenv("ATTNFORGE_DEBUG", "yes")
    assert knobs.get("ATTNFORGE_DEBUG") is True and knobs.debug is True
    monkeypatch.setenv("ATTNFORGE_DEBUG", "0")
    assert knobs.get("DEBUG") is False
    monkeypatch.setenv("ATTNFORGE_CACHE_DIR", "~/x")
    assert knobs.cache_dir == Path("~/x").expanduser()
    monkeypatch.delenv("ATTNFORGE_CACHE_DIR")
    assert knobs.cache_dir == Path("~/.cache/attnforge").expanduser()
    assert knobs.dump_dir is None or "ATTNFORGE_DUMP_DIR" in os.environ


def test_knob_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("ATTNFORGE_DEBUG", "maybe")
    with pytest.raises(ValueError, match="ATTNFORGE_DEBUG='maybe'.*1/0"):
        knobs.get("ATTNFORGE_DEBUG")
    with pytest.raises(KeyError, match="ATTNFORGE_NOPE"):
        knobs.get("ATTNFORGE_NOPE")
    with pytest.raises(AttributeError):
        knobs.nope  # noqa: B018


def test_describe_lists_every_knob():
    text = knobs.describe()
    for name in (
        "ATTNFORGE_DEBUG",
        "ATTNFORGE_CACHE_DIR",
        "ATTNFORGE_DUMP_DIR",
        "ATTNFORGE_INTERPRET",
        "ATTNFORGE_DISABLE_CACHE",
    ):
        assert name in text
    assert all(k.doc for k in knobs.all_knobs())


def test_fresh_source_that_fails_to_import_raises_and_is_not_published(cache_dir):
    low = FakeLowered("broken")
    low._files["fwd.py"] = "def broken(:\n"
    with pytest.raises(SyntaxError):
        cache.load_kernels(low, "cpu-interp")
    assert not (_entry(low) / "entry.json").exists()
    assert cache.cache_info().entries == 0


def test_autotuned_interpreted_kernel_is_self_contained(tmp_path):
    path = tmp_path / "tuned.py"
    path.write_text(
        FWD.replace(
            "@triton.jit\ndef kernel",
            "@triton.autotune(configs=[triton.Config({}, num_warps=1)], key=['N'])\n"
            "@triton.jit\ndef kernel",
        )
    )
    mod = loader.load_module(path, "attnforge_test.tuned", interpret=True)
    assert type(mod.kernel.fn).__name__ == "SelfContainedInterpretedFunction"
    _check_fwd(mod)


# -- BinaryStore: compiled GPU binaries kept in an entry --------------------------------------


def _binary_files():
    return {"k.json": b'{"name": "k"}', "k.cubin": bytes(range(256)) * 8}


def test_binary_store_round_trip(tmp_path):
    store = cache.BinaryStore(tmp_path / "bin")
    assert store.get("key-1") is None
    assert store.put("key-1", _binary_files(), {"hash": "abc", "name": "k"})
    paths, meta = store.get("key-1")
    assert meta == {"hash": "abc", "name": "k"}
    assert {n: p.read_bytes() for n, p in paths.items()} == _binary_files()
    assert store.get("key-2") is None  # another key: a miss


def test_binary_store_key_must_match_in_full(tmp_path):
    store = cache.BinaryStore(tmp_path / "bin")
    store.put("key-1", _binary_files(), {"hash": "abc"})
    manifest = next((tmp_path / "bin").rglob("manifest.json"))
    data = json.loads(manifest.read_text())
    data["key"] = "key-1 of another build"  # as if two keys shared a directory hash
    manifest.write_text(json.dumps(data))
    assert store.get("key-1") is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "manifest"])
def test_binary_store_damage_warns_and_misses(tmp_path, damage):
    store = cache.BinaryStore(tmp_path / "bin")
    store.put("key-1", _binary_files(), {"hash": "abc"})
    cubin = next((tmp_path / "bin").rglob("k.cubin"))
    manifest = cubin.parent / "manifest.json"
    if damage == "flip":
        data = bytearray(cubin.read_bytes())
        data[100] ^= 1
        cubin.write_bytes(bytes(data))
    elif damage == "truncate":
        cubin.write_bytes(cubin.read_bytes()[:10])
    elif damage == "missing":
        cubin.unlink()
    else:
        manifest.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="corrupt compiled binary"):
        assert store.get("key-1") is None
    assert not manifest.exists()  # discarded: the next save rewrites it
    assert store.get("key-1") is None
    assert store.put("key-1", _binary_files(), {"hash": "abc"})
    assert store.get("key-1") is not None


def test_binary_store_unwritable_is_silent(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = cache.BinaryStore(blocker / "bin")  # a path below a regular file
    assert store.put("key-1", _binary_files(), {}) is False
    assert store.get("key-1") is None


def test_binary_store_rejects_odd_names(tmp_path):
    store = cache.BinaryStore(tmp_path / "bin")
    assert store.put("k", {"../escape.cubin": b"x"}, {}) is False
    assert store.put("k", {"manifest.json": b"x"}, {}) is False
