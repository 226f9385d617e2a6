"""Servers on 127.0.0.1 for the remote-shard tests and benchmark: a shard folder over HTTP that fails on
request, and moto's S3 server.

:class:`FaultyHTTP` serves a folder with byte ranges (or without, ``ranges=False``) and can be told to
fail at chosen byte offsets of a file: ``drop`` (send the bytes before the offset, then close the
connection), ``stall`` (send them, then wait ``stall`` seconds before closing) or ``5xx`` (answer 503
to a request for a range holding the offset). ``fail_rate`` fails that share of GET requests with a
503, at random (seeded).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Fault:
    name: str  # file name in the folder
    offset: int  # byte offset the fault happens at
    kind: str  # "drop", "stall" or "5xx"
    times: int = 1  # how many requests it fails (then the file is served)


class FaultyHTTP:
    def __init__(self, folder: str | Path, ranges: bool = True, stall: float = 3.0, fail_rate: float = 0.0):
        self.folder, self.ranges, self.stall = Path(folder), ranges, stall
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int | None]] = []  # (method, name, range start)
        self.fail_rate, self.rng, self.failed = fail_rate, random.Random(0), 0
        self.lock = threading.Lock()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                name = self.path.lstrip("/")
                path = server.folder / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start, end, partial = 0, len(data), False
                match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if match and server.ranges:
                    start, partial = int(match[1]), True
                    end = min(len(data), int(match[2]) + 1) if match[2] else len(data)
                with server.lock:
                    server.requests.append((self.command, name, start if partial else None))
                    fault = next(
                        (
                            f
                            for f in server.faults
                            if body and f.name == name and f.times > 0 and start <= f.offset < end
                        ),
                        None,
                    )
                    if fault is not None:
                        fault.times -= 1
                    random_fail = body and server.fail_rate and server.rng.random() < server.fail_rate
                    if random_fail:
                        server.failed += 1
                if random_fail or (fault is not None and fault.kind == "5xx"):
                    self.send_error(503)
                    return
                self.send_response(206 if partial else 200)
                if partial:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.send_header("Content-Length", str(end - start))
                self.send_header("Accept-Ranges", "bytes" if server.ranges else "none")
                self.send_header("Content-Type", "application/x-tar")
                self.end_headers()
                if not body:
                    return
                if fault is None:
                    self.wfile.write(data[start:end])
                    return
                self.wfile.write(data[start : fault.offset])
                self.wfile.flush()
                if fault.kind == "stall":
                    time.sleep(server.stall)
                self.close_connection = True
                self.connection.shutdown(2)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultyHTTP:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class MotoS3:
    """moto's S3 server on 127.0.0.1 with fake credentials in the environment (as a cluster's would be)."""

    def __enter__(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        self.saved = {
            k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
        }
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
        )
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, skip_instance_cache=True)

    def upload(self, folder: str | Path, bucket: str, prefix: str) -> str:
        fs = self.fs()
        fs.mkdir(bucket)
        for path in sorted(Path(folder).iterdir()):
            fs.put_file(str(path), f"{bucket}/{prefix}/{path.name}")
        return f"s3://{bucket}/{prefix}"

    def __exit__(self, *exc) -> None:
        self.server.stop()
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
