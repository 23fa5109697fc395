"""The package's import graph keeps the layers docs/architecture.md names: no upward import,
no cycle, every module placed, and model.py free of hardware-specific code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "gptkit"
DOC = REPO / "docs" / "architecture.md"
# (importer, imported) pairs that go up by design, as the document explains
ALLOWED_UPWARD = {("model", "generate")}


def layers() -> dict[str, int]:
    """Module -> layer, from the document's table (`| 3 | `model` | ... |`)."""
    placed = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            for name in re.findall(r"`([\w.]+)`", row.group(2)):
                placed[name] = int(row.group(1))
    return placed


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def package_names() -> dict[str, str]:
    """Name -> defining module of what `from gptkit import NAME` gives: the package's lazy
    names (its `_LAZY` table, `"GPT": "gptkit.model"`) and the names it imports. A name
    the package defines itself (`__version__`) adds no edge: every gptkit import runs the
    package's `__init__` first anyway."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["_LAZY"]:
            names.update(ast.literal_eval(node.value))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gptkit."):
            names.update({a.asname or a.name: node.module for a in node.names})
    return {name: module.removeprefix("gptkit.") for name, module in names.items()}


def imports(path: Path, known: set[str]) -> set[str]:
    """The gptkit modules `path` imports at run time (at module level or in functions);
    `from gptkit import GPT` counts as importing gptkit.model, where GPT is defined."""
    found = set()
    lazy = package_names()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name.removeprefix("gptkit.") for a in child.names
                             if a.name.startswith("gptkit."))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == "gptkit":  # a module, or a name of the package's
                    found.update(a.name if a.name in known else lazy.get(a.name, "")
                                 for a in child.names)
                elif child.module.startswith("gptkit."):
                    found.add(child.module.removeprefix("gptkit."))
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found & known


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: imports(path, known) - {name} for name, path in modules().items()}


def test_every_module_has_a_layer():
    missing = sorted(set(modules()) - set(layers()))
    assert not missing, f"docs/architecture.md places no layer for {missing}"
    stale = sorted(set(layers()) - set(modules()))
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"


def test_no_import_goes_up_the_layers(graph):
    level = layers()
    upward = sorted((a, b) for a, targets in graph.items() for b in targets
                    if level[b] > level[a] and (a, b) not in ALLOWED_UPWARD)
    assert not upward, f"imports that go up the layers: {upward}"


def test_no_import_cycles(graph):
    # the one allowed upward import is lazy and one-way: generate never imports the model
    assert "model" not in graph["generate"]
    edges = {a: {b for b in targets if (a, b) not in ALLOWED_UPWARD} for a, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])


def test_the_checker_sees_lazy_imports_and_skips_type_only_ones(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from gptkit.model import GPT\n"
                      "def f():\n    from gptkit.train import train\n"
                      "from gptkit import checkpoint, GPT\n")
    # GPT comes from the package's lazy names: the import is one of gptkit.model
    assert imports(source, {"model", "train", "checkpoint"}) == {"train", "checkpoint", "model"}


def test_the_model_holds_no_hardware_specific_code():
    source = (PACKAGE / "model.py").read_text(encoding="utf-8")
    for marker in ("is_compiling", '"cpu"', "'cpu'", "cuda", "mkldnn", "device.type"):
        assert marker not in source, f"model.py mentions {marker}; that belongs in gptkit.kernels"
