"""What a client sent to ``ecglm serve``, checked and turned into a :class:`Job`: the windows (or
pictures) to answer and the questions, before anything reaches the model.

Everything here runs in the HTTP process, so a bad request is refused there with a 4xx naming the
problem (:class:`RequestError`) and never joins a batch of other clients' requests. An upload is
parsed from memory; the readers that need a file (WFDB, EDF) get a private temporary folder, removed
when the request is read, whose file names are ours (``upload.edf``, ``upload.hea``): a client's
file name gives only the format, never a path. Nothing is unpickled (``np.load(allow_pickle=False)``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecglm.ecg import Preprocessing
from ecglm.errors import EcglmError
from ecglm.records import RecordError, Recording, installed_readers, prepare, read_recording

#: Formats a client may upload, by the suffix of the file name it gives (WFDB: a .zip of .hea/.dat).
UPLOAD_FORMATS = (".zip", ".edf", ".bdf", ".csv", ".npy")
#: Picture formats of an ``image_url`` data URL.
IMAGE_MIMES = ("image/png", "image/jpeg")
#: A data URL: ``data:<mime>;base64,<payload>``.
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+/-]*)(?:;[\w=.-]+)*;base64,(?P<payload>.*)$", re.S)
#: A member of an uploaded WFDB zip: a plain file name (no folder, no ``..``).
_MEMBER = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


class RequestError(EcglmError, ValueError):
    """A request ``ecglm serve`` refuses: ``status`` is the HTTP code (400 malformed, 401 no key, 413 too
    large, 422 unreadable ECG or a value out of range), the message says what is wrong and what to do."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask: bytes uploaded, windows of a record, questions."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_windows: int = 32
    max_questions: int = 16


@dataclass
class Job:
    """One request, ready for the model: ``windows`` (each ``(12, num_samples)``) or ``images`` (RGB
    uint8), asked every question; ``source`` says what was read (format, rate, leads, seconds)."""

    questions: list[str]
    windows: list[np.ndarray] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def pairs(self) -> int:
        return len(self.questions) * max(len(self.windows), len(self.images))


