"""``ecglm serve``: the real server (LitServe, a worker process) on 127.0.0.1 with a tiny random bundle,
its answers against :func:`ecglm.inference.answer` on the same record, every bad input refused with a
4xx naming the problem while the server keeps serving, an API key, and OpenAI's own client."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("litserve")
requests = pytest.importorskip("requests")

#: A loaded machine (other jobs on two cores) can take minutes to start a server and its worker.
pytestmark = pytest.mark.timeout(900)
KEY = "test-key-24"
HEADERS = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = ["Is the rhythm regular or irregular?", "Does this ECG show atrial fibrillation?"]
MAX_NEW_TOKENS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[str, str]:
    from ecglm.testing import saved_signal_bundle

    return saved_signal_bundle(tmp_path_factory.mktemp("signal"))


def _serve(path: str, llm: str, log: Path, *extra: str, port: int | None = None, env: dict | None = None):
    """``ecglm serve`` of bundle ``path`` in a subprocess on ``port`` (default: a free one), once it is
    healthy: ``(process, base URL)``."""
    port = port or _free_port()
    args = [sys.executable, "-m", "ecglm", "serve", "--model", path, "--override", f"backbone.model={llm}"]
    args += ["--port", str(port), "--max_new_tokens", str(MAX_NEW_TOKENS), "--api_key_env", "ECGLM_TEST_KEY"]
    env = {**os.environ, "ECGLM_TEST_KEY": KEY, **(env or {})}
    with log.open("w") as out:
        process = subprocess.Popen([*args, *extra], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the server exited: {log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", headers=HEADERS, timeout=2).status_code == 200:
                    return process, url
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        pytest.fail(f"the server did not start: {log.read_text()[-3000:]}")
    except BaseException:  # not started in time, or the test interrupted: leave nothing running
        _stop(process)
        raise


def _stop(process) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    """The signal bundle served with small limits: ``(base URL, log file)``."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    limits = ["--max_upload_mb", "3", "--max_windows", "2", "--max_questions", "3", "--max_batch_size", "8"]
    process, url = _serve(*bundle, log, *limits)
    yield url, log
    _stop(process)


@pytest.fixture(scope="module")
def model(bundle):
    from ecglm.model import ECGLM

    path, llm = bundle
    return ECGLM.from_pretrained(path, device="cpu", overrides={"backbone": {"model": llm}})


@pytest.fixture(scope="module")
def ptb(ptb_record):
    from ecglm.records import read_recording

    folder = ptb_record.parent
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for suffix in (".hea", ".dat", ".xyz"):
            archive.write(folder / f"{ptb_record.name}{suffix}", f"{ptb_record.name}{suffix}")
    return read_recording(ptb_record.with_suffix(".hea")), buffer.getvalue()


def _expected(model, recording, questions, window="first"):
    from ecglm.inference import answer
    from ecglm.model import Decoding

    signal = recording.signal
    return answer(
        model, signal, recording.fs, recording.leads, list(questions), Decoding(MAX_NEW_TOKENS), window
    )


def _sent(recording, seconds: float = 12.0, start: float = 0.0):
    """The first ``seconds`` of ``recording`` from ``start``, rounded as :func:`_csv` writes it."""
    from ecglm.records import Recording

    signal = recording.signal[round(start * recording.fs) :][: round(seconds * recording.fs)]
    return Recording(np.round(signal, 6), recording.leads, recording.fs, "sent")


