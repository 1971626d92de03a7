"""The compiled backends: the ``dpf`` ops of the ``dpf_ext._C`` extension.

The schemas and the CPU (C++) and CUDA kernels are registered in C++ with
``TORCH_LIBRARY``; this module adds the fake kernels and the gradient, and registers the
backends whose kernels were built: ``cpp`` for CPU tensors, ``cuda`` for CUDA tensors.
"""

from __future__ import annotations

import torch

from .dispatch import register_backend
from .op_backend import OpBackend, register_abstract

try:
    from .. import _C  # noqa: F401  (loading the library registers the ops)
except ImportError:
    _C = None

if _C is not None:
    register_abstract("dpf")
    backend = OpBackend("dpf")
    for name, device, key in (("cpp", "cpu", "CPU"), ("cuda", "cuda", "CUDA")):
        if torch._C._dispatch_has_kernel_for_dispatch_key("dpf::update_masks", key):
            register_backend(name, backend, (device,))