def decode_data_url(url: str, what: str) -> tuple[str, bytes]:
    """``(mime, bytes)`` of a base64 data URL; refused (400) naming ``what`` when it is not one."""
    match = _DATA_URL.match(url) if isinstance(url, str) else None
    if match is None:
        raise RequestError(f"{what}: not a base64 data URL (data:<mime>;base64,...)", 400)
    try:
        return match["mime"], base64.b64decode(match["payload"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what}: the base64 payload does not decode", 400) from None


def parse_questions(questions: Sequence[Any], limits: Limits) -> list[str]:
    asked = [q.strip() for q in questions if isinstance(q, str) and q.strip()]
    if not asked:
        raise RequestError("no question: give at least one (non-empty text)", 422)
    if len(asked) > limits.max_questions:
        raise RequestError(
            f"{len(asked)} questions: at most {limits.max_questions} a request (--max_questions)", 413
        )
    return asked


def parse_leads(leads: Any) -> list[str] | None:
    """Lead names as a list or a comma-separated string (``I,II,III,...``)."""
    if leads is None or leads == "":
        return None
    if isinstance(leads, str):
        leads = leads.split(",")
    if not isinstance(leads, list) or not all(isinstance(x, str) and x.strip() for x in leads):
        raise RequestError("ecg_leads: lead names as a list or a comma-separated string", 422)
    return [x.strip() for x in leads]


def parse_fs(fs: Any) -> float | None:
    if fs is None or fs == "":
        return None
    try:
        value = float(fs)
    except (TypeError, ValueError):
        raise RequestError(f"ecg_fs: {fs!r} is not a sampling rate in Hz", 422) from None
    if not 0 < value <= 100_000:
        raise RequestError(f"ecg_fs: {value:g} Hz is not a sampling rate (0 < fs <= 100000)", 422)
    return value


def read_upload(name: str, data: bytes, fs: float | None, leads: list[str] | None) -> Recording:
    """The recording in an uploaded file, its format taken from ``name``'s suffix only."""
    suffix = Path(str(name)).suffix.lower()
    if suffix not in UPLOAD_FORMATS:
        raise RequestError(
            f"file {name!r}: unsupported format {suffix or '(no suffix)'}; upload one of "
            f"{', '.join(UPLOAD_FORMATS)} (WFDB as a .zip of its .hea and .dat)",
            415,
        )
    if not data:
        raise RequestError(f"file {name!r} is empty", 422)
    if suffix in (".csv", ".npy") and fs is None:
        raise RequestError(
            f"file {name!r}: a {suffix} file carries no sampling rate: give ecg_fs (Hz; the fs form field)",
            422,
        )
    if suffix == ".npy" and leads is None:
        raise RequestError(
            f"file {name!r}: a .npy file carries no lead names: give ecg_leads (the leads form field; "
            "e.g. I,II,III,aVR,...)",
            422,
        )
    try:
        if suffix == ".npy":
            return _read_npy(name, data, fs, leads)
        with tempfile.TemporaryDirectory(prefix="ecglm-serve-") as folder:
            path = _write_upload(Path(folder), suffix, data, name)
            try:
                recording = read_recording(path, fs, leads, installed_readers())
            except RecordError as err:  # named without our temporary folder
                raise RequestError(f"file {name!r}: {str(err).replace(folder + '/', '')}", 422) from None
    except RequestError:
        raise
    except RecordError as err:
        raise RequestError(f"file {name!r}: {err}", 422) from None
    except Exception as err:  # a reader library's own error on a damaged file
        raise RequestError(
            f"file {name!r}: not a readable {suffix} ECG ({type(err).__name__})", 422
        ) from None
    return Recording(recording.signal, recording.leads, recording.fs, name, recording.units)


def _read_npy(name: str, data: bytes, fs: float, leads: list[str]) -> Recording:
    from ecglm.records import samples_by_leads

    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise RequestError(f"file {name!r}: not a plain NumPy array ({err})", 422) from None
    if not np.issubdtype(array.dtype, np.number):
        raise RequestError(f"file {name!r}: a {array.dtype} array, not numbers", 422)
    return Recording(samples_by_leads(array, len(leads), name), leads, fs, name)


def _write_upload(folder: Path, suffix: str, data: bytes, name: str) -> Path:
    """The upload in ``folder`` under a name of ours; a WFDB zip's .hea and .dat unpacked there."""
    if suffix != ".zip":
        path = folder / f"upload{suffix}"
        path.write_bytes(data)
        return path
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise RequestError(
            f"file {name!r}: not a zip archive (WFDB: zip the .hea and .dat together)", 422
        ) from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        headers = [m for m in members if m.filename.lower().endswith(".hea")]
        if len(headers) != 1:
            raise RequestError(
                f"file {name!r}: {len(headers)} WFDB headers (.hea) in the zip; give exactly one record", 422
            )
        total = 0
        for member in members:
            base = Path(member.filename).name
            if not _MEMBER.match(base):
                continue  # written only under a plain file name of its own
            total += member.file_size
            if total > 4 * len(data) + (64 << 20):  # a zip bomb
                raise RequestError(f"file {name!r}: unpacks to far more than it holds", 413)
            (folder / base).write_bytes(archive.read(member))
        return folder / Path(headers[0].filename).name


def recording_job(
    recording: Recording,
    questions: list[str],
    preprocessing: Preprocessing | None,
    window: str,
    limits: Limits,
    what: str,
) -> Job:
    """The windows of ``recording`` the model reads (``first`` or ``all``), within ``limits``."""
    if preprocessing is None:
        raise RequestError("this model reads pictures of printouts only: send an image_url (PNG/JPEG)", 422)
    if window not in ("first", "all"):
        raise RequestError(f"ecg_window: {window!r}; one of first, all", 422)
    seconds = preprocessing.num_samples / preprocessing.sampling_rate
    if window == "all" and recording.seconds // seconds > limits.max_windows:
        raise RequestError(
            f"{what}: {recording.seconds:.0f} s is {int(recording.seconds // seconds)} windows of "
            f"{seconds:g} s; "
            f"at most {limits.max_windows} a request (--max_windows): send a shorter record",
            413,
        )
    try:
        windows = prepare(recording, preprocessing, window)
    except RecordError as err:
        raise RequestError(str(err), 422) from None
    if len(windows) * len(questions) > limits.max_windows * limits.max_questions:
        raise RequestError(f"{what}: too many windows x questions in one request", 413)
    source = {"file": what, "fs": recording.fs, "leads": list(recording.leads), "seconds": recording.seconds}
    return Job(questions, windows=list(windows), source=source)


def image_job(data: bytes, questions: list[str], what: str) -> Job:
    from ecglm.inference import read_image

    try:
        picture = read_image(_decoded_image(data, what), what)
    except RecordError as err:
        raise RequestError(str(err), 422) from None
    return Job(questions, images=[picture], source={"image": what, "size": list(picture.shape[1::-1])})


def _decoded_image(data: bytes, what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as picture:
            return np.asarray(picture.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise RequestError(f"{what}: not a PNG / JPEG picture ({type(err).__name__})", 422) from None


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"malformed JSON body: {err}", 400) from None
    if not isinstance(value, dict):
        raise RequestError("the JSON body must be an object", 400)
    return value


def chat_job(
    body: Mapping[str, Any], preprocessing: Preprocessing | None, image_model: bool, limits: Limits
) -> tuple[Job, str]:
    """The job of an OpenAI chat completion request and its ``ecg_window``: the ECG and question from
    the last user message (text parts are the question; one ``file`` or ``image_url`` part the ECG)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: a non-empty list of chat messages is required", 400)
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise RequestError("messages: no user message", 400)
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise RequestError("messages[-1].content: a string or a list of content parts", 400)
    texts = [p.get("text") for p in parts if p.get("type") == "text"]
    ecgs = [p for p in parts if p.get("type") in ("file", "image_url")]
    unknown = sorted({str(p.get("type")) for p in parts} - {"text", "file", "image_url"})
    if unknown:
        raise RequestError(f"content part type(s) {unknown} not supported: text, file, image_url", 400)
    if len(ecgs) != 1:
        raise RequestError(
            f"{len(ecgs)} ECGs in the user message: attach exactly one, as a file part "
            '({"type": "file", "file": {"filename": "ecg.csv", "file_data": "data:...;base64,..."}}) '
            "or an image_url part for image models",
            422,
        )
    question = " ".join(t.strip() for t in texts if isinstance(t, str) and t.strip())
    questions = parse_questions([question], limits)
    window = str(body.get("ecg_window", "first"))
    part = ecgs[0]
    if part["type"] == "image_url":
        if not image_model:
            raise RequestError("this model reads ECG signals, not pictures: send a file part", 422)
        url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
        mime, data = decode_data_url(url, "image_url.url")
        if mime not in IMAGE_MIMES:
            raise RequestError(
                f"image_url: {mime or 'no'} MIME type; send one of {', '.join(IMAGE_MIMES)}", 415
            )
        _check_size(data, limits, "image_url")
        return image_job(data, questions, "image_url"), "first"
    file = part.get("file")
    if not isinstance(file, dict) or not isinstance(file.get("filename"), str):
        raise RequestError(
            "file part: give file.filename (its suffix says the format) and file.file_data", 400
        )
    _, data = decode_data_url(file.get("file_data"), f"file {file['filename']!r}")
    _check_size(data, limits, f"file {file['filename']!r}")
    recording = read_upload(
        file["filename"], data, parse_fs(body.get("ecg_fs")), parse_leads(body.get("ecg_leads"))
    )
    return recording_job(recording, questions, preprocessing, window, limits, file["filename"]), window


def _check_size(data: bytes, limits: Limits, what: str) -> None:
    if len(data) > limits.max_upload_bytes:
        raise RequestError(
            f"{what}: {len(data)} bytes, over the limit of {limits.max_upload_bytes} (--max_upload_mb)", 413
        )