def _csv(recording, seconds: float = 12.0) -> bytes:
    rows = _sent(recording, seconds).signal
    lines = [",".join(recording.leads)] + [",".join(f"{v:.6f}" for v in row) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def _npy(recording, seconds: float = 12.0) -> bytes:
    out = io.BytesIO()
    np.save(out, _sent(recording, seconds).signal)
    return out.getvalue()


def _chat(filename: str, data: bytes, question: str = QUESTIONS[0], **extra) -> dict:
    part = {"type": "file", "file": {"filename": filename, "file_data": _data_url(data)}}
    content = [{"type": "text", "text": question}, part]
    return {"model": "bundle", "messages": [{"role": "user", "content": content}], **extra}


def _data_url(data: bytes, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_answer_endpoint_gives_what_answer_gives_on_the_real_ptb_record(server, model, ptb):
    url, _ = server
    recording, archive = ptb
    files = {"file": ("s0010_re.zip", archive, "application/zip")}
    data = {"question": QUESTIONS}
    response = requests.post(f"{url}/v1/answer", files=files, data=data, headers=HEADERS, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    rows = body["answers"]
    assert [(r["window"], r["question"]) for r in rows] == [(0, QUESTIONS[0]), (0, QUESTIONS[1])]
    assert [r["answer"] for r in rows] == _expected(model, recording, QUESTIONS)
    assert body["decoding"]["max_new_tokens"] == MAX_NEW_TOKENS
    assert body["version"]["ecglm"] and body["model"] == "bundle"
    assert body["source"]["fs"] == 1000.0 and body["source"]["leads"][:3] == ["i", "ii", "iii"]


def test_chat_completions_read_csv_and_npy_file_parts_with_rate_and_leads_in_the_body(server, model, ptb):
    url, _ = server
    recording, _ = ptb
    expected = _expected(model, _sent(recording), [QUESTIONS[0]])
    csv = _chat("ecg.csv", _csv(recording), ecg_fs=recording.fs)
    npy = _chat("ecg.npy", _npy(recording), ecg_fs=recording.fs, ecg_leads=",".join(recording.leads))
    for request in (csv, npy):
        response = requests.post(f"{url}/v1/chat/completions", json=request, headers=HEADERS, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected[0]


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(server, model, ptb):
    url, _ = server
    recording, _ = ptb
    questions = ["Is the rhythm regular or irregular?", "Which leads show ST elevation?", "Heart rate?"]
    # Different records (shifted starts) and questions, so that a mixed-up answer shows.
    cases = [(q, s) for q in questions for s in (0.0, 1.5)]

    def one(case):
        question, start = case
        csv = _csv(_sent(recording, 12.0, start))
        request = _chat("ecg.csv", csv, question, ecg_fs=recording.fs)
        response = requests.post(f"{url}/v1/chat/completions", json=request, headers=HEADERS, timeout=120)
        return response.status_code, response.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(one, cases))
    for (question, start), (status, text) in zip(cases, got, strict=True):
        assert status == 200
        assert text == _expected(model, _sent(_sent(recording, 12.0, start)), [question])[0], (
            question,
            start,
        )


def _bad_requests(recording, archive):
    csv = _csv(recording, 1.0)
    big = b"0" * (5 * 1024 * 1024)
    return {
        "malformed JSON": ("chat", b'{"messages": [', 400, "malformed JSON"),
        "no messages": ("chat", {"model": "x"}, 400, "messages"),
        "two ECGs": ("chat", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "q"},
            {"type": "file", "file": {"filename": "a.csv", "file_data": _data_url(csv)}},
            {"type": "file", "file": {"filename": "b.csv", "file_data": _data_url(csv)}}]}]}, 422, "2 ECGs"),
        "not base64": ("chat", _chat("ecg.csv", b"x") | {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "q"},
            {"type": "file", "file": {"filename": "a.csv", "file_data": "data:text/csv;base64,@@@"}}]}]},
            400, "base64"),
        "unknown format": ("chat", _chat("ecg.docx", b"abc"), 415, "unsupported format .docx"),
        "csv without rate": ("chat", _chat("ecg.csv", csv), 422, "ecg_fs"),
        "npy without leads": ("chat", _chat("ecg.npy", _npy(recording), ecg_fs=1000), 422, "ecg_leads"),
        "pickled npy": ("chat", _chat("ecg.npy", _pickled_npy(), ecg_fs=1000, ecg_leads="I"), 422, "pickle"),
        "unreadable edf": ("chat", _chat("ecg.edf", b"not an edf at all" * 10), 422, "ecg.edf"),
        "not a zip": ("chat", _chat("ecg.zip", b"PK no zip"), 422, "not a zip"),
        "too short": ("chat", _chat("ecg.csv", _csv(recording, 3.0), ecg_fs=1000), 422, "shorter than"),
        "a picture for a signal model": ("chat", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "q"},
            {"type": "image_url", "image_url": {"url": _data_url(b"x", "image/png")}}]}]},
            422, "not pictures"),
        "oversize upload": ("chat", _chat("ecg.csv", big, ecg_fs=1000), 413, "over 4"),
        "too many windows": ("answer", ({"question": "q", "window": "all"}, archive), 413, "--max_windows"),
        "too many questions": ("answer", ({"question": ["a", "b", "c", "d"]}, archive), 413, "4 questions"),
        "no question": ("answer", ({}, archive), 422, "no question"),
        "no file": ("answer", ({"question": "q"}, None), 422, "no file"),
    }  # fmt: skip


