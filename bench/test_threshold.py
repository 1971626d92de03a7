"""Global threshold at 90% sparsity over ~50 tensors: dpf_ext (exact, exact warm-started from
the previous threshold, approximate) against one read of the weights (the floor; the dpf
cases are also timed interleaved with it),
torch.kthvalue and torch.topk on the concatenated magnitudes (concatenation included) and
torch.nn.utils.prune.global_unstructured. Peak extra memory goes into extra_info."""

import pytest
import torch

from memory import measure
from workloads import (THRESHOLD_METHODS, interleaved_medians, one_read, prune_global_unstructured,
                       prune_modules, weight_set)

SIZES = {"1M": 1_000_000, "10M": 10_000_000, "25M": 25_000_000}
_weights = {}


def _get(n):
    if n not in _weights:
        _weights.clear()
        _weights[n] = weight_set(n)
    return _weights[n]


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("method", list(THRESHOLD_METHODS))
def test_threshold(benchmark, size, method):
    n = SIZES[size]
    weights = _get(n)
    benchmark.group = f"threshold N={size}"
    benchmark.extra_info["weights_bytes"] = 4 * n
    benchmark.extra_info["peak_extra_bytes"] = measure(method, n)
    rounds = 3 if n >= 10_000_000 else 10
    if method == "torch_prune_global":
        benchmark.pedantic(prune_global_unstructured, setup=lambda: ((prune_modules(weights),), {}),
                           rounds=rounds, warmup_rounds=1)
    else:
        fn = THRESHOLD_METHODS[method]
        if method.startswith("dpf"):
            medians = interleaved_medians({"dpf": lambda: fn(weights),
                                           "read": lambda: one_read(weights)}, rounds=rounds)
            benchmark.extra_info["interleaved"] = {"one read": medians["dpf"] / medians["read"]}
        result = benchmark.pedantic(fn, args=(weights,), rounds=rounds, warmup_rounds=1)
        if method in ("dpf_exact", "dpf_exact_warm"):
            assert torch.equal(result, THRESHOLD_METHODS["torch_kthvalue"](weights))
