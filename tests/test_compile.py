"""torch.compile and the torch.library contract of the compiled ops."""

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext import ops
from dpf_ext.ops.bits import HIGH_BINS
from dpf_ext.schedules import Constant

# op namespaces that run on CPU tensors here, with the backend that provides them
NAMESPACES = {"dpf": "cpp", "dpf_triton": "triton"}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 5))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("feedback", [True, False])
def test_compiled_forward_backward_matches_eager(device, compiler, feedback):
    model = dpf_ext.sparsify(_model()).to(device)
    dpf_ext.DPF(model, schedule=Constant(0.6), feedback=feedback)
    x = torch.randn(4, 3, 8, 8, device=device)
    model(x).square().sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.square().sum().backward()
    for p, g in zip(model.parameters(), eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_opcheck_all_ops(namespace):
    if NAMESPACES[namespace] not in ops.available_backends("cpu"):
        pytest.skip(f"{NAMESPACES[namespace]} does not run on CPU tensors here")
    lib = getattr(torch.ops, namespace)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(50, 3, generator=g), torch.randn(7, generator=g)]
    masks = [torch.rand(w.shape, generator=g) < 0.5 for w in weights]
    rows = [torch.zeros(50, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)]
    torch.library.opcheck(lib.magnitude_histogram.default, (weights, None, [], None, None))
    torch.library.opcheck(lib.magnitude_histogram.default, (weights, None, rows, None, None))
    prefix = torch.tensor(int(weights[0][0, 0].abs().view(torch.int32)) >> 16)
    torch.library.opcheck(lib.magnitude_histogram.default, (weights, prefix, [], None, None))
    torch.library.opcheck(lib.magnitude_histogram.default,
                          (weights, None, [], torch.zeros(3 * 65536, dtype=torch.int64), prefix - 1))
    for row_max in ([], rows):
        torch.library.opcheck(lib.update_masks.default,
                              (weights, torch.tensor([0.5, 0.7]), masks, False, row_max))
    for feedback in (True, False):
        w = torch.randn(6, 5, generator=g, requires_grad=True)
        mask = torch.rand(6, 5, generator=g) < 0.5
        torch.library.opcheck(lib.masked_weight.default, (w, mask, feedback))
    params = [w.clone() for w in weights]
    grads = [torch.randn(w.shape, generator=g) for w in weights]
    bufs = [torch.zeros_like(w) for w in weights]
    out = [torch.empty_like(w) for w in weights]
    hist = torch.zeros(HIGH_BINS, dtype=torch.int64)
    torch.library.opcheck(
        lib.feedback_sgd_step.default,
        (params, grads, bufs, [True, False], 0.1, 0.9, 0.0, True, 1e-4, False, masks, out, hist,
         [torch.zeros_like(r) for r in rows], torch.zeros(3 * 65536, dtype=torch.int64), prefix - 1),
    )
    torch.library.opcheck(lib.nm_masks.default,
                          ([torch.randn(6, 8, generator=g)], 2, 4, [torch.zeros(6, 8, dtype=torch.bool)]))
    states = [[torch.zeros_like(w) for w in weights] for _ in range(3)]
    torch.library.opcheck(
        lib.feedback_adamw_step.default,
        ([w.clone() for w in weights], grads, *states, 3, 1e-3, 0.9, 0.999, 1e-8, 1e-2, True,
         False, torch.zeros(HIGH_BINS, dtype=torch.int64), [torch.zeros_like(r) for r in rows],
         None, None),
    )
