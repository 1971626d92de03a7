"""Build a wheel from this checkout, install it into a fresh virtual environment and check
the installed package there, away from the source tree (``make wheel-check``).

The check run inside that environment is ``installed.py``: it imports every subpackage,
finds the compiled kernels and trains a few steps. Exits non-zero on any failure.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*cmd, **kwargs):
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def pinned_torch() -> str:
    """The torch requirement of ``requirements-dev.txt`` (the build the wheel is built with)."""
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines():
        if re.match(r"torch\s*==", line):
            return line.strip()
    raise SystemExit("requirements-dev.txt pins no torch")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dpf-wheel-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "DPF_EXT_STRICT_BUILD": "1"}
        run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
            "-w", tmp / "dist", ROOT, env=env)
        wheel, = (tmp / "dist").glob("dpf_ext-*.whl")
        run(sys.executable, "-m", "venv", tmp / "venv")
        python = tmp / "venv" / "bin" / "python"
        # the wheel's requirements and every extra (so that every module imports), pinned
        run(python, "-m", "pip", "install", "-q", pinned_torch())
        run(python, "-m", "pip", "install", "-q", "-c", ROOT / "requirements-dev.txt",
            f"{wheel}[train,triton,transformers]")
        installed = tmp / "installed.py"
        shutil.copy(Path(__file__).with_name("installed.py"), installed)
        # from an empty folder, with nothing of the checkout on the path
        work = tmp / "work"
        work.mkdir()
        clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        run(python, "-I", installed, cwd=work, env=clean)
        run(tmp / "venv" / "bin" / "dpf-train", "--help", cwd=work, env=clean,
            stdout=subprocess.DEVNULL)
    print("wheel check passed")


if __name__ == "__main__":
    main()
