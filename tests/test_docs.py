"""The docs against the code: the built-in tables against the entry-point registry, the names the docs
give from ``ecglm.testing`` against its exports, and signatures the docs spell out against the code."""

from __future__ import annotations

import inspect
import re

import pytest

import ecglm.testing
from ecglm.data.datamodule import ECGQADataModule
from ecglm.plugins import BASE_CLASSES, CLI_PLACES, GROUPS, discover
from ecglm_testing import REPO

DOCS = REPO / "docs"
PLACES = {GROUPS[part]: places for part, places in CLI_PLACES.items()}


@pytest.fixture(scope="module")
def builtins() -> dict[str, dict[str, str]]:
    """Group -> entry-point name -> class path, of ecglm's own entry points."""
    registry = discover(load=False)
    return {
        group: {name: p.class_path for name, p in plugins.items() if p.is_builtin}
        for group, plugins in registry.plugins.items()
    }


def table(path, header: str) -> list[list[str]]:
    """The cells of each row of the Markdown table in ``path`` whose header row starts with ``header``."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    assert start is not None, f"{path.name} has no table starting {header!r}"
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def code_names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_plugins_md_groups_table_names_every_builtin_and_nothing_else(builtins):
    rows = table(DOCS / "plugins.md", "| group | recipe key | base class | built-in names |")
    documented = {}
    for group_cell, key_cell, base_cell, names_cell in rows:
        (group,) = code_names(group_cell)
        ours = names_cell.split("(and ")[0]  # "(and `s4d` from the example plugin)": not built in
        documented[group] = sorted(code_names(ours))
        if PLACES[group]:
            assert code_names(key_cell)[0] in PLACES[group], (group, key_cell)
        else:  # a group no recipe key names (readers: every file is offered to each)
            assert not code_names(key_cell), (group, key_cell)
        assert code_names(base_cell) == [BASE_CLASSES[group].replace(":", ".")], group
    assert documented == {group: sorted(names) for group, names in builtins.items()}


def test_components_md_table_names_every_builtin_with_its_class(builtins):
    rows = table(DOCS / "components.md", "| group | name | class | what |")
    documented: dict[str, dict[str, str]] = {group: {} for group in builtins}
    for group_cell, name_cell, class_cell, _ in rows:
        (group,), (name,), (cls,) = code_names(group_cell), code_names(name_cell), code_names(class_cell)
        assert name not in documented.setdefault(group, {}), f"{group} {name} is listed twice"
        documented[group][name] = cls
    registered = {
        group: {name: path.rsplit(".", 1)[1] for name, path in names.items()}
        for group, names in builtins.items()
    }
    assert documented == registered


def test_plugins_md_listing_is_what_ecglm_plugins_prints_for_the_builtins(builtins):
    text = (DOCS / "plugins.md").read_text()
    block = text.split("$ ecglm plugins\n", 1)[1].split("```", 1)[0]
    listed: dict[str, dict[str, str]] = {}
    for line in block.splitlines():
        if not line.startswith(" "):
            group = line.rstrip(":")
            listed[group] = {}
            continue
        name, class_path, distribution, _version = line.split()
        if distribution == "ecglm":
            listed[group][name] = class_path
    assert listed == builtins


def documented_testing_names() -> dict[str, set[str]]:
    """Names the docs give as ``ecglm.testing.NAME``, import from ``ecglm.testing``, or list in
    plugins.md's fixtures and contract checks; per name, the files that give it."""
    found: dict[str, set[str]] = {}
    for path in [*DOCS.glob("*.md"), REPO / "README.md", REPO / "CONTRIBUTING.md"]:
        text = path.read_text()
        names = set(re.findall(r"ecglm\.testing\.(\w+)", text))
        for imported in re.findall(r"from ecglm\.testing import ([\w, ]+)", text):
            names |= {n.strip() for n in imported.split(",")}
        if path.name == "plugins.md":
            testing = text.split("## Testing a plugin", 1)[1].split("\n## ", 1)[0]
            names |= set(re.findall(r"^\| `(\w+)\(", testing, re.M))  # the contract checks
            names |= set(re.findall(r"^- `(\w+)[`(]", testing, re.M))  # the fixtures
        for name in names - {"tiny", "contracts", "measure", "benchmark_fixtures"}:  # submodules
            found.setdefault(name, set()).add(path.name)
    return found


def test_every_name_the_docs_give_from_ecglm_testing_is_exported():
    documented = documented_testing_names()
    assert {"tiny_vision_backbone", "check_backbone", "tiny_backbone"} <= set(documented)
    missing = {name: sorted(files) for name, files in documented.items() if name not in ecglm.testing.__all__}
    assert not missing, f"named in the docs but not exported by ecglm.testing: {missing}"
    assert all(hasattr(ecglm.testing, name) for name in ecglm.testing.__all__)


def test_data_md_shows_attach_with_its_signature():
    text = (DOCS / "data.md").read_text()
    (documented,) = re.findall(r"`(attach\([^`]*\))`", text)
    parameters = list(inspect.signature(ECGQADataModule.attach).parameters.values())[1:]  # not self
    actual = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in parameters)
    assert documented == f"attach({actual})"
