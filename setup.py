"""Build and install dpf_ext: ``pip install --no-build-isolation -e .`` (torch first)."""

from setuptools import setup

setup(
    name="dpf_ext",
    version="0.1.0",
    description="Dynamic Pruning with Feedback for PyTorch: one-pass sparse training",
    packages=["dpf_ext", "dpf_ext.ops"],
    python_requires=">=3.10",
    # torch is deliberately absent: pip would replace the installed build with the newest
    # CUDA one. Install torch first (requirements-dev.txt pins it).
    install_requires=["numpy", "scikit-learn", "matplotlib", "tqdm"],
    entry_points={"console_scripts": ["dpf-train=dpf_ext.cli:main"]},
)
