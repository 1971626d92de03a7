"""The sparse-training tables and figure from the benchmark results of
``bench/test_sparse_training.py``:

    python bench/sparse_report.py bench/results/sparse-training-layers-<machine>.json \\
        bench/results/sparse-training-steps-<machine>.json \\
        bench/results/sparse-training-index-<machine>.json \\
        [bench/results/sparse-training-conv-<machine>.json] [figure.png]

Prints markdown tables of each case's median time as a ratio to the dense torch layer (or
model) timed in the same run, and draws the per-layer ratios against sparsity."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

LAYER_IMPLS = ["torch-masked", "dpf-sparse", "dpf-sparse-fullgrad", "torch-csr", "sparseprop"]


def layer_rows(path: str) -> dict:
    """``{(shape, batch): {sparsity: {impl: median seconds}}}`` of the Linear-step cases."""
    rows: dict = defaultdict(lambda: defaultdict(dict))
    for b in json.load(open(path))["benchmarks"]:
        p = b["params"]
        if "batch" in p:
            rows[(tuple(p["shape"]), p["batch"])][p["sparsity"]][p["impl"]] = b["stats"]["median"]
    return rows


def layer_table(rows: dict) -> str:
    lines = ["| layer (in->out), batch | sparsity | dense torch (ms) | "
             + " | ".join(LAYER_IMPLS) + " |", "|---" * (3 + len(LAYER_IMPLS)) + "|"]
    for (shape, batch), by_sparsity in sorted(rows.items()):
        for sparsity, times in sorted(by_sparsity.items()):
            base = times["torch-dense"]
            cells = [f"{times[i] / base:.2f}" if i in times else "-" for i in LAYER_IMPLS]
            lines.append(f"| {shape[0]}->{shape[1]}, {batch} | {sparsity:.0%} | {base * 1e3:.1f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def index_table(path: str) -> str:
    cases: dict = defaultdict(dict)
    for b in json.load(open(path))["benchmarks"]:
        p = b["params"]
        if "batch" not in p and p.get("impl") in ("torch-dense-product", "index-rebuild"):
            cases[(tuple(p["shape"]), p["sparsity"])][p["impl"]] = b["stats"]["median"]
    lines = ["| layer (in->out) | sparsity | one dense product, batch 256 (ms) | index rebuild (ms) | ratio |",
             "|---|---|---|---|---|"]
    for (shape, sparsity), t in sorted(cases.items()):
        d, r = t["torch-dense-product"], t["index-rebuild"]
        lines.append(f"| {shape[0]}->{shape[1]} | {sparsity:.0%} | {d * 1e3:.1f} | {r * 1e3:.1f} | "
                     f"{r / d:.2f} |")
    return "\n".join(lines)


def step_table(path: str) -> str:
    """Whole training steps as ratios to plain torch, and each one's peak extra memory
    (where measured) as a ratio to plain torch's."""
    cases: dict = defaultdict(dict)
    memory: dict = defaultdict(dict)
    for b in json.load(open(path))["benchmarks"]:
        p = b["params"]
        key = (p["model_name"], p["method"], p["sparsity"])
        cases[key][p["compute"]] = b["stats"]["median"]
        if "peak_extra_bytes" in b.get("extra_info", {}):
            memory[key][p["compute"]] = b["extra_info"]["peak_extra_bytes"]
    lines = ["| model | method | sparsity | torch (ms) | dense | sparse | torch peak (MiB) "
             "| dense | sparse |", "|---|---|---|---|---|---|---|---|---|"]
    for key, t in sorted(cases.items()):
        base, mem = t["torch-dense"], memory.get(key, {})
        peak = (f"{mem['torch-dense'] / 2**20:.0f} | {mem['dense'] / mem['torch-dense']:.2f} | "
                f"{mem['sparse'] / mem['torch-dense']:.2f}" if len(mem) == 3 else "- | - | -")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:.0%} | {base * 1e3:.0f} | "
                     f"{t['dense'] / base:.2f} | {t['sparse'] / base:.2f} | {peak} |")
    return "\n".join(lines)


def conv_table(path: str) -> str:
    """The 3x3 convolution steps as ratios to dense torch."""
    cases: dict = defaultdict(dict)
    for b in json.load(open(path))["benchmarks"]:
        p = b["params"]
        if "conv" in b.get("extra_info", {}):
            cases[(tuple(b["extra_info"]["conv"]), p["sparsity"])][p["impl"]] = b["stats"]["median"]
    impls = ["torch-masked", "dpf-sparse-lowered", "lowering-only"]
    lines = ["| conv 3x3 (channels, side), batch 64 | sparsity | dense torch (ms) | "
             + " | ".join(impls) + " |", "|---" * (3 + len(impls)) + "|"]
    for (shape, sparsity), t in sorted(cases.items()):
        base = t["torch-dense"]
        lines.append(f"| {shape[0]}, {shape[1]}x{shape[1]} | {sparsity:.0%} | {base * 1e3:.1f} | "
                     + " | ".join(f"{t[i] / base:.2f}" for i in impls) + " |")
    return "\n".join(lines)


def figure(rows: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(rows)
    fig, axes = plt.subplots(2, (len(keys) + 1) // 2, figsize=(4 * ((len(keys) + 1) // 2), 7),
                             sharey=True)
    styles = dict(zip(LAYER_IMPLS, ["s:", "o-", "^-", "x--", "d-."]))
    for ax, key in zip(axes.flat, keys):
        sparsities = sorted(rows[key])
        for impl in LAYER_IMPLS:
            ys = [rows[key][s][impl] / rows[key][s]["torch-dense"] if impl in rows[key][s]
                  else float("nan") for s in sparsities]
            ax.plot([100 * s for s in sparsities], ys, styles[impl], label=impl)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{key[0][0]}->{key[0][1]}, batch {key[1]}", fontsize=9)
        ax.set_xlabel("sparsity (%)")
        ax.set_yscale("log")
    axes.flat[0].set_ylabel("step time / dense torch")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("One Linear training step (forward, input and weight gradients), 1 thread")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> int:
    layers, steps, index = sys.argv[1:4]
    rows = layer_rows(layers)
    print(layer_table(rows), "", index_table(index), "", step_table(steps), sep="\n")
    for extra in sys.argv[4:]:
        if extra.endswith(".json"):
            print("", conv_table(extra), sep="\n")
        else:
            figure(rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
