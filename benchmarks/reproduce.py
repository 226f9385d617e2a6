"""Re-run the README's quickstarts and print every README figure beside the one measured now.

    python benchmarks/reproduce.py                     # every run (about 45 min on a 2-core CPU)
    python benchmarks/reproduce.py --only quickstart   # one run family
    python benchmarks/reproduce.py --reuse             # re-score the runs already under --out

``benchmarks/readme-figures.yaml`` lists each figure as README.md prints it, the run that measures it
and where in that run's ``report.json`` it lies. Each run is the recipe itself, written out with its
training seed and output folders changed (``--out``/NAME/seed-S/recipe.yaml, so what ran is on
disk), then ``ecglm fit`` and ``ecglm evaluate`` as the README says. A figure passes within the
tolerance the README states for its kind:

- ``m ± s`` (mean ± std over evaluation seeds): the new mean within two standard deviations of the
  README's (the larger of its and the new one's spread, at least 1 point);
- ``e [lo, hi]`` (an estimate with its 95% bootstrap interval): the new estimate inside ``[lo, hi]``;
- a claim (``above_zero``: an interval's lower end above 0; ``greater``: one figure above another);
- ``info`` figures (wall times, sizes) are printed and never fail: they depend on the machine's load.

It exits 1 when a figure falls outside, or when README.md no longer prints a figure the file lists (a
table edited by hand). Update README.md only from this script's output (CONTRIBUTING.md).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "benchmarks" / "readme-figures.yaml"
MEAN_STD = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*±\s*(\d+(?:\.\d+)?)\s*$")
INTERVAL = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*\[\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?)\s*\]")


@dataclass
class Row:
    """One line of the printed table."""

    run: str
    name: str
    readme: str
    measured: str
    tolerance: str
    ok: bool | None  # None: informational


def lookup(report: dict[str, Any], path: list[str]) -> Any:
    node: Any = report
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"report.json has no {' / '.join(path)} (missing {key!r})")
        node = node[key]
    return node


def percent(value: float) -> float:
    return 100.0 * value


def seed_recipe(recipe: Path, out_dir: Path, seed: int) -> Path:
    """The recipe with ``seed_everything`` and every output folder moved under ``out_dir``."""
    config = yaml.safe_load(recipe.read_text())
    config["seed_everything"] = seed
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(out_dir)
    for callback in trainer.get("callbacks") or []:
        if callback.get("class_path", "").endswith("ModelCheckpoint"):
            callback.setdefault("init_args", {})["dirpath"] = str(out_dir / "checkpoints")
    config.setdefault("evaluate", {})["out_dir"] = str(out_dir / "evaluation")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "recipe.yaml"
    header = f"# {recipe.relative_to(REPO)} with seed_everything {seed}, written by benchmarks/reproduce.py\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def run(command: list[str], log: Path) -> float:
    """Run ``command`` from the repository root, its output in ``log``; the wall time in seconds."""
    start = time.perf_counter()
    with log.open("a") as out:
        print("$", " ".join(command), flush=True)
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        sys.exit(f"reproduce: {' '.join(command)} failed (exit {done.returncode}); its output is in {log}")
    return time.perf_counter() - start


def measure(name: str, spec: dict[str, Any], out: Path, reuse: bool) -> dict[int, dict[str, Any]]:
    """Train and evaluate ``spec``'s recipe once per training seed; per seed: report.json and timings."""
    ecglm = str(Path(sys.executable).with_name("ecglm"))
    results = {}
    for seed in spec["train_seeds"]:
        folder = out / name / f"seed-{seed}"
        report_file = folder / "evaluation" / "report.json"
        timings_file = folder / "timings.json"
        if not (reuse and report_file.exists()):
            if folder.exists():
                shutil.rmtree(folder)  # a fresh run: no checkpoint of an earlier one is resumed
            recipe = seed_recipe(REPO / spec["recipe"], folder, seed)
            log = folder / "log.txt"
            timings = {"fit_s": run([ecglm, "fit", "--config", str(recipe)], log)}
            timings["evaluate_s"] = run([ecglm, "evaluate", "--config", str(recipe)], log)
            if "ask" in spec:
                bundle = folder / "bundle"
                run(
                    [ecglm, "export", "--config", str(recipe), "--ckpt_path", "last", "--out", str(bundle)],
                    log,
                )
                answers = folder / "answers.jsonl"
                ask = spec["ask"]
                timings["ask_s"] = run(
                    [ecglm, "ask", "--model", str(bundle), "--record", str(REPO / ask["record"]),
                     "--question", ask["question"], "--window", "all", "--out", str(answers)],
                    log,
                )  # fmt: skip
                timings["bundle_mb"] = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 1e6
                timings["answers"] = [json.loads(line)["answer"] for line in answers.read_text().splitlines()]
            timings_file.write_text(json.dumps(timings, indent=1))
        results[seed] = {
            "report": json.loads(report_file.read_text()),
            "timings": json.loads(timings_file.read_text()) if timings_file.exists() else {},
        }
    return results


