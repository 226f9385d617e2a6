"""The benchmarks' on-disk layouts written small: PTB-XL 1.0.3, ECG-QA's files about its records and
ECGBench (PULSE's), as ``ecglm benchmark run|score`` reads the real ones.

The writers take the exact rows to write (what a test asserts on); :func:`write_example_benchmarks`
fills all three with a dozen synthetic 12-lead ECGs (:mod:`ecglm.data.synthetic`, the quickstart's
generator) and questions about them, for ``benchmarks/benchmark_example.py``. Signals are in
millivolts; ECGBench's images are drawn by ecglm's renderer (:func:`ecglm.render.render_ecg`, what
``ecglm render`` draws).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: PTB-XL's lead names as its WFDB headers write them.
PTBXL_LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
PTBXL_COLUMNS = ("ecg_id", "patient_id", "scp_codes", "strat_fold", "filename_hr")
#: scp_statements.csv's columns that matter, as PTB-XL 1.0.3 writes them: the code (unnamed index
#: column), diagnostic (1.0 or empty), diagnostic_class; SR is a rhythm statement, not diagnostic.
SCP_STATEMENTS = (
    ("NORM", "1.0", "NORM"),
    ("IMI", "1.0", "MI"),
    ("LAFB", "1.0", "CD"),
    ("NDT", "1.0", "STTC"),
    ("LVH", "1.0", "HYP"),
    ("SR", "", ""),
    ("LVOLT", "", ""),
)
PTBXL_FS = 500


def ptbxl_record(ecg_id: int) -> str:
    """The 500 Hz record of ``ecg_id`` relative to PTB-XL's folder (``filename_hr``)."""
    return f"records500/{1000 * (ecg_id // 1000):05d}/{ecg_id:05d}_hr"


def sine_ecg(ecg_id: int) -> np.ndarray:
    """10 s of 12 phase-shifted sines at 500 Hz, (5000, 12) mV, the frequency set by ``ecg_id``."""
    t = np.arange(10 * PTBXL_FS) / PTBXL_FS
    return np.stack([np.sin(2 * np.pi * (1 + ecg_id % 7 / 10) * t + k) * 0.5 for k in range(12)], 1)


def write_ptbxl(
    root: str | Path,
    rows: Mapping[int, tuple[int, str]],
    statements: Sequence[tuple[str, str, str]] = SCP_STATEMENTS,
    signal: Callable[[int], np.ndarray] = sine_ecg,
) -> Path:
    """PTB-XL 1.0.3's layout in ``root``: a 500 Hz WFDB record per row of ``rows`` (``ecg_id ->
    (strat_fold, scp_codes)``, the codes as the table writes them: ``"{'NORM': 100.0}"``), drawn by
    ``signal(ecg_id)`` ((samples, 12) mV), ``ptbxl_database.csv`` and ``scp_statements.csv`` of
    ``statements`` (code, diagnostic, diagnostic_class)."""
    import wfdb

    root = Path(root)
    table = []
    for ecg_id, (fold, codes) in rows.items():
        record = root / ptbxl_record(ecg_id)
        record.parent.mkdir(parents=True, exist_ok=True)
        wfdb.wrsamp(
            record.name, fs=PTBXL_FS, units=["mV"] * 12, sig_name=list(PTBXL_LEADS), p_signal=signal(ecg_id),
            fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(record.parent),
        )  # fmt: skip
        table.append({"ecg_id": ecg_id, "patient_id": 100 + ecg_id, "scp_codes": codes, "strat_fold": fold,
                      "filename_hr": ptbxl_record(ecg_id)})  # fmt: skip
    with open(root / "ptbxl_database.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(PTBXL_COLUMNS))
        writer.writeheader()
        writer.writerows(table)
    with open(root / "scp_statements.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", "description", "diagnostic", "form", "rhythm", "diagnostic_class"])
        writer.writerows(
            [(code, code.lower(), diagnostic, "", "", cls) for code, diagnostic, cls in statements]
        )
    return root


