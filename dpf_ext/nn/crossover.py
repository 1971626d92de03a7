"""Where the sparse products start to pay on this CPU: the densities (fractions of weights
kept) at or below which ``compute="auto"`` runs a Linear layer or a convolution sparse.

The crossover is a property of the CPU (its caches and vector units against torch's dense
kernels) and of the thread count, so it is measured on the machine, not copied from one:
:func:`measure_crossover` times one training step (forward, input gradient, weight gradient
at the kept positions) of a 1024 x 1024 Linear layer at batch 64 and of a 3x3 convolution of
32 channels on 16 x 16 planes at batch 8, through the sparse path at densities :data:`GRID`
and through torch's dense product on the masked weight, and interpolates the density at
which the two take the same time. :func:`crossover` measures once per machine and keeps the
result in ``$XDG_CACHE_HOME/dpf_ext/crossover.json`` (``~/.cache`` by default) under the CPU
model, its cache sizes, the instruction set, the thread count, the build of the kernels and
torch's version: 0.4-0.7 s on a 2-core AMD EPYC, the first time ``"auto"`` is set on a new
machine. ``DPF_EXT_CROSSOVER="linear=0.2,conv=0.3"`` fixes the densities instead (a run that
must decide the same way everywhere; the test suite).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import ops

GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
"""The densities at which :func:`measure_crossover` times the sparse path; a crossover lies
in ``[0, 0.5]`` (0: the sparse path is slower at every density, 0.5: faster at all of them)."""

ENV = "DPF_EXT_CROSSOVER"
"""The environment variable that fixes the crossover (``"linear=D,conv=D"``)."""


@dataclass(frozen=True)
class Crossover:
    """The densities at or below which the sparse path is faster than the dense one, and
    where they come from (``"measured"``, ``"cached"`` or :data:`ENV`)."""

    linear: float
    conv: float
    source: str


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name"; else what :mod:`platform`
    knows, else ``"unknown CPU"``)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def _fixed_key() -> str:
    """The part of :func:`machine_key` that cannot change within a process: the CPU model,
    its L1d and L2 sizes, when the compiled kernels were built (their file's modification
    time) and torch's version."""
    l1, l2 = ops.cache_bytes()
    spec = importlib.util.find_spec("dpf_ext._C")
    built = ("none" if spec is None or spec.origin is None else
             time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(os.stat(spec.origin).st_mtime)))
    return (f"{cpu_name()} | L1d {l1 >> 10} KiB, L2 {l2 >> 10} KiB | kernels built {built} | "
            f"torch {torch.__version__}")


def machine_key() -> str:
    """What a measured crossover holds for: CPU model, L1d and L2 sizes, the kernels' build
    and instruction set, torch's version and the thread count."""
    return f"{_fixed_key()} | {ops.simd()} | {torch.get_num_threads()} thread(s)"


def _cache_file(root: str | None) -> Path:
    return Path(root or Path.home() / ".cache") / "dpf_ext" / "crossover.json"


def _from_env(text: str) -> Crossover:
    values = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            values[name.strip()] = None
    if set(values) != {"linear", "conv"} or not all(v is not None and 0 <= v <= 1
                                                    for v in values.values()):
        raise ValueError(f'{ENV} must be "linear=D,conv=D" with densities in [0, 1], got {text!r}')
    return Crossover(values["linear"], values["conv"], ENV)


_memo: dict[tuple[str | None, str], Crossover] = {}


def crossover() -> Crossover:
    """This machine's crossover: :data:`ENV` where set, else the cached measurement for
    :func:`machine_key`, else a new one (:func:`measure_crossover`, then cached; a cache
    that cannot be written only costs the next process a new measurement)."""
    fixed = os.environ.get(ENV)
    if fixed:
        return _from_env(fixed)
    key, root = machine_key(), os.environ.get("XDG_CACHE_HOME")
    if (root, key) in _memo:  # per forward of an "auto" layer: kept cheap
        return _memo[root, key]
    path = _cache_file(root)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    entry = stored.get(key) if isinstance(stored, dict) else None
    if isinstance(entry, dict) and {"linear", "conv"} <= entry.keys():
        found = Crossover(float(entry["linear"]), float(entry["conv"]), "cached")
    else:
        found = measure_crossover()
        stored = stored if isinstance(stored, dict) else {}
        stored[key] = {"linear": found.linear, "conv": found.conv,
                       "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:  # whole or not at all: processes measuring together each write a complete file
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}")
            partial.write_text(json.dumps(stored, indent=1))
            os.replace(partial, path)
        except OSError:
            pass
    _memo[root, key] = found
    return found


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """The median time in seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _step(product, x, weight, bias, dy):
    def run():
        x.grad = weight.grad = bias.grad = None
        torch.autograd.backward(product(), dy)
    return run


def equal_cost_density(ratios: list[float]) -> float:
    """The density at which the sparse/dense time ratios measured at :data:`GRID` cross 1:
    linear between the grid points around the first crossing; 0 if the sparse path is
    slower at the lowest density, ``GRID[-1]`` if it is faster at all of them."""
    if len(ratios) != len(GRID):
        raise ValueError(f"one ratio per density of GRID ({len(GRID)}), got {len(ratios)}")
    if ratios[0] >= 1:
        return 0.0
    for (d0, r0), (d1, r1) in zip(zip(GRID, ratios), zip(GRID[1:], ratios[1:])):
        if r1 >= 1:
            return round(d0 + (1 - r0) * (d1 - d0) / (r1 - r0), 3)
    return GRID[-1]


def measure_crossover() -> Crossover:
    """Time the sparse and the dense training step of a Linear layer and a convolution (see
    the module's docstring) on this CPU at the current thread count, and return the
    densities where they cost the same. Draws its inputs from its own generator (the global
    random state is untouched). Where the compiled kernels are not built, the sparse path
    is never faster: 0 for both."""
    if ops.simd() == "none":
        return Crossover(0.0, 0.0, "measured")
    g = torch.Generator().manual_seed(0)
    cases = {
        "linear": ((64, 1024), (1024, 1024), ops.SparseIndex.from_mask, ops.sparse_linear,
                   torch.nn.functional.linear, {}),
        "conv": ((8, 32, 16, 16), (32, 32, 3, 3), ops.ConvIndex.from_mask, ops.sparse_conv2d,
                 torch.nn.functional.conv2d, {"padding": 1}),
    }
    found = {}
    with torch.inference_mode(False), torch.enable_grad():
        for name, (x_shape, w_shape, index_of, sparse, dense, kwargs) in cases.items():
            x = torch.randn(x_shape, generator=g).requires_grad_()
            weight = torch.randn(w_shape, generator=g).requires_grad_()
            bias = torch.zeros(w_shape[0], requires_grad=True)
            dy = torch.randn(dense(x, weight, bias, **kwargs).shape, generator=g)
            score = torch.rand(w_shape, generator=g)
            ratios = []
            for density in GRID:
                mask = score < density
                index = index_of(mask)
                t_sparse = median_time(_step(lambda: sparse(x, weight, index, bias, False),
                                             x, weight, bias, dy), warmup=2)
                t_dense = median_time(_step(
                    lambda: dense(x, ops.masked_weight(weight, mask, False), bias, **kwargs),
                    x, weight, bias, dy), warmup=2)
                ratios.append(t_sparse / t_dense)
            found[name] = equal_cost_density(ratios)
    return Crossover(found["linear"], found["conv"], "measured")


__all__ = ["Crossover", "ENV", "GRID", "cpu_name", "crossover", "equal_cost_density",
           "machine_key", "measure_crossover", "median_time"]
