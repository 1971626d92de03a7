"""dpf-train for long runs: a run killed with SIGKILL (mid-epoch, and inside a mask update)
and resumed ends with the same model, bit for bit, and the same metrics as the
uninterrupted run; corrupt or foreign checkpoints are clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpf_ext.app.cli import main

ARGS = ["--model", "mlp", "--epochs", "3", "--threads", "1", "--no-progress",
        "--checkpoint-every", "5", "--sparsity", "0.9"]

# Runs dpf-train, sending itself SIGKILL at the KILL_STEP-th optimizer step ("step") or
# inside the mask update of step KILL_STEP ("update").
KILLER = """
import os, signal, sys
import torch
import dpf_ext.pruner
kill_step, phase = int(sys.argv[1]), sys.argv[2]
if phase == "update":
    original = dpf_ext.pruner.Pruner._update_masks
    def dying(self, *args, **kwargs):
        if self.step_count == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    dpf_ext.pruner.Pruner._update_masks = dying
else:
    original = torch.optim.SGD.step
    calls = [0]
    def dying(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    torch.optim.SGD.step = dying
from dpf_ext.app.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _cli(*args, kill=None):
    code = KILLER if kill else "import sys; from dpf_ext.app.cli import main; sys.exit(main(sys.argv[1:]))"
    extra = [str(kill[0]), kill[1]] if kill else []
    return subprocess.run([sys.executable, "-c", code, *extra, *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _outcome(out: Path):
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    for r in runs:
        r.pop("wall_time")
    return runs, torch.load(out / "model-dpf.pt")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    done = _cli(*ARGS, "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return _outcome(out)


# 23 steps per epoch: step 30 is inside the second epoch; step 32 is a mask update (every 16)
@pytest.mark.parametrize("kill", [(30, "step"), (32, "update")], ids=["mid-epoch", "mask-update"])
def test_a_killed_run_resumes_to_the_same_model_and_metrics(uninterrupted, tmp_path, kill):
    killed = _cli(*ARGS, "--out", str(tmp_path), kill=kill)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "metrics.json").exists()
    latest = sorted((tmp_path / "checkpoints" / "dpf-seed0").glob("step-*.pt"))[-1]
    assert latest.name == ("step-000000025.pt" if kill[0] == 30 else "step-000000030.pt")
    resumed = _cli(*ARGS, "--out", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    runs, model = _outcome(tmp_path)
    ref_runs, ref_model = uninterrupted
    assert runs == ref_runs
    assert model.keys() == ref_model.keys()
    for key in model:
        assert torch.equal(model[key], ref_model[key]), key


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path, capsys):
    args = ["--model", "mlp", "--epochs", "1", "--no-progress", "--checkpoint-every", "5",
            "--out", str(tmp_path)]
    folder = tmp_path / "checkpoints" / "dpf-seed0"
    assert main(args) == 0
    # an unfinished run: two step checkpoints, the newest cut short
    (folder / "done.pt").unlink()
    for step in (5, 10):
        torch.save({"format": "dpf-train/1"}, folder / f"step-{step:09d}.pt")
    newest = folder / "step-000000010.pt"
    newest.write_bytes(newest.read_bytes()[:20])
    assert main(args + ["--resume"]) == 1
    err = capsys.readouterr().err
    assert "step-000000010.pt is unreadable" in err and "--resume " + str(folder / "step-000000005.pt") in err
    # another run's checkpoint
    newest.unlink()
    assert main(["--model", "mlp", "--epochs", "1", "--no-progress", "--out", str(tmp_path),
                 "--checkpoint-every", "5", "--overwrite"]) == 0
    (folder / "done.pt").rename(folder / "step-000000023.pt")
    state = torch.load(folder / "step-000000023.pt", weights_only=False)
    torch.save({**state, "config": {**state["config"], "sparsity": 0.5}}, folder / "step-000000023.pt")
    assert main(args + ["--resume"]) == 1
    assert "of another run: sparsity: checkpoint 0.5, this run 0.9" in capsys.readouterr().err


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys):
    args = ["--model", "mlp", "--epochs", "1", "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    with pytest.raises(SystemExit):
        main(args)
    assert "holds a previous run" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "90"], "did you mean 0.9"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--resume"], "need --out"),
    (["--sparsity", "1.0"], "got 1.0\n(see dpf-train --help)"),
    (["--sparsities", "0.5", "90"], "got 90.0 (a fraction: did you mean 0.9?)"),
    (["--method", "rigl", "--option", "drop_fractoin=0.3"], "did you mean drop_fraction?"),
    (["--compute", "sparse", "--model", "resnet20"],
     "--compute sparse: layers ['layer2.0.conv1', 'layer2.0.shortcut.0', 'layer3.0.conv1', "
     "'layer3.0.shortcut.0']: DPFConv2d: its stride is (2, 2)"),
    (["--data-dir", "somewhere"], "--data-dir is read by --data cifar10 and imagefolder only; digits"),
    (["--out", __file__], "is a file: give a folder"),
])
def test_bad_long_run_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert message in err
    assert "usage:" not in err and len(err.splitlines()) == 2  # one line, and the --help pointer


