"""``ecglm serve``: a bundle behind an HTTP API (LitServe; :mod:`ecglm.serving`), OpenAI-compatible."""

from __future__ import annotations

import contextlib
import logging
import signal

from ecglm.errors import EcglmError


class ServeError(EcglmError, ValueError):
    """Options of ``ecglm serve`` that cannot work."""


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    batch_timeout: float = 0.05,
    workers: int = 1,
    max_new_tokens: int = 64,
    generate_batch_size: int = 16,
    max_upload_mb: float = 20.0,
    max_windows: int = 32,
    max_questions: int = 16,
    timeout: float = 120.0,
    api_key_env: str | None = None,
    device: str | None = None,
    override: list[str] | None = None,
    trust_remote_code: bool = False,
) -> int:
    """Serve a bundle over HTTP: POST /v1/chat/completions (OpenAI's, the ECG as a file part),
    POST /v1/answer (multipart upload), GET /v1/models, GET /health (docs/serving.md).

    Args:
        model: A bundle folder (``ecglm export``).
        host: Address to bind: 127.0.0.1 (this machine only) unless you mean to share it.
        port: TCP port.
        max_batch_size: Requests LitServe gathers into one batch.
        batch_timeout: Seconds LitServe waits to fill a batch.
        workers: Model copies (worker processes) on the device.
        max_new_tokens: Longest answer, in tokens.
        generate_batch_size: (window, question) pairs per generate call.
        max_upload_mb: Largest ECG upload, MB (bigger requests get 413).
        max_windows: Most windows of one record answered per request (``window=all``).
        max_questions: Most questions per request.
        timeout: Seconds a request may wait for the model before 504.
        api_key_env: An environment variable holding an API key every request must carry
            (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``).
        device: cpu, cuda (default: CUDA when available).
        override: ``PART.KEY=VALUE`` (repeatable), as for ``ecglm ask`` (e.g. ``backbone.model=/models/llm``).
        trust_remote_code: As for ``ecglm ask``: only for bundles from authors you trust.
    """
    from ecglm.bundle import parse_overrides
    from ecglm.serving.api import api_key_from_env
    from ecglm.serving.app import build_server
    from ecglm.serving.requests import Limits, RequestError

    if (
        min(max_batch_size, workers, max_windows, max_questions, generate_batch_size) < 1
        or max_upload_mb <= 0
    ):
        raise ServeError(
            "--max_batch_size, --workers, --max_windows, --max_questions, --generate_batch_size and "
            "--max_upload_mb must be positive"
        )
    try:
        api_key = api_key_from_env(api_key_env)
    except RequestError as err:
        raise ServeError(str(err)) from None
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logging.getLogger("ecglm.serve").warning(
            "serving on %s without an API key: anyone who can reach this port can use the model "
            "(--api_key_env NAME)",
            host,
        )
    limits = Limits(round(max_upload_mb * 1024 * 1024), max_windows, max_questions)
    server = build_server(
        model,
        overrides=parse_overrides(override or []),
        max_batch_size=max_batch_size,
        batch_timeout=batch_timeout,
        workers=workers,
        max_new_tokens=max_new_tokens,
        generate_batch_size=generate_batch_size,
        device=device,
        api_key=api_key,
        limits=limits,
        timeout=timeout,
        trust_remote_code=trust_remote_code,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # SIGTERM as Ctrl-C: LitServe's shutdown stops the HTTP servers (in-flight requests finish) and
    # then the workers; by default SIGTERM would end this process alone and leave them running.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(host=host, port=port, generate_client_file=False, num_api_servers=1)
    except KeyboardInterrupt:  # stopped while the workers were starting: outside LitServe's shutdown
        return 130
    finally:
        _stop_children()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop_children(grace: float = 10.0) -> None:
    """Every process this one started and LitServe left running (a stop during start-up), terminated
    and after ``grace`` seconds killed: otherwise exiting would wait on them for ever."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
