"""An MLP too large to train densely here, trained sparse from the meta device.

``python bench/values_headline.py [--width W] [--layers L] [--sparsity S] [--steps N]``
builds ``L`` Linear layers of ``W x W`` (plus a classifier of 10) on the meta device, puts
them on values storage at sparsity ``S`` (static, uniform budget: no tensor of a layer's
dense size is ever allocated), trains ``N`` steps of SGD with momentum on random batches of
64, and prints one JSON line: dense-equivalent weights, kept weights, the bytes the dense
weights alone would take, the peak resident set of the process (VmHWM), the setup time and
the median step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import dpf_ext


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.99)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    start = time.perf_counter()
    with torch.device("meta"):
        blocks = []
        for _ in range(args.layers):
            blocks += [nn.Linear(args.width, args.width), nn.ReLU()]
        model = nn.Sequential(*blocks, nn.Linear(args.width, 10))
    dpf_ext.sparsify(model)
    pruner = dpf_ext.Pruner(model, "static", args.sparsity, budget="uniform", storage="values")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    setup = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    for _ in range(args.steps):
        x = torch.randn(64, args.width, generator=g)
        y = torch.randint(0, 10, (64,), generator=g)
        tick = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()
        times.append(time.perf_counter() - tick)
        losses.append(loss.item())
    report = pruner.report()
    dense = sum(layer.params for layer in report.layers)
    print(json.dumps({
        "dense_weights": dense, "kept_weights": report.kept,
        "dense_weight_bytes": dense * 4, "peak_resident_bytes": peak_resident_bytes(),
        "setup_s": round(setup, 2), "step_s": round(statistics.median(times), 4),
        "losses": [round(v, 4) for v in losses], "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