def ecgqa_sample(
    sample_id: int, question_type: str, question: str, answer: list[str], ecg_id: list[int]
) -> dict[str, Any]:
    """An ECG-QA sample with the fields of the real files."""
    return {
        "template_id": 1,
        "question_id": sample_id,
        "sample_id": sample_id,
        "question_type": question_type,
        "attribute_type": "scp_code",
        "question": question,
        "answer": answer,
        "ecg_id": ecg_id,
        "attribute": None,
    }


def write_ecgqa(
    root: str | Path,
    samples: Sequence[dict[str, Any]],
    source: str = "ptbxl",
    variant: str = "paraphrased",
    split: str = "test",
) -> Path:
    """ECG-QA's layout in ``root`` (its ``ecgqa`` folder): ``samples`` (:func:`ecgqa_sample`) as
    ``<source>/<variant>/<split>/00000.json``."""
    folder = Path(root) / source / variant / split
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "00000.json").write_text(json.dumps(list(samples)))
    return Path(root)


def random_walk_ecgs(count: int, seed: int = 0, samples: int = 2500) -> list[np.ndarray]:
    """``count`` random walks of 12 leads, (12, samples) mV: pictures of no ECG at all, cheap."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((samples, 12)).cumsum(0) * 0.01).T for _ in range(count)]


def ecgbench_item(ident: Any, image: str, question: str, gold: Any) -> dict[str, Any]:
    """An ECGBench item as the hub's files hold it: the question after ``<image>``, the gold answer."""
    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": gold}]
    return {"id": str(ident), "image": image, "conversations": turns}


