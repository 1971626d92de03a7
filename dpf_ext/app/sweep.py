"""Sweeps: where a planned sweep stands (``dpf-train --status``), and its results as people
read them: accuracy against sparsity per method, as a Markdown table (mean ± standard
deviation over seeds, diverged runs counted, wall time against dense) and as a figure (a
line per method, the spread as a band)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from .models import build_model
from .resume import load as load_checkpoint
from .train import RunResult, TrainConfig, run_name


MARKERS = "osD^vP*Xhp<>"
"""Marker per method in the figures (with a line style, so overlapping lines stay apart)."""
LINE_STYLES = ("-", "--", "-.", ":")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def sweep_cells(results: list[RunResult]) -> dict[str, dict[float, dict]]:
    """``{method: {sparsity: {"mean", "std", "diverged"}}}``: accuracy
    in percent over the seeds that did not diverge (NaN when all did). Dense runs, trained
    once, stand at every sparsity of the sweep."""
    targets = sorted({r.config.sparsity for r in results if r.config.method != "dense"})
    cells: dict[str, dict[float, dict]] = {}
    for method in dict.fromkeys(r.config.method for r in results):
        for target in targets:
            runs = [r for r in results if r.config.method == method
                    and (method == "dense" or r.config.sparsity == target)]
            if not runs:
                continue
            ok = [r for r in runs if not r.diverged]
            mean, std = mean_std([100 * r.accuracy for r in ok]) if ok else (math.nan, math.nan)
            cells.setdefault(method, {})[target] = {
                "mean": mean, "std": std, "diverged": len(runs) - len(ok)}
    return cells


def sweep_table(results: list[RunResult]) -> str:
    """A Markdown table: a row per method, a column per sparsity, ``mean ± std`` test
    accuracy (%) with the number of diverged seeds where any did, and the method's diverged
    runs in all. (Wall times are in ``metrics.json``; on a shared machine they are no measure
    of a method's cost: ``bench/test_methods.py`` times the steps interleaved with dense.)"""
    cells = sweep_cells(results)
    targets = sorted({t for row in cells.values() for t in row})
    lines = ["| method | " + " | ".join(f"{100 * t:g}%" for t in targets) + " | diverged |",
             "| --- |" + " ---: |" * (len(targets) + 1)]
    for method, row in cells.items():
        entries = []
        for t in targets:
            c = row.get(t)
            if c is None:
                entries.append("")
                continue
            text = "diverged" if math.isnan(c["mean"]) else f"{c['mean']:.2f} ± {c['std']:.2f}"
            if c["diverged"] and not math.isnan(c["mean"]):
                text += f" ({c['diverged']} diverged)"
            entries.append(text)
        diverged = (next(iter(row.values()))["diverged"] if method == "dense"
                    else sum(c["diverged"] for c in row.values()))
        lines.append(f"| {method} | " + " | ".join(entries) + f" | {diverged} |")
    return "\n".join(lines) + "\n"


def plot_sweep(results: list[RunResult], path: str | Path, title: str = "") -> None:
    """Accuracy against sparsity, a line per method (mean over seeds) with its spread (± one
    standard deviation) as a band; dense as a grey band. Left: the whole range; right: the
    same, zoomed to the few points around dense where most methods are. Sparsities are
    evenly spaced on the axis (50, 80, 90, 95, 98, 99% read better so than to scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sweep_cells(results)
    targets = sorted({t for row in cells.values() for t in row})
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # 7: grey
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    dense = cells.get("dense")
    for ax in axes:
        others = 0
        for method, row in cells.items():
            xs = [j for j, t in enumerate(targets) if t in row and not math.isnan(row[t]["mean"])]
            if not xs:
                continue
            mean = [row[targets[j]]["mean"] for j in xs]
            std = [row[targets[j]]["std"] for j in xs]
            low, high = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
            if method == "dense":
                ax.axhspan(low[0], high[0], color="grey", alpha=0.25)
                ax.axhline(mean[0], color="grey", lw=1.5, label="dense")
                continue
            color = palette[others % len(palette)]
            ax.plot(xs, mean, marker=MARKERS[others % len(MARKERS)], ms=5, color=color,
                    ls=LINE_STYLES[others // len(palette) % len(LINE_STYLES)],  # colour reused
                    label=method, lw=2.8 if method == "dpf" else 1.3)
            ax.fill_between(xs, low, high, color=color, alpha=0.12)
            others += 1
        ax.set_xticks(range(len(targets)), [f"{100 * t:g}" for t in targets])
        ax.set(xlabel="sparsity (%)", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[0].legend(fontsize=8, ncol=2, loc="lower left")
    if dense:
        level = next(iter(dense.values()))["mean"]
        axes[1].set_ylim(level - 8, level + 3)
    axes[1].set_title("the same, near dense")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trial_step_time(config: TrainConfig, data, steps: int = 3) -> float:
    """Seconds per training step of ``config``'s model at its batch size: ``steps`` dense
    SGD steps timed now, after one to warm up (masked steps cost a few percent more)."""
    model = build_model(config.model, data.input_shape, data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = data.train_batch(torch.arange(min(config.batch_size, data.train_size)))
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / steps


def sweep_status(args: argparse.Namespace, configs: list[TrainConfig], data) -> str:
    """Which runs of the plan are done, in progress (their latest checkpoint's step) or
    waiting, and the time left: at the mean step time in ``log.jsonl``, or before any step
    is logged at a few steps timed now (:func:`trial_step_time`), with as many runs at a
    time as the plan was started with (its ``--jobs``, from the log; else ``args.jobs``)."""
    steps_per_run = args.epochs * -(-data.train_size // args.batch_size)
    step_times, jobs = [], None
    log = args.out / "log.jsonl"
    if log.exists():
        for record in map(json.loads, log.read_text().splitlines()):
            if "step_time" in record:
                step_times.append(record["step_time"])
            jobs = record.get("plan", {}).get("jobs", jobs)
    lines, left = [f"started with --jobs {jobs}" if jobs else "not started yet"], 0
    jobs = jobs or args.jobs
    for config in configs:
        folder = args.out / "checkpoints" / run_name(config, bool(args.sparsities))
        done = folder / "done.pt"
        steps = sorted(folder.glob("step-*.pt"))
        if done.exists():
            result = load_checkpoint(done)["result"]
            state = "diverged" if result.diverged else f"done: {result.accuracy:.2%}"
        elif steps:
            at = int(steps[-1].stem.split("-")[1])
            state, left = f"running: step {at}/{steps_per_run}", left + steps_per_run - at
        else:
            state, left = "waiting", left + steps_per_run
        lines.append(f"{run_name(config, bool(args.sparsities)):<32} {state}")
    if step_times:
        mean, source = sum(step_times) / len(step_times), "at the logged step time"
    else:
        mean, source = trial_step_time(configs[0], data), "estimated from 3 steps timed now"
    eta = (f"about {left * mean / 60 / jobs:.0f} min of training left"
           + (f" at {jobs} runs at a time" if jobs > 1 else "") + f" ({source})")
    done_count = sum("done" in line or "diverged" in line for line in lines[1:])
    return "\n".join([*lines, f"{done_count}/{len(configs)} runs finished; {eta}"])
