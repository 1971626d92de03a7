"""Iterative magnitude pruning with rewinding: the lottery-ticket procedure (Frankle &
Carbin, ICLR 2019), its stabilised form that rewinds to an early step of training (Frankle,
Dziugaite, Roy, Carbin, ICML 2020) and learning-rate rewinding (Renda, Frankle, Carbin,
ICLR 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .phases import PhaseEnd, PruneRetrain, fresh_optimizer, restore, snapshot
from .recipe import Recipe


@dataclass(eq=False)
class IMP(PruneRetrain):
    """Train, prune, rewind, retrain: ``cycles + 1`` training phases of equal length.

    The first phase trains the dense model. At the end of phase ``c`` (``c = 1 ..
    cycles``) the weights that remain are pruned by magnitude to ``1 - (1 - s) **
    (c / cycles)`` of sparsity (one global threshold by default; ``budget="uniform"``: per
    layer), so that each cycle removes the same fraction of the remaining weights and the
    last reaches the target ``s`` exactly; then the kept weights rewind to their values at
    ``rewind`` of the first phase's steps (0: the initialisation; the other parameters and
    the float buffers rewind with them), the optimizer's state is cleared, and the next
    phase retrains with the gradient masked. ``lr_rewind=True`` keeps the trained weights
    instead (learning-rate rewinding: only the schedule starts again). The training loop
    restarts its learning-rate schedule at every phase and calls
    :meth:`dpf_ext.Pruner.end_phase` after each (``dpf-train`` does both).
    """

    name = "imp"
    recipe = Recipe("cycles", fixed=True)

    cycles: int = 3
    rewind: float = 0.0
    lr_rewind: bool = False

    def __post_init__(self):
        super().__post_init__()
        r = self.rewind
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ValueError(f"rewind must be a fraction of the first phase's steps in [0, 1), "
                             f"got {r!r}")
        self.rewind = float(r)
        self.lr_rewind = bool(self.lr_rewind)
        self.recipe = Recipe("cycles", fixed=True, phases=self.cycles + 1)
        self._saved: dict[str, torch.Tensor] | None = None

    def check(self, run) -> None:
        super().check(run)
        self._rewind_step = round(self.rewind * run.phase_steps)
        if self._rewind_step == 0 and not self.lr_rewind:
            self._saved = snapshot(run.model)

    def after_step(self, run) -> None:
        if run.step == self._rewind_step and run.phase == 0 and not self.lr_rewind:
            self._saved = snapshot(run.model)

    def phase_end(self, run, phase: int) -> PhaseEnd:
        return PhaseEnd(self.next_level(run) if phase < self.cycles else None)

    def phase_start(self, run, phase: int) -> None:
        if not self.lr_rewind:
            restore(run.model, self._saved)
        fresh_optimizer(run.optimizer)

    def phase_of(self, phase: int) -> dict:
        return {"cycle": phase, "ingredient": 0}

    def state_dict(self) -> dict:
        return {"saved": self._saved}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self._saved = state.get("saved")
