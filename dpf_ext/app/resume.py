"""Checkpoints of a ``dpf-train`` run: written atomically (a temporary file renamed into
place, so a kill during the write leaves the last good one), the last few kept, the latest
good one found again for an exact resume."""

from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "dpf-train/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: unreadable, or of another run."""


class Checkpoints:
    """The checkpoints of one run in ``folder`` (``step-<N>.pt``), the last ``keep`` kept,
    and ``done.pt`` once the run has finished.

    The files are ``torch.save`` pickles of this library's own state (model, optimizer,
    pruner, random generators, metrics): load only checkpoints you wrote."""

    def __init__(self, folder: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.folder = Path(folder)
        self.keep = keep

    def paths(self) -> list[Path]:
        """The step checkpoints, oldest first."""
        return sorted(self.folder.glob("step-*.pt"))

    def _write(self, state: dict, path: Path) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            torch.save({"format": FORMAT, **state}, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def save(self, state: dict, step: int) -> Path:
        """Write ``state`` as the checkpoint of ``step`` and drop the oldest beyond
        ``keep``; returns its path. A failed write leaves the earlier ones as they were."""
        path = self._write(state, self.folder / f"step-{step:09d}.pt")
        for old in self.paths()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def finish(self, state: dict) -> Path:
        """Record the finished run (``done.pt``) and drop the step checkpoints."""
        path = self._write(state, self.folder / "done.pt")
        for old in self.paths():
            old.unlink(missing_ok=True)
        return path

    def finished(self) -> dict | None:
        """The finished run's state, if it finished."""
        done = self.folder / "done.pt"
        return load(done) if done.exists() else None

    def latest(self) -> dict | None:
        """The newest step checkpoint (``None`` if there is none). An unreadable one is a
        :class:`CheckpointError` naming the previous one to resume from instead."""
        paths = self.paths()
        if not paths:
            return None
        try:
            return {**load(paths[-1]), "path": paths[-1]}
        except CheckpointError as exc:
            previous = f"; the previous one is {paths[-2]}: resume from it with --resume {paths[-2]}" \
                if len(paths) > 1 else "; there is no earlier one"
            raise CheckpointError(f"{exc}{previous}") from None


def load(path: str | Path) -> dict:
    """A checkpoint written by :class:`Checkpoints`; anything else is a
    :class:`CheckpointError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, corrupt or not a torch file
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dpf-train checkpoint")
    return state


def check_same_run(saved: dict, config: dict, path, defaults: dict | None = None) -> None:
    """Raise :class:`CheckpointError` naming the settings in which the checkpoint's run
    (``saved``) differs from ``config``; a setting the checkpoint predates counts as its
    value in ``defaults``. The device, the thread count and the compute mode may differ:
    the run then continues to float tolerance, not bit for bit."""
    free = {"device", "compute"}
    defaults = defaults or {}
    diff = {k: (saved.get(k, defaults.get(k)), v) for k, v in config.items()
            if k not in free and saved.get(k, defaults.get(k)) != v}
    if diff:
        details = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path} is of another run: {details}")


class FolderInUse(RuntimeError):
    """The run folder is being written by another live process."""


class FolderLock:
    """An advisory lock on a run folder (``.dpf-train.lock``, ``flock``) while a process
    trains into it: a second ``dpf-train`` into the same folder (a ``--resume`` started
    while the first, or one of its ``--jobs`` workers, still runs) is refused with
    :class:`FolderInUse` instead of racing it. The lock goes with the process that holds it,
    however that process ends."""

    NAME = ".dpf-train.lock"

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / self.NAME
        self._file = None
        self._owner = False

    def acquire(self, shared: bool = False) -> "FolderLock":
        """Take the lock: exclusive (the first process: no one else may be writing), or
        ``shared`` (a worker of the process that holds it). Raises :class:`FolderInUse`."""
        import fcntl

        while True:
            self._file = open(self.path, "a+")
            self._owner = not shared
            if not shared:
                try:
                    fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._file.close()
                    self._file = None
                    raise FolderInUse(f"{self.path.parent} is being written by another live "
                                      "process (dpf-train or one of its --jobs workers); wait "
                                      "for it to end or stop it, then resume") from None
                if not self._is_current():  # its holder removed it as we opened it: again
                    self._file.close()
                    continue
            fcntl.flock(self._file, fcntl.LOCK_SH)  # the workers may share it
            return self

    def _is_current(self) -> bool:
        """Whether the file this lock holds is still the one at :attr:`path`."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self._file.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Let go of the lock; the process that took it exclusively removes the file."""
        if self._file is not None:
            if self._owner and self._is_current():
                self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None
