"""``ecglm serve`` under load: N concurrent clients, bad requests mixed in, against batched ``ecglm ask``.

Starts ``ecglm serve`` on 127.0.0.1 (a subprocess, ``--threads`` CPU threads), then for 1, 4 and 16
concurrent clients sends OpenAI chat completions (a 10.4 s random 12-lead .npy record each, one
question) for ``--seconds``; every 10th request is bad (a .csv without its rate, malformed JSON, an
unknown format, in turn). Prints requests/s, p50/p95 latency of the good requests, the status codes
(the bad ones must all be 4xx, none 5xx) and whether each good answer equals that record's answer
from a pass with one client and no bad requests. The reference is ``ecglm.inference.ask`` batched
(``--batch-size``) over the same records in this process, with the same threads: answers/s.

Then the faults, each with what it left behind: a client gone halfway through its upload, one gone
before its answer and a slow upload (a quarter of the body every 0.25 s), after which a good request
must still get its record's answer; then the server killed (SIGKILL) under 16 clients: how the
requests in flight ended (none may hang), the processes and upload folders left (none may be), and
the restarted server on the same port: seconds to healthy and whether its answer is unchanged.

    .venv/bin/python benchmarks/serve.py                       # a tiny random bundle
    .venv/bin/python benchmarks/serve.py --model quickstart-bundle [--override backbone.model=...]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch

LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
QUESTION = "What is the heart rate category of this ECG?"


def _records(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((2600, 12)).cumsum(0) * 0.01).astype(np.float32) for _ in range(n)]


def _npy(signal: np.ndarray) -> str:
    out = io.BytesIO()
    np.save(out, signal)
    return "data:application/octet-stream;base64," + base64.b64encode(out.getvalue()).decode()


def _good(url: str) -> dict:
    part = {"type": "file", "file": {"filename": "ecg.npy", "file_data": url}}
    content = [{"type": "text", "text": QUESTION}, part]
    return {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "ecg_fs": 250,
        "ecg_leads": LEADS,
    }


def _bad(kind: int, url: str) -> bytes:
    if kind == 0:  # a .csv without its rate
        body = _good("data:text/csv;base64," + base64.b64encode(b"I,II\n1,2\n").decode())
        body["messages"][0]["content"][1]["file"]["filename"] = "ecg.csv"
        body.pop("ecg_fs")
        return json.dumps(body).encode()
    if kind == 1:
        return b'{"messages": [{"role": "user", "content": '  # malformed JSON
    body = _good(url)
    body["messages"][0]["content"][1]["file"]["filename"] = "ecg.docx"  # unknown format
    return json.dumps(body).encode()


def _start(args, port: int, log: Path, tmp: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ecglm", "serve", "--model", args.model, "--port", str(port)]
    cmd += ["--max_new_tokens", str(args.max_new_tokens), "--max_batch_size", str(args.max_batch_size)]
    cmd += ["--batch_timeout", str(args.batch_timeout), "--generate_batch_size", str(args.max_batch_size)]
    cmd += [x for o in args.override for x in ("--override", o)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env["TMPDIR"] = str(tmp)  # the server's private upload folders are made here: the faults count them
    with log.open("a") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except requests.ConnectionError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")


def _load(base: str, urls: list[str], clients: int, seconds: float, bad_every: int) -> dict:
    """``clients`` threads sending requests for ``seconds``: latencies, statuses, answers by record."""
    lock = threading.Lock()
    stats = {"latency": [], "status": {}, "answers": {}, "bad_status": {}}
    counter = iter(range(10**9))
    stop = time.monotonic() + seconds

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < stop:
            with lock:
                n = next(counter)
            record = n % len(urls)
            bad = bad_every and n % bad_every == bad_every - 1
            body = _bad(n // bad_every % 3, urls[record]) if bad else json.dumps(_good(urls[record])).encode()
            start = time.perf_counter()
            response = session.post(
                f"{base}/v1/chat/completions",
                data=body,
                headers={"content-type": "application/json"},
                timeout=300,
            )
            took = time.perf_counter() - start
            with lock:
                key = "bad_status" if bad else "status"
                stats[key][response.status_code] = stats[key].get(response.status_code, 0) + 1
                if not bad and response.status_code == 200:
                    stats["latency"].append(took)
                    text = response.json()["choices"][0]["message"]["content"]
                    stats["answers"].setdefault(record, set()).add(text)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["wall"] = time.perf_counter() - begin
    return stats


def _ask_rate(args, signals: list[np.ndarray]) -> tuple[float, dict[int, str]]:
    """Answers per second of ``ecglm.inference.ask`` batched over the same records, here."""
    from ecglm import ECGLM
    from ecglm.bundle import parse_overrides
    from ecglm.inference import ask
    from ecglm.model import Decoding

    torch.set_num_threads(args.threads)
    model = ECGLM.from_pretrained(args.model, device="cpu", overrides=parse_overrides(args.override))
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, signal in enumerate(signals):
            np.save(Path(folder) / f"r{i}.npy", signal)
            paths.append(Path(folder) / f"r{i}.npy")
        ask(model, paths[:2], [QUESTION], fs=250, leads=LEADS, decoding=decoding, batch_size=2)  # warm-up
        start = time.perf_counter()
        rows, _ = ask(
            model, paths, [QUESTION], fs=250, leads=LEADS, decoding=decoding, batch_size=args.max_batch_size
        )
        took = time.perf_counter() - start
    return len(rows) / took, {int(Path(r["record"]).stem[1:]): r["answer"] for r in rows}


def _raw(port: int, body: bytes, declared: int) -> socket.socket:
    """A socket that has sent the head of a chat completion announcing ``declared`` bytes, then ``body``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=300)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def _answer(base: str, body: bytes) -> str | None:
    response = requests.post(
        f"{base}/v1/chat/completions", data=body, headers={"content-type": "application/json"}, timeout=300
    )
    return response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None


