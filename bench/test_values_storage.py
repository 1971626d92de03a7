"""Values storage (``Pruner(storage="values")``) against dense storage and plain torch: the
bytes a model's training state takes (weights, gradients, optimizer state, masks or index),
the peak extra memory and the time of one step, one Linear layer's step at batch 64 and 256
beside SparseProp, and a model whose dense training does not fit in memory trained from the
meta device (``values_headline.py``, in a fresh process: its peak resident set).

Thread count: the run's (``OMP_NUM_THREADS=1 python bench/run.py -k values_storage``)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dpf_ext
from memory import peak_extra_bytes
from test_sparse_training import _case, _step_fn
from workloads import interleaved_medians

HERE = Path(__file__).parent
SPARSITIES = [0.8, 0.9, 0.95, 0.98, 0.99]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10))


def _optimizer(name, params):
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-4)


def _training_step(model, optimizer, pruner, features: int):
    """One step on a fixed random batch of 64 (10 classes), the pruner's step after it."""
    x, y = torch.randn(64, features), torch.randint(0, 10, (64,))

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        if pruner is not None:
            pruner.step()
    return step


def state_bytes(model, optimizer) -> int:
    """Bytes of the model's parameters, their gradients, the optimizer's state and the
    model's buffers (masks, index)."""
    tensors = [*model.parameters(), *model.buffers(),
               *(p.grad for p in model.parameters() if p.grad is not None),
               *(v for s in optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor))]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("storage", ["torch-dense", "dense", "values"])
@pytest.mark.parametrize("optimizer_name", ["sgd-momentum", "adamw"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_training_state(benchmark, sparsity, optimizer_name, storage):
    """One step of an MLP 1024-4096-4096-1024-10 (static, uniform budget, batch 64), and the
    bytes of its training state after it: plain torch, dense storage with the sparse
    products, values storage."""
    model = _mlp()
    optimizer = _optimizer(optimizer_name, model.parameters())
    pruner = None
    if storage != "torch-dense":
        dpf_ext.sparsify(model, compute="sparse")
        pruner = dpf_ext.Pruner(model, "static", sparsity, budget="uniform", optimizer=optimizer,
                                storage=storage)
    step = _training_step(model, optimizer, pruner, 1024)
    benchmark.group = (f"values storage: MLP step at {sparsity:.0%}, {optimizer_name}, "
                       f"{torch.get_num_threads()} thread(s)")
    benchmark.pedantic(step, rounds=7, warmup_rounds=2)
    benchmark.extra_info.update(state_bytes=state_bytes(model, optimizer),
                                peak_extra_bytes=peak_extra_bytes(step), sparsity=sparsity)


def _linear_step(impl, shape, batch, sparsity):
    """One training step of a Linear layer with ``impl`` (see :func:`test_linear_step`)."""
    if impl in ("torch-dense", "sparseprop"):
        return _step_fn(impl, *_case(shape, sparsity, batch))
    torch.manual_seed(0)
    layer = dpf_ext.sparsify(nn.Sequential(nn.Linear(*shape)), compute="sparse")
    dpf_ext.Pruner(layer, "static", sparsity, storage=impl.removesuffix("-storage"))
    x = torch.randn(batch, shape[0], requires_grad=True)
    dy = torch.randn(batch, shape[1])

    def step():
        for p in layer.parameters():
            p.grad = None
        torch.autograd.backward(layer(x), dy)
    return step


@pytest.mark.parametrize("impl", ["torch-dense", "dense-storage", "values-storage", "sparseprop"])
@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("batch", [64, 256])
@pytest.mark.parametrize("shape", [(1024, 4096), (4096, 1024)])
def test_linear_step(benchmark, shape, batch, sparsity, impl):
    """One Linear layer's training step (forward, input, weight and bias gradients) through
    the public API: a sparsified ``nn.Linear`` under a static pruner with dense storage
    (``compute="sparse"``) or values storage; plain torch and SparseProp beside. Each case
    is also timed in interleaved rounds with plain torch (``interleaved``: its speed-up
    over plain torch, which a shared machine's slow spells hit alike)."""
    step = _linear_step(impl, shape, batch, sparsity)
    benchmark.group = (f"values storage: Linear {shape[0]}->{shape[1]} at {sparsity:.0%}, "
                       f"batch {batch}, {torch.get_num_threads()} thread(s)")
    if impl != "torch-dense":
        medians = interleaved_medians(
            {impl: step, "torch": _linear_step("torch-dense", shape, batch, sparsity)}, rounds=15)
        benchmark.extra_info["interleaved"] = {"speed-up over plain torch":
                                               medians["torch"] / medians[impl]}
    benchmark.pedantic(step, rounds=15, warmup_rounds=3)


def test_model_beyond_dense_memory(benchmark):
    """``values_headline.py``: an MLP of 537 million dense-equivalent weights built on the
    meta device, trained for a few steps at 99% with values storage, in a fresh process;
    its peak resident set and step time (the benchmark's time is the whole run)."""
    result = {}

    def run():
        out = subprocess.run([sys.executable, str(HERE / "values_headline.py")],
                             capture_output=True, text=True, check=True)
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))

    benchmark.group = "values storage: a model beyond dense memory"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result)


@pytest.mark.parametrize("storage", ["dense", "values"])
def test_rigl_update_step(benchmark, storage):
    """A RigL update step (forward, backward with the dense gradient recorded, SGD, drop and
    grow) of an MLP 4096-4096-10 at 99% (a 4096 x 4096 layer: 64 MiB of float32 dense), batch
    64: its time and peak extra memory. Values storage forms the gradient 1 MiB at a time."""
    torch.manual_seed(0)
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10)),
                             compute="sparse")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    pruner = dpf_ext.Pruner(model, "rigl", 0.99, budget="uniform", update_every=1,
                            end_step=10**9, optimizer=optimizer, storage=storage)
    step = _training_step(model, optimizer, pruner, 4096)
    benchmark.group = f"values storage: a RigL update step, {torch.get_num_threads()} thread(s)"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(peak_extra_bytes=peak_extra_bytes(step),
                                dense_layer_bytes=4096 * 4096 * 4)
