import os
import sys
from pathlib import Path

import pytest
import torch

# tests import their shared helpers (cases.py) by module name
sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. The
# variable is read when the kernels are decorated, so it is set before dpf_ext is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dpf_ext import ops  # noqa: E402
from dpf_ext.nn import crossover  # noqa: E402

# compute="auto" decides by densities fixed here, not by this machine's timings (inherited
# by the command-line runs the tests start; tests/test_crossover.py measures)
os.environ[crossover.ENV] = "linear=0.2,conv=0.3"

STRICT = os.environ.get("DPF_EXT_STRICT_BUILD") == "1"

# (backend, device) pairs every op test runs on
BACKENDS = [("reference", "cpu"), ("cpp", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]
if os.environ.get("TRITON_INTERPRET") == "1":
    BACKENDS.append(("triton-interpreted", "cpu"))


def _skip_reason(name: str, device: str) -> str | None:
    name = name.removesuffix("-interpreted")
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device"
    if name not in ops.available_backends(device):
        if STRICT:
            pytest.fail(f"backend {name!r} was not built (DPF_EXT_STRICT_BUILD=1)")
        return f"backend {name!r} was not built"
    return None


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def isa(request):
    """Each instruction set of the CPU sparse kernels in turn (skipped where this CPU lacks
    it, or the kernels are not built)."""
    if ops.simd() == "none":
        if STRICT:
            pytest.fail("the C++ kernels were not built (DPF_EXT_STRICT_BUILD=1)")
        pytest.skip("the C++ kernels are not built")
    try:
        previous = ops.simd(request.param)
    except RuntimeError:
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    ops.simd(previous)


@pytest.fixture(params=BACKENDS, ids=[b for b, _ in BACKENDS])
def device(request, monkeypatch):
    """Runs the test once per backend; yields the device its tensors must live on."""
    name, dev = request.param
    reason = _skip_reason(name, dev)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("DPF_EXT_BACKEND", name.removesuffix("-interpreted"))
    return torch.device(dev)


def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device", ("", ""))[1] == "cuda":
            item.add_marker(pytest.mark.gpu)
