"""``ecglm demo``'s web page: a bundle in front of people, on Gradio (docs/serving.md).

Upload an ECG file (WFDB as a .zip of its .hea and .dat, or the files themselves; .edf / .bdf, .csv,
.npy) or take the example, see its 12-lead printout as ``ecglm render`` draws it, window by window,
ask preset or free questions and read the answers per 10 s window; an image-path model also takes a
photo or scan of a printout (PNG / JPEG). The model card (the parts, the base LLM, the evaluation
table with its no-signal and shuffled-ECG gaps when the bundle has one, "not a medical device") is on
the page.

Nothing here parses or answers on its own: uploads are read by :mod:`ecglm.serving.requests` (as
``ecglm serve`` reads them: the file name gives only the format, never a path; no pickle; a private
temporary folder for the readers that need one) and answered by
:func:`ecglm.serving.answering.answer_jobs` (as ``ecglm serve`` and ``ecglm ask`` answer).
:class:`DemoModel` is the page's logic without Gradio, :func:`build_page` the page.
"""

from __future__ import annotations

import io
import re
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecglm.records import Recording
from ecglm.serving.requests import (
    Job,
    Limits,
    RequestError,
    image_job,
    parse_fs,
    parse_leads,
    parse_questions,
    read_upload,
    recording_job,
)

#: Suffixes of picture uploads (image-path models).
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Suffixes of a WFDB record's own files, uploaded side by side instead of zipped.
WFDB_SUFFIXES = (".hea", ".dat", ".xyz", ".atr", ".mat")
#: Questions offered when the bundle records no training questions and none were given (--questions).
GENERAL_QUESTIONS = (
    "Is the rhythm regular or irregular?",
    "What is the heart rate category of this ECG: bradycardia, normal or tachycardia?",
    "Does this ECG show atrial fibrillation?",
    "Describe this ECG.",
)
NOT_A_MEDICAL_DEVICE = (
    "**Not a medical device.** A research model: not validated for clinical use; its answers must "
    "not inform the care of a patient."
)
_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.S)


@dataclass
class Answered:
    """What the page shows for one ask: the printouts (image, caption), the answer rows
    ``[window, seconds, question, answer]`` and a line on what was read."""

    printouts: list[tuple[np.ndarray, str]]
    rows: list[list[Any]] = field(default_factory=list)
    source: str = ""