def _pickled_npy() -> bytes:
    out = io.BytesIO()
    np.save(out, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return out.getvalue()


def _send(url: str, kind: str, payload, headers=HEADERS) -> requests.Response:
    if kind == "chat":
        content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = {**headers, "content-type": "application/json"}
        return requests.post(f"{url}/v1/chat/completions", data=content, headers=headers, timeout=60)
    fields, archive = payload
    files = {"file": ("s0010_re.zip", archive, "application/zip")} if archive else {"dummy": ("d", b"")}
    return requests.post(f"{url}/v1/answer", data=fields, files=files, headers=headers, timeout=60)


def test_every_bad_request_is_a_4xx_naming_the_problem_and_the_server_keeps_answering(server, model, ptb):
    url, _ = server
    recording, archive = ptb
    for name, (kind, payload, status, words) in _bad_requests(recording, archive).items():
        response = _send(url, kind, payload)
        assert response.status_code == status, (name, response.text)
        assert words in response.json()["error"]["message"], (name, response.text)
    good = _chat("ecg.csv", _csv(recording), ecg_fs=recording.fs)
    response = requests.post(f"{url}/v1/chat/completions", json=good, headers=HEADERS, timeout=60)
    assert (
        response.json()["choices"][0]["message"]["content"]
        == _expected(model, _sent(recording), [QUESTIONS[0]])[0]
    )


def test_without_the_api_key_every_endpoint_is_refused(server, ptb):
    url, _ = server
    recording, _ = ptb
    good = _chat("ecg.csv", _csv(recording), ecg_fs=recording.fs)
    assert requests.post(f"{url}/v1/chat/completions", json=good, timeout=30).status_code == 401
    assert requests.get(f"{url}/v1/models", timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (
        requests.post(f"{url}/v1/chat/completions", json=good, headers=wrong, timeout=30).status_code == 401
    )


def test_models_lists_the_bundle_with_its_card(server, bundle):
    url, _ = server
    entry = requests.get(f"{url}/v1/models", headers=HEADERS, timeout=30).json()["data"][0]
    assert entry["id"] == "bundle" and entry["reads"] == "signals"
    assert entry["parts"]["encoder"] == "ecglm.encoders.Wav2Vec2ECGEncoder"
    assert entry["card"] == (Path(bundle[0]) / "README.md").read_text()
    assert "Not a medical device" in entry["card"]
    assert entry["preprocessing"] == {"sampling_rate": 250, "num_samples": 2500, "normalization": "zscore"}


def test_the_openai_client_round_trips_with_window_all_in_an_extra_field(server, model, ptb):
    openai = pytest.importorskip("openai")
    url, _ = server
    recording, _ = ptb
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    csv = _csv(recording, 21.0)  # two 10 s windows
    content = [
        {"type": "text", "text": QUESTIONS[1]},
        {"type": "file", "file": {"filename": "ecg.csv", "file_data": _data_url(csv, "text/csv")}},
    ]
    completion = client.chat.completions.create(
        model="bundle",
        messages=[{"role": "user", "content": content}],
        extra_body={"ecg_fs": recording.fs, "ecg_window": "all"},
    )
    two = _sent(recording, 21.0)
    expected = _expected(model, two, [QUESTIONS[1]], "all")
    assert len(expected) == 2
    assert completion.model_extra["ecg_answers"] == [
        {"window": i, "answer": a} for i, a in enumerate(expected)
    ]
    assert completion.choices[0].message.content == "\n".join(
        f"window {i}: {a}" for i, a in enumerate(expected)
    )
    assert [m.id for m in client.models.list()] == ["bundle"]
    with pytest.raises(openai.BadRequestError, match=r"messages"):
        client.chat.completions.create(model="bundle", messages=[])


def test_each_request_is_logged_on_one_line_with_id_size_status_and_latency(server):
    url, log = server
    response = requests.get(f"{url}/v1/models", headers=HEADERS, timeout=30)
    request_id = response.headers["x-request-id"]
    time.sleep(0.5)
    lines = [line for line in log.read_text().splitlines() if f"request {request_id} " in line]
    assert len(lines) == 1, log.read_text()[-2000:]
    assert " GET /v1/models 0 B -> 200 in " in lines[0] and lines[0].endswith(" s")


def test_an_image_model_answers_a_picture_and_a_record_as_answer_image_and_answer_do(tmp_path_factory, ptb):
    from PIL import Image

    from ecglm.inference import answer_image
    from ecglm.model import ECGLM, Decoding
    from ecglm.render import render_ecg
    from ecglm.testing import saved_image_bundle

    path, llm = saved_image_bundle(tmp_path_factory.mktemp("image"), channels=[8, 16])
    model = ECGLM.from_pretrained(path, device="cpu", overrides={"backbone": {"model": llm}})
    recording, archive = ptb
    picture = render_ecg(recording.signal[:10000, :12].T, recording.fs, dpi=30)
    png = io.BytesIO()
    Image.fromarray(picture).save(png, format="PNG")
    process, url = _serve(path, llm, tmp_path_factory.mktemp("image-serve") / "serve.log")
    try:
        content = [
            {"type": "text", "text": QUESTIONS[0]},
            {"type": "image_url", "image_url": {"url": _data_url(png.getvalue(), "image/png")}},
        ]
        request = {"model": "bundle", "messages": [{"role": "user", "content": content}]}
        response = requests.post(f"{url}/v1/chat/completions", json=request, headers=HEADERS, timeout=60)
        assert response.status_code == 200, response.text
        expected = answer_image(model, picture, QUESTIONS[0], Decoding(MAX_NEW_TOKENS))
        assert response.json()["choices"][0]["message"]["content"] == expected
        # A record is drawn by the model's own printout, as answer() draws it.
        files = {"file": ("s0010_re.zip", archive, "application/zip")}
        response = requests.post(
            f"{url}/v1/answer", files=files, data={"question": QUESTIONS[0]}, headers=HEADERS, timeout=60
        )
        assert response.status_code == 200, response.text
        assert response.json()["answers"][0]["answer"] == _expected(model, recording, [QUESTIONS[0]])[0]
        models = requests.get(f"{url}/v1/models", headers=HEADERS, timeout=30).json()
        assert models["data"][0]["reads"] == "pictures"
    finally:
        _stop(process)


def _raw(
    url: str, body: bytes, path: str = "/v1/chat/completions", declared: int | None = None
) -> socket.socket:
    """A socket that has sent ``body`` as the start of a POST (``declared`` bytes announced)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared or len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_clients_that_go_away_or_upload_slowly_do_not_disturb_the_server(server, model, ptb):
    url, _ = server
    recording, _ = ptb
    good = json.dumps(_chat("ecg.csv", _csv(recording), ecg_fs=recording.fs)).encode()
    expected = _expected(model, _sent(recording), [QUESTIONS[0]])[0]
    _raw(url, good[:1000], declared=len(good)).close()  # gone halfway through its upload
    _raw(url, good).close()  # gone before its answer
    slow = _raw(url, b"", declared=len(good))
    for start in range(0, len(good), len(good) // 4 + 1):  # the upload trickles in over a second
        time.sleep(0.25)
        slow.sendall(good[start : start + len(good) // 4 + 1])
    reply = b""
    while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
        chunk = slow.recv(65536)
        if not chunk:
            break
        reply += chunk
    slow.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["choices"][0]["message"]["content"] == expected
    response = requests.post(f"{url}/v1/chat/completions", data=good, headers=HEADERS, timeout=60)
    assert response.json()["choices"][0]["message"]["content"] == expected


def _family(pid: int) -> list:
    import psutil

    return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]


def _gone(processes: list, seconds: float = 60.0) -> list:
    import psutil

    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for p in processes:
            try:  # an exited process whose parent is gone may stay a zombie where no init reaps it
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for p in alive:  # leave nothing behind for the next test, then fail
        p.kill()
    return alive


def test_stopped_or_killed_mid_load_the_server_leaves_nothing_behind_and_restarts(bundle, ptb, tmp_path):
    import signal

    recording, _ = ptb
    good = _chat("ecg.csv", _csv(recording), ecg_fs=recording.fs)
    port = _free_port()
    for how in (signal.SIGTERM, signal.SIGKILL):
        private = tmp_path / f"tmp-{how.name}"
        private.mkdir()
        process, url = _serve(*bundle, tmp_path / f"{how.name}.log", port=port, env={"TMPDIR": str(private)})
        family = _family(process.pid)
        assert len(family) >= 3  # the main process, an HTTP server, an inference worker
        with ThreadPoolExecutor(8) as pool:
            sent = [
                pool.submit(
                    requests.post, f"{url}/v1/chat/completions", json=good, headers=HEADERS, timeout=60
                )
                for _ in range(8)
            ]
            time.sleep(0.3)
            process.send_signal(how)
            outcomes = [f.exception() or f.result().status_code for f in sent]
        assert not _gone(family), f"{how.name} left processes running"
        assert not list(private.glob("ecglm-serve-*")), f"{how.name} left an upload folder"
        if how == signal.SIGTERM:  # a graceful stop: what was in flight was answered
            assert all(o == 200 or isinstance(o, requests.ConnectionError) for o in outcomes), outcomes
            assert outcomes.count(200) >= 1, outcomes
        else:  # killed: the requests in flight get an answer or an error, none hangs
            assert all(o in (200, 500) or isinstance(o, requests.ConnectionError) for o in outcomes), outcomes
    process, url = _serve(*bundle, tmp_path / "again.log", port=port)  # the same port, free again
    try:
        response = requests.post(f"{url}/v1/chat/completions", json=good, headers=HEADERS, timeout=60)
        assert response.status_code == 200
    finally:
        _stop(process)
