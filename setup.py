"""Build and install dpf_ext: ``pip install --no-build-isolation -e .`` (torch first).

The metadata is in ``pyproject.toml``; this file adds what depends on the machine: the
compiled extension and the torch requirement it implies.

Builds the compiled extension ``dpf_ext._C`` that this machine can build: the C++ CPU
kernels wherever a C++ compiler exists, plus the CUDA kernels where torch has CUDA and
nvcc is found (``CUDA_HOME``; ``TORCH_CUDA_ARCH_LIST`` picks the architectures, as for any
torch extension). Where the build fails, the package installs as pure Python (the
reference backend) and says so, unless ``DPF_EXT_STRICT_BUILD=1`` is set, in which case
the failure is fatal (CI sets it).
"""

import os
import sys
from glob import glob

from setuptools import setup

STRICT = os.environ.get("DPF_EXT_STRICT_BUILD", "0") == "1"


def _say(msg: str) -> None:
    print(f"dpf_ext: {msg}", file=sys.stderr)


def extension_and_cmdclass():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if STRICT:
            raise
        _say("torch is not importable, installing pure Python (install torch first and use "
             "--no-build-isolation to build the kernels)")
        return [], {}, ["torch>=2.11"]  # the oldest release tested (the GPU machines')

    class OptionalBuildExt(BuildExtension):
        """Builds the extension; without DPF_EXT_STRICT_BUILD a failure is not fatal."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing or failing
                if STRICT:
                    raise
                _say(f"building the compiled kernels failed ({exc}); installing pure Python, "
                     "the reference backend will run every op")

    sources = ["csrc/register.cpp", *sorted(glob("csrc/cpu/*.cpp"))]
    options = dict(
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-fno-math-errno"], "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=["-fopenmp"],
    )
    if torch.version.cuda and CUDA_HOME:
        _say(f"building the C++ and CUDA kernels (nvcc from {CUDA_HOME})")
        sources += sorted(glob("csrc/cuda/*.cu")) + sorted(glob("csrc/cuda/*.cpp"))
        ext = CUDAExtension("dpf_ext._C", sources=sources, **options)
    else:
        ext = CppExtension("dpf_ext._C", sources=sources, **options)
    # a torch extension loads only into the torch release it was compiled against
    release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return [ext], {"build_ext": OptionalBuildExt}, [f"torch=={release}.*"]


ext_modules, cmdclass, install_requires = extension_and_cmdclass()

setup(
    # torch is the only requirement: the command line's extra is dpf_ext[train]
    install_requires=install_requires,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
