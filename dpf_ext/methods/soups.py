"""Sparse Model Soups (Zimmer, Spiegel, Pokutta, ICLR 2024): each prune-retrain cycle
trains several copies of the pruned model and starts the next cycle from their average."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .phases import (PhaseEnd, PruneRetrain, accumulate, check_count, fresh_optimizer, restore,
                     snapshot)
from .recipe import Recipe


@dataclass(eq=False)
class SparseModelSoups(PruneRetrain):
    """Prune, train ``soup`` copies, average them; ``cycles`` times, after a dense phase.

    ``1 + cycles * soup`` training phases of equal length. After the first (dense) phase, and
    after each cycle's soup is made, the model is pruned by magnitude to the cycle's level
    (``1 - (1 - s) ** (c / cycles)``, the last exactly ``s``; one global threshold by
    default). Each cycle then trains ``soup`` copies (ingredients) from the same pruned
    model and mask, one phase each, with the optimizer's state cleared and the learning-rate
    schedule restarted; the copies differ by the batch order the loop draws for them (the
    paper: random seeds or batch orders). At the end of a cycle the model becomes the
    uniform average of its ingredients (parameters and float buffers): the mask is kept,
    since every ingredient has zeros at its pruned positions. The last cycle's soup is the
    result. The paper also evaluates a greedy soup (ingredients added while validation
    accuracy improves); that form is not implemented.
    """

    name = "sms"
    recipe = Recipe("cycles", fixed=True)

    soup: int = 2

    def __post_init__(self):
        super().__post_init__()
        check_count(self.soup, "soup")
        self.recipe = Recipe("cycles", fixed=True, phases=1 + self.cycles * self.soup,
                             phases_per_level=self.soup)
        self._start: dict[str, torch.Tensor] | None = None  # the cycle's pruned model
        self._sum: dict[str, torch.Tensor] | None = None  # its ingredients so far

    def phase_of(self, phase: int) -> dict:
        if phase == 0:
            return {"cycle": 0, "ingredient": 0}
        return {"cycle": 1 + (phase - 1) // self.soup, "ingredient": (phase - 1) % self.soup}

    @torch.no_grad()
    def phase_end(self, run, phase: int) -> PhaseEnd:
        if phase == 0:
            return PhaseEnd(self.next_level(run))
        self._sum = accumulate(self._sum, run.model)
        where = self.phase_of(phase)
        if where["ingredient"] < self.soup - 1:
            return PhaseEnd()
        soup, self._sum = self._sum, None
        restore(run.model, {k: v.div_(self.soup) for k, v in soup.items()})
        return PhaseEnd(self.next_level(run) if where["cycle"] < self.cycles else None, soup=True)

    def phase_start(self, run, phase: int) -> None:
        if self.phase_of(phase)["ingredient"] == 0:
            self._start = snapshot(run.model)  # pruned: the cycle's first ingredient starts here
        else:
            restore(run.model, self._start)
        fresh_optimizer(run.optimizer)

    def state_dict(self) -> dict:
        return {"start": self._start, "sum": self._sum}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self._start, self._sum = state.get("start"), state.get("sum")