class DemoModel:
    """A bundle loaded once for the page, and everything the page does with it, without Gradio.

    Args:
        model: The bundle folder.
        overrides: ``{part: {key: value}}`` (``--override``), as ``ecglm ask`` takes them.
        max_new_tokens: Longest answer, in tokens.
        generate_batch_size: (window, question) pairs per ``generate`` call.
        limits: What one ask may upload and ask (:class:`~ecglm.serving.requests.Limits`).
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        questions: Preset questions (default: the bundle's few-shot demonstrations' questions, else
            :data:`GENERAL_QUESTIONS`).
        example: The example record: a file ``read_recording`` reads, or a :class:`Recording`
            (default: none; :func:`synthetic_example` makes one).
        trust_remote_code: As for ``ecglm ask``.
    """

    def __init__(
        self,
        model: str | Path,
        overrides: dict[str, dict[str, Any]] | None = None,
        max_new_tokens: int = 64,
        generate_batch_size: int = 8,
        limits: Limits | None = None,
        device: str | None = None,
        questions: Sequence[str] | None = None,
        example: str | Path | Recording | None = None,
        trust_remote_code: bool = False,
    ):
        import torch

        from ecglm.bundle import CARD_FILE, check_bundle
        from ecglm.ecg import Preprocessing
        from ecglm.model import ECGLM, Decoding

        self.bundle = Path(model)
        self.config = check_bundle(model, trust_remote_code=trust_remote_code, overrides=overrides or {})
        card_path = self.bundle / CARD_FILE
        self.card = card_path.read_text() if card_path.is_file() else ""
        pre = self.config.get("preprocessing")
        self.preprocessing = Preprocessing(**pre) if isinstance(pre, dict) else None
        self.reads_pictures = self.preprocessing is None
        self.draws_printouts = bool(self.config.get("image"))
        self.limits = limits or Limits()
        self.example = example
        self.model = ECGLM.from_pretrained(
            model,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
            trust_remote_code=trust_remote_code,
            overrides=overrides or {},
        )
        self.model.eval()
        self.decoding = Decoding(max_new_tokens=max_new_tokens)
        self.generate_batch_size = generate_batch_size
        self.questions = list(questions or self._trained_questions() or GENERAL_QUESTIONS)
        # One model on a shared machine: one ask at a time (Gradio's queue also runs one per event).
        self._lock = threading.Lock()

    def _trained_questions(self) -> list[str]:
        """The questions of the few-shot demonstrations the bundle records (a bundle records no other
        training questions), in order, once each."""
        found: list[str] = []
        for shots in (self.config.get("demonstrations") or {}).values():
            for shot in shots or []:
                question = str(shot.get("question", "")).strip() if isinstance(shot, dict) else ""
                if question and question not in found:
                    found.append(question)
        return found

    # --- reading ------------------------------------------------------------------------------------

    def upload_formats(self) -> list[str]:
        """The suffixes the upload box takes."""
        signals = [] if self.reads_pictures else [".zip", ".edf", ".bdf", ".csv", ".npy", *WFDB_SUFFIXES]
        return signals + (list(PICTURE_SUFFIXES) if self.reads_pictures or self.draws_printouts else [])

    def read_files(self, paths: Sequence[str | Path], fs: Any = None, leads: Any = None) -> Recording | bytes:
        """The recording in uploaded files (``paths``: Gradio's copies, named as the user's files),
        or a picture's bytes. Several files must be one WFDB record (.hea with its .dat); they are
        zipped in memory and read as ``ecglm serve`` reads a WFDB zip."""
        files = [Path(p) for p in paths or []]
        if not files:
            raise RequestError("no file: upload an ECG (or take the example)", 422)
        for path in files:
            if path.stat().st_size > self.limits.max_upload_bytes:
                raise RequestError(
                    f"file {path.name!r}: over the limit of {self.limits.max_upload_bytes} bytes "
                    "(ecglm demo --max_upload_mb)",
                    413,
                )
        suffixes = [p.suffix.lower() for p in files]
        if len(files) == 1 and suffixes[0] in PICTURE_SUFFIXES:
            if not (self.reads_pictures or self.draws_printouts):
                raise RequestError("this model reads ECG signals, not pictures: upload a record", 422)
            return files[0].read_bytes()
        if len(files) > 1 or suffixes[0] in WFDB_SUFFIXES:
            if ".hea" not in suffixes or not set(suffixes) <= set(WFDB_SUFFIXES):
                raise RequestError(
                    f"files {[p.name for p in files]}: upload one record: one file, or a WFDB record's "
                    ".hea with its .dat (or a .zip of them)",
                    422,
                )
            return read_upload("record.zip", _zipped(files), parse_fs(fs), parse_leads(leads))
        return read_upload(files[0].name, files[0].read_bytes(), parse_fs(fs), parse_leads(leads))

    def example_recording(self) -> Recording:
        """The example record (``--example``, read once), or a refusal saying how to offer one."""
        from ecglm.records import RecordError, read_recording

        if self.example is None:
            raise RequestError("no example on this page: start it with --example RECORD", 422)
        if not isinstance(self.example, Recording):
            try:
                self.example = read_recording(self.example)
            except RecordError as err:
                raise RequestError(f"the example: {err}", 422) from None
        return self.example

    # --- answering ----------------------------------------------------------------------------------

    def job(self, ecg: Recording | bytes, questions: Sequence[str], window: str, what: str) -> Job:
        asked = parse_questions(list(questions), self.limits)
        if isinstance(ecg, bytes):
            return image_job(ecg, asked, what)
        return recording_job(ecg, asked, self.preprocessing, window, self.limits, what)

    def printouts(self, ecg: Recording | bytes, job: Job | None = None) -> list[tuple[np.ndarray, str]]:
        """The printout of each window, as ``ecglm render`` draws it (the record's 12 standard leads in
        their own units and rate), or the uploaded picture; for a model that reads printouts drawn
        from signals, also each window as the model reads it (its printout, at its size)."""
        from ecglm.data.preprocess import select_leads
        from ecglm.render import render_ecg

        if isinstance(ecg, bytes):
            picture = job.images[0] if job is not None else _picture(ecg)
            return [(picture, "the uploaded picture")]
        seconds = 10.0
        if self.preprocessing is not None:
            seconds = self.preprocessing.num_samples / self.preprocessing.sampling_rate
        count = len(job.windows) if job is not None else 1
        try:
            signal = select_leads(ecg.signal, ecg.leads, ecg.source)
        except ValueError as err:
            raise RequestError(str(err), 422) from None
        shown = []
        for i in range(count):
            start = round(i * seconds * ecg.fs)
            piece = signal[:, start : start + round(max(seconds, 10.0) * ecg.fs)]
            if piece.shape[1] < round(10.0 * ecg.fs):  # the printout draws 10 s: the record's last 10
                piece = signal[:, -round(10.0 * ecg.fs) :]
            try:
                image = render_ecg(np.nan_to_num(piece), ecg.fs, dpi=100)
            except ValueError as err:
                raise RequestError(f"{ecg.source}: {err}", 422) from None
            label = f"window {i}: {i * seconds:g}-{(i + 1) * seconds:g} s"
            shown.append((image, f"{label} ({ecg.units}, {ecg.fs:g} Hz, as `ecglm render` draws it)"))
            if self.draws_printouts and job is not None:
                shown.append((self._model_view(job.windows[i]), f"{label}, as the model reads it"))
        return shown

    def _model_view(self, window: np.ndarray) -> np.ndarray:
        from ecglm.inference import printout_of

        drawn = printout_of(self.model)({"ecg": window, "key": "demo"}, augment=False)
        return np.ascontiguousarray(drawn[0].transpose(1, 2, 0))

    def ask(self, ecg: Recording | bytes, questions: Sequence[str], window: str = "first") -> Answered:
        """Every question about every window of ``ecg`` (or about the picture), answered."""
        from ecglm.serving.answering import answer_jobs

        what = "the picture" if isinstance(ecg, bytes) else ecg.source
        job = self.job(ecg, questions, window, what)
        with self._lock:
            answers = answer_jobs(self.model, [job], self.decoding, self.generate_batch_size)[0]
        seconds = 10.0
        if self.preprocessing is not None:
            seconds = self.preprocessing.num_samples / self.preprocessing.sampling_rate
        count = max(len(job.windows), len(job.images))
        rows = [
            [
                w,
                f"{w * seconds:g}-{(w + 1) * seconds:g} s" if job.windows else "-",
                q,
                answers[w * len(job.questions) + i],
            ]
            for w in range(count)
            for i, q in enumerate(job.questions)
        ]
        return Answered(self.printouts(ecg, job), rows, describe(job))

    # --- the card -----------------------------------------------------------------------------------

    def card_markdown(self) -> str:
        """The bundle's model card (its README.md without front matter) after a summary of the model."""
        components = self.config.get("components", {})
        parts = ", ".join(
            f"{part} `{(components.get(part) or {}).get('class_path')}`"
            for part in ("encoder", "connector", "backbone", "policy")
            if components.get(part)
        )
        base = ((components.get("backbone") or {}).get("init_args") or {}).get("model")
        reads = "pictures of ECG printouts" if self.reads_pictures else "12-lead ECG signals"
        if self.draws_printouts:
            reads += " drawn as printouts (and photos or scans of printouts)"
        lines = [
            f"**Model** `{self.bundle.resolve().name}` (ecglm {self.config.get('ecglm_version')}): reads "
            f"{reads}; base LLM `{base}`; {parts}.",
        ]
        if self.preprocessing is not None:
            pre = self.preprocessing
            lines.append(
                f"**Input**: windows of {pre.num_samples / pre.sampling_rate:g} s at "
                f"{pre.sampling_rate:g} Hz ({pre.num_samples} samples)."
            )
        lines.append(f"**Decoding**: greedy, at most {self.decoding.max_new_tokens} new tokens.")
        card = _FRONT_MATTER.sub("", self.card).strip()
        if "## Evaluation" not in card:
            lines.append(
                "*This bundle records no evaluation: export it after `ecglm evaluate` to have its table, "
                "with the gaps against the no-signal and shuffled-ECG controls, here.*"
            )
        return "\n\n".join([*lines, card or "*The bundle has no model card (README.md).*"])


