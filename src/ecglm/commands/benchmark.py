"""``ecglm benchmark run`` / ``ecglm benchmark score``: the field's benchmarks (ECGBench from images,
PTB-XL's diagnostic superclasses from the signal) answered by a bundle and scored as the published
tables were (``--scoring pulse``) or as they should be (``strict``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ecglm.errors import EcglmError


class BenchmarkUsageError(EcglmError, ValueError):
    """Options of ``ecglm benchmark`` that do not fit together."""


CONTROLS = ("shuffled", "blank")
Suite = Literal["ecgbench", "ptbxl", "ecgqa"]


def _subsets(subsets: list[str] | None) -> list[str]:
    from ecglm.benchmarks.ecgbench import SCORED, subset

    names = subsets or list(SCORED)
    for name in names:
        subset(name)
    return names


def score(
    data: str,
    predictions: str,
    suite: Suite = "ecgbench",
    scoring: Literal["pulse", "strict"] = "pulse",
    subsets: list[str] | None = None,
    out: str | None = None,
    judge: str | None = None,
    judge_args: dict | None = None,
    split: Literal["test", "val"] = "test",
    signals: str | None = None,
    source: Literal["ptbxl", "mimic-iv-ecg"] = "ptbxl",
    variant: Literal["paraphrased", "template"] = "paraphrased",
    arena_rubric: str | None = None,
    mlflow: str | None = None,
    mlflow_experiment: str = "ecglm-benchmark",
) -> int:
    """Score benchmark predictions (JSON lines in PULSE's layout, from any tool) against the gold answers.

    Args:
        data: The ECGBench folder (``<subset>.json`` per subset and ``images/``); for ``--suite
            ptbxl`` PTB-XL 1.0.3's folder (``ptbxl_database.csv``, ``scp_statements.csv``); for
            ``--suite ecgqa`` ECG-QA's ``ecgqa`` folder (``ptbxl/``, ``mimic-iv-ecg/``).
        predictions: A folder with ``<subset>.jsonl`` (or PULSE's ``<subset>/step-final.jsonl``) per
            subset, or one ``.jsonl`` file (give one subset with --subsets).
        suite: The benchmark: ``ecgbench`` (PULSE's, from images), ``ptbxl`` (PTB-XL's diagnostic
            superclasses from the signal, subset ``ptbxl-superclass``) or ``ecgqa`` (ECG-QA's test
            split from the signals, subset ``ecgqa-<source>-<variant>``).
        scoring: ``pulse``: as PULSE's evaluate_ecgbench.py scores it (comparable with the published
            tables); ``strict``: unparsable answers wrong, whole-token labels, AUROC from label scores,
            intervals and gaps against the controls (docs/benchmarks.md).
        subsets: The subsets to score (default: every rule-scored one that has predictions).
        out: scores.json to write, with scores.md and the plots (scores.<metric>.png) beside it
            (default: printed only).
        judge: A judge of ``ecglm.judges`` (``openai-chat``, ``local`` or a class path) for the
            judged subsets (ptb-test-report, arena), with its ``judge_args``; without it they are left out.
        judge_args: The judge's arguments as JSON, e.g. ``{"model": "gpt-4o", "rubric_file": "r.txt"}``.
        split: The signal suites: PTB-XL's recommended test fold (10) or validation fold (9); ECG-QA's
            test or valid split.
        signals: ``--suite ecgqa``: the folder of the source's signals (PTB-XL 1.0.3 or MIMIC-IV-ECG).
        source: ``--suite ecgqa``: whose questions (``ptbxl`` or ``mimic-iv-ecg``).
        variant: ``--suite ecgqa``: ``paraphrased`` or ``template`` questions.
        arena_rubric: A text file replacing the arena rubric (default: PULSE's three categories, each
            scored 0-10, ``ecglm.benchmarks.judged.ARENA_RUBRIC``); the judge gets it as its ``rubric``.
        mlflow: An MLflow tracking URI (``sqlite:///mlflow.db``): log the metrics and the report's
            files (scores.json, scores.md, the plots) as a run of ``mlflow_experiment``.
        mlflow_experiment: The MLflow experiment of that run.
    """
    if mlflow and not out:
        raise BenchmarkUsageError("--mlflow logs the report's files: give --out scores.json as well")
    if suite != "ecgbench":
        signal_suite = _signal_suite(suite, data, split, None, signals, source, variant)
        return _score_signals(
            signal_suite, data, predictions, scoring, subsets, out, split, mlflow, mlflow_experiment
        )
    from ecglm.benchmarks.ecgbench import predictions_file, read_conversations, read_predictions, read_subset
    from ecglm.benchmarks.judged import JUDGED
    from ecglm.benchmarks.published import SOURCE, published
    from ecglm.benchmarks.scoring import score_ecgbench

    if Path(predictions).is_file() and (not subsets or len(subsets) != 1):
        raise BenchmarkUsageError(
            f"--predictions {predictions} is one file: name its subset (--subsets NAME)"
        )
    found, controls = {}, {}
    names = _subsets(subsets) + (list(JUDGED) if judge and not subsets else [])
    judged = [n for n in names if n in JUDGED]
    if judged and not judge:
        raise BenchmarkUsageError(f"{judged[0]} is scored by a judge: give --judge NAME --judge_args JSON")
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
    items = {name: read_subset(data, name) for name in found if name != "arena"}
    reports = {n: found.pop(n) for n in judged if n in found}
    scores = score_ecgbench(items, found, scoring, controls) if found else {}
    if "ptb-test-report" in reports:
        from ecglm.benchmarks.judged import judge_subset

        chosen = _judge(judge, judge_args or {})
        name = "ptb-test-report"
        scores[name] = judge_subset(name, items[name], reports[name], chosen, controls=controls.get(name))
    if "arena" in reports:
        from ecglm.benchmarks.judged import judge_conversations, read_arena_rubric

        # judge_args' rubric is the report rubric; the arena's is its own (--arena_rubric).
        args = {k: v for k, v in (judge_args or {}).items() if k not in ("rubric", "rubric_file")}
        args["rubric"] = read_arena_rubric(arena_rubric)
        if "response_format" not in args and _takes(judge, "response_format"):
            args["response_format"] = "json_object"  # the arena rubric asks for one JSON object
        chosen = _judge(judge, args)
        conversations = read_conversations(data, "arena")
        scores["arena"] = judge_conversations(
            "arena", conversations, reports["arena"], chosen, scoring, controls=controls.get("arena")
        )
    print(summary_table(scores))
    report = {"suite": suite, "scoring": scoring, "subsets": scores}
    report |= {"published": {name: published(name) for name in scores}, "published_source": SOURCE}
    return _report(report, predictions, out, mlflow, mlflow_experiment)


def _takes(name: str, argument: str) -> bool:
    """Whether the judge ``name`` of ``ecglm.judges`` takes ``argument``."""
    from ecglm.plugins import GROUPS, component_class

    parameters = inspect.signature(component_class(name, GROUPS["judge"])).parameters
    return argument in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _judge(name: str, args: dict[str, Any]):
    """The judge ``name`` of ``ecglm.judges`` built with ``args``."""
    from ecglm.plugins import GROUPS, build_component

    if "rubric" in args and not _takes(name, "rubric"):
        raise BenchmarkUsageError(
            f"judge {name} takes no 'rubric' argument, and arena is judged with its own rubric: choose a"
            " judge that takes one (openai-chat, local)"
        )
    return build_component({"class_path": name, "init_args": args}, GROUPS["judge"])


def run(
    model: str | None = None,
    data: str | None = None,
    out: str | None = None,
    suite: Suite = "ecgbench",
    subsets: list[str] | None = None,
    controls: list[Literal["shuffled", "blank"]] | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    label_scores: bool = True,
    limit: int | None = None,
    device: str | None = None,
    override: list[str] | None = None,
    trust_remote_code: bool = False,
    split: Literal["test", "val"] = "test",
    question: str | None = None,
    signals: str | None = None,
    source: Literal["ptbxl", "mimic-iv-ecg"] = "ptbxl",
    variant: Literal["paraphrased", "template"] = "paraphrased",
    config: list[str] | None = None,
) -> int:
    """Answer a benchmark's questions with a bundle, or with the untrained model a recipe describes
    (zero-shot), appending JSON lines in PULSE's layout to OUT/<subset>.jsonl (a rerun answers only
    what is missing) and recording the model in OUT/run.json: ECGBench's about its ECG images, or
    PTB-XL's diagnostic superclasses about its records (a signal model reads the signal, an image
    model its printout).

    Args:
        model: A bundle folder (``ecglm export``): of an image-path model for ``ecgbench``.
        config: Instead of --model, a recipe (repeat to merge variants, as ``ecglm fit``): its model
            untrained, with its parts' own pretrained weights; e.g. a Hugging Face vision-language
            backbone (``hf-vision-language``) reading the printouts zero-shot.
        data: The ECGBench folder (``<subset>.json`` per subset and ``images/``); for ``--suite
            ptbxl`` PTB-XL 1.0.3's folder (``ptbxl_database.csv``, ``scp_statements.csv``,
            ``records500/``); for ``--suite ecgqa`` ECG-QA's ``ecgqa`` folder.
        out: The folder of predictions (``<subset>.jsonl``; controls ``<subset>.<control>.jsonl``).
        suite: The benchmark: ``ecgbench``, ``ptbxl`` or ``ecgqa``.
        subsets: The subsets to answer (default: every rule-scored one found in DATA); ``arena``'s
            conversations are answered turn by turn, after the model's own earlier answers.
        controls: Also answer with another item's image (``shuffled``) or a blank page (``blank``).
        batch_size: Questions answered per generate call.
        max_new_tokens: Longest answer, in tokens. Decoding is a recipe's own (``model.decoding``) with
            --config, and greedy with --model (as PULSE's inference; a bundle records no decoding);
            this replaces its length (default: the recipe's, or 64 tokens for a bundle). run.json
            records the decoding; sampled answers are seeded (0) at the start of each run.
        label_scores: On multi-label subsets, also write each label's score (for strict AUROC).
        limit: Answer only the first N items of each subset (a smoke test; not comparable).
        device: cpu, cuda (default: CUDA when available).
        override: ``PART.KEY=VALUE`` (repeatable): an argument of the bundle's (or recipe's) parts
            given by you.
        trust_remote_code: Let the bundle name classes no installed plugin registers.
        split: The signal suites: PTB-XL's recommended test fold (10) or validation fold (9); ECG-QA's
            test or valid split.
        question: ``--suite ptbxl``: the question asked of every record (default: names the five
            superclasses, ``ecglm.benchmarks.ptbxl.QUESTION``); ask it as the model was trained to.
        signals: ``--suite ecgqa``: the folder of the source's signals (PTB-XL 1.0.3 or MIMIC-IV-ECG).
        source: ``--suite ecgqa``: whose questions (``ptbxl`` or ``mimic-iv-ecg``).
        variant: ``--suite ecgqa``: ``paraphrased`` or ``template`` questions.
    """
    if data is None or out is None:
        raise BenchmarkUsageError("give the benchmark's folder and the answers' folder: --data DIR --out DIR")
    if (model is None) == (config is None):
        raise BenchmarkUsageError(
            ("--model and --config are exclusive: " if model else "")
            + "give one model to run: --model BUNDLE (a trained model) or --config RECIPE (its untrained"
            " model, zero-shot)"
        )
    if suite != "ecgbench":
        signal_suite = _signal_suite(suite, data, split, question, signals, source, variant)
        return _run_signals(
            signal_suite, model, config, out, controls, batch_size, max_new_tokens, label_scores, limit,
            device, override, trust_remote_code,
        )  # fmt: skip
    from ecglm.benchmarks.ecgbench import read_conversations, read_subset
    from ecglm.benchmarks.running import run_conversations, run_subset

    names = subsets or [n for n in _subsets(None) if (Path(data) / f"{n}.json").is_file()]
    if not names:
        raise BenchmarkUsageError(
            f"{data}: no <subset>.json of ECGBench; write the hub dataset PULSE-ECG/ECGBench there first"
            f" (ecglm benchmark fetch --out {data}, where the hub is reachable)"
        )
    conversations = {n: read_conversations(data, n)[:limit] for n in _subsets(names) if n == "arena"}
    items = {n: read_subset(data, n)[:limit] for n in _subsets(names) if n not in conversations}
    loaded, model_id, decoding = _answering_model(
        model, config, out, device, override, trust_remote_code, True, max_new_tokens
    )
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
                model_id=model_id,
                with_label_scores=label_scores and condition == "image",
            )
            print(f"{name} ({condition}): {answered} answered now, {len(subset_items)} in all")
    for name, asked in conversations.items():
        for condition in ("image", *(controls or [])):
            answered = run_conversations(
                loaded, name, asked, Path(data) / "images", out, decoding, batch_size, condition, model_id
            )
            print(f"{name} ({condition}): {answered} conversations answered now, {len(asked)} in all")
    return 0


def _answering_model(
    model: str | None,
    config: list[str] | None,
    out: str,
    device: str | None,
    override: list[str] | None,
    trust_remote_code: bool,
    images: bool,
    max_new_tokens: int | None = None,
) -> tuple[Any, str, Any]:
    """The bundle ``model``, or the untrained model of the recipe ``config``
    (:func:`ecglm.commands.recipe_model.model_from_recipe`), on ``device`` (default: CUDA when
    available) with its overrides, recorded in ``out/run.json``; the ``model_id`` of its answers
    (``zero-shot:<backbone model>`` for a recipe's); and the decoding: the recipe's, or greedy for a
    bundle, ``max_new_tokens`` long when given. ``images``: refuse a model that reads signals."""
    from dataclasses import asdict, replace

    import torch

    from ecglm.benchmarks.provenance import write_run_record
    from ecglm.bundle import check_bundle, parse_overrides
    from ecglm.model import ECGLM, Decoding

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides = parse_overrides(override or [])
    if config is not None:
        from ecglm.commands.recipe_model import model_from_recipe

        loaded, record = model_from_recipe(config, override or [], device)
        if images and loaded.image_size is None:
            raise BenchmarkUsageError(
                f"--config {record['recipe']}: its model reads ECG signals; ECGBench asks about ECG images"
            )
        decoding, model_id = Decoding(**record["decoding"]), f"zero-shot:{record['name']}"
    else:
        bundle = check_bundle(model, trust_remote_code=trust_remote_code, overrides=overrides)
        if images and not bundle.get("image"):
            raise BenchmarkUsageError(f"{model} reads ECG signals; ECGBench asks about ECG images")
        loaded = ECGLM.from_pretrained(
            model, device=device, trust_remote_code=trust_remote_code, overrides=overrides
        )
        record = {"name": str(model), "zero_shot": False, "training": loaded.training_stages}
        decoding, model_id = Decoding(max_new_tokens=64), str(model)
    if max_new_tokens is not None:
        decoding = replace(decoding, max_new_tokens=max_new_tokens)
    record["decoding"] = asdict(decoding)
    write_run_record(out, record)
    if decoding.do_sample:
        torch.manual_seed(0)  # sampled answers: the same run samples the same answers
    return loaded, model_id, decoding


@dataclass(frozen=True)
class SignalSuite:
    """A signal suite's one subset as asked: its spec, items, signals folder and training dataset."""

    spec: Any
    items: list
    signals: Path
    dataset: str | None = None


def _signal_suite(
    suite: str,
    data: str,
    split: str,
    question: str | None,
    signals: str | None,
    source: str,
    variant: str,
) -> SignalSuite:
    if suite == "ptbxl":
        from ecglm.benchmarks.ptbxl import QUESTION, SUPERCLASS, read_superclass_items

        return SignalSuite(SUPERCLASS, read_superclass_items(data, split, question or QUESTION), Path(data))
    from ecglm.benchmarks.ecgqa import read_ecgqa_items, subset_of

    if signals is None:
        raise BenchmarkUsageError(
            f"--suite ecgqa asks about {source}'s records: give their folder with --signals DIR"
        )
    if question is not None:
        raise BenchmarkUsageError("--suite ecgqa asks ECG-QA's own questions: leave out --question")
    items, left_out = read_ecgqa_items(data, signals, source, variant, split)
    if left_out:
        print(f"ECG-QA {source}/{variant} {split}: left out {dict(left_out)}")
    return SignalSuite(subset_of(source, variant), items, Path(signals), f"ecgqa-{source}")


def _run_signals(
    suite: SignalSuite,
    model: str | None,
    config: list[str] | None,
    out: str,
    controls: list[str] | None,
    batch_size: int,
    max_new_tokens: int | None,
    label_scores: bool,
    limit: int | None,
    device: str | None,
    override: list[str] | None,
    trust_remote_code: bool,
) -> int:
    """``ecglm benchmark run --suite ptbxl|ecgqa``: every item asked about its records."""
    from ecglm.benchmarks.running import run_signal_subset

    items = suite.items[:limit]
    loaded, model_id, decoding = _answering_model(
        model, config, out, device, override, trust_remote_code, False, max_new_tokens
    )
    for condition in ("ecg", *(controls or [])):
        answered = run_signal_subset(
            loaded,
            suite.spec,
            items,
            suite.signals,
            out,
            decoding,
            batch_size,
            condition,
            model_id=model_id,
            with_label_scores=label_scores and condition == "ecg",
            dataset=suite.dataset,
        )
        print(f"{suite.spec.name} ({condition}): {answered} answered now, {len(items)} in all")
    return 0


def _score_signals(
    suite: SignalSuite,
    data: str,
    predictions: str,
    scoring: str,
    subsets: list[str] | None,
    out: str | None,
    split: str,
    mlflow: str | None = None,
    mlflow_experiment: str = "ecglm-benchmark",
) -> int:
    """``ecglm benchmark score --suite ptbxl|ecgqa``: PTB-XL's superclasses scored as ECGBench's
    ptb-test; ECG-QA by exact match per question type, as its paper scores it."""
    from ecglm.benchmarks.ecgbench import predictions_file, read_predictions
    from ecglm.benchmarks.ecgqa import score_ecgqa
    from ecglm.benchmarks.scoring import score_subset

    name = suite.spec.name
    if subsets and subsets != [name]:
        raise BenchmarkUsageError(f"this suite has the one subset {name}, not {subsets}")
    if suite.spec.kind == "ecgqa" and scoring != "strict":
        raise BenchmarkUsageError(
            "ECG-QA's test splits are scored by exact match of the answer set, as its paper scores them:"
            " give --scoring strict"
        )
    path = predictions_file(predictions, name)
    if path is None:
        raise BenchmarkUsageError(f"{predictions}: no predictions for {name} ({name}.jsonl)")
    controls = {
        control: read_predictions(path.with_name(f"{path.stem}.{control}.jsonl"))
        for control in CONTROLS
        if path.with_name(f"{path.stem}.{control}.jsonl").is_file()
    }
    rows = read_predictions(path)
    if suite.spec.kind == "ecgqa":
        result = score_ecgqa(suite.spec, suite.items, rows, controls)
    else:
        result = score_subset(name, suite.items, rows, scoring, controls=controls, spec=suite.spec)
    scores = {name: result | {"split": split}}
    print(summary_table(scores))
    report = {"suite": name.split("-")[0], "scoring": scoring, "data": str(data), "subsets": scores}
    return _report(report, predictions, out, mlflow, mlflow_experiment)


def _report(
    report: dict, predictions: str, out: str | None, mlflow: str | None, mlflow_experiment: str
) -> int:
    """scores.json with its markdown and plots beside it (:mod:`ecglm.benchmarks.report`), the model
    that answered when the predictions record it, and the run in MLflow when ``mlflow`` names a
    tracking URI."""
    from ecglm.benchmarks.provenance import read_run_record
    from ecglm.benchmarks.report import log_to_mlflow, write_report

    recorded = read_run_record(predictions)  # which model answered (ecglm benchmark run's run.json)
    if recorded is not None:
        report = {"model": recorded, **report}
    if out:
        files = write_report(report, out)
        print("report written: " + ", ".join(str(f) for f in files))
        if mlflow:
            run_id = log_to_mlflow(report, files, mlflow, mlflow_experiment)
            print(f"logged to MLflow {mlflow}, experiment {mlflow_experiment}, run {run_id}")
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
            key = "arena_score" if "arena_score" in row else "report_score"
            label = key.replace("_", " ")
            score = "" if row[key] is None else f"{100 * row[key]:.1f}"
            lines.append(
                f"| {name} | judge {row['judge']}: {label} {score} | {row['answers']} | {row['unreadable']} |"
            )
            for model, values in published(name).items():
                if model in beside and values.get(key) is not None:
                    lines.append(
                        f"| {name} | {model} (published, GPT-4o judge): {label} {100 * values[key]:.1f} |"
                    )
            continue
        lines.append(
            f"| {name} | {row['scoring']} | {row['answers']} | {row.get('unparsable', '')} | {cells(row)} |"
        )
        for model, values in published(name).items():
            if model in beside and values:  # a suite of its own has no published rows
                lines.append(f"| {name} | {model} (published, pulse) | | | {cells(values)} |")
    return "\n".join(lines)


def fetch(
    out: str | None = None,
    subsets: list[str] | None = None,
    repo: str = "PULSE-ECG/ECGBench",
    revision: str | None = None,
) -> int:
    """Write ECGBench from the Hugging Face hub into OUT in the layout its authors distribute
    (``<subset>.json`` and ``images/``), which ``ecglm benchmark run --data OUT`` reads. A rerun keeps
    the pictures already written.

    Args:
        out: The folder to write (e.g. data/ECGBench).
        subsets: The subsets to fetch (default: all nine).
        repo: The dataset's hub id, or a local copy of its repository.
        revision: A branch, tag or commit of the dataset (default: its latest).
    """
    from ecglm.benchmarks.hub import fetch_ecgbench

    if out is None:
        raise BenchmarkUsageError("give the folder to write: --out DIR (e.g. data/ECGBench)")
    fetch_ecgbench(out, subsets, repo, revision)
    return 0


def benchmark(args: list[str]) -> int:
    """``ecglm benchmark (run | score | fetch) ARGS``."""
    from ecglm.commands.arguments import call

    actions = {"run": run, "score": score, "fetch": fetch}
    if not args or args[0] not in actions:
        print("usage: ecglm benchmark {" + " | ".join(actions) + "} ARGS (--help for each)")
        if args and args[0] in ("-h", "--help"):
            raise SystemExit(0)  # as every other command's --help exits
        return 2
    return call(actions[args[0]], args[1:], prog=f"ecglm benchmark {args[0]}")
