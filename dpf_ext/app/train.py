"""The training loop behind ``dpf-train``: one method, one model, one data set."""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .data import Dataset
from ..distributed import is_sharded
from .cli_pruner import make_pruner, method_phases
from ..methods import METHODS, method_options, recipe_of
from .models import build_model
from ..nn import values_storage
from ..nn.convert import sparsify
from ..nn.state_dict_forms import UnfinalizedWarning
from .sync_batch_norm import synchronize_batch_norm
from ..report import SparsityReport
from ..schedules import Cubic
from .resume import Checkpoints, check_same_run


class RunLog:
    """The log of ``dpf-train`` runs in ``folder``: one JSON object per line in
    ``log.jsonl`` and, when the ``tensorboard`` package is installed, the same numbers as
    TensorBoard scalars in ``tensorboard/`` (tagged ``<run>/<name>``, at the record's step)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / "log.jsonl"
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # an optional dependency
            self.tensorboard = None
        else:
            self.tensorboard = SummaryWriter(str(Path(folder) / "tensorboard"))

    def write(self, record: dict) -> None:
        """Append ``record``: a step's or an epoch's (with ``run`` and ``step`` keys), or the
        plan's (``{"plan": {"jobs", "processes", "threads"}}``, written first)."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("run", "step", "epoch") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{record['run']}/{key}", value, record["step"])
            self.tensorboard.flush()


@dataclass
class TrainConfig:
    """Everything that defines a run. The optimizer is SGD with Nesterov momentum; the
    learning rate drops 10x at 50% and 75% of training (the DPF paper's recipe, scaled)."""

    method: str = "dpf"
    model: str = "mlp"
    sparsity: float = 0.9
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    update_every: int | None = None
    """Steps between mask updates; ``None``: the method's (DPF: 16, RigL and SET: 100)."""
    scope: str = "global"
    threshold: str = "exact"
    oneshot_at: float = 0.1
    """One-shot pruning point, as a fraction of training."""
    exclude: tuple[str, ...] = ()
    channel_floor: bool = True
    """DPF's channel floor (the baselines run without it)."""
    sparse_init: bool = False
    """Rescale each unit's kept weights to its kept fan-in once the first masks are set (the
    :class:`~dpf_ext.Pruner`'s ``sparse_init``)."""
    storage: str = "dense"
    """How the pruned layers hold their weights: ``"dense"`` or ``"values"`` (the kept values
    only; the :class:`~dpf_ext.Pruner`'s ``storage``)."""
    feedback_clip: float | None = None
    """DPF's feedback clip (see :class:`dpf_ext.DPF`)."""
    pattern: str | None = None
    """An N:M pattern (``"2:4"``) instead of ``sparsity`` (see :func:`dpf_ext.app.cli_pruner.make_pruner`)."""
    budget: str | None = None
    """The layer-wise budget (``"global"``, ``"uniform"``, ``"erk"``, ``"er"``); ``None``: the
    method's."""
    options: dict = field(default_factory=dict)
    """The method's options (see :func:`dpf_ext.methods.method_options`)."""
    powerprop: float | None = None
    """Powerpropagation's exponent α (see :mod:`dpf_ext.nn.powerprop`); ``None``: off."""
    ramp_until: float | None = None
    """DPF's and gradual pruning's cubic schedule reaches the target at this fraction of
    training (``None``: 0.75); the other methods keep their schedules."""
    updates_until: float | None = None
    """The masks change up to this fraction of training and then stay fixed (the
    controller's ``end_step``); ``None``: the method's (DPF: to the end, RigL: 0.75)."""
    compute: str = "dense"
    """The product the DPF layers run: ``"dense"``, ``"sparse"`` or ``"auto"`` (see
    :mod:`dpf_ext.nn.compute`)."""
    fsdp: bool = False
    """Under ``torchrun``: shard the model with FSDP2 instead of DDP."""
    sync_bn: bool = True
    """Under ``torchrun``: BatchNorm layers normalise with the statistics of the global batch
    (:mod:`dpf_ext.app.sync_batch_norm`), as one process does; ``False``: each process with its
    own share."""
    seed: int = 0
    device: str = "cpu"


