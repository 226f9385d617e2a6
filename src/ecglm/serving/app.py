"""``ecglm serve``'s server: the LitServe server of a bundle (:func:`build_server`), a body-size limit
and one log line per request (:class:`RequestLog`).

LitServe gives the workers, the dynamic batching, ``/health`` and a graceful shutdown (uvicorn
finishes in-flight requests on SIGINT/SIGTERM). Its ``MaxSizeMiddleware`` raises from inside the
body reader, which an endpoint that reads the body itself would turn into its own error; the limit
here answers 413 before any endpoint runs, naming the limit, and is written by hand for that.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ecglm.serving.lifetime import exit_with_parent

LOG = logging.getLogger("ecglm.serve")


class RequestLog:
    """ASGI middleware: refuses a body over ``max_body_bytes`` with 413 before the endpoint runs (the
    body is read here, so the check holds with or without a Content-Length), and logs one line per
    request: its id (also sent back as ``X-Request-ID``), method, path, bytes, status, seconds."""

    def __init__(self, app: Any, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        exit_with_parent()  # built in each HTTP server process

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:12]
        start = time.perf_counter()
        status = {"code": 0}
        size = 0

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            chunks: list[bytes] = []
            more = scope["method"] in ("POST", "PUT", "PATCH")
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    status["code"] = 499  # the client went away before sending its request
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > self.max_body_bytes:
                    await self._refuse(sending, size)
                    return
            body = b"".join(chunks)
            sent = False

            async def replay() -> dict:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay if scope["method"] in ("POST", "PUT", "PATCH") else receive, sending)
        finally:
            LOG.info(
                "request %s %s %s %d B -> %d in %.3f s",
                request_id,
                scope["method"],
                scope["path"],
                size,
                status["code"],
                time.perf_counter() - start,
            )

    async def _refuse(self, send: Any, size: int) -> None:
        message = (
            f"request body over {self.max_body_bytes} bytes (at {size} bytes): the server's limit "
            "(ecglm serve --max_upload_mb); send a shorter record"
        )
        body = json.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "code": 413}}
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def build_server(
    model: str,
    overrides: dict[str, dict[str, Any]] | None = None,
    max_batch_size: int = 8,
    batch_timeout: float = 0.05,
    workers: int = 1,
    max_new_tokens: int = 64,
    generate_batch_size: int = 16,
    device: str | None = None,
    api_key: str | None = None,
    limits: Any = None,
    timeout: float = 120.0,
    trust_remote_code: bool = False,
    model_id: str | None = None,
):
    """The LitServe server of bundle ``model`` (checked against its digests first: a damaged bundle is
    refused here, before a worker starts)."""
    import litserve as ls

    from ecglm.bundle import CARD_FILE, check_bundle
    from ecglm.model import Decoding
    from ecglm.serving.api import ECGLMAPI
    from ecglm.serving.requests import Limits
    from ecglm.serving.spec import ECGSpec

    limits = limits or Limits()
    config = check_bundle(model, trust_remote_code=trust_remote_code, overrides=overrides or {})
    card_path = Path(model) / CARD_FILE
    card = card_path.read_text() if card_path.is_file() else ""
    decoding = asdict(Decoding(max_new_tokens=max_new_tokens))
    spec = ECGSpec(model_id or Path(model).resolve().name, config, card, limits, decoding)
    api = ECGLMAPI(
        model,
        overrides=overrides,
        max_new_tokens=max_new_tokens,
        generate_batch_size=generate_batch_size,
        device=device,
        api_key=api_key,
        trust_remote_code=trust_remote_code,
        max_batch_size=max_batch_size,
        batch_timeout=batch_timeout,
        spec=spec,
    )
    # Base64 makes a file a third larger in a JSON body; the multipart and JSON overheads are small.
    max_body = limits.max_upload_bytes * 4 // 3 + 64 * 1024
    accelerator = "cpu" if (device or "cpu") == "cpu" and not _cuda() else "auto"
    return ls.LitServer(
        api,
        accelerator=accelerator if device is None else ("cpu" if device == "cpu" else "cuda"),
        devices=1,
        workers_per_device=workers,
        timeout=timeout,
        middlewares=[(RequestLog, {"max_body_bytes": max_body})],
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
