"""Which backend runs an op: the fastest one built for the tensors' device, unless forced.

Backends register themselves with :func:`register_backend`, most preferred first per device
type. The reference backend is always present and serves every device. Set the environment
variable ``DPF_EXT_BACKEND`` (for example ``DPF_EXT_BACKEND=reference``) to force one backend
for every device it supports.
"""

from __future__ import annotations

import os

import torch

from . import reference

_BACKENDS: dict[str, tuple[object, tuple[str, ...]]] = {}
_PREFERENCE: list[str] = []


def register_backend(name: str, backend, device_types: tuple[str, ...]) -> None:
    """Make ``backend`` (a module or object with the functions of
    :mod:`dpf_ext.ops.reference`) the preferred backend for ``device_types``; ``("*",)``
    means every device."""
    _BACKENDS[name] = (backend, device_types)
    if name in _PREFERENCE:
        _PREFERENCE.remove(name)
    _PREFERENCE.insert(0, name)


def available_backends(device: torch.device | str) -> list[str]:
    """Names of the backends that can run on ``device``, most preferred first."""
    device_type = torch.device(device).type
    return [
        name for name in _PREFERENCE
        if "*" in _BACKENDS[name][1] or device_type in _BACKENDS[name][1]
    ]


def _provides(name: str, op: str | None, device_type: str) -> bool:
    """Whether backend ``name`` runs ``op`` on ``device_type`` (every op if ``op`` is None)."""
    backend = _BACKENDS[name][0]
    if op is None:
        return True
    provides = getattr(backend, "provides", None)
    return provides(op, device_type) if provides is not None else hasattr(backend, op)


def backend_for(device: torch.device | str, op: str | None = None):
    """The backend module for ``device``: ``DPF_EXT_BACKEND`` if set, else the preferred; with
    ``op``, the preferred of those that have a kernel for it (the reference has them all)."""
    device_type = torch.device(device).type
    names = [n for n in available_backends(device) if _provides(n, op, device_type)]
    forced = os.environ.get("DPF_EXT_BACKEND")
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(
                f"DPF_EXT_BACKEND={forced!r} is not a built backend; built: {sorted(_BACKENDS)}"
            )
        if forced not in names:
            raise ValueError(f"DPF_EXT_BACKEND={forced!r} cannot run {op or 'the ops'} on "
                             f"{device}; use one of {names}")
        return _BACKENDS[forced][0]
    return _BACKENDS[names[0]][0]


register_backend("reference", reference, ("*",))