def test_a_misspelt_recipe_key_names_the_file_and_the_key(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "mlp"\nepohcs = 3\n')
    with pytest.raises(SystemExit):
        main(["--config", str(recipe)])
    err = capsys.readouterr().err
    assert f"--config {recipe}: unknown key 'epohcs' (did you mean 'epochs'?)" in err
    assert len(err.splitlines()) == 2


def test_help_says_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    for option in text.split(" --")[1:]:
        assert option.count("default") <= 1, option
    assert "(default: None)" not in text and "(default: 40)" in text  # --epochs


def test_torchrun_resumes_a_single_process_checkpoint_with_the_same_result(uninterrupted, tmp_path):
    killed = _cli(*ARGS, "--out", str(tmp_path), kill=(30, "step"))
    assert killed.returncode == -9
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "dpf_ext", *ARGS, "--out", str(tmp_path),
           "--resume"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    runs, model = _outcome(tmp_path)
    ref_runs, ref_model = uninterrupted
    for got, ref in zip(runs, ref_runs):  # DDP sums the two halves' gradients: last bits
        assert got["accuracy"] == ref["accuracy"] and got["sparsity"] == ref["sparsity"]
        assert got["reactivations"] == ref["reactivations"]
    for key in model:
        torch.testing.assert_close(model[key], ref_model[key], rtol=1e-4, atol=1e-6)


# lr 0.02: at 0.1 a BatchNorm network is chaotic enough that the last-bit differences of
# another summation order (2 processes, or 2 threads) grow to a test image in 3 epochs
CNN_ARGS = ["--model", "cnn", "--epochs", "2", "--lr", "0.02", "--threads", "1", "--no-progress",
            "--checkpoint-every", "5", "--sparsity", "0.9"]


def _torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "dpf_ext", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def test_torchrun_resumes_a_batchnorm_model_as_one_process_trains_it(tmp_path):
    one = _cli(*CNN_ARGS, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    killed = _cli(*CNN_ARGS, "--out", str(tmp_path / "two"), kill=(30, "step"))
    assert killed.returncode == -9
    _torchrun(*CNN_ARGS, "--out", str(tmp_path / "two"), "--resume")
    _torchrun(*CNN_ARGS, "--out", str(tmp_path / "unsynced"), "--no-sync-bn")
    (ref,), ref_model = _outcome(tmp_path / "one")
    (got,), model = _outcome(tmp_path / "two")
    assert [got[k] for k in ("accuracy", "sparsity", "reactivations")] == [
        ref[k] for k in ("accuracy", "sparsity", "reactivations")]
    for key in model:
        torch.testing.assert_close(model[key], ref_model[key], rtol=1e-4, atol=1e-5)
    # without the synchronised statistics each process normalises its half of the batch
    _, unsynced = _outcome(tmp_path / "unsynced")
    assert max(float((unsynced[k] - ref_model[k]).abs().max()) for k in model
               if model[k].is_floating_point()) > 1e-2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from dpf_ext.app.resume import Checkpoints

    checkpoints = Checkpoints(tmp_path, keep=2)
    checkpoints.save({"step": 5}, 5)

    def disk_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.save({"step": 10}, 10)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000005.pt"]  # no partial file
    assert checkpoints.latest()["step"] == 5


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoints(tmp_path, capsys):
    args = ["--model", "mlp", "--epochs", "2", "--no-progress", "--lr", "1e30",
            "--checkpoint-every", "1", "--out", str(tmp_path)]
    assert main(args) == 1  # step 1 is finite, its update makes step 2's loss NaN
    assert "the loss is nan at step 2; the last good checkpoint is kept" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "checkpoints" / "dpf-seed0").glob("step-*.pt")] == [
        "step-000000001.pt"]


