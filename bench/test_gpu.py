"""GPU benchmarks (skipped without CUDA): the global threshold at N = 25.6M (ResNet-50's
size) and 100M against torch.kthvalue, torch.topk and prune.global_unstructured on the
GPU, next to one read of the weights (the bandwidth floor), exact, exact warm-started and
approximate; the fused DPF step, plain and counting the next threshold's first pass,
against torch.optim.SGD(fused=True); a ResNet-50 training step with DPF against dense. Each case is
timed with the device synchronised, over CUDA events."""

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext import ops
from dpf_ext.app.models import resnet50
from workloads import (THRESHOLD_METHODS, first_pass_args, interleaved_medians,
                       prune_global_unstructured, prune_modules, weight_set)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SIZES = {"25.6M": 25_557_032, "100M": 100_000_000}
_weights = {}


def _get(n):
    if n not in _weights:
        _weights.clear()
        torch.cuda.empty_cache()
        _weights[n] = weight_set(n, device="cuda")
    return _weights[n]


def _synced(fn):
    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out
    return run


def _peak_extra(fn, *args) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


CASES = {
    **{f"{name}[{b}]": (name, b) for name in ("dpf_exact", "dpf_exact_warm", "dpf_approx")
       for b in ("cuda", "triton")},
    **{name: (name, None) for name in ("torch_kthvalue", "torch_topk", "torch_prune_global")},
    "torch_one_read": ("one_read", None),
}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_threshold(benchmark, monkeypatch, size, case):
    name, backend = CASES[case]
    if backend is not None:
        if backend not in ops.available_backends("cuda"):
            pytest.skip(f"backend {backend!r} was not built")
        monkeypatch.setenv("DPF_EXT_BACKEND", backend)
    n = SIZES[size]
    weights = _get(n)
    benchmark.group = f"GPU threshold N={size}"
    benchmark.extra_info["weights_bytes"] = 4 * n
    if name == "one_read":  # reads every weight once: the floor a threshold pass is held to
        fn = _synced(lambda ws: torch._foreach_norm(ws, 1))
        benchmark.pedantic(fn, args=(weights,), rounds=20, warmup_rounds=3)
        benchmark.extra_info["bandwidth_GBps"] = 4 * n / benchmark.stats.stats.median / 1e9
        return
    if name == "torch_prune_global":
        benchmark.extra_info["peak_extra_bytes"] = _peak_extra(
            lambda: prune_global_unstructured(prune_modules(weights)))
        benchmark.pedantic(_synced(prune_global_unstructured),
                           setup=lambda: ((prune_modules(weights),), {}), rounds=5, warmup_rounds=1)
        return
    fn = THRESHOLD_METHODS[name]
    benchmark.extra_info["peak_extra_bytes"] = _peak_extra(fn, weights)
    result = benchmark.pedantic(_synced(fn), args=(weights,), rounds=20, warmup_rounds=3)
    if name in ("dpf_exact", "dpf_exact_warm"):
        assert torch.equal(result, THRESHOLD_METHODS["torch_kthvalue"](weights))


HP = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


@pytest.mark.parametrize("variant", [f"dpf_{kind}[{backend}]" for backend in ("cuda", "triton")
                                     for kind in ("fused", "fused_histogram", "fused_first_pass_exact")]
                         + ["torch_sgd_fused"])
def test_gpu_step(benchmark, monkeypatch, variant):
    params = [p.clone() for p in _get(SIZES["25.6M"])]
    g = torch.Generator(device="cuda").manual_seed(1)
    grads = [torch.randn(p.shape, device="cuda", generator=g) for p in params]
    benchmark.group = "GPU DPF step N=25.6M"
    if variant == "torch_sgd_fused":
        ps = [p.requires_grad_() for p in params]
        for p, gr in zip(ps, grads):
            p.grad = gr
        opt = torch.optim.SGD(ps, fused=True, **HP)
        step = opt.step
    else:
        backend = variant.split("[")[1].rstrip("]")
        if backend not in ops.available_backends("cuda"):
            pytest.skip(f"backend {backend!r} was not built")
        monkeypatch.setenv("DPF_EXT_BACKEND", backend)
        bufs = [None] * len(params)
        counted = first_pass_args(params, variant.removeprefix("dpf_"))

        def step():
            ops.feedback_sgd_step(params, grads, bufs, dampening=0.0, maximize=False, **counted,
                                  **HP)
    step()
    benchmark.pedantic(_synced(step), rounds=20, warmup_rounds=3)


def _resnet50_steps(method, steps=16):
    torch.manual_seed(0)
    model = resnet50().cuda().to(memory_format=torch.channels_last)
    pruner = None
    if method == "dense":
        opt = torch.optim.SGD(model.parameters(), fused=True, **HP)
    else:
        dpf_ext.sparsify(model)
        pruner = dpf_ext.DPF(model, 0.9, total_steps=10_000, update_every=16)
        opt = dpf_ext.DPFSGD(model.parameters(), pruner=pruner, **HP)
    x = torch.randn(64, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (64,), device="cuda")

    def run():
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if pruner is not None:
                pruner.step()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("method", ["dense", "dpf"])
def test_gpu_resnet50_training_steps(benchmark, method):
    benchmark.group = "GPU ResNet-50 training, 16 steps (batch 64, bf16 autocast)"
    run = _resnet50_steps(method)
    if method == "dpf":
        medians = interleaved_medians({"dense": _resnet50_steps("dense"), "dpf": run})
        benchmark.extra_info["interleaved_ratio"] = medians["dpf"] / medians["dense"]
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