def mean_std_row(run_name: str, figure: dict[str, Any], readme: str, entry: dict[str, float]) -> Row:
    match = MEAN_STD.match(readme)
    if not match:
        raise ValueError(f"{figure['name']}: {readme!r} is not 'mean ± std'")
    mean, std = float(match[1]), float(match[2])
    new_mean, new_std = percent(entry["mean"]), percent(entry["std"])
    allowed = max(2 * max(std, new_std), 1.0)
    ok = abs(new_mean - mean) <= allowed
    return Row(run_name, figure["name"], readme, f"{new_mean:.1f} ± {new_std:.1f}", f"±{allowed:.1f}", ok)


def interval_row(run_name: str, figure: dict[str, Any], readme: str, entry: dict[str, float]) -> Row:
    match = INTERVAL.match(readme)
    if not match:
        raise ValueError(f"{figure['name']}: {readme!r} is not 'estimate [low, high]'")
    low, high = float(match[2]), float(match[3])
    estimate, new_low, new_high = (percent(entry[k]) for k in ("estimate", "low", "high"))
    ok = low <= estimate <= high
    measured = f"{estimate:.1f} [{new_low:.1f}, {new_high:.1f}]"
    if "p_value" in entry:
        measured += f" (p={entry['p_value']:.3f})"
    return Row(run_name, figure["name"], readme, measured, f"in [{low:g}, {high:g}]", ok)


def figure_row(run_name: str, figure: dict[str, Any], measured: dict[int, dict[str, Any]]) -> Row:
    seed = figure.get("seed", next(iter(measured)))
    result = measured[seed]
    kind = figure.get("kind", "mean_std")
    if kind == "info":
        try:
            value = lookup(result["timings"], figure["timing"])
        except KeyError:  # a reused run made without this script: no timings
            value = "not measured"
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        return Row(run_name, figure["name"], figure.get("readme", ""), shown, "printed only", None)
    entry = lookup(result["report"], figure["value"])
    if kind == "mean_std":
        return mean_std_row(run_name, figure, figure["readme"], entry)
    if kind == "interval":
        return interval_row(run_name, figure, figure["readme"], entry)
    if kind == "above_zero":
        ok = bool(entry["low"] > 0)
        shown = (
            f"{percent(entry['estimate']):.1f} [{percent(entry['low']):.1f}, {percent(entry['high']):.1f}]"
        )
        return Row(run_name, figure["name"], figure.get("readme", ""), shown, "low > 0", ok)
    if kind == "greater":
        other = lookup(result["report"], figure["than"])
        a, b = percent(entry["mean"]), percent(other["mean"])
        return Row(run_name, figure["name"], figure.get("readme", ""), f"{a:.1f} > {b:.1f}", "a > b", a > b)
    raise ValueError(
        f"{figure['name']}: unknown kind {kind!r} (mean_std, interval, above_zero, greater, info)"
    )


def print_table(rows: list[Row]) -> None:
    header = ("run", "figure", "README", "measured now", "tolerance", "")
    cells = [header] + [
        (
            r.run,
            r.name,
            r.readme,
            r.measured,
            r.tolerance,
            "" if r.ok is None else ("ok" if r.ok else "OUTSIDE"),
        )
        for r in rows
    ]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(header))]
    for line in cells:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures", type=Path, default=FIGURES, help="the figures file")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "reproduce", help="where runs go")
    parser.add_argument("--only", action="append", help="a run family of the figures file (repeatable)")
    parser.add_argument("--reuse", action="store_true", help="score existing runs instead of training again")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args(argv)
    spec = yaml.safe_load(args.figures.read_text())
    names = args.only or list(spec["runs"])
    unknown = sorted(set(names) - set(spec["runs"]))
    if unknown:
        parser.error(f"--only {unknown}: the figures file has runs {sorted(spec['runs'])}")
    readme = args.readme.read_text()
    stale = [
        f["readme"]
        for f in spec["figures"]
        if f["run"] in names and f.get("readme") and f.get("kind") != "info" and f["readme"] not in readme
    ]
    measured = {name: measure(name, spec["runs"][name], args.out, args.reuse) for name in names}
    rows = [figure_row(f["run"], f, measured[f["run"]]) for f in spec["figures"] if f["run"] in names]
    print_table(rows)
    outside = [r for r in rows if r.ok is False]
    for text in stale:
        print(f"README.md no longer prints {text!r}: update {args.figures.name} with the table")
    if outside or stale:
        print(f"{len(outside)} figure(s) outside their tolerance, {len(stale)} missing from README.md")
        return 1
    print(f"all {sum(r.ok is not None for r in rows)} checked figures within their tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