def test_the_log_has_a_line_per_step_and_per_epoch(tmp_path):
    assert main(["--model", "mlp", "--epochs", "2", "--no-progress", "--out", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    epochs = [r for r in lines if "test_accuracy" in r]
    assert len(steps) == 46 and [r["step"] for r in steps] == list(range(1, 47))
    assert [r["epoch"] for r in epochs] == [1, 2] and all("lr" in r for r in steps)


def test_the_log_goes_to_tensorboard_when_it_is_installed(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    assert main(["--model", "mlp", "--epochs", "1", "--no-progress", "--out", str(tmp_path)]) == 0
    assert list((tmp_path / "tensorboard").glob("events.*"))


RECIPES = Path(__file__).resolve().parent.parent / "examples" / "recipes"


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.stem)
def test_every_recipe_reads_as_the_command_line(recipe):
    from dpf_ext.app.cli import build_parser, recipe_argv

    parser = build_parser()
    argv, contents = recipe_argv(recipe, parser)
    args = parser.parse_args(argv)
    assert args.sparsities == contents["sparsities"] and args.seeds == 3
    assert args.compare.split(",") == contents["compare"]


def test_a_recipe_runs_as_a_sweep_flags_override_it_and_it_is_recorded(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "cnn"\nepochs = 5\ncompare = ["dpf", "rigl"]\n'
                      'sparsities = [0.5, 0.8]\n[option]\ndrop_fraction = 0.5\n')
    out = tmp_path / "out"
    args = ["--config", str(recipe), "--model", "mlp", "--epochs", "1", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "dpf @ 0.5" in text and "rigl @ 0.8" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["compare"] == ["dpf", "rigl"] and "torch" in metrics["versions"]
    configs = [r["config"] for r in metrics["runs"]]
    assert [(c["method"], c["sparsity"], c["model"], c["epochs"]) for c in configs] == [
        ("dpf", 0.5, "mlp", 1), ("rigl", 0.5, "mlp", 1), ("dpf", 0.8, "mlp", 1), ("rigl", 0.8, "mlp", 1)]
    assert configs[1]["options"] == {"drop_fraction": 0.5} and configs[0]["options"] == {}
    assert main(args + ["--status"]) == 0
    assert "4/4 runs finished" in capsys.readouterr().out


def test_a_sweep_records_diverged_runs_and_goes_on(tmp_path, capsys):
    args = ["--model", "mlp", "--epochs", "1", "--no-progress", "--compare", "dpf,gradual",
            "--lr", "1e30", "--out", str(tmp_path), "--checkpoint-every", "50"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("recorded as diverged") == 2
    runs = json.loads((tmp_path / "metrics.json").read_text())["runs"]
    assert [r["diverged"] for r in runs] == [True, True]


def test_the_status_of_an_interrupted_sweep(tmp_path, capsys):
    args = ["--model", "mlp", "--epochs", "1", "--no-progress", "--compare", "dpf,gradual",
            "--sparsities", "0.5", "0.9", "--checkpoint-every", "10", "--out", str(tmp_path)]
    killed = _cli(*args, kill=(60, "step"))  # dies in the third run (23 steps a run)
    assert killed.returncode == -9
    assert main(args + ["--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("dpf-s0.5-seed0") and "done" in line for line in lines)
    assert any(line.startswith("dpf-s0.9-seed0") and "running: step 10/23" in line for line in lines)
    assert any(line.startswith("gradual-s0.9-seed0") and "waiting" in line for line in lines)
    assert lines[0] == "started with --jobs 1"
    assert "2/4 runs finished" in lines[-1] and "min of training left" in lines[-1]
    assert "(at the logged step time)" in lines[-1]
    assert main(args + ["--resume"]) == 0  # the finished runs are read back, not trained


def test_the_status_before_the_first_step_estimates_the_time(tmp_path, capsys):
    args = ["--model", "mlp", "--epochs", "2", "--compare", "dpf,rigl", "--out", str(tmp_path)]
    assert main(args + ["--status", "--jobs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "not started yet"
    assert "0/2 runs finished; about " in lines[-1] and "at 2 runs at a time" in lines[-1]
    assert lines[-1].endswith("(estimated from 3 steps timed now)")


def test_resume_loads_a_path_outside_out_and_says_so(uninterrupted, tmp_path):
    killed = _cli(*ARGS, "--out", str(tmp_path / "old"), kill=(30, "step"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    latest = sorted((tmp_path / "old" / "checkpoints" / "dpf-seed0").glob("step-*.pt"))[-1]
    moved = tmp_path / "elsewhere.pt"
    latest.rename(moved)
    resumed = _cli(*ARGS, "--out", str(tmp_path / "new"), "--resume", str(moved))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f": resumed from {moved} at step 25 of 69" in resumed.stdout
    runs, model = _outcome(tmp_path / "new")
    ref_runs, ref_model = uninterrupted
    assert runs == ref_runs
    for key in model:
        assert torch.equal(model[key], ref_model[key]), key


def test_resume_from_a_missing_path_is_an_error_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "mlp", "--epochs", "1", "--out", str(out), "--resume",
              str(tmp_path / "missing.pt")])
    assert exit_info.value.code != 0
    assert "missing.pt: no such checkpoint file" in capsys.readouterr().err
    assert not out.exists()


def test_resume_from_another_runs_path_is_refused(tmp_path, capsys):
    args = ["--model", "mlp", "--epochs", "1", "--no-progress", "--checkpoint-every", "5"]
    assert main(args + ["--out", str(tmp_path / "a"), "--sparsity", "0.5"]) == 0
    done = tmp_path / "a" / "checkpoints" / "dpf-seed0" / "done.pt"
    with pytest.raises(SystemExit):
        main(args + ["--out", str(tmp_path / "b"), "--resume", str(done)])
    assert "of another run: sparsity: checkpoint 0.5, this run 0.9" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before any work


def test_a_finished_runs_checkpoint_resumed_into_a_new_folder_is_read_back(tmp_path, capsys):
    args = ["--model", "mlp", "--epochs", "1", "--no-progress", "--sparsity", "0.5"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    done = tmp_path / "a" / "checkpoints" / "dpf-seed0" / "done.pt"
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "b"), "--resume", str(done)]) == 0
    assert "wrote" in capsys.readouterr().out
    old, new = _outcome(tmp_path / "a"), _outcome(tmp_path / "b")
    assert old[0] == new[0]
    assert all(torch.equal(old[1][k], new[1][k]) for k in old[1])
    assert (tmp_path / "b" / "checkpoints" / "dpf-seed0" / "done.pt").is_file()
    for folder in ("a", "b"):  # the folder lock goes with the run
        assert not (tmp_path / folder / ".dpf-train.lock").exists()
    machine = json.loads((tmp_path / "b" / "metrics.json").read_text())["machine"]
    assert machine["processor"]  # the CPU's name, never ""


def test_a_refused_resume_creates_no_folder(tmp_path, capsys):
    not_a_checkpoint = tmp_path / "notes.pt"
    torch.save({"weights": torch.zeros(2)}, not_a_checkpoint)
    out = tmp_path / "new"
    with pytest.raises(SystemExit):
        main(["--model", "mlp", "--epochs", "1", "--out", str(out), "--resume",
              str(not_a_checkpoint)])
    assert "notes.pt is not a dpf-train checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_resume_with_nothing_to_resume_says_so_and_starts_from_step_0(tmp_path, capsys):
    assert main(["--model", "mlp", "--epochs", "1", "--no-progress", "--out", str(tmp_path),
                 "--resume"]) == 0
    assert ": nothing to resume in" in capsys.readouterr().out


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_killed_jobs_parent_leaves_no_live_worker(tmp_path):
    import signal
    import time

    args = ["--compare", "dpf,rigl", "--jobs", "2", "--model", "mlp", "--epochs", "50",
            "--no-progress", "--checkpoint-every", "5", "--out", str(tmp_path)]
    parent = subprocess.Popen([sys.executable, "-m", "dpf_ext", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("checkpoints/*/step-*.pt")):  # the workers are training
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.2)
        workers = _children(parent.pid)
        assert workers
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{w}").exists() and "Z" not in
                  Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[:1] for w in workers
                  if Path(f"/proc/{w}/stat").exists()):
            assert time.monotonic() < deadline, "a worker outlived its parent"
            time.sleep(0.2)
    finally:
        parent.kill()


def test_a_folder_being_written_is_not_resumed_into(tmp_path, capsys):
    from dpf_ext.app.resume import FolderLock

    args = ["--model", "mlp", "--epochs", "1", "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    live = FolderLock(tmp_path).acquire()  # as a live run into the folder holds it
    try:
        with pytest.raises(SystemExit):
            main(args + ["--resume"])
        assert "is being written by another live process" in capsys.readouterr().err
    finally:
        live.release()
    assert main(args + ["--resume"]) == 0


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("method, options, kill", [
    ("imp", ["--option", "cycles=2", "--option", "rewind=0.2"], 30),  # in the first cycle
    ("sms", ["--option", "cycles=1", "--option", "soup=2"], 52),  # in the soup's second ingredient
])
def test_a_killed_prune_retrain_run_resumes_to_the_same_model_and_metrics(tmp_path, method, options, kill):
    """23 steps per epoch and one epoch per phase: the kill falls inside a later phase, so the
    resumed run restores the rewind point or the cycle's start and its soup so far."""
    args = ["--model", "mlp", "--epochs", "1", "--threads", "1", "--no-progress",
            "--checkpoint-every", "5", "--sparsity", "0.9", "--method", method, *options]
    straight = _cli(*args, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _cli(*args, "--out", str(tmp_path / "run"), kill=(kill, "step"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _cli(*args, "--out", str(tmp_path / "run"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    outcomes = []
    for out in (tmp_path / "straight", tmp_path / "run"):
        runs = json.loads((out / "metrics.json").read_text())["runs"]
        for r in runs:
            r.pop("wall_time")
        outcomes.append((runs, torch.load(out / f"model-{method}.pt")))
    (runs, model), (ref_runs, ref_model) = outcomes
    assert runs == ref_runs and len(runs[0]["phases"]) == 3
    for key in model:
        assert torch.equal(model[key], ref_model[key]), key
