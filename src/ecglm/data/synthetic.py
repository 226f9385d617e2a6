"""SyntheticHeartQA: a small, deterministic 12-lead ECG question-answering set for the quickstart.

Every record is built from a real-looking beat (neurokit2's 12-lead simulator, or beats cut from a
real WFDB record) re-timed along a sampled RR sequence, so the two answers -- heart-rate class
(bradycardia / normal / tachycardia) and rhythm (regular / irregular) -- can only be read off the
signal. A :class:`~ecglm.data.source.ShardSource` (entry point ``synthetic`` of ``ecglm.sources``): its
records are written as WebDataset shards plus a manifest via :mod:`ecglm.data.shards`.

Re-timing (see :func:`_place_beat`): beats are overlap-added at their R peaks. The QRS (+-50 ms)
keeps its width; the rest of the beat is stretched by ``sqrt(RR / RR_template)`` after the R peak
(Bazett-like QT adaptation) and by the square root of that before it (PR changes little with
rate). Long RR intervals thus get an isoelectric TP segment, short ones a P wave riding on the T.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import signal

from ecglm.data.preprocess import read_wfdb, resample, select_leads, zscore
from ecglm.data.source import ShardSource, SourceRecord
from ecglm.data.splits import SPLITS
from ecglm.ecg import LEADS, MANIFEST_KEYS

log = logging.getLogger(__name__)

DATASET = "synthetic-heart-qa"
VERSION = 4  # 2: heart-rate questions list the exact answer words; 3: splits list datasets, question types;
# 4: shard entries carry num_qa, datasets and bytes (the DataModule plans epochs from them)
HEART_RATE_CLASSES = {"bradycardia": (40.0, 52.0), "normal": (65.0, 92.0), "tachycardia": (110.0, 150.0)}
RHYTHM_JITTER = {"regular": (0.0, 0.03), "irregular": (0.25, 0.35)}  # max relative RR deviation per beat
MIN_IRREGULAR_RR_CV = 0.08  # a few AF-like beats can look regular by chance
# Every question names its answer options, as ECG-QA's "choose" questions do: the text fixes the
# answer format, so what the model must learn from the ECG is only which option is right.
QUESTIONS = {
    "heart-rate": (
        "What is the heart rate category of this ECG: bradycardia, normal or tachycardia?",
        "Is the heart rate in this ECG bradycardia, normal or tachycardia?",
        "Classify the ventricular rate of this ECG as bradycardia, normal or tachycardia.",
        "Does this ECG show bradycardia, a normal heart rate or tachycardia?",
        "Based on this 12-lead ECG, is the heart rate bradycardia, normal or tachycardia?",
    ),
    "rhythm": (
        "Is the rhythm regular or irregular?",
        "Is the rhythm of this ECG regular or irregular?",
        "Are the RR intervals in this ECG regular or irregular?",
        "Does this ECG show a regular or an irregular rhythm?",
        "Based on this 12-lead ECG, is the rhythm regular or irregular?",
    ),
}
NEUROKIT_HEART_RATES = (60, 66, 72, 78)  # one simulator call (~1.7 s at 250 Hz) per template
QRS_HALF_WIDTH_S = 0.05
TEMPLATE_PRE_S, TEMPLATE_POST_S = 0.28, 0.45  # P onset .. T end around the R peak


@dataclass(frozen=True)
class BeatTemplate:
    """One median beat per lead, baseline-corrected and tapered to zero at both ends."""

    beat: np.ndarray  # (12, length)
    r_index: int  # position of the QRS centre in ``beat``
    rr: float  # RR interval (samples) of the recording it was cut from


def qrs_peaks(leads: np.ndarray, fs: int) -> np.ndarray:
    """QRS centres of ``leads`` (12, n) from the multi-lead slope energy.

    Not lead II alone: neurokit2's 12-lead simulator draws a tiny QRS and a tall T wave in lead II,
    and single-lead detectors then lock onto T waves.
    """
    band = signal.butter(2, [8.0, min(30.0, 0.45 * fs)], "bandpass", fs=fs, output="sos")
    slope = np.diff(signal.sosfiltfilt(band, leads, axis=1), axis=1, prepend=0.0)
    window = max(1, round(0.08 * fs))
    energy = np.convolve((slope**2).sum(axis=0), np.ones(window) / window, mode="same")
    peaks, _ = signal.find_peaks(energy, height=0.3 * np.percentile(energy, 99), distance=round(0.25 * fs))
    return peaks


def _cut_template(leads: np.ndarray, fs: int) -> BeatTemplate:
    """Median beat of ``leads`` (12, n) around its QRS complexes."""
    leads = signal.sosfiltfilt(signal.butter(2, 0.5, "highpass", fs=fs, output="sos"), leads, axis=1)
    peaks = qrs_peaks(leads, fs)
    if len(peaks) < 3:
        raise ValueError(f"found only {len(peaks)} QRS complexes; cannot cut a beat template")
    rr = float(np.median(np.diff(peaks)))
    pre = int(min(TEMPLATE_PRE_S * fs, 0.35 * rr))
    post = int(min(TEMPLATE_POST_S * fs, 0.58 * rr))
    peaks = peaks[(peaks >= pre) & (peaks + post < leads.shape[1])]
    beat = np.median(np.stack([leads[:, p - pre : p + post] for p in peaks]), axis=0)
    # Zero the TP baseline (line through the ends) and taper, so overlap-added beats sum cleanly.
    ramp = np.linspace(0.0, 1.0, beat.shape[1])
    beat = beat - beat[:, :1] - (beat[:, -1:] - beat[:, :1]) * ramp
    beat = beat * signal.windows.tukey(beat.shape[1], alpha=0.2)
    beat.setflags(write=False)  # templates are cached and shared between builders
    return BeatTemplate(beat=beat, r_index=pre, rr=rr)


@functools.lru_cache(maxsize=4)
def neurokit_templates(fs: int, seed: int) -> tuple[BeatTemplate, ...]:
    """Beat templates from neurokit2's 12-lead simulator at a few base heart rates (cached: ~7 s)."""
    import neurokit2 as nk

    templates = []
    for i, heart_rate in enumerate(NEUROKIT_HEART_RATES):
        state = int(np.random.default_rng([seed, 1000 + i]).integers(2**31))
        frame = nk.ecg_simulate(
            duration=10, sampling_rate=fs, heart_rate=heart_rate, method="multileads", random_state=state
        )
        templates.append(_cut_template(frame[list(LEADS)].to_numpy().T, fs))
    return tuple(templates)


