"""ecglm's public API, described and checked with griffe (the tool mkdocstrings and others use).

``api/ecglm-X.Y.Z.json`` is the public API of release X.Y.Z as griffe reads it from the source
(signatures, classes, attributes; docstrings, file paths and private names left out). The check
compares each committed description with the code and lists every breaking change griffe finds
(a public name removed or moved, a parameter removed, renamed, reordered or made required, a
default changed) that CHANGELOG.md does not record: a change is recorded when the changed object's
path, in backticks, appears in a CHANGELOG section of a release after X.Y.Z (or ``Unreleased``).

    python scripts/api.py write 0.2.0            # at a release: describe the code as it is
    python scripts/api.py write 0.1.0 --ref REF  # describe an earlier release from git history
    python scripts/api.py check                  # what tests/test_public_api.py runs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import griffe
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
SNAPSHOTS = REPO / "api"
CHANGELOG = REPO / "CHANGELOG.md"
#: Keys of griffe's JSON that say nothing about the API (and would differ between machines).
DROPPED_KEYS = {"docstring", "filepath", "relative_filepath", "relative_package_filepath"}


def _public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def _strip(node: object) -> object:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in DROPPED_KEYS:
                continue
            if key == "members":
                value = {name: member for name, member in value.items() if _public(name)}
            out[key] = _strip(value)
        return out
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def describe(ref: str | None = None) -> str:
    """The public API of the code in ``src/`` (or at git ``ref``) as griffe's JSON."""
    if ref is None:
        module = griffe.load("ecglm", search_paths=[str(REPO / "src")])
    else:
        module = griffe.load_git("ecglm", ref=ref, search_paths=["src"], repo=str(REPO))
    data = json.loads(json.dumps(module, cls=griffe.JSONEncoder, full=False))
    return json.dumps(_strip(data), separators=(",", ":"), sort_keys=True) + "\n"


def load_snapshot(path: Path) -> griffe.Module:
    module = json.loads(path.read_text(), object_hook=griffe.json_decoder)
    collection = griffe.ModulesCollection()
    collection["ecglm"] = module
    module._modules_collection = collection  # griffe resolves aliases through it
    return module


def snapshots() -> dict[Version, Path]:
    return {Version(p.stem.removeprefix("ecglm-")): p for p in sorted(SNAPSHOTS.glob("ecglm-*.json"))}


def changelog_sections(text: str) -> dict[str, str]:
    """CHANGELOG.md's sections by heading (``Unreleased``, ``0.2.0``, ...)."""
    sections: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        heading = re.match(r"^## \[([^\]]+)\]", line)
        if heading:
            current = heading.group(1)
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def recorded_after(version: Version, changelog: str) -> str:
    """The text of the CHANGELOG sections of releases after ``version``, and ``Unreleased``."""
    sections = changelog_sections(changelog)
    return "".join(text for name, text in sections.items() if name == "Unreleased" or Version(name) > version)


def unrecorded(old: griffe.Module, new: griffe.Module, recorded: str) -> list[str]:
    """Breaking changes from ``old`` to ``new`` whose object path is not in ``recorded`` (in backticks)."""
    missing = []
    for change in griffe.find_breaking_changes(old, new):
        path = change.obj.path
        if f"`{path}`" not in recorded:
            missing.append(f"{path}: {change.kind.value}")
    return missing


def check() -> list[str]:
    """Every breaking change, against every committed description, that CHANGELOG.md does not record."""
    current = griffe.load("ecglm", search_paths=[str(REPO / "src")])
    changelog = CHANGELOG.read_text()
    problems = []
    for version, path in snapshots().items():
        missing = unrecorded(load_snapshot(path), current, recorded_after(version, changelog))
        problems += [f"since {version}: {m}" for m in missing]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="describe the API of a release into api/ecglm-VERSION.json")
    write.add_argument("version")
    write.add_argument("--ref", help="a git ref of that release (default: the code as it is)")
    sub.add_parser("check", help="list breaking changes the CHANGELOG does not record")
    options = parser.parse_args()
    if options.command == "write":
        SNAPSHOTS.mkdir(exist_ok=True)
        out = SNAPSHOTS / f"ecglm-{Version(options.version)}.json"
        out.write_text(describe(options.ref))
        print(f"wrote {out}")
        return 0
    problems = check()
    print("\n".join(problems) or "every breaking change is recorded in CHANGELOG.md")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
