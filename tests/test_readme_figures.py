"""README figures cannot drift: every figure of benchmarks/readme-figures.yaml is printed by README.md,
and ``benchmarks/reproduce.py`` passes a re-run inside the stated tolerance and fails one outside."""

from __future__ import annotations

import importlib.util
import json
import sys

import yaml

from ecglm_testing import REPO

spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = reproduce  # its dataclass looks its module up
spec.loader.exec_module(reproduce)

FIGURES = yaml.safe_load((REPO / "benchmarks" / "readme-figures.yaml").read_text())


def test_every_listed_figure_is_printed_by_the_readme_and_found_in_a_report():
    readme = (REPO / "README.md").read_text()
    checked = [f for f in FIGURES["figures"] if f.get("kind") != "info" and "readme" in f]
    assert {f["run"] for f in checked} == set(FIGURES["runs"])
    missing = [f["readme"] for f in checked if f["readme"] not in readme]
    assert not missing, (
        f"README.md no longer prints {missing}: update readme-figures.yaml from make reproduce"
    )
    for f in checked:  # each run's recipe exists, each figure names a key path
        assert (REPO / FIGURES["runs"][f["run"]]["recipe"]).exists()
        assert isinstance(f["value"], list) and f["value"]


def _report(ecg: float, std: float, gap: tuple[float, float, float]) -> dict:
    acc = {"mean": ecg, "std": std, "n_seeds": 3}
    interval = {"estimate": gap[0], "low": gap[1], "high": gap[2], "p_value": 0.001}
    return {
        "summary": {"conditions": {"ecg": {"datasets": {"d": {"acc": acc}}}, "zeroed_ecg": {
            "datasets": {"d": {"acc": {"mean": 0.3, "std": 0.01, "n_seeds": 3}}}}}},
        "meta": {"intervals": {"gaps": {"ecg_minus_shuffled_ecg": {"q": interval}}}},
    }  # fmt: skip


def _score(tmp_path, report: dict) -> int:
    """``reproduce.py --reuse`` over one fabricated run with the given report."""
    run = tmp_path / "runs" / "demo" / "seed-0"
    (run / "evaluation").mkdir(parents=True)
    (run / "evaluation" / "report.json").write_text(json.dumps(report))
    figures = {
        "runs": {"demo": {"recipe": "recipes/quickstart.yaml", "train_seeds": [0]}},
        "figures": [
            {"run": "demo", "name": "all", "readme": "60.0 ± 2.0", "value": ["summary", "conditions", "ecg",
             "datasets", "d", "acc"]},
            {"run": "demo", "name": "gap", "readme": "20.0 [10.0, 30.0]", "kind": "interval",
             "value": ["meta", "intervals", "gaps", "ecg_minus_shuffled_ecg", "q"]},
            {"run": "demo", "name": "gap above 0", "kind": "above_zero",
             "value": ["meta", "intervals", "gaps", "ecg_minus_shuffled_ecg", "q"]},
            {"run": "demo", "name": "beats blank", "kind": "greater",
             "value": ["summary", "conditions", "ecg", "datasets", "d", "acc"],
             "than": ["summary", "conditions", "zeroed_ecg", "datasets", "d", "acc"]},
        ],
    }  # fmt: skip
    (tmp_path / "figures.yaml").write_text(yaml.safe_dump(figures))
    (tmp_path / "README.md").write_text("| 60.0 ± 2.0 | 20.0 [10.0, 30.0] |")
    argv = ["--figures", str(tmp_path / "figures.yaml"), "--out", str(tmp_path / "runs"), "--reuse"]
    return reproduce.main([*argv, "--readme", str(tmp_path / "README.md")])


def test_a_rerun_within_the_tolerance_passes_and_one_outside_fails(tmp_path, capsys):
    # 63.5 is within 2 x 2.0 of 60.0; the gap's estimate 25 lies in the README's [10, 30].
    assert _score(tmp_path / "a", _report(0.635, 0.02, (0.25, 0.05, 0.45))) == 0
    assert "all 4 checked figures within their tolerance" in capsys.readouterr().out
    # 64.5 is 4.5 points off with spreads of 2: outside.
    assert _score(tmp_path / "b", _report(0.645, 0.02, (0.25, 0.05, 0.45))) == 1
    # A gap whose interval reaches 0 fails the claim even though its estimate is inside [10, 30].
    assert _score(tmp_path / "c", _report(0.60, 0.02, (0.12, -0.01, 0.25))) == 1
    out = capsys.readouterr().out
    assert "OUTSIDE" in out and "figure(s) outside their tolerance" in out
