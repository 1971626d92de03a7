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
from workloads import (first_pass_args, interleaved_medians, keep_count, one_read, row_max_per_tensor,
                       weight_set)

N = 10_000_000
HP = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


@pytest.fixture(scope="module")
def problem():
    params = weight_set(N)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    masks = [torch.rand(p.shape, generator=g) < 0.1 for p in params]
    return params, grads, masks


def _sgd_step(problem, counted: dict):
    """A fused SGD step counting ``counted`` (first_pass_args) on ``problem``'s weights
    (momentum buffers made)."""
    params, grads, masks = problem
    bufs = [None] * len(params)
    out = [torch.empty_like(p) for p in params]

    def step():
        ops.feedback_sgd_step(params, grads, bufs, masks=masks, masked_out=out, dampening=0.0,
                              maximize=False, **counted, **HP)

    step()  # momentum buffers exist from here on, as in training
    return step


def _adamw_step(problem, counted: dict):
    """A fused AdamW step counting ``counted`` on ``problem``'s weights."""
    params, grads, _ = problem
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    count = [0]

    def step():
        count[0] += 1
        ops.feedback_adamw_step(params, grads, *state, step=count[0], **counted, **ADAMW)

    return step


def _time_step(benchmark, problem, make, variant: str) -> None:
    """Benchmark ``variant``'s step on a copy of the weights, its window re-centred on their
    threshold before every timed step; for a counting variant, also the ratios to the plain
    step and to one read timed interleaved with it."""
    params = [p.clone() for p in problem[0]]
    counted = first_pass_args(params, variant)
    step = make((params, *problem[1:]), counted)
    recentre = None
    if "window" in counted:
        def recentre():
            counted.update(first_pass_args(params, variant))
    if variant != "fused":
        plain = make(([p.clone() for p in problem[0]], *problem[1:]), {})
        read = lambda: one_read(problem[0])  # noqa: E731
        medians = interleaved_medians({"plain": plain, "counting": step, "read": read}, rounds=7,
                                      setups={"counting": recentre} if recentre else None)
        benchmark.extra_info["interleaved"] = {
            "the step without it": medians["counting"] / medians["plain"],
            "one read": medians["counting"] / medians["read"]}
    benchmark.pedantic(step, setup=recentre, rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("variant", ["fused", "fused_histogram", "fused_first_pass_exact"])
def test_dpf_fused_step(benchmark, problem, variant):
    benchmark.group = "DPF step N=10M"
    _time_step(benchmark, problem, _sgd_step, variant)


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
    benchmark.group = "AdamW step N=10M"
    _time_step(benchmark, problem, _adamw_step, variant)


@pytest.mark.parametrize("impl", ["torch_fused", "torch_foreach"])
def test_torch_adamw(benchmark, problem, impl):
    params, grads, _ = problem
    params = [p.clone().requires_grad_() for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt = torch.optim.AdamW(params, **{impl.removeprefix("torch_"): True}, **ADAMW)
    benchmark.group = "AdamW step N=10M"
    benchmark.pedantic(opt.step, rounds=10, warmup_rounds=1)


UPDATE_EVERY = 16  # DPF's default
PERIOD = dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)


def _period(problem, variant: str):
    """UPDATE_EVERY training steps of ``variant`` on a copy of the weights and masks, with
    gradients of a realistic scale; the dpf_update variants end with the exact mask update
    at 90% with the channel floor. Returns the period and the list it appends to, per
    update, whether the threshold landed in the window."""
    params, grads, masks = problem
    params, masks = [p.clone() for p in params], [m.clone() for m in masks]
    grads = [g * 1e-2 for g in grads]
    k, rows = keep_count(params), len(params)
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
        return period, landed

    bufs = [None] * len(params)
    out = [torch.empty_like(p) for p in params]

    def first_pass():
        return dict(row_max=row_max_per_tensor(params), window=ops.Window.around(taus[-1]))

    def period():
        counted = {}
        for i in range(UPDATE_EVERY):
            if variant == "dpf_update_from_step" and i == UPDATE_EVERY - 1:
                counted = dict(histogram=torch.zeros(HIGH_BINS, dtype=torch.int64), **first_pass())
            ops.feedback_sgd_step(params, grads, bufs, masks=masks, masked_out=out, dampening=0.0,
                                  maximize=False, **counted, **PERIOD)
        if variant == "dpf_update_standalone":
            counted = first_pass()
        if variant != "dpf_no_update":
            update(counted)
    return period, landed


@pytest.mark.parametrize("variant", ["torch_sgd_then_mask", "dpf_no_update", "dpf_update_from_step",
                                     "dpf_update_standalone"])
def test_mask_update_period(benchmark, problem, variant):
    """A mask-update period, reported per step; the dpf_update variants also time it
    interleaved with the period without the update (the update's amortised cost) and
    record how many updates found the threshold in the window."""
    benchmark.group = f"mask update every {UPDATE_EVERY} steps N=10M"
    benchmark.extra_info["steps"] = UPDATE_EVERY
    period, landed = _period(problem, variant)
    if variant.startswith("dpf_update"):
        medians = interleaved_medians({"plain": _period(problem, "dpf_no_update")[0],
                                       "update": period}, rounds=5)
        benchmark.extra_info["interleaved"] = {"the period without it": medians["update"] /
                                               medians["plain"]}
    benchmark.pedantic(period, rounds=5, warmup_rounds=1)
    if landed:
        benchmark.extra_info["window_landed"] = f"{sum(landed)} of {len(landed)} updates"


def test_torch_one_read_per_step(benchmark, problem):
    benchmark.group = f"mask update every {UPDATE_EVERY} steps N=10M"
    benchmark.pedantic(one_read, args=(problem[0],), rounds=10, warmup_rounds=1)