def read_wfdb_leads(record: str | Path, fs: int) -> np.ndarray:
    """The 12 standard leads (canonical order, resampled to ``fs``) of a WFDB record, as (12, n)."""
    x, names, rate = read_wfdb(record)
    return resample(np.nan_to_num(select_leads(x, names, str(record))), rate, fs)


def wfdb_templates(record: str | Path, fs: int, max_templates: int = 4) -> tuple[BeatTemplate, ...]:
    """Median beats from consecutive (at least 8 s long) segments of a real WFDB recording."""
    leads = read_wfdb_leads(record, fs)
    count = int(np.clip(leads.shape[1] // (8 * fs), 1, max_templates))
    try:
        return tuple(_cut_template(segment, fs) for segment in np.array_split(leads, count, axis=1))
    except ValueError as error:
        raise ValueError(f"WFDB record {record}: {error}") from error


def _place_beat(out: np.ndarray, template: BeatTemplate, r_pos: float, rr: float, qrs: float) -> None:
    """Overlap-add ``template`` re-timed for an RR of ``rr`` samples with its R peak at ``r_pos``."""
    post_scale = float(np.clip(np.sqrt(rr / template.rr), 0.5, 1.6))
    pre_scale = np.sqrt(post_scale)
    length = template.beat.shape[1]
    start = int(np.ceil(r_pos - qrs - (template.r_index - qrs) * pre_scale))
    stop = int(np.floor(r_pos + qrs + (length - 1 - template.r_index - qrs) * post_scale)) + 1
    n = np.arange(max(start, 0), min(stop, out.shape[1]))
    if n.size == 0:
        return
    d = n - r_pos
    scale = np.where(d < 0, pre_scale, post_scale)
    warped = np.where(np.abs(d) <= qrs, d, np.sign(d) * (qrs + (np.abs(d) - qrs) / scale))
    pos = np.clip(template.r_index + warped, 0, length - 1)
    i0 = np.minimum(pos.astype(int), length - 2)
    frac = pos - i0
    out[:, n] += template.beat[:, i0] * (1 - frac) + template.beat[:, i0 + 1] * frac


class SyntheticHeartQA(ShardSource):
    """Builder of the synthetic heart-rate / rhythm ECG QA set (train/val/test WebDataset shards)."""

    dataset = DATASET
    version = VERSION
    question_types = tuple(QUESTIONS)

    def __init__(
        self,
        num_train: int = 640,
        num_val: int = 64,
        num_test: int = 96,
        seed: int = 0,
        sampling_rate: int = 250,
        seconds: float = 10.0,
        beat_source: str = "neurokit2",
        noise_std: float = 0.05,
        max_samples_per_shard: int = 1000,
    ) -> None:
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.seed = seed
        self.sampling_rate = sampling_rate
        self.seconds = seconds
        self.beat_source = beat_source
        self.noise_std = noise_std
        self.max_samples_per_shard = max_samples_per_shard
        self.num_samples = round(sampling_rate * seconds)
        self._templates: tuple[BeatTemplate, ...] | None = None
        self._validate()

    def _validate(self) -> None:
        sizes = {"num_train": self.num_train, "num_val": self.num_val, "num_test": self.num_test}
        for name, value in sizes.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.sampling_rate < 100:
            raise ValueError(f"sampling_rate must be >= 100 Hz, got {self.sampling_rate}")
        if self.seconds < 4:
            raise ValueError(f"seconds must be >= 4 to hold three beats at 40 bpm, got {self.seconds}")
        if self.noise_std < 0 or self.max_samples_per_shard < 1:
            raise ValueError("noise_std must be >= 0 and max_samples_per_shard >= 1")

    @property
    def params(self) -> dict[str, Any]:
        return {
            "num_train": self.num_train,
            "num_val": self.num_val,
            "num_test": self.num_test,
            "seed": self.seed,
            "sampling_rate": self.sampling_rate,
            "seconds": self.seconds,
            "beat_source": str(self.beat_source),
            "noise_std": self.noise_std,
            "max_samples_per_shard": self.max_samples_per_shard,
        }

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}

    @property
    def templates(self) -> tuple[BeatTemplate, ...]:
        if self._templates is None:
            if self.beat_source == "neurokit2":
                self._templates = neurokit_templates(self.sampling_rate, self.seed)
            else:
                self._templates = wfdb_templates(self.beat_source, self.sampling_rate)
            if not self._templates:
                raise ValueError(f"no beat templates could be cut from {self.beat_source}")
        return self._templates

    def _r_peak_times(self, rng: np.random.Generator, hr_class: str, rhythm: str) -> tuple[np.ndarray, float]:
        """R-peak positions (samples; some before 0 and after the end) and the in-window heart rate."""
        fs, n = self.sampling_rate, self.num_samples
        low, high = HEART_RATE_CLASSES[hr_class]
        for _ in range(100):
            rr_mean = 60.0 * fs / rng.uniform(low, high)
            jitter = rng.uniform(*RHYTHM_JITTER[rhythm])
            rr = rr_mean * (1 + rng.uniform(-jitter, jitter, size=int(n / (0.6 * rr_mean)) + 4))
            peaks = rng.uniform(0, rr[0]) - rr[0] + np.concatenate([[0.0], np.cumsum(rr)])
            inside = np.diff(peaks[(peaks >= 0) & (peaks < n)])
            if len(inside) < 2:
                continue
            heart_rate = 60.0 * fs / float(np.mean(inside))
            variation = float(np.std(inside) / np.mean(inside))
            # Labels must be true of the generated window, not just of the sampled parameters.
            if low <= heart_rate <= high and (rhythm == "regular" or variation >= MIN_IRREGULAR_RR_CV):
                return peaks, heart_rate
        raise RuntimeError(f"could not sample a {rhythm} {hr_class} RR sequence")

    def _signal(self, rng: np.random.Generator, peaks: np.ndarray) -> np.ndarray:
        fs, n = self.sampling_rate, self.num_samples
        template = self.templates[rng.integers(len(self.templates))]
        clean = np.zeros((len(LEADS), n))
        rrs = np.diff(peaks, prepend=2 * peaks[0] - peaks[1])
        for r_pos, rr in zip(peaks, rrs, strict=True):
            _place_beat(clean, template, r_pos, rr, QRS_HALF_WIDTH_S * fs)
        clean *= rng.uniform(0.7, 1.3, size=(len(LEADS), 1))
        # One scale for all leads: electrode noise does not grow with a lead's QRS amplitude.
        scale = float(np.sqrt(np.mean(clean**2))) + 1e-6
        t = np.arange(n) / fs
        wander_freq = rng.uniform(0.05, 0.5)
        wander = rng.uniform(0.0, 0.3, size=(len(LEADS), 1)) * np.sin(
            2 * np.pi * wander_freq * t + rng.uniform(0, 2 * np.pi, size=(len(LEADS), 1))
        )
        noise = rng.normal(0.0, self.noise_std, size=clean.shape)
        return zscore(clean + scale * (wander + noise), np.float32)

    def make_record(self, split: str, index: int) -> dict[str, Any]:
        """The WebDataset sample ``index`` of ``split``; depends only on (seed, split, index)."""
        rng = np.random.default_rng([self.seed, SPLITS.index(split), index])
        hr_class = str(rng.choice(list(HEART_RATE_CLASSES)))
        rhythm = str(rng.choice(list(RHYTHM_JITTER)))
        peaks, heart_rate = self._r_peak_times(rng, hr_class, rhythm)
        ecg = self._signal(rng, peaks)
        key = f"synthetic_{split}_{index:06d}"
        answers = {"heart-rate": hr_class, "rhythm": rhythm}
        qa = [
            {"question": str(rng.choice(QUESTIONS[kind])), "answer": answer, "question_type": kind}
            for kind, answer in answers.items()
        ]
        meta = {
            "dataset": DATASET,
            "record_id": key,
            "patient_id": key,
            "split": split,
            "sampling_rate": self.sampling_rate,
            "leads": list(LEADS),
            "labels": {
                "heart_rate_bpm": round(float(heart_rate), 2),
                "heart_rate_class": hr_class,
                "rhythm": rhythm,
            },
            "qa": qa,
        }
        return {"__key__": key, "ecg.npy": ecg, "json": meta}

    def records(self) -> Iterator[SourceRecord]:
        """Every record of every split, by ``(split, index)``; one ECG per (synthetic) patient."""
        for split, size in self.split_sizes().items():
            for index in range(size):
                key = f"synthetic_{split}_{index:06d}"
                yield SourceRecord(key, key, location=(split, index), split=split)

    def items(self, record: SourceRecord) -> list[dict[str, Any]]:
        """The heart-rate and rhythm questions of ``record`` (drawn with its signal: it is generated)."""
        return self.make_record(*record.location)["json"]["qa"]

    def samples(self, split: str) -> Iterator[dict[str, Any]]:
        return (self.make_record(split, i) for i in range(self.split_sizes()[split]))

    def manifest_extras(self) -> dict[str, Any]:
        return {
            "preprocessing": {
                "sampling_rate": self.sampling_rate,
                "num_samples": self.num_samples,
                "leads": list(LEADS),
                MANIFEST_KEYS["normalization"]: "per-lead z-score",
            },
        }

    def _run_samples(self, split: str, start: int, previous: Path | None) -> Iterator[dict[str, Any]]:
        """Records ``start, start + 1, ...`` of ``split`` (a run of shards is a split): each depends only
        on (seed, split, index), so a damaged shard is written again alone (:func:`repair_shards`)."""
        return (self.make_record(split, i) for i in range(start, self.split_sizes()[split]))
