"""The README's and the documentation's Python examples run as written, and the README's
links resolve."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def _run(path: Path, blocks: list[str]) -> dict:
    namespace = {"__name__": "__docs__"}
    for code in blocks:
        exec(compile(code, str(path), "exec"), namespace)
    return namespace


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks(README)
    assert blocks, "README has no Python example"
    monkeypatch.chdir(tmp_path)  # the examples may write files
    namespace = _run(README, blocks)
    out = capsys.readouterr().out
    assert "total" in out and "test accuracy" in out
    assert namespace["accuracy"] > 0.9  # chance is 0.1
    assert (tmp_path / "sparse.pt").exists()


@pytest.mark.parametrize("page", [p for p in PAGES if _python_blocks(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run(page, _python_blocks(page))


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)#\s]+)", README.read_text())
    assert links
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not missing, missing


def test_readme_is_short():
    assert len(README.read_text()) <= 10_000
