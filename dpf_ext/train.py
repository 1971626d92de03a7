"""The training loop behind ``dpf-train``: one method, one model, one data set."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .data import Dataset, augment_batch
from .methods import METHODS, make_pruner, method_options
from .models import build_model
from .nn import sparsify
from .report import SparsityReport


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
    feedback_clip: float | None = None
    """DPF's feedback clip (see :class:`dpf_ext.DPF`)."""
    pattern: str | None = None
    """An N:M pattern (``"2:4"``) instead of ``sparsity`` (see :func:`dpf_ext.methods.make_pruner`)."""
    budget: str | None = None
    """The layer-wise budget (``"global"``, ``"uniform"``, ``"erk"``, ``"er"``); ``None``: the
    method's."""
    options: dict = field(default_factory=dict)
    """The method's options (see :func:`dpf_ext.methods.method_options`)."""
    powerprop: float | None = None
    """Powerpropagation's exponent α (see :mod:`dpf_ext.powerprop`); ``None``: off."""
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
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    """The trained model: masks folded in, plain torch layers (its ``state_dict`` loads into
    the architecture that :func:`dpf_ext.models.build_model` builds)."""

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


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    correct = 0
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size].to(device))
        correct += int((out.argmax(1).cpu() == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / len(x)


def train(config: TrainConfig, data: Dataset, progress: bool = True) -> RunResult:
    """Train ``config.model`` on ``data`` with ``config.method``; return the result.

    The pruner's masks are folded into the weights at the end, so the evaluated model is
    the sparse one.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    device = torch.device(config.device)
    model = build_model(config.model, data.input_shape, data.num_classes).to(device)
    steps_per_epoch = -(-len(data.x_train) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.method != "dense":
        sparsify(model, exclude=config.exclude, powerprop=config.powerprop)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.momentum > 0, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    first = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(config.seed))
    first = first[:config.batch_size]  # the batch that SNIP scores the weights on
    controller = {k: v for k, v in (("update_every", config.update_every),
                                    ("budget", config.budget)) if v is not None}
    if (config.update_every is None and config.method in METHODS
            and getattr(METHODS[config.method], "updates_per_epoch", False)):
        controller["update_every"] = steps_per_epoch
    takes = method_options(config.method) if config.method in METHODS else []
    for key in ("threshold", "feedback_clip"):  # the magnitude methods' settings
        if key in takes:
            controller[key] = getattr(config, key)
    pruner = make_pruner(
        config.method, model, config.sparsity, total_steps,
        prune_at=round(config.oneshot_at * total_steps), scope=config.scope,
        channel_floor=config.channel_floor, pattern=config.pattern, optimizer=optimizer,
        seed=config.seed,
        batch_loss=lambda m: loss_fn(m(data.x_train[first].to(device)),
                                     data.y_train[first].to(device)),
        options=config.options, **controller,
    )
    milestones = [total_steps // 2, total_steps * 3 // 4]
    lr_schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)

    history = []
    start = time.perf_counter()
    # the bar shows on a terminal only (tqdm's disable=None), never with progress=False
    bar = tqdm(range(config.epochs), desc=f"{config.method:>7}",
               disable=None if progress else True, leave=False)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(data.x_train), generator=gen)
        loss_sum = torch.zeros((), device=device)
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            x = data.x_train[idx]
            if data.augment:
                x = augment_batch(x, gen)
            loss = loss_fn(model(x.to(device)), data.y_train[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_schedule.step()
            if pruner is not None:
                pruner.step()
            loss_sum += loss.detach() * len(idx)
        accuracy = evaluate(model, data.x_test, data.y_test)
        sparsity = pruner.sparsity() if pruner is not None else 0.0
        history.append({
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps_per_epoch,
            "train_loss": float(loss_sum) / len(order),
            "test_accuracy": accuracy,
            "sparsity": sparsity,
            "reactivations": int(pruner.reactivated_total.sum()) if pruner is not None else 0,
        })
        bar.set_postfix(acc=f"{accuracy:.3f}", sparsity=f"{sparsity:.2f}")
    wall_time = time.perf_counter() - start

    report = None
    if pruner is not None:
        report = pruner.report()
        pruner.finalize(unwrap=True)
    return RunResult(
        config=config,
        accuracy=evaluate(model, data.x_test, data.y_test),
        sparsity=report.sparsity if report else 0.0,
        reactivations=report.reactivated_total if report else 0,
        wall_time=wall_time,
        history=history,
        report=report,
        model=model,
    )
