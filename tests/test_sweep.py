"""Sweeps: the table and figure of accuracy against sparsity, and runs in parallel
(``--jobs``) giving what one process gives."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from dpf_ext.app.cli import main
from dpf_ext.app.sweep import sweep_cells, sweep_table
from dpf_ext.app.train import RunResult, TrainConfig


def _result(method, sparsity, seed, accuracy, diverged=False):
    config = TrainConfig(method=method, sparsity=sparsity, seed=seed)
    return RunResult(config, math.nan if diverged else accuracy, sparsity, 0, 1.0,
                     diverged=diverged)


def test_the_sweep_table_by_hand():
    results = [
        _result("dense", 0.0, 0, 0.80), _result("dense", 0.0, 1, 0.82),
        _result("dpf", 0.9, 0, 0.70), _result("dpf", 0.9, 1, 0.74),
        _result("dpf", 0.99, 0, 0.50), _result("dpf", 0.99, 1, 0, diverged=True),
        _result("dsr", 0.9, 0, 0.60), _result("dsr", 0.9, 1, 0.60),
        _result("dsr", 0.99, 0, 0, diverged=True), _result("dsr", 0.99, 1, 0, diverged=True),
    ]
    cells = sweep_cells(results)
    assert cells["dense"][0.9] == cells["dense"][0.99]  # dense stands at every sparsity
    assert cells["dpf"][0.9]["mean"] == pytest.approx(72.0)
    assert cells["dpf"][0.9]["std"] == pytest.approx(math.sqrt(8.0))  # sample std of 70, 74
    assert cells["dpf"][0.99]["mean"] == pytest.approx(50.0) and cells["dpf"][0.99]["diverged"] == 1
    lines = sweep_table(results).splitlines()
    assert lines[0] == "| method | 90% | 99% | diverged |"
    assert lines[2] == "| dense | 81.00 ± 1.41 | 81.00 ± 1.41 | 0 |"
    assert lines[3] == "| dpf | 72.00 ± 2.83 | 50.00 ± 0.00 (1 diverged) | 1 |"
    assert lines[4] == "| dsr | 60.00 ± 0.00 | diverged | 2 |"


def _metrics(folder):
    runs = json.loads((folder / "metrics.json").read_text())["runs"]
    return [(r["config"]["method"], r["config"]["sparsity"], r["config"]["seed"], r["accuracy"],
             r["sparsity"], r["reactivations"]) for r in runs]


def test_parallel_runs_give_what_one_process_gives(tmp_path, capsys):
    args = ["--model", "mlp", "--epochs", "2", "--threads", "1", "--no-progress",
            "--compare", "dense,dpf,rigl", "--sparsities", "0.5", "0.9", "--seeds", "2"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert main(args + ["--jobs", "2", "--out", str(tmp_path / "two"),
                        "--checkpoint-every", "10"]) == 0
    assert len(_metrics(tmp_path / "one")) == 10
    assert _metrics(tmp_path / "two") == _metrics(tmp_path / "one")
    for name in ("model-rigl-s0.9-seed1.pt", "model-dpf-s0.5-seed0.pt"):
        one, two = (torch.load(tmp_path / d / name) for d in ("one", "two"))
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    table = (tmp_path / "two" / "sweep.md").read_text()
    assert table == (tmp_path / "one" / "sweep.md").read_text()
    assert table.splitlines()[0] == "| method | 50% | 90% | diverged |"
    assert [line.split(" |")[0] for line in table.splitlines()[2:]] == ["| dense", "| dpf", "| rigl"]
    assert (tmp_path / "two" / "sweep.png").stat().st_size > 0
    log = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert json.loads(log[0]) == {"plan": {"jobs": 2, "processes": 1, "threads": 1}}
    assert {json.loads(line)["run"] for line in log[1:]} == {
        f"{m}-s{s}-seed{k}" for m, s in (("dense", 0), ("dpf", 0.5), ("rigl", 0.5), ("dpf", 0.9),
                                         ("rigl", 0.9)) for k in (0, 1)}
    capsys.readouterr()
    # a finished parallel sweep is read back, not trained again
    assert main(args + ["--jobs", "2", "--out", str(tmp_path / "two"), "--resume"]) == 0
    assert "epoch 1/2" not in capsys.readouterr().out
    assert _metrics(tmp_path / "two") == _metrics(tmp_path / "one")


def test_jobs_under_torchrun_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(["--model", "mlp", "--epochs", "1", "--jobs", "2"])
    assert "--jobs runs several single-process trainings" in capsys.readouterr().err



def test_results_hold_no_file_descriptors(tmp_path):
    # Models handed back as tensors kept one shared-memory descriptor per tensor open in the
    # parent until the sweep ended; 14 CNN results exceed a limit of 160 and the sweep hung.
    command = (f"ulimit -n 160 && {sys.executable} -m dpf_ext --model cnn --epochs 1 "
               "--compare dense,dpf,gradual,rigl --sparsities 0.5 0.9 --seeds 2 --jobs 2 "
               f"--threads 1 --no-progress --out {tmp_path}")
    job = subprocess.Popen(["bash", "-c", command], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = job.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        pytest.fail("the parallel sweep hung (out of file descriptors?)")
    assert job.returncode == 0, err.decode()[-2000:]
    assert len(json.loads((tmp_path / "metrics.json").read_text())["runs"]) == 14
