"""One install gives every command: what the package imports is a dependency, and an
optional logger that is not installed (TensorBoard, W&B) is one sentence naming its extra."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

from gptkit.errors import GptkitError

REPO = Path(__file__).resolve().parents[1]
EXTRAS = ("tensorboard", "wandb")  # loggers a user opts into; everything else is a dependency
# modules that exist to plug gptkit into an optional package (its extra), so import it at
# module level; no other gptkit module imports them
PLUGINS = {"lmeval.py": "lmeval"}
COMES_WITH = {"starlette": "fastapi"}  # imported directly, installed (and pinned) by the other
TRAIN_FLAGS = ["--preset", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
               "--block-size", "16", "--batch-size", "2", "--max-steps", "1", "--device", "cpu"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports() -> list[tuple[str, str, bool]]:
    """(file, top-level module, imported at module level) for every absolute import in src/."""
    found = []
    for path in sorted((REPO / "src" / "gptkit").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                root = module.split(".")[0]
                if root != "gptkit" and root not in sys.stdlib_module_names:
                    found.append((path.name, root, id(node) in top_level))
    return found


def test_every_imported_package_is_a_dependency_or_a_lazily_imported_extra():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    required = {_name(r) for r in project["dependencies"]}
    optional = {_name(r) for extra in EXTRAS for r in project["optional-dependencies"][extra]}
    assert set(EXTRAS) <= optional and not optional & required
    plugged = {file: {_name(r) for r in project["optional-dependencies"][extra]}
               for file, extra in PLUGINS.items()}
    distributions = importlib.metadata.packages_distributions()
    for file, module, at_module_level in _third_party_imports():
        names = {_name(d) for d in distributions.get(module, [module])}
        names |= {COMES_WITH[module]} if module in COMES_WITH else set()
        if names & required or names & plugged.get(file, set()):
            continue
        assert names & optional, f"{file} imports {module}, which pyproject.toml does not declare"
        assert not at_module_level, (f"{file} imports the optional {module} at module level; "
                                     "import it where it is used")


def test_plugins_are_imported_by_no_other_module():
    for path in (REPO / "src" / "gptkit").rglob("*.py"):
        for plugin in PLUGINS:
            module = "gptkit." + plugin.removesuffix(".py")
            if path.name != plugin:
                assert module not in path.read_text(encoding="utf-8"), f"{path.name} imports {module}"


def _hide(monkeypatch: pytest.MonkeyPatch, name: str, *loaded_by_others: str) -> None:
    """Make `import name` fail as it does where the package is not installed; modules that
    import it (`loaded_by_others`) are forgotten so that importing them runs into it."""
    for module in list(sys.modules):
        if module == name or module.startswith(f"{name}.") or any(
                module == other or module.startswith(f"{other}.") for other in loaded_by_others):
            monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("extra", EXTRAS)
def test_a_missing_logger_is_one_sentence_naming_its_extra(extra, char_data, tmp_path, monkeypatch,
                                                           capsys):
    from gptkit.cli import main

    _hide(monkeypatch, extra, "torch.utils.tensorboard")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(char_data), "--out", str(tmp_path / "run"), f"--{extra}",
              *TRAIN_FLAGS])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    # the sentence is all the run says, and it leaves no run directory behind
    assert captured.out == "" and captured.err == (
        f"gptkit train: error: --{extra} needs the {extra} package, an optional extra; install it "
        f"with `pip install 'gptkit[{extra}]'`.\n")
    assert not (tmp_path / "run").exists()


def test_a_missing_logger_in_the_python_api_is_a_gptkit_error(tmp_path, monkeypatch):
    from gptkit.runlog import TensorBoardSink

    _hide(monkeypatch, "tensorboard", "torch.utils.tensorboard")
    with pytest.raises(GptkitError, match=r"^--tensorboard needs .*gptkit\[tensorboard\]'`\.$"):
        TensorBoardSink(tmp_path)
