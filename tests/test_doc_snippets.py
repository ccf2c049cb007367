"""Every ```python block of README.md and docs/*.md runs as printed (issues #10 item 6, #16 item 2).

Each block runs alone: a fresh namespace, a fresh temporary working directory, nothing from the
other blocks. Blocks whose info string is ``python gpu`` need CUDA and are skipped without it.
Illustrative code that is not meant to run is fenced as ```text. A failure names the block by
``file:line`` (the line of its opening fence).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)```(.*)$")


def python_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(line of the opening fence, info string, code)`` of every ```python block of a Markdown text.

    Raises:
        ValueError: a fence that is never closed.
    """
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, info, start = m.group(1), m.group(2).strip(), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"line {start + 1}: the ``` fence is never closed")
        i += 1
        if info.split()[:1] == ["python"]:
            blocks.append((start + 1, info, "\n".join(body) + "\n"))
    return blocks


def _cases() -> list:
    cases = []
    for path in DOCS:
        for line, info, code in python_blocks(path.read_text()):
            marks = []
            if "gpu" in info.split()[1:] and not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="needs CUDA"))
            cases.append(pytest.param(path, line, code, id=f"{path.relative_to(ROOT)}:{line}", marks=marks))
    return cases


@pytest.mark.parametrize("path,line,code", _cases())
def test_snippet_runs(path: Path, line: int, code: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    compiled = compile(code, f"{path.relative_to(ROOT)}:{line}", "exec")
    exec(compiled, {"__name__": "__main__"})  # noqa: S102 - the documentation's own code


def test_every_doc_has_its_snippets_collected():
    """The README and every method card show runnable code; none of it escapes the test above."""
    for path in DOCS:
        text = path.read_text()
        assert len(python_blocks(text)) == len(re.findall(r"^\s*```python", text, re.M)), path


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a\n```python\nx = 1\n```\n", [(2, "python", "x = 1\n")]),
        ("```python gpu\ny = 2\n```\n", [(1, "python gpu", "y = 2\n")]),
        ("```bash\nls\n```\n```text\nnot run\n```\n", []),
        ("- item\n  ```python\n  z = 3\n  ```\n", [(2, "python", "z = 3\n")]),
    ],
)
def test_python_blocks_parses_fences(text, expected):
    assert python_blocks(text) == expected


def test_python_blocks_refuses_an_unclosed_fence():
    with pytest.raises(ValueError, match="line 1"):
        python_blocks("```python\nx = 1\n")


def test_a_broken_snippet_fails(tmp_path, monkeypatch):
    """The runner really executes the code: a NameError surfaces, named by its file:line."""
    with pytest.raises(NameError) as err:
        test_snippet_runs(ROOT / "README.md", 7, "Trainer()\n", tmp_path, monkeypatch)
    assert any(f.co_filename == "README.md:7" for f in _frames(err.value.__traceback__))


def _frames(tb):
    while tb is not None:
        yield tb.tb_frame.f_code
        tb = tb.tb_next
