"""The public API check: every breaking change against each committed description of a release
(``api/ecglm-X.Y.Z.json``, griffe's) is recorded in CHANGELOG.md, and the check can fail."""

from __future__ import annotations

import importlib.util
import json

import griffe

from ecglm_testing import REPO

spec = importlib.util.spec_from_file_location("api_check", REPO / "scripts" / "api.py")
api = importlib.util.module_from_spec(spec)
spec.loader.exec_module(api)


def test_every_breaking_change_since_each_release_is_in_the_changelog():
    assert api.snapshots(), "no api/ecglm-*.json: describe the last release (python scripts/api.py write)"
    assert api.check() == []


def _current_snapshot(tmp_path):
    path = tmp_path / "ecglm-9.9.9.json"
    path.write_text(api.describe())
    return api.load_snapshot(path)


def test_a_deliberate_removal_fails_the_check_until_the_changelog_records_it(tmp_path):
    released = _current_snapshot(tmp_path)
    changed = griffe.load("ecglm", search_paths=[str(REPO / "src")])
    changed["connectors"].del_member("LinearConnector")
    del changed["model"]["ECGLM"]["generate"].parameters["condition"]
    missing = api.unrecorded(released, changed, recorded="")
    assert "ecglm.connectors.LinearConnector: Public object was removed" in missing
    assert "ecglm.model.ECGLM.generate: Parameter was removed" in missing
    recorded = "- `ecglm.connectors.LinearConnector` removed; `ecglm.model.ECGLM.generate` lost `condition`"
    assert api.unrecorded(released, changed, recorded) == []


def test_the_changelog_sections_after_a_release_are_what_counts():
    changelog = "## [Unreleased]\n- `a.b`\n## [0.3.0] - x\n- `c.d`\n## [0.2.0] - y\n- `e.f`\n"
    after = api.recorded_after(api.Version("0.2.0"), changelog)
    assert "`a.b`" in after and "`c.d`" in after and "`e.f`" not in after


def test_a_description_holds_no_machine_paths_or_private_names():
    data = json.loads((sorted((REPO / "api").glob("ecglm-*.json")))[0].read_text())
    text = json.dumps(data)
    assert "/tmp/" not in text and "/work/" not in text and '"filepath"' not in text

    def member_names(node):
        if isinstance(node, dict):
            for name, member in (node.get("members") or {}).items():
                yield name
                yield from member_names(member)

    names = set(member_names(data))
    assert "Wav2Vec2ECGEncoder" in names
    assert not {n for n in names if n.startswith("_") and not n.endswith("__")}  # e.g. _SamePad
