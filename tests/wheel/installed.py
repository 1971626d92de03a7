"""Run inside an environment where dpf_ext is installed from its wheel (see ``check.py``):
every subpackage imports, the compiled kernels are there, a few training steps run."""

import importlib
import pkgutil
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

import dpf_ext

location = Path(dpf_ext.__file__).resolve().parent
assert "site-packages" in location.parts, f"dpf_ext imported from {location}, not the wheel"

modules = [m.name for m in pkgutil.walk_packages(dpf_ext.__path__, "dpf_ext.")]
for name in modules:
    if name == "dpf_ext.__main__":  # runs dpf-train: check.py runs the command instead
        continue
    importlib.import_module(name)
for package in ("dpf_ext.app", "dpf_ext.methods", "dpf_ext.nn", "dpf_ext.ops",
                "dpf_ext.triton_kernels"):
    assert package in modules, f"{package} is not in the wheel"

# the compiled kernels: the C++ extension loads wherever the wheel was built with a compiler
compiler = shutil.which("c++") or shutil.which("g++")
assert dpf_ext.ops.simd() != "none" or not compiler, "the wheel has no compiled kernels"
assert "cpp" in dpf_ext.ops.available_backends("cpu") or not compiler, dpf_ext.ops.available_backends("cpu")

torch.manual_seed(0)
x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
for method in ("dpf", "rigl"):
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = dpf_ext.Pruner(model, method, 0.8, total_steps=8, update_every=2,
                            optimizer=optimizer)
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()
    assert torch.isfinite(loss), method
    assert abs(pruner.report().sparsity - 0.8) < 0.05, (method, pruner.report().sparsity)
print(f"installed dpf_ext {dpf_ext.__version__}: {len(modules)} modules, "
      f"simd {dpf_ext.ops.simd()}, trained dpf and rigl", file=sys.stderr)
