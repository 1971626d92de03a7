"""The DPF optimizer step on ~50 tensors of 10M weights in all: dpf_ext's fused kernel
(SGD with Nesterov momentum and weight decay, the masked copy for the next forward, and
optionally the first pass of the next threshold: the histogram, with the channel floor's
row maxima and the exact threshold's window) against torch.optim.SGD(foreach=True) followed
by a separate mask multiply, and one read of the weights (the floor). The last group is a
whole mask-update period: the cost of an exact update amortised over its steps."""

import pytest
import torch

from dpf_ext import ops
from dpf_ext.ops.bits import HIGH_BINS
from workloads import keep_count, one_read, weight_set

N = 10_000_000
HP = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


@pytest.fixture(scope="module")
def problem():
    params = weight_set(N)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    masks = [torch.rand(p.shape, generator=g) < 0.1 for p in params]
    return params, grads, masks


def _row_max(params) -> list[torch.Tensor]:
    """The channel floor's row maxima, one row per (flat) benchmark tensor."""
    return [torch.zeros(1, dtype=torch.int64) for _ in params]


def _first_pass(params, variant: str) -> dict:
    """The keyword arguments that make a fused step count what ``variant`` names."""
    if variant == "fused":
        return {}
    counted = dict(histogram=torch.zeros(HIGH_BINS, dtype=torch.int64))
    if variant == "fused_first_pass_exact":  # what the default pruner asks for
        tau = ops.global_threshold(params, keep_count(params))
        counted.update(row_max=_row_max(params), window=ops.Window.around(tau))
    return counted


@pytest.mark.parametrize("variant", ["fused", "fused_histogram", "fused_first_pass_exact"])
def test_dpf_fused_step(benchmark, problem, variant):
    params, grads, masks = problem
    params = [p.clone() for p in params]
    bufs = [None] * len(params)
    out = [torch.empty_like(p) for p in params]
    counted = _first_pass(params, variant)
    benchmark.group = "DPF step N=10M"

    def step():
        ops.feedback_sgd_step(params, grads, bufs, masks=masks, masked_out=out, dampening=0.0,
                              maximize=False, **counted, **HP)

    step()  # momentum buffers exist from here on, as in training
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("group", ["DPF step N=10M", "AdamW step N=10M"])
def test_torch_one_read(benchmark, problem, group):
    benchmark.group = group
    benchmark.pedantic(one_read, args=(problem[0],), rounds=10, warmup_rounds=1)


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


@pytest.mark.parametrize("variant", ["fused", "fused_histogram", "fused_first_pass_exact"])
def test_dpf_adamw_step(benchmark, problem, variant):
    params, grads, _ = problem
    params = [p.clone() for p in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    counted = _first_pass(params, variant)
    benchmark.group = "AdamW step N=10M"
    count = [0]

    def step():
        count[0] += 1
        ops.feedback_adamw_step(params, grads, *state, step=count[0], **counted, **ADAMW)

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


UPDATE_EVERY = 16  # DPF's default
PERIOD = dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)


@pytest.mark.parametrize("variant", ["torch_sgd_then_mask", "dpf_no_update", "dpf_update_from_step",
                                     "dpf_update_standalone"])
def test_mask_update_period(benchmark, problem, variant):
    """UPDATE_EVERY training steps (gradients of a realistic scale) and, for the dpf_update
    cases, the exact mask update at 90% with the channel floor after the last one: from
    the first pass the last step counted (with the window around the previous threshold),
    or standalone (its own warm-started pass). extra_info records how many updates found
    the threshold in the window."""
    params, grads, masks = problem
    params = [p.clone() for p in params]
    grads = [g * 1e-2 for g in grads]
    benchmark.group = f"mask update every {UPDATE_EVERY} steps N=10M"
    benchmark.extra_info["steps"] = UPDATE_EVERY
    masks = [m.clone() for m in masks]
    k = keep_count(params)
    rows = len(params)
    taus = [ops.global_threshold(params, k)]
    landed = []

    def update(counted):
        tau = ops.global_threshold(params, k - rows, histogram=counted.get("histogram"),
                                   row_max=counted["row_max"], window=counted["window"])
        ops.update_masks(params, tau, masks, row_max=counted["row_max"])
        slot = int((tau.view(torch.int32) >> 16) - counted["window"].start)
        landed.append(0 <= slot < counted["window"].width)
        taus.append(tau)

    if variant == "torch_sgd_then_mask":
        leaves = [p.requires_grad_() for p in params]
        for p, g in zip(leaves, grads):
            p.grad = g
        opt = torch.optim.SGD(leaves, foreach=True, **PERIOD)

        def period():
            for _ in range(UPDATE_EVERY):
                opt.step()
                with torch.no_grad():
                    torch._foreach_mul([p.detach() for p in leaves], masks)
    else:
        bufs = [None] * len(params)
        out = [torch.empty_like(p) for p in params]

        def first_pass():
            return dict(row_max=_row_max(params), window=ops.Window.around(taus[-1]))

        def period():
            counted = {}
            for i in range(UPDATE_EVERY):
                if variant == "dpf_update_from_step" and i == UPDATE_EVERY - 1:
                    counted = dict(histogram=torch.zeros(HIGH_BINS, dtype=torch.int64),
                                   **first_pass())
                ops.feedback_sgd_step(params, grads, bufs, masks=masks, masked_out=out,
                                      dampening=0.0, maximize=False, **counted, **PERIOD)
            if variant == "dpf_update_standalone":
                counted = first_pass()
            if variant != "dpf_no_update":
                update(counted)

    benchmark.pedantic(period, rounds=5, warmup_rounds=1)
    if landed:
        benchmark.extra_info["window_landed"] = f"{sum(landed)} of {len(landed)} updates"


def test_torch_one_read_per_step(benchmark, problem):
    benchmark.group = f"mask update every {UPDATE_EVERY} steps N=10M"
    benchmark.pedantic(one_read, args=(problem[0],), rounds=10, warmup_rounds=1)