@dataclass
class RunResult:
    """What a run produced: final accuracy and sparsity, feedback, time and history."""

    config: TrainConfig
    accuracy: float
    sparsity: float
    reactivations: int
    wall_time: float
    history: list[dict] = field(default_factory=list)
    report: SparsityReport | None = None
    """The pruner's report before the masks were folded in (``None`` for dense)."""
    diverged: bool = False
    """Whether the run stopped on a non-finite loss (its accuracy is then NaN)."""
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    """The trained model: masks folded in, plain torch layers (its ``state_dict`` loads into
    the architecture that :func:`dpf_ext.app.models.build_model` builds)."""
    phases: list[dict] = field(default_factory=list)
    """For a method that trains in phases (IMP, sparse model soups), one record per phase
    (:func:`end_phase`)."""

    def to_dict(self) -> dict:
        """Plain data (JSON-serialisable), without the model."""
        model, self.model = self.model, None
        try:
            out = asdict(self)
        finally:
            self.model = model
        out.pop("model")
        out["report"] = self.report.to_dict() if self.report else None
        return out


def run_name(config: TrainConfig, with_sparsity: bool = False) -> str:
    """``<method>-seed<k>``, or ``<method>-s<sparsity>-seed<k>`` (runs of a sweep over
    sparsities)."""
    target = f"-s{config.sparsity:g}" if with_sparsity else ""
    return f"{config.method}{target}-seed{config.seed}"


def dense_state(model: nn.Module) -> dict:
    """``model.state_dict()`` with the dense weights and the masks, as a checkpoint for
    resuming must hold them (without the warning meant for exports)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnfinalizedWarning)
        return model.state_dict()


def ranks() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(model: nn.Module, device: torch.device) -> None:
    """FSDP2: ``fully_shard`` every module with parameters of its own, then the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in list(model.modules())[1:]:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def gathered(model: nn.Module, config: TrainConfig, data: Dataset) -> nn.Module:
    """The plain model with the sharded ``model``'s full weights (every rank calls it)."""
    full = {k: v.full_tensor() if is_sharded(v) else v for k, v in model.state_dict().items()}
    plain = build_model(config.model, data.input_shape, data.num_classes)
    plain.load_state_dict({k: v.cpu() for k, v in full.items()})
    return plain


def mask_checksums(pruner) -> list[int]:
    """One number per layer that differs between two different masks (almost surely)."""
    out = []
    for _, layer in pruner.layers:
        kept = (values_storage.positions(layer) if values_storage.is_values(layer)
                else layer.mask.reshape(-1).nonzero().view(-1))
        out.append(int(((kept + 1) * 2654435761 % 4294967291).sum()))
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``data``'s test examples."""
    was_training = model.training
    model.eval()
    correct = 0
    device = next(model.parameters()).device
    for x, y in data.test_batches(batch_size):
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    model.train(was_training)
    return correct / data.test_size


def end_phase(pruner, accuracy: float, sparsity: float, model: nn.Module, data: Dataset) -> dict:
    """Close the pruner's training phase (:meth:`dpf_ext.Pruner.end_phase`) and return its
    record: ``phase``, the method's ``cycle`` and ``ingredient``, the ``sparsity`` and test
    ``accuracy`` it trained at and, where the phase made a soup, the soup's
    ``soup_accuracy`` (before it is pruned further)."""
    record = {"accuracy": accuracy, "sparsity": sparsity}
    ended = pruner.end_phase(measure=lambda: evaluate(model, data))
    record.update({k: v for k, v in ended.items() if k not in ("sparsity", "soup", "measured")})
    if ended["soup"]:
        record["soup_accuracy"] = ended["measured"]
    return record