def arena_item(ident: str, image: str, turns: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """An ``arena`` conversation: turns of ``{question, answer}`` (the gold answers)."""
    return {"id": ident, "image": image, "conversations": [{"question": q, "answer": a} for q, a in turns]}


def write_ecgbench(
    root: str | Path,
    subsets: Mapping[str, Sequence[dict[str, Any]]],
    images: Mapping[str, np.ndarray],
    fs: float = 250,
    dpi: int = 30,
) -> Path:
    """ECGBench's layout in ``root``: ``<subset>.json`` per subset (lists of :func:`ecgbench_item` or
    :func:`arena_item`) and ``images/<path>``, each of ``images`` (path -> 12 leads x samples, mV, at
    ``fs``) drawn as a printout at ``dpi``."""
    from ecglm.render import render_ecg, save_png

    root = Path(root)
    for path, signal in images.items():
        save_png(render_ecg(signal, fs, dpi=dpi), root / "images" / path)
    for name, items in subsets.items():
        (root / f"{name}.json").write_text(json.dumps(list(items)))
    return root


# --- synthetic example ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticECG:
    """One synthetic 12-lead ECG (12 x samples, mV, at ``fs``) and what its generator drew."""

    signal: np.ndarray
    fs: int
    heart_rate: str  # bradycardia, normal, tachycardia
    rhythm: str  # regular, irregular


def synthetic_ecgs(count: int = 12, seed: int = 0, mv_per_sd: float = 0.3) -> list[SyntheticECG]:
    """``count`` ECGs of the quickstart's generator (:class:`~ecglm.data.synthetic.SyntheticHeartQA`,
    neurokit2's beats re-timed; its test split, which the quickstart never trains on), each 10 s at
    250 Hz, z-scored leads scaled to ``mv_per_sd`` mV per standard deviation."""
    from ecglm.data.synthetic import SyntheticHeartQA

    source = SyntheticHeartQA(num_train=0, num_val=0, num_test=count, seed=seed)
    out = []
    for index in range(count):
        record = source.make_record("test", index)
        labels = record["json"]["labels"]
        signal = record["ecg.npy"].astype(np.float64) * mv_per_sd
        out.append(SyntheticECG(signal, source.sampling_rate, labels["heart_rate_class"], labels["rhythm"]))
    return out


#: The example's diagnostic statements, one per record in turn (the superclass gold, drawn by turns and
#: not from the signal: the synthetic beats carry no pathology), and a rhythm statement per record.
EXAMPLE_DIAGNOSES = ("NORM", "IMI", "NDT", "LAFB", "LVH", "NORM", "IMI,NDT", "LAFB,LVH")
EXAMPLE_STATEMENTS = (
    *SCP_STATEMENTS[:5],
    ("SR", "", ""),
    ("SBRAD", "", ""),
    ("STACH", "", ""),
    ("SARRH", "", ""),
)
_RHYTHM_CODE = {"bradycardia": "SBRAD", "tachycardia": "STACH", "normal": "SR"}
_DESCRIPTIONS = {
    "NORM": "a normal ECG",
    "IMI": "an inferior myocardial infarction",
    "NDT": "non-diagnostic T wave abnormalities",
    "LAFB": "a left anterior fascicular block",
    "LVH": "left ventricular hypertrophy",
}
HEART_RATES = ("bradycardia", "normal", "tachycardia")


def _codes(index: int, ecg: SyntheticECG) -> dict[str, float]:
    codes = dict.fromkeys(EXAMPLE_DIAGNOSES[index % len(EXAMPLE_DIAGNOSES)].split(","), 100.0)
    rhythm = "SARRH" if ecg.rhythm == "irregular" else _RHYTHM_CODE[ecg.heart_rate]
    return codes | {rhythm: 0.0}


def _example_ecgqa(ecgs: Sequence[SyntheticECG]) -> list[dict[str, Any]]:
    """Per record: the quickstart's own heart-rate and rhythm questions (``single-choose``, gold from
    the generator) and a yes/no question on a diagnostic statement (``single-verify``); per pair of
    records, whether both are regular (``comparison_irrelevant-verify``)."""
    from ecglm.data.synthetic import QUESTIONS

    samples = []
    for i, ecg in enumerate(ecgs):
        ecg_id, asked = i + 1, 100 * (i + 1)
        heart, rhythm = QUESTIONS["heart-rate"], QUESTIONS["rhythm"]
        samples.append(
            ecgqa_sample(asked, "single-choose", heart[i % len(heart)], [ecg.heart_rate], [ecg_id])
        )
        samples.append(
            ecgqa_sample(asked + 1, "single-choose", rhythm[i % len(rhythm)], [ecg.rhythm], [ecg_id])
        )
        code = tuple(_DESCRIPTIONS)[i % len(_DESCRIPTIONS)]
        answer = "yes" if code in _codes(i, ecg) else "no"
        question = f"Does this ECG show {_DESCRIPTIONS[code]}?"
        samples.append(ecgqa_sample(asked + 2, "single-verify", question, [answer], [ecg_id]))
    for i in range(0, len(ecgs) - 1, 2):
        both = "yes" if all(ecg.rhythm == "regular" for ecg in ecgs[i : i + 2]) else "no"
        question = "Do both ECGs show a regular rhythm?"
        kind = "comparison_irrelevant-verify"
        samples.append(ecgqa_sample(100 * (i + 1) + 3, kind, question, [both], [i + 1, i + 2]))
    return samples


def _example_ecgbench(ecgs: Sequence[SyntheticECG]) -> dict[str, list[dict[str, Any]]]:
    """Every rule-scored ECGBench subset asked about each ECG's printout (``synthetic/<i>.png``), the
    gold answers from the generator's heart rate and rhythm (ptb-test's from :data:`EXAMPLE_DIAGNOSES`)."""
    from ecglm.benchmarks.ptbxl import SUPERCLASSES

    superclass = {code: cls for code, _, cls in EXAMPLE_STATEMENTS if cls}
    rate_options = "A. bradycardia B. normal C. tachycardia D. cannot be determined"
    subsets: dict[str, list[dict[str, Any]]] = {name: [] for name in (
        "ptb-test", "mmmu-ecg", "cpsc-test", "csn-test-no-cot", "g12-test-no-cot", "ecgqa-test", "code15-test"
    )}  # fmt: skip
    for i, ecg in enumerate(ecgs):
        image = f"synthetic/{i}.png"
        gold = {superclass[c] for c in _codes(i, ecg) if c in superclass}
        letter = "ABC"[HEART_RATES.index(ecg.heart_rate)]
        regular = ecg.rhythm == "regular"
        found = {
            "SB": ecg.heart_rate == "bradycardia",
            "ST": ecg.heart_rate == "tachycardia",
            "AF": not regular,
        }
        code15 = [code for code, on in found.items() if on]
        asked = {
            "ptb-test": ("Which diagnostic classes does this ECG show? Options: "
                         + ", ".join(SUPERCLASSES), "; ".join(c for c in SUPERCLASSES if c in gold)),
            "mmmu-ecg": (f"What is the heart rate of this ECG? {rate_options}", letter),
            "cpsc-test": ("Which of NORM, AF, I-AVB, LBBB, RBBB, PAC, PVC, STD, STE does this ECG show?",
                          "NORM" if regular else "AF"),
            "csn-test-no-cot": ("Is the rhythm of this ECG: A. regular B. irregular?",
                                "A. regular" if regular else "B. irregular"),
            "g12-test-no-cot": (f"Classify the rate of this ECG. {rate_options}",
                                f"{letter}. {ecg.heart_rate}"),
            "ecgqa-test": ("Question: What is the heart rate category of this ECG? Options: bradycardia, "
                           "normal, tachycardia. Only answer based on the given Options without any "
                           "explanation.", [ecg.heart_rate]),
            "code15-test": ("Which of 1dAVb, RBBB, LBBB, SB, ST, AF does this ECG show, or is it NORM?",
                            ", ".join(code15) or "NORM"),
        }  # fmt: skip
        for name, (question, answer) in asked.items():
            subsets[name].append(ecgbench_item(i, image, question, answer))
    return subsets


@dataclass(frozen=True)
class ExampleBenchmarks:
    """Where :func:`write_example_benchmarks` wrote each benchmark (``ecgbench`` ``None`` unless asked)."""

    ptbxl: Path
    ecgqa: Path
    ecgbench: Path | None
    ecgs: tuple[SyntheticECG, ...]


def write_example_benchmarks(
    root: str | Path, count: int = 12, seed: int = 0, ecgbench: bool = True, dpi: int = 40
) -> ExampleBenchmarks:
    """PTB-XL (``root/ptb-xl``: ``count`` records, all of test fold 10), ECG-QA's test files about them
    (``root/ecgqa``) and, if ``ecgbench``, ECGBench's rule-scored subsets about their printouts
    (``root/ECGBench``), from :func:`synthetic_ecgs`. The heart-rate and rhythm answers are the
    generator's; the diagnostic superclasses are dealt out by turns (:data:`EXAMPLE_DIAGNOSES`)."""
    from ecglm.data.preprocess import resample

    root = Path(root)
    ecgs = synthetic_ecgs(count, seed)
    rows = {i + 1: (10, repr(_codes(i, ecg))) for i, ecg in enumerate(ecgs)}

    def signal(ecg_id: int) -> np.ndarray:
        ecg = ecgs[ecg_id - 1]
        return resample(ecg.signal, ecg.fs, PTBXL_FS).T

    ptbxl = write_ptbxl(root / "ptb-xl", rows, EXAMPLE_STATEMENTS, signal)
    ecgqa = write_ecgqa(root / "ecgqa", _example_ecgqa(ecgs))
    bench = None
    if ecgbench:
        images = {f"synthetic/{i}.png": ecg.signal for i, ecg in enumerate(ecgs)}
        bench = write_ecgbench(root / "ECGBench", _example_ecgbench(ecgs), images, ecgs[0].fs, dpi)
    return ExampleBenchmarks(ptbxl, ecgqa, bench, tuple(ecgs))
