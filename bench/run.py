"""Run the benchmark suite and print one comparison table.

    python bench/run.py [pytest args, e.g. -k threshold]

Every ratio compares cases timed in the same run, on the same machine. The raw
pytest-benchmark JSON plus the table go to ``bench/results/<machine>.json``, or, if that
file exists (the README cites it), to ``<machine>-<date>-<time>.json`` unless
``DPF_BENCH_OVERWRITE=1``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dpf_ext.nn.crossover import cpu_name

HERE = Path(__file__).parent
BASELINE = re.compile(r"torch|dense")  # cases the dpf_ext ones are compared with


def machine_name() -> str:
    """A file-name-safe name for this machine: the GPU's, else CPU model and cores."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu-{os.cpu_count()}core-{cpu_name()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def case_name(bench: dict) -> str:
    params = bench.get("params") or {}
    named = "-".join(str(v) for k, v in params.items() if k not in ("size", "group"))
    return named or bench["name"].removeprefix("test_").split("[")[0]


def per_step(bench: dict) -> float:
    """The median time of one step of a case: cases timing several steps (``steps`` in
    their extra_info) are divided by that count."""
    return bench["stats"]["median"] / bench.get("extra_info", {}).get("steps", 1)


def table(benchmarks: list[dict]) -> str:
    """Per group: each case's median time (per step where a case times several), as a
    multiple of one read of the weights where the group times one, peak extra memory where
    measured, and the speed-up of every dpf_ext case over every torch baseline of the
    group."""
    groups: dict[str, list[dict]] = {}
    for b in benchmarks:
        groups.setdefault(b["group"], []).append(b)
    lines = []
    for group, cases in groups.items():
        lines.append(f"\n{group}")
        reads = [c for c in cases if "one_read" in case_name(c)]
        baselines = [c for c in cases if BASELINE.search(case_name(c)) and c not in reads]
        for c in cases:
            med = per_step(c)
            extra = c.get("extra_info", {})
            floor = f"  {med / per_step(reads[0]):6.2f} reads" if reads else ""
            mem = ""
            if "peak_extra_bytes" in extra:
                mem = f"  peak extra {extra['peak_extra_bytes'] / 2**20:7.1f} MiB"
                if "weights_bytes" in extra:
                    mem += f" ({extra['peak_extra_bytes'] / extra['weights_bytes']:6.1%} of weights)"
            if "state_bytes" in extra:
                mem += f"  training state {extra['state_bytes'] / 2**20:7.1f} MiB"
            if "bandwidth_GBps" in extra:
                mem += f"  ({extra['bandwidth_GBps']:.0f} GB/s)"
            if "interleaved_ratio" in extra:
                mem += f"  interleaved with the baseline: {extra['interleaved_ratio']:.3f}x its time"
            if "interleaved" in extra:
                mem += "  interleaved: " + ", ".join(
                    f"{ratio:.2f}x {what}" for what, ratio in extra["interleaved"].items())
            if "window_landed" in extra:
                mem += f"  (window: {extra['window_landed']})"
            ratios = ""
            if c not in baselines and c not in reads:
                ratios = "  " + ", ".join(
                    f"{per_step(base) / med:.2f}x vs {case_name(base)}" for base in baselines
                )
            unit = " ms/step" if "steps" in extra else " ms"
            lines.append(f"  {case_name(c):<32} {med * 1e3:10.2f}{unit}{floor}{mem}{ratios}")
    return "\n".join(lines)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider",
               f"--benchmark-json={raw}", "--benchmark-columns=median,min,max,rounds",
               *sys.argv[1:]]
        rc = subprocess.call(cmd)
        if rc != 0 or not raw.exists():
            return rc or 1
        data = json.loads(raw.read_text())
    text = table(data["benchmarks"])
    machine = machine_name()
    header = (f"machine: {machine} | torch {torch.__version__} | threads {torch.get_num_threads()}"
              f" | backends: {', '.join(__import__('dpf_ext').ops.available_backends('cpu'))}")
    print(header + text)
    out = HERE / "results" / f"{machine}.json"
    if out.exists() and os.environ.get("DPF_BENCH_OVERWRITE") != "1":  # the README cites it
        out = out.with_name(f"{machine}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "summary": header + text, **data}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
