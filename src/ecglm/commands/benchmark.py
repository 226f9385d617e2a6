"""``ecglm benchmark run`` / ``ecglm benchmark score``: the field's benchmarks (ECGBench) answered by a
bundle and scored as the published tables were (``--scoring pulse``) or as they should be (``strict``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from ecglm.errors import EcglmError


class BenchmarkUsageError(EcglmError, ValueError):
    """Options of ``ecglm benchmark`` that do not fit together."""


CONTROLS = ("shuffled", "blank")


def _subsets(subsets: list[str] | None) -> list[str]:
    from ecglm.benchmarks.ecgbench import SCORED, subset

    names = subsets or list(SCORED)
    for name in names:
        subset(name)
    return names


def score(
    data: str,
    predictions: str,
    suite: Literal["ecgbench"] = "ecgbench",
    scoring: Literal["pulse", "strict"] = "pulse",
    subsets: list[str] | None = None,
    out: str | None = None,
    judge: str | None = None,
    judge_args: dict | None = None,
) -> int:
    """Score ECGBench predictions (JSON lines in PULSE's layout, from any tool) against the gold answers.

    Args:
        data: The ECGBench folder: ``<subset>.json`` per subset (and ``images/``).
        predictions: A folder with ``<subset>.jsonl`` (or PULSE's ``<subset>/step-final.jsonl``) per
            subset, or one ``.jsonl`` file (give one subset with --subsets).
        suite: The benchmark (``ecgbench``).
        scoring: ``pulse``: as PULSE's evaluate_ecgbench.py scores it (comparable with the published
            tables); ``strict``: unparsable answers wrong, whole-token labels, AUROC from label scores,
            intervals and gaps against the controls (docs/benchmarks.md).
        subsets: The subsets to score (default: every rule-scored one that has predictions).
        out: scores.json to write (default: printed only).
        judge: A judge of ``ecglm.judges`` (``openai-chat``, ``local`` or a class path) for
            ptb-test-report, with its ``judge_args``; without it the report subset is left out.
        judge_args: The judge's arguments as JSON, e.g. ``{"model": "gpt-4o", "rubric_file": "r.txt"}``.
    """
    from ecglm.benchmarks.ecgbench import predictions_file, read_predictions, read_subset
    from ecglm.benchmarks.published import SOURCE, published
    from ecglm.benchmarks.scoring import score_ecgbench

    if Path(predictions).is_file() and (not subsets or len(subsets) != 1):
        raise BenchmarkUsageError(
            f"--predictions {predictions} is one file: name its subset (--subsets NAME)"
        )
    found, controls = {}, {}
    names = _subsets(subsets) + (["ptb-test-report"] if judge and not subsets else [])
    judged = [n for n in names if n == "ptb-test-report"]
    if judged and not judge:
        raise BenchmarkUsageError("ptb-test-report is scored by a judge: give --judge NAME --judge_args JSON")
    for name in names:
        path = predictions_file(predictions, name)
        if path is None:
            if subsets:
                raise BenchmarkUsageError(f"{predictions}: no predictions for {name} ({name}.jsonl)")
            continue
        found[name] = read_predictions(path)
        for control in CONTROLS:
            control_path = path.with_name(f"{path.stem}.{control}.jsonl")
            if control_path.is_file():
                controls.setdefault(name, {})[control] = read_predictions(control_path)
    if not found:
        raise BenchmarkUsageError(f"{predictions}: no <subset>.jsonl predictions file of ECGBench")
    items = {name: read_subset(data, name) for name in found}
    reports = {n: found.pop(n) for n in judged if n in found}
    scores = score_ecgbench(items, found, scoring, controls) if found else {}
    if reports:
        from ecglm.benchmarks.judged import judge_subset
        from ecglm.plugins import GROUPS, build_component

        chosen = build_component({"class_path": judge, "init_args": judge_args or {}}, GROUPS["judge"])
        scores |= {n: judge_subset(n, items[n], rows, chosen) for n, rows in reports.items()}
    print(summary_table(scores))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        beside = {name: published(name) for name in scores}
        report = {"suite": suite, "scoring": scoring, "subsets": scores}
        report |= {"published": beside, "published_source": SOURCE}
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"scores written to {out}")
    return 0


def run(
    model: str,
    data: str,
    out: str,
    suite: Literal["ecgbench"] = "ecgbench",
    subsets: list[str] | None = None,
    controls: list[Literal["shuffled", "blank"]] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    label_scores: bool = True,
    limit: int | None = None,
    device: str | None = None,
    override: list[str] | None = None,
    trust_remote_code: bool = False,
) -> int:
    """Answer ECGBench's questions about its ECG images with a bundle, appending JSON lines in PULSE's
    layout to OUT/<subset>.jsonl (a rerun answers only what is missing).

    Args:
        model: A bundle folder (``ecglm export``) of an image-path model.
        data: The ECGBench folder: ``<subset>.json`` per subset and ``images/``.
        out: The folder of predictions (``<subset>.jsonl``; controls ``<subset>.<control>.jsonl``).
        suite: The benchmark (``ecgbench``).
        subsets: The subsets to answer (default: every rule-scored one found in DATA).
        controls: Also answer with another item's image (``shuffled``) or a blank page (``blank``).
        batch_size: Questions answered per generate call.
        max_new_tokens: Longest answer, in tokens (greedy decoding, as PULSE's inference).
        label_scores: On multi-label subsets, also write each label's score (for strict AUROC).
        limit: Answer only the first N items of each subset (a smoke test; not comparable).
        device: cpu, cuda (default: CUDA when available).
        override: ``PART.KEY=VALUE`` (repeatable): an argument of the bundle's parts given by you.
        trust_remote_code: Let the bundle name classes no installed plugin registers.
    """
    import torch

    from ecglm.benchmarks.ecgbench import read_subset
    from ecglm.benchmarks.running import run_subset
    from ecglm.bundle import check_bundle, parse_overrides

    names = subsets or [n for n in _subsets(None) if (Path(data) / f"{n}.json").is_file()]
    if not names:
        raise BenchmarkUsageError(
            f"{data}: no <subset>.json of ECGBench; download the hub dataset PULSE-ECG/ECGBench with"
            " datasets.load_dataset as PULSE's README shows (no hub is reached here) and give that folder"
        )
    if "arena" in names:
        raise BenchmarkUsageError(
            "arena's multi-turn conversations are not run yet: leave it out of --subsets"
        )
    items = {name: read_subset(data, name)[:limit] for name in _subsets(names)}
    overrides = parse_overrides(override or [])
    config = check_bundle(model, trust_remote_code=trust_remote_code, overrides=overrides)
    if not config.get("image"):
        raise BenchmarkUsageError(f"{model} reads ECG signals; ECGBench asks about ECG images")
    from ecglm.model import ECGLM, Decoding

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = ECGLM.from_pretrained(
        model, device=device, trust_remote_code=trust_remote_code, overrides=overrides
    )
    decoding = Decoding(max_new_tokens=max_new_tokens)
    for name, subset_items in items.items():
        for condition in ("image", *(controls or [])):
            answered = run_subset(
                loaded,
                name,
                subset_items,
                Path(data) / "images",
                out,
                decoding,
                batch_size,
                condition,
                model_id=str(model),
                with_label_scores=label_scores and condition == "image",
            )
            print(f"{name} ({condition}): {answered} answered now, {len(subset_items)} in all")
    return 0


#: The published rows printed beside ours (scores.json holds every row of the paper's tables).
BESIDE = ("PULSE-7B", "GPT-4o")


def summary_table(scores: dict[str, dict], beside: tuple[str, ...] = BESIDE) -> str:
    """The scores as a markdown table: one row per subset, metrics as percentages, with the published
    rows of ``beside`` under each subset (comparable under ``pulse`` scoring only)."""
    from ecglm.benchmarks.published import published

    metrics = ("accuracy", "f1", "auc", "hamming_loss")
    lines = [
        "| subset | scoring / source | answers | unparsable | accuracy | F1 | AUC | Hamming loss |",
        "|" + "---|" * 8,
    ]

    def cells(row: dict) -> str:
        return " | ".join("" if row.get(k) is None else f"{100 * float(row[k]):.1f}" for k in metrics)

    for name, row in scores.items():
        if row["scoring"] == "judge":
            score = "" if row["report_score"] is None else f"{100 * row['report_score']:.1f}"
            source = f"judge {row['judge']}: report score {score}"
            lines.append(f"| {name} | {source} | {row['answers']} | {row['unreadable']} |")
            continue
        lines.append(
            f"| {name} | {row['scoring']} | {row['answers']} | {row.get('unparsable', '')} | {cells(row)} |"
        )
        for model, values in published(name).items():
            if model in beside:
                lines.append(f"| {name} | {model} (published, pulse) | | | {cells(values)} |")
    return "\n".join(lines)


def benchmark(args: list[str]) -> int:
    """``ecglm benchmark (run | score) ARGS``."""
    from ecglm.commands.arguments import call

    actions = {"run": run, "score": score}
    if not args or args[0] not in actions:
        print("usage: ecglm benchmark {" + " | ".join(actions) + "} ARGS (--help for each)")
        if args and args[0] in ("-h", "--help"):
            raise SystemExit(0)  # as every other command's --help exits
        return 2
    return call(actions[args[0]], args[1:], prog=f"ecglm benchmark {args[0]}")