def _left(pids: list[int], tmp: Path) -> tuple[int, int]:
    """The stopped server's processes still running (zombies excluded) and its upload folders left."""
    import psutil

    alive = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            alive += psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return alive, len(list(tmp.glob("ecglm-serve-*")))


def _faults(args, base: str, port: int, urls: list[str], process, log: Path, tmp: Path, expected: str):
    """Clients that go away or trickle, then a kill under load and a restart; prints what each left."""
    import signal

    import psutil

    good = json.dumps(_good(urls[0])).encode()
    _raw(port, good[: len(good) // 2], len(good)).close()  # gone halfway through its upload
    _raw(port, good, len(good)).close()  # gone before its answer
    slow = _raw(port, b"", len(good))
    step = len(good) // 4 + 1
    start = time.perf_counter()
    for offset in range(0, len(good), step):
        time.sleep(0.25)
        slow.sendall(good[offset : offset + step])
    reply = b""
    while not reply.rstrip().endswith(b"}"):
        chunk = slow.recv(65536)
        if not chunk:
            break
        reply += chunk
    slow.close()
    took = time.perf_counter() - start
    body = reply.split(b"\r\n\r\n", 1)[-1]
    slow_ok = reply.startswith(b"HTTP/1.1 200")
    slow_ok = slow_ok and json.loads(body)["choices"][0]["message"]["content"] == expected
    after = _answer(base, good)
    print(
        f"faults: gone mid-upload + gone before the answer + slow upload ({took:.1f} s): slow one answered "
        f"correctly {slow_ok}; next request's answer unchanged {after == expected}; upload folders left "
        f"{len(list(tmp.glob('ecglm-serve-*')))}"
    )
    pids = [process.pid, *(c.pid for c in psutil.Process(process.pid).children(recursive=True))]
    outcomes: dict[str, int] = {}  # how the requests in flight at the kill ended
    answered = [0]  # requests answered before it
    lock = threading.Lock()
    killed = threading.Event()

    def client() -> None:  # sends until its request fails or ends after the kill
        while True:
            try:
                response = requests.post(
                    f"{base}/v1/chat/completions",
                    data=good,
                    headers={"content-type": "application/json"},
                    timeout=300,
                )
                outcome = str(response.status_code)
            except requests.RequestException as error:
                outcome = type(error).__name__
            with lock:
                if not killed.is_set():
                    answered[0] += 1
                    continue
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                return

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    with lock:
        killed.set()
        process.send_signal(signal.SIGKILL)
    start = time.perf_counter()
    for t in threads:
        t.join(300)
    ended = time.perf_counter() - start
    hung = sum(t.is_alive() for t in threads)
    process.wait(30)
    deadline = time.monotonic() + 60  # the children notice their parent is gone and stop
    while _left(pids, tmp)[0] and time.monotonic() < deadline:
        time.sleep(0.5)
    alive, folders = _left(pids, tmp)
    print(
        f"faults: SIGKILL under 16 clients after {answered[0]} answers: the 16 in flight ended as "
        f"{outcomes}, hung {hung}, all within {ended:.1f} s; processes left {alive} of {len(pids)}; "
        f"upload folders left {folders}"
    )
    start = time.perf_counter()
    restarted = _start(args, port, log, tmp)
    ready = time.perf_counter() - start
    print(
        f"faults: restarted on port {port}: healthy after {ready:.1f} s (loading the model); answer "
        f"unchanged {_answer(base, good) == expected}"
    )
    return restarted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a bundle (default: a tiny random one, built here)")
    parser.add_argument("--override", action="append", default=[], help="PART.KEY=VALUE, as for ecglm serve")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.02)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory()
    if args.model is None:
        from ecglm.testing import saved_signal_bundle

        args.model, llm = saved_signal_bundle(Path(scratch.name) / "tiny")
        args.override = [f"backbone.model={llm}"]
    signals = _records(args.records)
    urls = [_npy(s) for s in signals]
    ask_rate, ask_answers = _ask_rate(args, signals)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(scratch.name) / "serve.log"
    tmp = Path(scratch.name) / "server-tmp"
    tmp.mkdir()
    process = _start(args, port, log, tmp)
    base = f"http://127.0.0.1:{port}"
    try:
        _load(base, urls[:2], 1, 2.0, 0)  # warm-up
        alone = _load(base, urls, 1, args.seconds, 0)
        print(
            f"model {args.model}; {args.threads} CPU threads; max batch {args.max_batch_size}; "
            f"{args.seconds:g} s a run"
        )
        print(f"ecglm ask batched ({args.max_batch_size}): {ask_rate:.2f} answers/s")
        print(
            "clients  req/s  x ask  p50 s  p95 s  good (status: count)  bad (status: count)  "
            "answers unchanged"
        )
        for clients in [int(c) for c in args.clients.split(",")]:
            stats = _load(base, urls, clients, args.seconds, 10)
            good = sum(stats["status"].values())
            rate = good / stats["wall"]
            lat = np.array(stats["latency"]) if stats["latency"] else np.array([float("nan")])
            reference = {**ask_answers, **{r: next(iter(a)) for r, a in alone["answers"].items()}}
            same = all(a == {reference[r]} for r, a in stats["answers"].items())
            print(
                f"{clients:>7}  {rate:5.2f}  {rate / ask_rate:5.2f}  {np.percentile(lat, 50):5.2f}  "
                f"{np.percentile(lat, 95):5.2f}  {stats['status']}  {stats['bad_status']}  {same}"
            )
        served = sum(1 for line in log.read_text().splitlines() if "ecglm.serve request " in line)
        print(f"server log: {served} request lines; 5xx lines: {log.read_text().count('-> 5')}")
        process = _faults(args, base, port, urls, process, log, tmp, next(iter(alone["answers"][0])))
    finally:
        process.terminate()
        process.wait(30)
        scratch.cleanup()


if __name__ == "__main__":
    main()
