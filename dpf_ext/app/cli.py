"""``dpf-train`` (also ``python -m dpf_ext``): train with DPF or a baseline and report.

With no arguments: DPF at 90% sparsity, ResNet-20 on scikit-learn's digits (bundled, no
download), 40 epochs on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist

from ..allocator import retain_freed_memory
from .data import DATASETS, load_dataset
from ..budgets import BUDGETS
from ..methods import METHODS, method_options, recipe_of, values_storage_methods
from .models import MODELS, build_model
from ..nn.convert import sparsify
from ..nn.layers import dpf_layers
from ..methods.patterns import NMPattern, reduction
from ..methods.magnitude import THRESHOLDS
from ..methods.presets import SCOPES
from .resume import CheckpointError, Checkpoints, FolderInUse, FolderLock, check_same_run
from .resume import load as load_checkpoint
from .run_outputs import summary_table, write_outputs
from .sweep import sweep_status
from .train import RunLog, RunResult, TrainConfig, ranks, run_name, train


COMPARED = ("dense", "oneshot", "gradual", "dpf")
"""What ``--compare`` alone trains."""


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = Parser(
        prog="dpf-train",
        formatter_class=HelpFormatter,
        description="Train a sparse network in one pass with Dynamic Pruning with Feedback "
                    "(or a baseline) and report accuracy, sparsity and reactivations.",
    )
    p.add_argument("--method", choices=["dense", *METHODS], default=defaults.method,
                   help="the method that chooses the masks")
    p.add_argument("--compare", nargs="?", const=",".join(COMPARED), default=None,
                   metavar="METHODS",
                   help="train these methods (comma-separated; alone: "
                        f"{','.join(COMPARED)}) with the same budget; one table")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the method (repeatable; the value is read as JSON, "
                        "else as a string), e.g. --option drop_fraction=0.5")
    p.add_argument("--budget", choices=sorted(BUDGETS), default=None,
                   help="the layer-wise budget (default: the method's; DPF: global, "
                        "RigL/SET/static: erk)")
    p.add_argument("--model", choices=sorted(MODELS), default="resnet20", help="the network")
    p.add_argument("--data", choices=DATASETS, default="digits",
                   help="digits (bundled), gratings and gratings20 (generated, harder), cifar10 "
                        "or imagefolder (both from --data-dir)")
    p.add_argument("--data-dir", help="folder with CIFAR-10's python batches, or an image folder "
                                      "root with train/ and val/ (never downloaded)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="a recipe: a TOML file of these options (names with - or _; "
                        "'compare' and 'sparsities' may be lists, 'option' a table); flags "
                        "given here override it")
    p.add_argument("--sparsity", type=float, default=defaults.sparsity,
                   help="the target share of pruned weights, in [0, 1)")
    p.add_argument("--sparsities", type=float, nargs="+", default=None, metavar="S",
                   help="a sweep: every method and seed at each of these sparsities")
    p.add_argument("--status", action="store_true",
                   help="with --out: show which runs of this plan are done, running or "
                        "waiting, and the time left; trains nothing")
    p.add_argument("--epochs", type=int, default=40, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="the global batch (split across processes under torchrun)")
    p.add_argument("--lr", type=float, default=defaults.lr,
                   help="SGD's learning rate (÷10 at 50%% and 75%% of training)")
    p.add_argument("--momentum", type=float, default=defaults.momentum, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="SGD's weight decay")
    p.add_argument("--update-every", type=int, default=defaults.update_every,
                   help="steps between mask updates (default: the method's; dpf: 16, "
                        "rigl/set: 100)")
    p.add_argument("--scope", choices=SCOPES, default=defaults.scope,
                   help="dpf and gradual: global (the method's budget), layer (the uniform "
                        "budget) or filter (whole output filters)")
    p.add_argument("--threshold", choices=THRESHOLDS, default=defaults.threshold,
                   help="magnitude thresholds: exact, or from one histogram pass")
    p.add_argument("--ramp-until", type=float, default=None, metavar="F",
                   help="dpf's and gradual's cubic schedule reaches the target at this "
                        "fraction of training (default 0.75)")
    p.add_argument("--updates-until", type=float, default=None, metavar="F",
                   help="the masks change up to this fraction of training, then stay fixed "
                        "(default: the method's; dpf: to the end, rigl/set: 0.75)")
    p.add_argument("--oneshot-at", type=float, default=defaults.oneshot_at,
                   help="one-shot pruning point as a fraction of training")
    p.add_argument("--exclude", nargs="*", default=[],
                   help="layer names or patterns kept dense (e.g. conv1 fc)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="first seed")
    p.add_argument("--seeds", type=int, default=1,
                   help="run every method with this many seeds (seed, seed+1, ...) and report "
                        "the mean and standard deviation")
    p.add_argument("--threads", type=int, default=1,
                   help="torch's CPU threads per process (default 1, the measured choice: "
                        "see the results page; results depend on it; recorded in "
                        "metrics.json)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at a time, each in its own process with --threads "
                        "threads; results do not depend on N")
    p.add_argument("--no-channel-floor", action="store_true",
                   help="DPF without the channel floor (the paper's unguarded algorithm)")
    p.add_argument("--sparse-init", action="store_true",
                   help="rescale each unit's kept weights by sqrt(fan-in / kept fan-in) once "
                        "the first masks are set (methods that start sparse: static, SET, "
                        "RigL, SNIP, ...; off: their published initialisation)")
    p.add_argument("--storage", choices=["dense", "values"], default=defaults.storage,
                   help="how pruned layers hold their weights: dense (weight and mask) or values "
                        "(the kept values and their index only: memory that grows with the kept "
                        f"weights; Linear layers, methods {', '.join(values_storage_methods())})")
    p.add_argument("--pattern", default=None,
                   help="N:M structured sparsity (e.g. 2:4) instead of --sparsity: dpf keeps "
                        "updating the N:M masks with feedback, oneshot prunes once and retrains "
                        "(both dense until --oneshot-at); layers whose reduction dimension is not "
                        "a multiple of M stay dense")
    p.add_argument("--feedback-clip", type=float, default=None,
                   help="bound pruned weights' feedback gradient to this multiple of the "
                        "largest kept one per layer (1.0 is the measured setting; default off)")
    p.add_argument("--powerprop", type=float, default=None, metavar="ALPHA",
                   help="Powerpropagation: train the weights as v|v|^(ALPHA-1) (ALPHA >= 1), "
                        "with any method")
    p.add_argument("--compute", choices=["dense", "sparse", "auto"], default=defaults.compute,
                   help="the layers' products: dense (mask * weight), sparse (the kept weights "
                        "only; Linear layers, attention projections and stride-1 'same' "
                        "Conv2d), auto (sparse at densities this machine measured faster, once, "
                        "then cached; DPF_EXT_CROSSOVER fixes them: dpf_ext.nn.crossover)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 instead of DDP")
    p.add_argument("--no-sync-bn", dest="sync_bn", action="store_false",
                   help="under torchrun: each process normalises BatchNorm with its own share "
                        "of the batch (by default with the global batch's statistics, as one "
                        "process does)")
    p.add_argument("--device", default=defaults.device, help="cpu or cuda[:N]")
    p.add_argument("--out", type=Path, help="folder for metrics.json, the PNG plots, the trained "
                   "models, log.jsonl (one line per step and per epoch) and checkpoints/")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="write a checkpoint every STEPS optimizer steps (needs --out)")
    p.add_argument("--keep-checkpoints", type=int, default=2, metavar="N",
                   help="checkpoints kept per run (the newest)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from the latest good checkpoint in --out (or from PATH); "
                        "finished runs are read back, not trained again")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's results in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _percent_hint(value: float) -> str:
    """A hint for a sparsity given in percent (``90`` for ``0.9``); none for anything that is
    not a plausible percentage (under 10: 1.5 is not a sparsity of 1.5%)."""
    return f" (a fraction: did you mean {value / 100:g}?)" if 10 <= value < 100 else ""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each default said once: appended where the help text does not
    already say it, and left out where there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, []):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line and a pointer to ``--help`` (not the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every argument checked before any training: an argparse error (exit status 2) naming
    the problem."""
    for value in args.sparsities or []:
        if not 0.0 <= value < 1.0:
            parser.error(f"--sparsities: each must be in [0, 1), got {value}{_percent_hint(value)}")
    if not 0.0 <= args.sparsity < 1.0:
        hint = _percent_hint(args.sparsity)
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}{hint}")
    for name in ("epochs", "batch_size", "update_every", "seeds", "jobs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.ramp_until is not None and not 0.0 < args.ramp_until <= 1.0:
        parser.error(f"--ramp-until is a fraction of training in (0, 1], got {args.ramp_until}")
    if not 0.0 <= args.oneshot_at < 1.0:
        parser.error(f"--oneshot-at is a fraction of training in [0, 1), got {args.oneshot_at}")
    if args.lr < 0 or args.momentum < 0 or args.weight_decay < 0:
        parser.error("--lr, --momentum and --weight-decay must be non-negative")
    if args.powerprop is not None and not args.powerprop >= 1:
        parser.error(f"--powerprop must be at least 1, got {args.powerprop}")
    if args.feedback_clip is not None and not args.feedback_clip > 0:
        parser.error(f"--feedback-clip must be positive, got {args.feedback_clip}")
    args.methods = [args.method] if args.compare is None else [
        m.strip() for m in args.compare.split(",") if m.strip()]
    unknown = [m for m in args.methods if m != "dense" and m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--compare: unknown methods {unknown}; choose from "
                     f"{['dense', *METHODS]}")
    if args.updates_until is not None:
        if not 0.0 <= args.updates_until <= 1.0:
            parser.error(f"--updates-until is a fraction of training in [0, 1], got {args.updates_until}")
        recipes = {m: recipe_of(m) for m in args.methods if m != "dense"}
        fixed = sorted(m for m, r in recipes.items() if r.fixed)
        if fixed:
            parser.error(f"--updates-until: {', '.join(fixed)} fix their masks by design")
        ramp = 0.75 if args.ramp_until is None else args.ramp_until
        ramping = [f"{m}'s" for m, r in recipes.items() if r.ramps]
        if args.updates_until < ramp and ramping:
            parser.error(f"--updates-until {args.updates_until} stops {' and '.join(ramping)} "
                         f"masks before their schedule reaches the target (at {ramp}, --ramp-until)")
    args.options = {}
    for item in args.option:
        key, eq, value = item.partition("=")
        if not eq or not key:
            parser.error(f"--option {item!r}: write KEY=VALUE")
        try:
            args.options[key] = json.loads(value)
        except json.JSONDecodeError:
            args.options[key] = value
    valid = {o for m in args.methods if m != "dense" for o in method_options(m)}
    bad = sorted(set(args.options) - valid)
    if bad:
        near = [n for b in bad for n in difflib.get_close_matches(b, sorted(valid), 1)]
        takes = "takes" if len(args.methods) == 1 else "take"
        parser.error(f"--option {bad}: {', '.join(args.methods)} {takes} {sorted(valid) or 'no options'}"
                     + (f" (did you mean {', '.join(near)}?)" if near else ""))
    takers = {key: [m for m in args.methods if m != "dense" and key in method_options(m)]
              for key in ("filters", "pattern")}
    if args.scope == "filter" and set(args.methods) - {"dense", *takers["filters"]}:
        parser.error(f"--scope filter prunes with {' or '.join(takers['filters']) or 'none of'} "
                     f"{', '.join(args.methods)} only (the methods with a filters option)")
    if args.pattern is not None:
        try:
            args.nm = NMPattern.parse(args.pattern)
        except ValueError as exc:
            parser.error(f"--pattern: {exc}")
        if args.compare is None and not takers["pattern"]:
            parser.error(f"--pattern: {args.method} has no N:M form; use --method "
                         + " or ".join(m for m in METHODS if "pattern" in method_options(m)))
        if args.scope != "global":
            parser.error("--pattern chooses the masks by itself: leave --scope global")
        args.sparsity = args.nm.sparsity
    if args.data == "cifar10" and not args.data_dir:
        parser.error("--data cifar10 needs --data-dir DIR holding CIFAR-10's python batches "
                     "(dpf_ext never downloads data)")
    if args.data_dir is not None and args.data not in ("cifar10", "imagefolder"):
        parser.error(f"--data-dir is read by --data cifar10 and imagefolder only; {args.data} "
                     "is bundled or generated: leave --data-dir out")
    if args.data == "imagefolder" and not args.data_dir:
        parser.error("--data imagefolder needs --data-dir ROOT holding train/<class>/ and "
                     "val/<class>/ image folders (dpf_ext never downloads data)")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: dpf-train runs on cpu or cuda")
    for name in ("lr", "momentum", "weight_decay"):
        if not math.isfinite(getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if args.jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--jobs runs several single-process trainings; under torchrun every "
                     "process trains the same run: leave --jobs out")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        parser.error("--fsdp shards over several processes: run dpf-train under torchrun")
    if args.fsdp and (args.checkpoint_every is not None or args.resume):
        parser.error("--fsdp runs cannot be checkpointed yet; use DDP (leave out --fsdp)")
    if (args.checkpoint_every is not None or args.resume) and args.out is None:
        parser.error("--checkpoint-every and --resume need --out (where the checkpoints are)")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        parser.error(f"--resume {args.resume}: no such checkpoint file")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    if args.keep_checkpoints < 1:
        parser.error(f"--keep-checkpoints must be at least 1, got {args.keep_checkpoints}")
    if args.status and args.out is None:
        parser.error("--status reads the runs in --out: give it")
    if args.out is not None and not args.resume and not args.overwrite and not args.status and (
            (args.out / "metrics.json").exists() or (args.out / "checkpoints").exists()):
        parser.error(f"--out {args.out} holds a previous run: pass --resume to continue it or "
                     "--overwrite to replace it")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file: give a folder (made if missing)")
    if args.resume not in (None, "auto"):
        try:
            load_checkpoint(args.resume)
        except CheckpointError as exc:
            parser.error(f"--resume {args.resume}: {exc}")


def make_out(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Create ``--out`` (once every argument is checked) and check that it takes files."""
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".dpf-train-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        parser.error(f"--out {args.out}: cannot write there ({exc.strerror or exc})")


def _resume_from(args: argparse.Namespace, configs: list[TrainConfig]) -> dict[str, Path]:
    """``--resume PATH``: the run of the plan that PATH is a checkpoint of (by its recorded
    config), ``{run name: PATH}``; a :class:`CheckpointError` if it is of none of them."""
    if args.resume in (None, "auto"):
        return {}
    path = Path(args.resume)
    saved = load_checkpoint(path)["config"]
    mismatch = None
    for config in configs:
        try:
            check_same_run(saved, asdict(config), path)
        except CheckpointError as exc:
            mismatch = mismatch or exc
            continue
        return {run_name(config, bool(args.sparsities)): path}
    raise mismatch


def _terminate(signum, frame):
    """SIGTERM: stop as Ctrl-C does, so that what finished is written."""
    raise KeyboardInterrupt(f"signal {signum}")


def _run(args: argparse.Namespace, config: TrainConfig, data, log, writer: bool = True) -> RunResult:
    """One run of ``config``: read back if it finished in an earlier invocation
    (``--resume``), continued from its latest checkpoint, or trained from the start;
    checkpointed when asked."""
    checkpoints = None
    if args.out is not None:  # finished runs are recorded, so that --resume skips them
        checkpoints = Checkpoints(args.out / "checkpoints" / run_name(config, bool(args.sparsities)),
                                  args.keep_checkpoints)
    state = None
    if args.resume and checkpoints is not None:
        done = checkpoints.finished()
        if done is not None:
            check_same_run(done["config"], asdict(config), checkpoints.folder / "done.pt")
            return _with_model(done["result"], done["model"], data)
        explicit = args.resume_from.get(run_name(config, bool(args.sparsities)))
        state = ({**load_checkpoint(explicit), "path": explicit} if explicit is not None
                 else checkpoints.latest())  # the runs PATH is not of: their own latest
        if state is not None and "result" in state:  # PATH is another folder's done.pt
            check_same_run(state["config"], asdict(config), state["path"])
            if writer:
                checkpoints.finish({k: state[k] for k in ("config", "model", "result")})
            return _with_model(state["result"], state["model"], data)
        if state is None and writer:
            print(f"{run_name(config, True)}: nothing to resume in {checkpoints.folder}, "
                  "training from step 0")
    result = train(config, data, progress=not args.no_progress and writer,
                   checkpoints=checkpoints if writer else None,
                   checkpoint_every=args.checkpoint_every, resume=state, log=log)
    if checkpoints is not None and writer:
        checkpoints.finish({"config": asdict(config), "model": result.model.state_dict(),
                            "result": dataclasses.replace(result, model=None)})
    return result


def _with_model(result: RunResult, state: dict, data) -> RunResult:
    """``result`` with its trained model rebuilt from ``state`` (a finished run's
    ``state_dict``, as ``done.pt`` and the ``--jobs`` workers hand it over)."""
    model = build_model(result.config.model, data.input_shape, data.num_classes)
    model.load_state_dict(state)
    return dataclasses.replace(result, model=model)


_worker: dict = {}
"""A ``--jobs`` worker process's arguments and data set, loaded once per process."""


def _exit_with_parent(parent: int) -> None:
    """End this process (a ``--jobs`` worker) as soon as its parent ``parent`` is gone, so that
    no orphan keeps training into ``--out``."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="dpf-train-parent-watch").start()


def _start_worker(args: argparse.Namespace, parent: int) -> None:
    _exit_with_parent(parent)
    warnings.showwarning = show_warning
    if args.out is not None:  # shared with the parent's: the folder stays locked while we run
        _worker["lock"] = FolderLock(args.out).acquire(shared=True)
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    _worker.update(args=args, data=load_dataset(args.data, args.data_dir),
                   log=RunLog(args.out) if args.out is not None else None)


def _run_in_worker(config: TrainConfig) -> tuple[RunResult, bytes]:
    """:func:`_run` in a ``--jobs`` worker: the result without its model, and the model's
    ``state_dict`` as ``torch.save`` bytes. Plain bytes cross the pipe: tensors would cross as
    shared-memory handles, one per tensor, which the receiving process keeps open."""
    result = _run(_worker["args"], config, _worker["data"], _worker["log"])
    state = io.BytesIO()
    torch.save(result.model.state_dict(), state)
    return dataclasses.replace(result, model=None), state.getvalue()


def _run_all(args: argparse.Namespace, configs: list[TrainConfig], data, log, writer: bool,
             say, results: list[RunResult]) -> None:
    """Every run of the plan, appended to ``results`` in order (so that an interruption
    leaves the finished ones there): one after another, or ``args.jobs`` at a time in worker
    processes. A run that diverges is recorded as such while the others go on (a single
    run's divergence is an error)."""

    def diverged(config: TrainConfig, exc: FloatingPointError) -> RunResult:
        if len(configs) == 1:
            raise exc
        say(f"{exc}: recorded as diverged; the other runs go on")
        return RunResult(config, float("nan"), float("nan"), 0, 0.0, diverged=True)

    if args.jobs == 1:
        for config in configs:
            try:
                results.append(_run(args, config, data, log, writer))
            except FloatingPointError as exc:
                results.append(diverged(config, exc))
            if args.compare is None and args.seeds == 1 and results[-1].report:
                say(results[-1].report)
        return
    args = argparse.Namespace(**{**vars(args), "no_progress": True})  # no interleaved bars
    sweep = bool(args.sparsities)

    def finished(outcome):
        result = outcome[0]
        say(f"{run_name(result.config, sweep)}: done, {result.accuracy:.2%}", flush=True)

    # spawn: a fresh interpreter per worker, not a fork of this process's thread pools
    with multiprocessing.get_context("spawn").Pool(args.jobs, _start_worker, (args, os.getpid())) as pool:
        try:
            pending = [pool.apply_async(_run_in_worker, (c,), callback=finished) for c in configs]
            for config, outcome in zip(configs, pending):
                try:
                    result, state = outcome.get()
                    results.append(_with_model(result, torch.load(io.BytesIO(state)), data))
                except FloatingPointError as exc:
                    results.append(diverged(config, exc))
        except BaseException:
            pool.terminate()  # the runs in flight stop at once; their checkpoints stay
            raise
        pool.close()
        pool.join()


def recipe_argv(path: Path, parser: argparse.ArgumentParser) -> tuple[list[str], dict]:
    """The command-line arguments of ``parser`` a recipe file stands for, and its contents;
    a key that is none of its options is a ``ValueError`` naming the file and the key."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        recipe = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"--config {path}: {exc}") from None
    keys = sorted(a.dest for a in parser._actions if a.dest not in ("help", "config"))
    argv = []
    for key, value in recipe.items():
        if key.replace("-", "_") not in keys:
            near = difflib.get_close_matches(key.replace("-", "_"), keys, 1)
            raise ValueError(f"--config {path}: unknown key {key!r}"
                             + (f" (did you mean {near[0]!r}?)" if near else ""))
        flag = "--" + key.replace("_", "-")
        if key == "option":
            argv += [item for k, v in value.items() for item in ("--option", f"{k}={json.dumps(v)}")]
        elif key == "compare":
            argv += [flag, ",".join(value) if isinstance(value, list) else str(value)]
        elif isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv, recipe


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command line: a warning reads as a message
    (``dpf-train: warning: ...``), not as a source line."""
    print(f"dpf-train: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """``dpf-train``: parse ``argv`` (default: the process's), train, write; the exit status."""
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        return _parse_and_run(argv)


def _parse_and_run(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.recipe = None
    if args.config is not None:  # the recipe first: the flags given after it win
        try:
            recipe_args, recipe = recipe_argv(args.config, parser)
        except ValueError as exc:
            parser.error(str(exc))
        args = parser.parse_args(recipe_args + argv)
        args.recipe = recipe
    check_args(parser, args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():  # torchrun
        cuda = args.device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
        try:
            return _main(parser, args)
        finally:
            dist.barrier()  # no rank tears down its connections while another still uses them
            dist.destroy_process_group()
    return _main(parser, args)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """:func:`main` after the arguments are checked (and the process group is up)."""
    writer = ranks()[0] == 0  # only rank 0 prints the tables and writes files
    say = print if writer else (lambda *parts, **kwargs: None)
    try:
        data = load_dataset(args.data, args.data_dir)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    if args.exclude:
        try:
            sparsify(build_model(args.model, data.input_shape, data.num_classes), exclude=args.exclude)
        except ValueError as exc:
            parser.error(f"--exclude: {exc}")
    if args.storage == "values":
        runs = values_storage_methods()
        refused = [m for m in args.methods if m != "dense" and m not in runs]
        if refused:
            parser.error(f"--storage values: {refused} read or train the pruned weights, which "
                         f"values storage does not hold (it runs {', '.join(runs)})")
    if args.compute == "sparse":
        try:
            sparsify(build_model(args.model, data.input_shape, data.num_classes),
                     exclude=args.exclude, compute="sparse")
        except ValueError as exc:
            parser.error(f"--compute sparse: {str(exc).removeprefix('compute=' + repr('sparse') + ': ')}")
    if args.pattern is not None:  # layers the pattern does not fit stay dense, and we say so
        probe = sparsify(build_model(args.model, data.input_shape, data.num_classes), exclude=args.exclude)
        unfit = [name for name, layer in dpf_layers(probe) if reduction(layer) % args.nm.m]
        if unfit:
            say(f"pattern {args.nm}: {unfit} keep dense (reduction dimension not a multiple of "
                  f"{args.nm.m})")
            args.exclude = [*args.exclude, *unfit]
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    base = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
            if hasattr(args, f.name) and f.name not in ("method", "exclude", "seed", "options")}
    methods = args.methods
    if args.pattern is not None and args.compare is not None:
        methods = [m for m in methods if m == "dense" or "pattern" in method_options(m)]
    targets = args.sparsities or [args.sparsity]
    base.pop("sparsity")
    configs = [TrainConfig(method=m, exclude=tuple(args.exclude), seed=args.seed + i,
                           sparsity=0.0 if m == "dense" else target,
                           channel_floor=not args.no_channel_floor,
                           options={k: v for k, v in args.options.items()
                                    if m != "dense" and k in method_options(m)}, **base)
               for target in targets for m in methods for i in range(args.seeds)]
    configs = list({run_name(c, True): c for c in configs}.values())  # dense once per seed
    if args.status:
        say(sweep_status(args, configs, data))
        return 0
    try:
        args.resume_from = _resume_from(args, configs)
    except CheckpointError as exc:
        parser.error(f"--resume {args.resume}: {exc}")
    target = (f"pattern {args.pattern}" if args.pattern else
              f"sparsities {', '.join(f'{t:.0%}' for t in targets)}" if args.sparsities else
              f"sparsity {args.sparsity:.0%}")
    say(f"{data.name}: {data.train_size} train / {data.test_size} test, model {args.model}, "
        f"target {target}, {args.epochs} epochs, {ranks()[1]} process"
        f"{'es' if ranks()[1] > 1 else ''} x {torch.get_num_threads()} threads"
        + (f", {args.jobs} runs at a time" if args.jobs > 1 else ""))
    lock = FolderLock(args.out) if args.out is not None and writer else None
    if lock is not None:
        make_out(parser, args)
        try:
            lock.acquire()
        except FolderInUse as exc:
            parser.error(str(exc))
    try:
        return _train_and_report(args, configs, data, writer, say)
    finally:
        if lock is not None:
            lock.release()


def _train_and_report(args: argparse.Namespace, configs: list[TrainConfig], data, writer: bool,
                      say) -> int:
    """The runs of the plan, then the summary table and the output files (rank 0)."""
    if args.out is not None and args.overwrite and writer:
        shutil.rmtree(args.out / "checkpoints", ignore_errors=True)
        (args.out / "log.jsonl").unlink(missing_ok=True)
    log = RunLog(args.out) if args.out is not None and writer else None
    if log is not None:  # what --status reads of the plan
        log.write({"plan": {"jobs": args.jobs, "processes": ranks()[1],
                            "threads": torch.get_num_threads()}})
    results = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        _run_all(args, configs, data, log, writer, say, results)
    except (KeyboardInterrupt, CheckpointError, FloatingPointError, ValueError, TypeError) as exc:
        if args.out and results and writer:
            for path in write_outputs(args.out, results, args.recipe, data.name):
                print(f"wrote {path} (the runs that finished)")
        if isinstance(exc, KeyboardInterrupt):
            raise
        print(f"dpf-train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    say(summary_table(results))
    if args.out and writer:
        for path in write_outputs(args.out, results, args.recipe, data.name):
            print(f"wrote {path}")
    return 0
