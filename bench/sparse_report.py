"""The sparse-training tables and figure from the benchmark results of
``bench/test_sparse_training.py``:

    python bench/sparse_report.py bench/results/sparse-training-layers-<machine>.json \\
        bench/results/sparse-training-steps-<machine>.json \\
        bench/results/sparse-training-index-<machine>.json \\
        [bench/results/sparse-training-conv-<machine>.json] [figure.png [conv-figure.png]]

Prints markdown tables of each case's median time as a ratio to the dense torch layer (or
model) timed in the same run (interleaved with it where the case recorded that), and draws
the per-layer (and per-convolution) ratios against sparsity."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

LAYER_IMPLS = ["torch-masked", "dpf-sparse", "dpf-sparse-fullgrad", "torch-csr", "sparseprop"]
CONV_IMPLS = ["torch-masked", "dpf-sparse", "dpf-sparse-fullgrad", "sparseprop"]


def layer_rows(path: str) -> dict:
    """``{(shape, batch): {sparsity: {impl: median seconds}}}`` of the Linear-step cases;
    where a case was also timed interleaved with dense torch, its time is that fraction of
    the dense case's median (so the table's ratios are the interleaved ones)."""
    rows: dict = defaultdict(lambda: defaultdict(dict))
    cases = [b for b in json.load(open(path))["benchmarks"]
             if b["name"].startswith("test_linear_training_step[")]
    dense = {(tuple(b["params"]["shape"]), b["params"]["batch"], b["params"]["sparsity"]):
             b["stats"]["median"] for b in cases if b["params"]["impl"] == "torch-dense"}
    for b in cases:
        p = b["params"]
        key = (tuple(p["shape"]), p["batch"])
        fraction = next(iter(b.get("extra_info", {}).get("interleaved", {}).values()), None)
        rows[key][p["sparsity"]][p["impl"]] = (b["stats"]["median"] if fraction is None
                                               else fraction * dense[(*key, p["sparsity"])])
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
    (where measured) as a ratio to plain torch's. ``sparse`` is the run's sparse mode
    (``compute="auto"`` for ResNet-20), timed alone and interleaved with plain torch, with
    the number of layers it ran sparse."""
    cases: dict = defaultdict(dict)
    memory: dict = defaultdict(dict)
    sparse_layers: dict = {}
    interleaved: dict = {}
    for b in json.load(open(path))["benchmarks"]:
        p = b["params"]
        key = (p["model_name"], p["method"], p["sparsity"])
        mode = "sparse" if p["compute"] == "auto" else p["compute"]
        cases[key][mode] = b["stats"]["median"]
        info = b.get("extra_info", {})
        if "peak_extra_bytes" in info:
            memory[key][mode] = info["peak_extra_bytes"]
        if mode == "sparse":
            sparse_layers[key] = f"{info.get('sparse_layers', '-')}" + (" (auto)" if p["compute"] == "auto" else "")
            interleaved[key] = next(iter(info.get("interleaved", {}).values()), None)
    lines = ["| model | method | sparsity | torch (ms) | dense | sparse | sparse, interleaved "
             "| layers sparse | torch peak (MiB) | dense | sparse |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, t in sorted(cases.items()):
        base, mem = t["torch-dense"], memory.get(key, {})
        peak = (f"{mem['torch-dense'] / 2**20:.0f} | {mem['dense'] / mem['torch-dense']:.2f} | "
                f"{mem['sparse'] / mem['torch-dense']:.2f}" if len(mem) == 3 else "- | - | -")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:.0%} | {base * 1e3:.0f} | "
                     f"{t['dense'] / base:.2f} | {t['sparse'] / base:.2f} | "
                     + (f"{interleaved[key]:.2f}" if interleaved.get(key) else "-")
                     + f" | {sparse_layers.get(key, '-')} | {peak} |")
    return "\n".join(lines)


def conv_rows(path: str) -> dict:
    """``{(channels, side): {sparsity: {impl: median seconds}}}`` of the convolution steps."""
    rows: dict = defaultdict(lambda: defaultdict(dict))
    for b in json.load(open(path))["benchmarks"]:
        if "conv" in b.get("extra_info", {}):
            rows[tuple(b["extra_info"]["conv"])][b["params"]["sparsity"]][b["params"]["impl"]] = \
                b["stats"]["median"]
    return rows


def conv_table(rows: dict) -> str:
    """The 3x3 convolution steps as ratios to dense torch."""
    lines = ["| conv 3x3 (channels, side), batch 64 | sparsity | dense torch (ms) | "
             + " | ".join(CONV_IMPLS) + " |", "|---" * (3 + len(CONV_IMPLS)) + "|"]
    for shape, by_sparsity in sorted(rows.items()):
        for sparsity, t in sorted(by_sparsity.items()):
            base = t["torch-dense"]
            lines.append(f"| {shape[0]}, {shape[1]}x{shape[1]} | {sparsity:.0%} | {base * 1e3:.1f} | "
                         + " | ".join(f"{t[i] / base:.2f}" if i in t else "-" for i in CONV_IMPLS)
                         + " |")
    return "\n".join(lines)


def figure(rows: dict, impls: list[str], title, label, out: str) -> None:
    """Each case's step time over dense torch's against sparsity, one panel per case
    (``title(key)``), ``impls`` as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(rows)
    nrows = 1 if len(keys) <= 3 else 2
    ncols = -(-len(keys) // nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.5 * nrows + 0.5), sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    styles = dict(zip(LAYER_IMPLS, ["s:", "o-", "^-", "x--", "d-."]))
    for ax, key in zip(axes.flat, keys):
        sparsities = sorted(rows[key])
        for impl in impls:
            ys = [rows[key][s][impl] / rows[key][s]["torch-dense"] if impl in rows[key][s]
                  else float("nan") for s in sparsities]
            ax.plot([100 * s for s in sparsities], ys, styles[impl], label=impl)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(title(key), fontsize=9)
        ax.set_xlabel("sparsity (%)")
        ax.set_yscale("log")
    axes.flat[0].set_ylabel("step time / dense torch")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(label)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> int:
    layers, steps, index = sys.argv[1:4]
    rows = layer_rows(layers)
    print(layer_table(rows), "", index_table(index), "", step_table(steps), sep="\n")
    convs = [conv_rows(a) for a in sys.argv[4:] if a.endswith(".json")]
    for conv in convs:
        print("", conv_table(conv), sep="\n")
    figures = [a for a in sys.argv[4:] if not a.endswith(".json")]
    if figures:
        figure(rows, LAYER_IMPLS, lambda k: f"{k[0][0]}->{k[0][1]}, batch {k[1]}",
               "One Linear training step (forward, input and weight gradients), 1 thread",
               figures[0])
    if len(figures) > 1 and convs:
        figure(convs[0], CONV_IMPLS, lambda k: f"3x3, {k[0]} channels at {k[1]}x{k[1]}",
               "One 3x3 convolution training step, batch 64, 1 thread", figures[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
