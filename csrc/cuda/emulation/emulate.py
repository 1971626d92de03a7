"""Rewrite a .cu file into C++ that g++ compiles against HIP-CPU and cuda_runtime.h here.

    python emulate.py kernels.cu kernels.emulated.cpp

Two constructs change, in place, so that every line keeps its number (a ``#line``
directive at the top makes errors and sanitizer reports name the real .cu file):

- ``kernel<<<grid, block[, smem[, stream]]>>>(args)`` becomes
  ``::dpf_emu::launch(kernel, dim3(grid), dim3(block), smem, stream, args)``;
- ``extern __shared__ T name[];`` becomes HIP-CPU's ``HIP_DYNAMIC_SHARED(T, name)`` followed
  by ``::dpf_emu::poison_shared(name);``, and a fixed-size ``__shared__ T name[N];`` is
  followed by ``::dpf_emu::poison_static_shared(name);``: the first thread of a block
  fills them with a poison pattern where they come into scope.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SHARED = re.compile(r"extern\s+__shared__\s+([\w:<>\s]+?)\s+(\w+)\s*\[\s*\]\s*;")
STATIC_SHARED = re.compile(r"(?<!extern )__shared__\s+[\w:<>\s]+?\s+(\w+)\s*\[[^\]]+\]\s*;")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses, brackets, braces and angle brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _closing(text: str, open_at: int) -> int:
    """Index of the parenthesis closing the one at ``open_at``."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced parentheses after offset {open_at}")


def rewrite_launches(src: str) -> str:
    out, pos = [], 0
    while (start := src.find("<<<", pos)) != -1:
        end = src.find(">>>", start)
        line_start = src.rfind("\n", 0, start) + 1
        indent = len(src[line_start:start]) - len(src[line_start:start].lstrip())
        kernel = src[line_start + indent:start].strip()
        config = _split_top_level(src[start + 3:end])
        if not 2 <= len(config) <= 4:
            raise ValueError(f"launch of {kernel} with {len(config)} configuration values")
        config += ["0", "nullptr"][len(config) - 2:]
        args_open = end + 3
        if src[args_open] != "(":
            raise ValueError(f"launch of {kernel}: expected '(' after '>>>'")
        args_close = _closing(src, args_open)
        args = src[args_open + 1:args_close]
        grid, block, smem, stream = config
        out.append(src[pos:line_start + indent])
        out.append(f"::dpf_emu::launch({kernel}, dim3({grid}), dim3({block}), {smem}, {stream}"
                   + (f", {args})" if args.strip() else ")"))
        pos = args_close + 1
    out.append(src[pos:])
    return "".join(out)


def rewrite_shared(src: str) -> str:
    src = STATIC_SHARED.sub(lambda m: f"{m.group(0)} ::dpf_emu::poison_static_shared({m.group(1)});", src)
    return SHARED.sub(lambda m: f"HIP_DYNAMIC_SHARED({m.group(1)}, {m.group(2)}) "
                                f"::dpf_emu::poison_shared({m.group(2)});", src)


def emulate(source: Path) -> str:
    text = source.read_text()
    body = rewrite_shared(rewrite_launches(text))
    assert body.count("\n") == text.count("\n"), "the rewrite must keep every line's number"
    return f'#line 1 "{source.resolve()}"\n' + body


def main() -> None:
    source, target = map(Path, sys.argv[1:3])
    out = emulate(source)
    if not target.exists() or target.read_text() != out:
        target.write_text(out)


if __name__ == "__main__":
    main()
