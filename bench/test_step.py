"""The DPF optimizer step on ~50 tensors of 10M weights in all: dpf_ext's fused kernel
(SGD with Nesterov momentum and weight decay, the masked copy for the next forward, and
optionally the histogram for the next threshold) against torch.optim.SGD(foreach=True)
followed by a separate mask multiply."""

import pytest
import torch

from dpf_ext import ops
from dpf_ext.ops.bits import HIGH_BINS
from workloads import weight_set

N = 10_000_000
HP = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


@pytest.fixture(scope="module")
def problem():
    params = weight_set(N)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    masks = [torch.rand(p.shape, generator=g) < 0.1 for p in params]
    return params, grads, masks


@pytest.mark.parametrize("variant", ["fused", "fused_histogram"])
def test_dpf_fused_step(benchmark, problem, variant):
    params, grads, masks = problem
    params = [p.clone() for p in params]
    bufs = [None] * len(params)
    out = [torch.empty_like(p) for p in params]
    hist = torch.zeros(HIGH_BINS, dtype=torch.int64) if variant == "fused_histogram" else None
    benchmark.group = "DPF step N=10M"

    def step():
        ops.feedback_sgd_step(params, grads, bufs, masks=masks, masked_out=out, histogram=hist,
                              dampening=0.0, maximize=False, **HP)

    step()  # momentum buffers exist from here on, as in training
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)


def test_torch_sgd_foreach_then_mask(benchmark, problem):
    params, grads, masks = problem
    params = [p.clone().requires_grad_() for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt = torch.optim.SGD(params, foreach=True, **HP)
    benchmark.group = "DPF step N=10M"

    def step():
        opt.step()
        with torch.no_grad():
            return torch._foreach_mul([p.detach() for p in params], masks)

    step()
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)


ADAMW = dict(lr=1e-3, weight_decay=1e-2)


@pytest.mark.parametrize("variant", ["fused", "fused_histogram"])
def test_dpf_adamw_step(benchmark, problem, variant):
    params, grads, _ = problem
    params = [p.clone() for p in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    hist = torch.zeros(HIGH_BINS, dtype=torch.int64) if variant == "fused_histogram" else None
    benchmark.group = "AdamW step N=10M"
    count = [0]

    def step():
        count[0] += 1
        ops.feedback_adamw_step(params, grads, *state, step=count[0], histogram=hist, **ADAMW)

    benchmark.pedantic(step, rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_torch_adamw(benchmark, problem, impl):
    params, grads, _ = problem
    params = [p.clone().requires_grad_() for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt = torch.optim.AdamW(params, **{impl: True}, **ADAMW)
    benchmark.group = "AdamW step N=10M"
    benchmark.pedantic(opt.step, rounds=10, warmup_rounds=1)
