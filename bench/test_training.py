"""One training step of ResNet-20 (batch 128, 3x32x32) with DPF against the same step
dense. A round is 16 steps, one mask-update period, so the update's cost is included.

A shared 2-core machine drifts by several percent between test cases, more than the
overhead being measured, so each DPF case also times dense and DPF rounds interleaved and
records the ratio of their medians (``extra_info["interleaved_ratio"]``)."""

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext.app.models import ResNet
from workloads import interleaved_medians, training_steps

STEPS = 16
INTERLEAVED_ROUNDS = 4


def _trainer(method):
    """A function running STEPS training steps of ``method`` (dense, dpf, dpf_approx)."""
    torch.manual_seed(0)
    model = ResNet(20)
    pruner = None
    if method == "dense":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                              weight_decay=1e-4)
    else:
        dpf_ext.sparsify(model)
        pruner = dpf_ext.DPF(model, 0.9, total_steps=10_000, update_every=STEPS,
                             threshold="approx" if method == "dpf_approx" else "exact")
        opt = dpf_ext.DPFSGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                             weight_decay=1e-4, pruner=pruner)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)
    loss_fn = nn.CrossEntropyLoss()

    return training_steps(model, opt, pruner, x, y, loss_fn, STEPS)


def _interleaved_ratio(method) -> float:
    medians = interleaved_medians({"dense": _trainer("dense"), method: _trainer(method)},
                                  INTERLEAVED_ROUNDS)
    return medians[method] / medians["dense"]


@pytest.mark.parametrize("method", ["dense", "dpf", "dpf_approx"])
def test_resnet20_training_steps(benchmark, method):
    benchmark.group = f"ResNet-20 training, {STEPS} steps"
    if method != "dense":
        benchmark.extra_info["interleaved_ratio"] = _interleaved_ratio(method)
    benchmark.pedantic(_trainer(method), rounds=5, warmup_rounds=1)
