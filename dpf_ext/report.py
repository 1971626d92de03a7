"""The per-layer sparsity report a :class:`dpf_ext.DPF` pruner hands back."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .nn.coverage import Coverage


@dataclass(frozen=True)
class LayerReport:
    """One prunable layer: its shape, weights kept and the feedback it saw (weights grown
    back: ``reactivated_*``)."""

    name: str
    shape: tuple[int, ...]
    params: int
    kept: int
    reactivated_last: int
    reactivated_total: int
    forced: int = 0
    """Weights the channel floor kept at the last update: its channels whose every weight
    fell below the threshold."""
    dropped_last: int = 0
    """Weights kept before the last update and pruned by it."""
    regrown_last: int = 0
    """Weights the last update dropped and grew again at once (they keep their value)."""
    compute: str = "dense"
    """The product the layer's next forward runs: ``"sparse"`` (the kept weights only) or
    ``"dense"`` (see :mod:`dpf_ext.nn.compute`)."""

    @property
    def sparsity(self) -> float:
        """Fraction of this layer's weights that are pruned."""
        return 1.0 - self.kept / self.params if self.params else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """The state of every prunable layer at one step.

    ``target_kept`` is the number of weights (``scope="filter"``: filters) the last mask
    update aimed to keep; ``kept`` is what the masks hold. They differ by the ties at the
    threshold (exact mode) or by the width of one histogram bin (approximate mode).
    """

    step: int
    target_sparsity: float
    target_kept: int
    frozen: bool
    layers: list[LayerReport]
    coverage: Coverage | None = None
    """The model's :class:`~dpf_ext.nn.coverage.Coverage`: what is pruned and what stays dense."""
    pattern: str | None = None
    """The N:M pattern (``"2:4"``) the masks follow, if any."""
    method: str | None = None
    """The name of the method that chose the masks."""

    @property
    def params(self) -> int:
        """Prunable weights in the model."""
        return sum(r.params for r in self.layers)

    @property
    def kept(self) -> int:
        """Weights the masks keep."""
        return sum(r.kept for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Actual fraction of prunable weights that are pruned."""
        return 1.0 - self.kept / self.params

    @property
    def reactivated_last(self) -> int:
        """Weights that came back at the last mask update."""
        return sum(r.reactivated_last for r in self.layers)

    @property
    def reactivated_total(self) -> int:
        """Weights that came back, summed over all mask updates so far."""
        return sum(r.reactivated_total for r in self.layers)

    @property
    def forced(self) -> int:
        """Weights the channel floor kept at the last update (one per channel that would
        otherwise have been emptied)."""
        return sum(r.forced for r in self.layers)

    @property
    def dropped_last(self) -> int:
        """Weights the last update pruned that were kept before."""
        return sum(r.dropped_last for r in self.layers)

    @property
    def regrown_last(self) -> int:
        """Weights the last update dropped and grew again at once."""
        return sum(r.regrown_last for r in self.layers)

    def to_dict(self) -> dict:
        """Plain data (JSON-serialisable), totals included."""
        out = asdict(self)
        out["coverage"] = self.coverage.to_dict() if self.coverage is not None else None
        for row, layer in zip(out["layers"], self.layers):
            row["sparsity"] = layer.sparsity
        out.update(params=self.params, kept=self.kept, sparsity=self.sparsity,
                   reactivated_last=self.reactivated_last,
                   reactivated_total=self.reactivated_total, forced=self.forced,
                   dropped_last=self.dropped_last, regrown_last=self.regrown_last)
        return out

    def __str__(self) -> str:
        header = ("layer", "shape", "params", "kept", "sparsity", "react. last", "react. total",
                  "forced", "dropped", "regrown", "compute")
        rows = [
            (r.name, "x".join(map(str, r.shape)), str(r.params), str(r.kept),
             f"{r.sparsity:.2%}", str(r.reactivated_last), str(r.reactivated_total), str(r.forced),
             str(r.dropped_last), str(r.regrown_last), r.compute)
            for r in self.layers
        ]
        rows.append(("total", "", str(self.params), str(self.kept), f"{self.sparsity:.2%}",
                     str(self.reactivated_last), str(self.reactivated_total), str(self.forced),
                     str(self.dropped_last), str(self.regrown_last), ""))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        line = lambda row: "  ".join(  # noqa: E731
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        )
        title = (f"step {self.step}: {self.method + ', ' if self.method else ''}target sparsity "
                 f"{self.target_sparsity:.2%}"
                 f"{f' (pattern {self.pattern})' if self.pattern else ''}"
                 f"{' (mask frozen)' if self.frozen else ''}")
        tail = [self.coverage.describe(self.method)] if self.coverage is not None else []
        return "\n".join([title, line(header), *map(line, rows), *tail])
