"""Time dpf-train's default job and one ``--compare`` under each thread setting, on an
idle machine and beside one busy process, to choose the CLI's thread defaults.

    python bench/thread_defaults.py [--quick]

Each run is a fresh ``dpf-train`` process; the table gives its wall time and the CPU
time it used (user + system of the process and its children). "busy" runs one other
process spinning on one core for the whole run. Results go to
``bench/results/thread-defaults-<machine>.json`` and are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from run import machine_name  # noqa: E402

from dpf_ext.nn.crossover import cpu_name  # noqa: E402

HERE = Path(__file__).parent
JOBS = {"default job": [], "--compare dpf,rigl": ["--compare", "dpf,rigl"]}
THREADS = (1, 2)
POLICIES = (None, "PASSIVE", "ACTIVE")  # OMP_WAIT_POLICY; None leaves it unset


def timed_run(args: list[str], threads: int, policy: str | None) -> dict:
    """Wall and CPU seconds of one dpf-train process with ``--threads threads`` and the
    given OpenMP wait policy."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    with tempfile.TemporaryDirectory() as out:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dpf_ext", "--out", out, "--overwrite",
                        "--threads", str(threads), *args], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the default job only, without the ACTIVE policy")
    opts = parser.parse_args()
    jobs = {"default job": []} if opts.quick else JOBS
    policies = POLICIES[:2] if opts.quick else POLICIES
    rows = []
    for load in ("idle", "busy"):
        spinner = (subprocess.Popen([sys.executable, "-c", "while True: pass"])
                   if load == "busy" else None)
        try:
            for job, args in jobs.items():
                for threads in THREADS:
                    for policy in policies:
                        row = {"job": job, "load": load, "threads": threads,
                               "wait_policy": policy or "unset",
                               **timed_run(args, threads, policy)}
                        print(json.dumps(row), flush=True)
                        rows.append(row)
        finally:
            if spinner:
                spinner.kill()
    record = {"machine": f"{os.cpu_count()} cores, {cpu_name()}", "rows": rows}
    path = HERE / "results" / f"thread-defaults-{machine_name()}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"| job | load | threads | OMP_WAIT_POLICY | wall s | CPU s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['job']} | {r['load']} | {r['threads']} | {r['wait_policy']} "
              f"| {r['wall_s']} | {r['cpu_s']} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
