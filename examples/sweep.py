"""Accuracy against sparsity: dense, gradual magnitude pruning and DPF, over several seeds.

    python examples/sweep.py --data digits --model resnet20 --out runs/sweep-digits
    python examples/sweep.py --data gratings --model cnn --epochs 15 --out runs/sweep-gratings

Writes ``sweep.json`` (every run, the machine and the thread count), ``sweep.md`` (mean ±
standard deviation per method and sparsity) and ``sweep.png`` (one line per method, the
spread as error bars; dense as a band) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from dpf_ext.cli import mean_std
from dpf_ext.data import DATASETS, load_dataset
from dpf_ext.models import MODELS
from dpf_ext.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=DATASETS, default="digits")
    p.add_argument("--data-dir")
    p.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    p.add_argument("--methods", nargs="+", default=["gradual", "dpf"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data, args.data_dir)

    runs = []
    plan = [("dense", 0.0)] + [(m, s) for s in args.sparsities for m in args.methods]
    for method, sparsity in plan:
        for seed in range(args.seeds):
            config = TrainConfig(method=method, model=args.model, epochs=args.epochs,
                                 sparsity=sparsity or 0.9, seed=seed)
            r = train(config, data, progress=False)
            runs.append({"method": method, "target": sparsity, "seed": seed,
                         "accuracy": r.accuracy, "sparsity": r.sparsity,
                         "reactivations": r.reactivations, "wall_time": r.wall_time,
                         "forced": r.report.forced if r.report else 0})
            print(f"{method:8s} {sparsity:.2f} seed {seed}: {r.accuracy:.2%} "
                  f"(sparsity {r.sparsity:.2%}, {r.wall_time:.0f} s)", flush=True)
            machine = {"platform": platform.platform(), "processor": platform.processor(),
                       "torch": torch.__version__, "threads": torch.get_num_threads()}
            (args.out / "sweep.json").write_text(json.dumps(
                {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                 "runs": runs}, indent=1))

    def cell(method, target):
        accs = [100 * r["accuracy"] for r in runs if r["method"] == method and r["target"] == target]
        return mean_std(accs)

    lines = ["| method | " + " | ".join(f"{s:.0%}" for s in args.sparsities) + " |",
             "| --- |" + " ---: |" * len(args.sparsities)]
    dense = cell("dense", 0.0)
    lines.append("| dense | " + " | ".join(f"{dense[0]:.2f} ± {dense[1]:.2f}"
                                           for _ in args.sparsities) + " |")
    for m in args.methods:
        lines.append(f"| {m} | " + " | ".join("{:.2f} ± {:.2f}".format(*cell(m, s))
                                             for s in args.sparsities) + " |")
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [100 * s for s in args.sparsities]
    ax.axhspan(dense[0] - dense[1], dense[0] + dense[1], color="grey", alpha=0.3)
    ax.axhline(dense[0], color="grey", label="dense")
    for m in args.methods:
        stats = [cell(m, s) for s in args.sparsities]
        ax.errorbar(xs, [a for a, _ in stats], yerr=[e for _, e in stats], marker="o",
                    capsize=3, label=m)
    ax.set(xlabel="sparsity (%)", ylabel="test accuracy (%)",
           title=f"{args.model} on {args.data}, {args.seeds} seeds, {args.threads} thread(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "sweep.png", dpi=110)


if __name__ == "__main__":
    main()
