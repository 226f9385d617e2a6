"""The house rules a test can check: no import circle, no file doing several jobs (a size bound as the
proxy), the answering side free of metrics and streaming, every command in the one table."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ecglm_testing import REPO

SRC = REPO / "src" / "ecglm"
#: The most lines a module of src/ may have: beyond it a file is doing several jobs (docs/api.md).
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The ecglm modules ``path`` imports when it runs (at module level or inside a function), not
    counting imports under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    found.discard(_module_name(path))
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in graph:
        if node not in index:
            visit(node)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    modules = set(files)
    # The package itself only re-exports lazily (ecglm.ECGLM); a module reading ecglm.version is not
    # an import of the package's contents.
    graph = {name: _runtime_imports(path, modules) - {"ecglm"} for name, path in files.items()}
    graph["ecglm"] = {"ecglm.model", "ecglm.version"}
    return graph


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_the_circle_check_finds_a_circle():
    graph = _graph()
    graph["ecglm.model"] = graph["ecglm.model"] | {"ecglm.inference"}  # the model calling up into answering
    assert any({"ecglm.model", "ecglm.inference"} <= set(c) for c in _cycles(graph))


def test_no_module_in_src_does_several_jobs():
    long = {
        str(p.relative_to(REPO)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these along their jobs: {long}"


def test_answering_imports_neither_metrics_nor_streaming():
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import ecglm.inference
        ecglm.inference.read_image(np.full((64, 128, 3), 255, dtype=np.uint8))
        above = {"torchmetrics", "nltk", "webdataset", "lightning", "pytorch_lightning", "mlflow"}
        heavy = sorted({m.split(".")[0] for m in sys.modules} & above)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["ask", "render", "compare", "plugins"])
def test_every_typed_command_has_flags_derived_from_its_signature(name):
    from ecglm.commands import COMMANDS
    from ecglm.commands.arguments import function_parser

    function = COMMANDS[name].function()
    parser = function_parser(function, f"ecglm {name}")
    flags = {a.dest for a in parser._actions} - {"help", "config", "print_config"}
    assert flags == set(inspect.signature(function).parameters)


def test_every_command_of_the_table_runs_its_help():
    from ecglm.commands import COMMANDS, main

    for name in COMMANDS:
        if name in ("estimate",):  # its own parser (recipe overrides); --help exits as argparse does
            continue
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0, name
