"""What ``dpf-train`` writes of its runs: the summary table it prints, and in ``--out``
``metrics.json``, the figures and the trained models."""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path

import torch

from ..methods import METHODS, recipe_of
from ..nn.crossover import cpu_name, crossover
from .sweep import LINE_STYLES, MARKERS, mean_std, plot_sweep, sweep_table
from .train import RunResult, ranks, run_name


def summary_table(results: list[RunResult]) -> str:
    """One row per method (and target, in a sweep): accuracy (mean ± standard deviation over
    its seeds that did not diverge), sparsity, reactivations, wall time, seeds, diverged."""
    header = ("method", "accuracy", "sparsity", "reactivations", "wall time", "seeds", "diverged")
    sweep = len({r.config.sparsity for r in results if r.config.method != "dense"}) > 1
    groups = list(dict.fromkeys((r.config.method, r.config.sparsity if sweep else None)
                                for r in results))
    rows = []
    for m, target in groups:
        runs = [r for r in results if r.config.method == m
                and (target is None or r.config.sparsity == target)]
        ok = [r for r in runs if not r.diverged] or runs
        acc, spread = mean_std([100 * r.accuracy for r in ok])
        label = m if target is None or m == "dense" else f"{m} @ {target:g}"
        rows.append((label, f"{acc:.2f} ± {spread:.2f}%" if len(ok) > 1 else f"{acc:.2f}%",
                     f"{mean_std([r.sparsity for r in ok])[0]:.2%}",
                     str(round(mean_std([r.reactivations for r in ok])[0])),
                     f"{mean_std([r.wall_time for r in ok])[0]:.1f} s", str(len(runs)),
                     str(sum(r.diverged for r in runs))))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    )


def write_outputs(out: Path, results: list[RunResult], recipe: dict | None = None,
                  data_name: str = "") -> list[Path]:
    """Write ``metrics.json``, the plots (for a sweep over sparsities ``sweep.md`` and
    ``sweep.png`` instead: :func:`dpf_ext.app.sweep.sweep_table`, :func:`dpf_ext.app.sweep.plot_sweep`)
    and each trained model (``model-<method>.pt``, or
    ``model-<method>-seed<k>.pt`` with several seeds: the finalized ``state_dict``, which
    loads into the original architecture) into ``out``; return the paths written.
    ``metrics.json`` records the machine (with the crossover densities where a run used
    ``compute="auto"``), the software versions and the ``recipe`` run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": cpu_name(),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "processes": ranks()[1]}
    if any(r.config.compute == "auto" for r in results):  # the densities "auto" decided by
        machine["auto_crossover"] = dataclasses.asdict(crossover())
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "dpf_ext": __import__("dpf_ext").__version__}
    metrics = out / "metrics.json"
    metrics.write_text(json.dumps({"machine": machine, "versions": versions, "recipe": recipe,
                                   "runs": [r.to_dict() for r in results]}, indent=2))
    written = [metrics]
    several = len({r.config.method for r in results}) < len(results)
    sweep = len({r.config.sparsity for r in results if r.config.method != "dense"}) > 1
    for r in results:
        if r.model is not None:
            name = (f"model-{run_name(r.config, sweep)}" if several
                    else f"model-{r.config.method}")
            written.append(out / f"{name}.pt")
            torch.save(r.model.state_dict(), written[-1])
    if sweep:  # accuracy against sparsity, as a table and a figure, instead of per-run plots
        written.append(out / "sweep.md")
        written[-1].write_text(sweep_table(results))
        seeds = len({r.config.seed for r in results})
        threads = torch.get_num_threads()
        written.append(out / "sweep.png")
        plot_sweep(results, written[-1], f"{results[0].config.model} on {data_name}, {seeds} "
                   f"seeds, {threads} thread{'s' if threads > 1 else ''} per run")
        return written

    fig, (ax_loss, ax_acc, ax_sp) = plt.subplots(1, 3, figsize=(15, 4))
    targets_drawn = False
    for i, r in enumerate(results):
        epochs = [h["epoch"] for h in r.history]
        style = dict(marker=MARKERS[i % len(MARKERS)], ls=LINE_STYLES[i % len(LINE_STYLES)],
                     ms=4, markevery=max(1, len(epochs) // 12), label=r.config.method)
        ax_loss.plot(epochs, [h["train_loss"] for h in r.history], **style)
        (acc_line,) = ax_acc.plot(epochs, [100 * h["test_accuracy"] for h in r.history], **style)
        soups = [(h["epoch"], h["phase_end"]["soup_accuracy"]) for h in r.history
                 if "soup_accuracy" in h.get("phase_end", {})]
        if soups:  # a soup's accuracy where its cycle ends (the line shows its ingredients')
            ax_acc.scatter(*zip(*[(e, 100 * a) for e, a in soups]), marker="*", s=120,
                           color=acc_line.get_color(), zorder=4, label=f"{r.config.method} soups")
        (line,) = ax_sp.plot(epochs, [100 * h["sparsity"] for h in r.history], **style)
        target = [h.get("target_sparsity") for h in r.history]
        if r.config.method in METHODS and recipe_of(r.config.method).takes_target and (
                None not in target):  # wide and pale, above the data line: seen where they meet
            ax_sp.plot(epochs, [100 * t for t in target], color=line.get_color(), lw=6,
                       alpha=0.3, zorder=3,
                       label=None if targets_drawn else "target (each method's)")
            targets_drawn = True
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Loss over training")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Accuracy over training")
    ax_sp.set(xlabel="epoch", ylabel="sparsity (%)", title="Sparsity and its target")
    ax_sp.set_ylim(bottom=0)  # sparsity is never negative: no axis below 0 for a dense run
    for ax in (ax_loss, ax_acc, ax_sp):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs on short runs
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "training.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    pruned = [r for r in results if r.report]
    if pruned:
        names = [row.name for row in pruned[0].report.layers]
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4))
        width = 0.8 / len(pruned)
        for j, r in enumerate(pruned):
            xs = [i + j * width for i in range(len(names))]
            ax.bar(xs, [100 * row.sparsity for row in r.report.layers], width,
                   label=r.config.method)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=70,
                      fontsize=7)
        ax.set(ylabel="sparsity (%)", title="Sparsity per layer at the end of training")
        ax.legend()
        fig.tight_layout()
        written.append(out / "layer_sparsity.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