def train(config: TrainConfig, data: Dataset, progress: bool = True,
          checkpoints: Checkpoints | None = None, checkpoint_every: int | None = None,
          resume: dict | None = None, log: RunLog | None = None) -> RunResult:
    """Train ``config.model`` on ``data`` with ``config.method``; return the result.

    The pruner's masks are folded into the weights at the end, so the evaluated model is
    the sparse one. With ``checkpoints``, every ``checkpoint_every`` steps the whole state
    (model and masks, optimizer, learning-rate schedule, pruner, both random generators,
    the position in the epoch and the metrics so far) is saved; ``resume`` (such a state)
    continues from it exactly: the same model, bit for bit on the CPU with the same thread
    count, and the same metrics as an uninterrupted run. ``log`` gets one line per step and
    per epoch. A non-finite loss is a ``FloatingPointError``.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    device = torch.device(config.device)
    model = build_model(config.model, data.input_shape, data.num_classes).to(device)
    steps_per_epoch = -(-data.train_size // config.batch_size)
    phases = method_phases(config.method, config.options)  # --epochs is per phase
    phase_steps = config.epochs * steps_per_epoch
    total_steps = phases * phase_steps
    if config.method != "dense":
        sparsify(model, exclude=config.exclude, powerprop=config.powerprop, compute=config.compute)
    rank, world = ranks()
    if world > 1 and config.sync_bn:
        model = synchronize_batch_norm(model)
    if config.fsdp:
        shard(model, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.momentum > 0, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    first = torch.randperm(data.train_size, generator=torch.Generator().manual_seed(config.seed))
    first = first[:config.batch_size]  # the batch that SNIP scores the weights on

    def first_loss(m: nn.Module) -> torch.Tensor:
        x, y = data.train_batch(first)
        return loss_fn(m(x.to(device)), y.to(device))

    controller = {k: v for k, v in (("update_every", config.update_every),
                                    ("budget", config.budget)) if v is not None}
    recipe = recipe_of(config.method) if config.method in METHODS else None
    if config.update_every is None and recipe is not None and recipe.update_every == "epoch":
        controller["update_every"] = steps_per_epoch
    if config.ramp_until is not None and recipe is not None and recipe.ramps and not config.pattern:
        controller["schedule"] = Cubic(config.sparsity, 0, max(1, round(config.ramp_until * total_steps)))
    if config.updates_until is not None:
        controller["end_step"] = round(config.updates_until * total_steps)
    takes = method_options(config.method) if config.method in METHODS else []
    for key in ("threshold", "feedback_clip"):  # settings of the methods that take them
        if key in takes:
            controller[key] = getattr(config, key)
    pruner = make_pruner(
        config.method, model, config.sparsity, total_steps,
        prune_at=round(config.oneshot_at * total_steps), scope=config.scope,
        channel_floor=config.channel_floor, pattern=config.pattern, optimizer=optimizer,
        seed=config.seed, sparse_init=config.sparse_init, storage=config.storage,
        batch_loss=first_loss,
        options=config.options, **controller,
    )
    wrapped = model  # what the training steps call: DDP's wrapper over several processes
    if world > 1 and not config.fsdp:
        wrapped = nn.parallel.DistributedDataParallel(model)
    def new_lr_schedule():  # for each phase: the learning rate from the start of its schedule
        for group in optimizer.param_groups:
            group["lr"] = config.lr
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, [phase_steps // 2, phase_steps * 3 // 4], gamma=0.1)
    lr_schedule = new_lr_schedule()

    history, epoch0, batch0, order, loss_sum, elapsed = [], 0, 0, None, None, 0.0
    if resume is not None:  # the checkpoint's state, then on from its position
        check_same_run(resume["config"], asdict(config), resume.get("path", "the checkpoint"),
                       defaults=asdict(TrainConfig()))
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        lr_schedule.load_state_dict(resume["lr_schedule"])
        if pruner is not None:
            pruner.load_state_dict(resume["pruner"])
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        history, epoch0, batch0 = resume["history"], resume["epoch"], resume["batch"]
        order, elapsed = resume["order"], resume["elapsed"]
        loss_sum = resume["loss_sum"].to(device)
        if rank == 0:
            print(f"{run_name(config, with_sparsity=True)}: resumed from "
                  f"{resume.get('path', 'a checkpoint')} at step "
                  f"{epoch0 * steps_per_epoch + batch0} of {total_steps}")
    batches = range(0, data.train_size, config.batch_size)
    name = run_name(config, with_sparsity=True)
    start = time.perf_counter()
    # the bar shows on a terminal only (tqdm's disable=None), never with progress=False
    bar = tqdm(range(epoch0, phases * config.epochs), desc=f"{config.method:>7}",
               disable=None if progress else True, leave=False)
    for epoch in bar:
        model.train()
        if batch0 == 0:
            order = torch.randperm(data.train_size, generator=gen)
            loss_sum = torch.zeros((), device=device)
        for b in range(batch0, len(batches)):
            tick = time.perf_counter()
            idx = order[batches[b]:batches[b] + config.batch_size]
            x, y = data.train_batch(idx, gen)
            mine = torch.arange(len(idx)).tensor_split(world)[rank]  # this rank's part
            loss = loss_fn(wrapped(x[mine].to(device)), y[mine].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_schedule.step()
            if pruner is not None:
                pruner.step()
            loss_sum += loss.detach() * len(mine)
            step = epoch * len(batches) + b + 1
            due = checkpoints is not None and checkpoint_every and step % checkpoint_every == 0
            if log is not None or due or device.type == "cpu":  # one read-back of the loss
                value = float(loss.detach())
                if log is not None:
                    log.write({"run": name, "step": step, "loss": value,
                               "lr": optimizer.param_groups[0]["lr"],
                               "step_time": time.perf_counter() - tick})
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"{name}: the loss is {value} at step {step}"
                        + ("; the last good checkpoint is kept" if checkpoints is not None else ""))
            if due:
                checkpoints.save({  # resumes at batch b + 1 (the last: the epoch's evaluation)
                    "config": asdict(config), "epoch": epoch, "batch": b + 1,
                    "order": order, "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "model": dense_state(model), "optimizer": optimizer.state_dict(),
                    "lr_schedule": lr_schedule.state_dict(),
                    "pruner": pruner.state_dict() if pruner is not None else None,
                    "loss_sum": loss_sum.detach().cpu(), "elapsed": elapsed + time.perf_counter() - start,
                    "history": list(history),
                }, step)
        batch0 = 0
        epoch_loss = loss_sum.clone()
        if world > 1:
            dist.all_reduce(epoch_loss)
        accuracy = evaluate(model, data)
        sparsity = pruner.sparsity() if pruner is not None else 0.0
        history.append({
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps_per_epoch,
            "train_loss": float(epoch_loss) / len(order),
            "test_accuracy": accuracy,
            "sparsity": sparsity,
            "target_sparsity": pruner.target_sparsity if pruner is not None else 0.0,
            "reactivations": int(pruner.reactivated_total.sum()) if pruner is not None else 0,
        })
        if phases > 1 and (epoch + 1) % config.epochs == 0:  # a phase ends: its record
            history[-1]["phase_end"] = end_phase(pruner, accuracy, sparsity, model, data)
            if epoch + 1 < phases * config.epochs:
                lr_schedule = new_lr_schedule()
        if log is not None:
            log.write({"run": name, **history[-1]})
        if bar.disable and rank == 0:  # no bar (--no-progress, or not a terminal): a line
            print(f"{name} epoch {epoch + 1}/{phases * config.epochs}: loss "
                  f"{history[-1]['train_loss']:.4f}, test accuracy {accuracy:.2%}, sparsity "
                  f"{sparsity:.2%}", flush=True)
        bar.set_postfix(acc=f"{accuracy:.3f}", sparsity=f"{sparsity:.2f}")
    wall_time = elapsed + time.perf_counter() - start

    report = None
    if pruner is not None:
        if world > 1:  # DDP and FSDP2 keep one mask: say so loudly if they ever do not
            sums = [None] * world
            dist.all_gather_object(sums, mask_checksums(pruner))
            if any(other != sums[0] for other in sums):
                raise RuntimeError(f"{name}: the masks differ across ranks {sums}")
        report = pruner.report()
        pruner.finalize(unwrap=True)
    if config.fsdp:
        model = gathered(model, config, data)
    return RunResult(
        config=config,
        accuracy=evaluate(model, data),
        sparsity=report.sparsity if report else 0.0,
        reactivations=report.reactivated_total if report else 0,
        wall_time=wall_time,
        history=history,
        report=report,
        model=model,
        phases=[h["phase_end"] for h in history if "phase_end" in h],
    )
