"""The documentation runs: every block marked `<!-- test: run -->` is executed.

A marker on the line before a ```bash or ```python fence marks that block as runnable.
Each document's marked blocks run in order in one fresh temporary directory, so a
block may use files that earlier blocks of the same document made; python blocks share
one namespace per document, as if pasted into one Python session. Bash blocks run with
`bash -euo pipefail`, python blocks in this interpreter. Unmarked blocks are not run.

What a guide asks the reader to download is put there first: Tiny Shakespeare as
`input.txt` (its first 100 kB of data/shakespeare/input.txt, so that the guides' quick runs
stay quick). $GPTKIT_REPO names the repository's root, for a block that reads its data/.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- test: run -->"
FENCE = re.compile(r"^```(\w*)\s*$")
DOCUMENTS = [REPO / "README.md", REPO / "README.zh-CN.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass
class Block:
    language: str
    line: int  # 1-based line of the opening fence
    code: str


def marked_blocks(path: Path) -> list[Block]:
    """The runnable blocks of a Markdown file; a marker before anything else is an error."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != MARKER:
            i += 1
            continue
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if not fence or fence.group(1) not in ("bash", "python"):
            raise AssertionError(f"{path.name}:{i + 1}: {MARKER} must be followed directly by "
                                 "a ```bash or ```python block")
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        blocks.append(Block(fence.group(1), i + 2, "\n".join(lines[i + 2:end]) + "\n"))
        i = end + 1
    return blocks


def test_docs_exist_and_have_runnable_blocks():
    names = {p.name for p in DOCUMENTS}
    for name in ("pretrain.md", "finetune-tasks.md", "generate-and-serve.md", "scale-out.md",
                 "hub.md", "how-gpt-works.md", "README.zh-CN.md"):
        assert name in names, f"{name} is missing"
    assert sum(len(marked_blocks(p)) for p in DOCUMENTS) >= 10
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for path in DOCUMENTS[1:]:  # the README links every guide
        assert str(path.relative_to(REPO)) in readme, f"README.md does not link {path.name}"


def test_relative_links_resolve():
    """Links such as [`Block`](../src/gptkit/model.py#L105-L118) point at a file that exists
    and at lines that still hold the name in the link text, so code moves cannot rot them."""
    for path in DOCUMENTS:
        text = path.read_text(encoding="utf-8")
        for label, link, start, end in re.findall(
                r"\[([^\]]*)\]\(([^)#\s]+)(?:#L(\d+)(?:-L(\d+))?)?\)", text):
            if "://" in link or link.startswith("mailto:"):
                continue
            file = (path.parent / link).resolve()
            assert file.exists(), f"{path.name} links to missing {link}"
            names = re.findall(r"`([^`]+)`", label)
            if start and names:
                lines = file.read_text(encoding="utf-8").splitlines()
                span = "\n".join(lines[int(start) - 1:int(end or start)])
                name = names[0].split(".")[-1].split("(")[0]
                assert name in span, f"{path.name}: {link}#L{start} no longer shows {name}"


def test_readme_commands_read_only_the_repository():
    """The READMEs' commands run as written from a fresh clone: the files they read are in it."""
    for path in DOCUMENTS[:2]:
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text, f"{path.name} reads from outside the repository"
        for name in re.findall(r"(?<![\w./-])data/[\w./-]+\.\w+", text):
            assert (REPO / name).is_file(), f"{path.name} reads {name}, which is not in data/"


@pytest.mark.parametrize("path", [p for p in DOCUMENTS if p.exists() and marked_blocks(p)],
                         ids=lambda p: p.name)
def test_document_runs(path, tmp_path, monkeypatch):
    text = (REPO / "data" / "shakespeare" / "input.txt").read_text(encoding="utf-8")[:100_000]
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    env = {**os.environ, "GPTKIT_REPO": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTKIT_REPO", str(REPO))
    namespace: dict = {"__name__": "__main__"}
    for block in marked_blocks(path):
        where = f"{path.name}:{block.line}"
        if block.language == "python":
            exec(compile(block.code, where, "exec"), namespace)
            continue
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (f"{where} failed ({result.returncode}):\n"
                                        f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
