"""The ``dpf-train`` application: the command line, its training loop, sweeps, run outputs
and checkpoints, the bundled data sets and the reference models.

It is built on the library (``dpf_ext``'s public API) and nothing in the library imports
it. It needs the ``train`` extra (``pip install 'dpf_ext[train]'``).
"""

from importlib.util import find_spec

TRAIN_EXTRA = {"numpy": "numpy", "sklearn": "scikit-learn", "matplotlib": "matplotlib",
               "tqdm": "tqdm"}
"""The import names the application needs beyond torch, with their package names."""

_missing = [package for name, package in TRAIN_EXTRA.items() if find_spec(name) is None]
if _missing:
    raise ImportError(f"dpf_ext.app (the dpf-train command) needs {', '.join(_missing)}: "
                      "pip install 'dpf_ext[train]'")