def describe(job: Job) -> str:
    """One line on what was read."""
    source = job.source
    if "image" in source:
        width, height = source["size"]
        return f"a picture of {width} x {height} px"
    leads = len(source.get("leads", []))
    return (
        f"{source.get('file')}: {source.get('seconds', 0):.1f} s at {source.get('fs', 0):g} Hz, "
        f"{leads} leads; {len(job.windows)} window(s) answered"
    )


def _zipped(files: Sequence[Path]) -> bytes:
    """A WFDB record's files, zipped in memory under their own base names (``read_upload`` unpacks
    them, under names it checks, into its private folder)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in files:
            archive.writestr(path.name, path.read_bytes())
    return buffer.getvalue()


def _picture(data: bytes) -> np.ndarray:
    from ecglm.serving.requests import _decoded_image

    return _decoded_image(data, "the picture")


def synthetic_example(seed: int = 0) -> tuple[Recording, list[str]]:
    """A 10 s synthetic 12-lead ECG of the quickstart's data set (:mod:`ecglm.data.synthetic`, the
    ``synthetic`` extra: neurokit2's beats) and the questions asked about it there."""
    from ecglm.data.synthetic import SyntheticHeartQA
    from ecglm.ecg import LEADS

    builder = SyntheticHeartQA(num_train=1, num_val=0, num_test=0, seed=seed)
    record = builder.make_record("train", 0)
    recording = Recording(
        np.asarray(record["ecg.npy"], dtype=np.float64).T,
        list(LEADS),
        float(builder.sampling_rate),
        "the example (synthetic)",
        units="z-scored",
    )
    return recording, [qa["question"] for qa in record["json"]["qa"]]
