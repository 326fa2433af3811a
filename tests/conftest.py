import os

import pytest

# CPU runs use the Triton interpreter; set it before anything imports triton kernels.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_compile_helpers(request, monkeypatch):
    # Tests that fake Triton's GPU compile on a CPU box must compile in-process: a compile
    # helper (ATTNFORGE_COMPILE_WORKERS, default 3) would run the real compiler.  GPU tests
    # and the tests that set the knob themselves keep the default.
    if "gpu" not in request.keywords and "ATTNFORGE_COMPILE_WORKERS" not in os.environ:
        monkeypatch.setenv("ATTNFORGE_COMPILE_WORKERS", "0")
    yield


@pytest.fixture
def device():
    return "cuda" if _HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tma_descriptor_calls(monkeypatch):
    """A list that grows by one at every forward launch built with TMA descriptors."""
    from attnforge.runtime import launch

    calls = []
    real = launch._fwd_descriptors
    monkeypatch.setattr(launch, "_fwd_descriptors", lambda *a: calls.append(1) or real(*a))
    return calls
