"""``ecglm demo``: a bundle behind a web page (Gradio; :mod:`ecglm.serving.page`), for colleagues."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

from ecglm.errors import EcglmError


class DemoError(EcglmError, ValueError):
    """Options of ``ecglm demo`` that cannot work."""


def demo(
    model: str,
    host: str = "127.0.0.1",
    port: int = 7860,
    example: str | None = None,
    synthetic_example: bool = False,
    questions: str | None = None,
    max_new_tokens: int = 64,
    generate_batch_size: int = 8,
    max_upload_mb: float = 20.0,
    max_windows: int = 12,
    max_questions: int = 8,
    device: str | None = None,
    override: list[str] | None = None,
    trust_remote_code: bool = False,
) -> int:
    """A web page in front of a bundle: upload an ECG (or take the example), see its printout, ask
    questions, read the answers per 10 s window; the model card beside them (docs/serving.md).

    Args:
        model: A bundle folder (``ecglm export``).
        host: Address to bind: 127.0.0.1 (this machine only) unless you mean to share it. The page is
            never shared through a public link.
        port: TCP port.
        example: A record the page offers as its example (any format ``ecglm ask`` reads).
        synthetic_example: Offer a synthetic 10 s ECG of the quickstart's data set as the example,
            with its questions as presets (needs the ``synthetic`` extra: neurokit2).
        questions: A text file of preset questions, one a line (default: the questions of the
            bundle's few-shot demonstrations, else a few general ones).
        max_new_tokens: Longest answer, in tokens.
        generate_batch_size: (window, question) pairs per generate call.
        max_upload_mb: Largest upload, MB.
        max_windows: Most windows of one record answered per ask (windows: all).
        max_questions: Most questions per ask.
        device: cpu, cuda (default: CUDA when available).
        override: ``PART.KEY=VALUE`` (repeatable), as for ``ecglm ask`` (e.g. ``backbone.model=/models/llm``).
        trust_remote_code: As for ``ecglm ask``: only for bundles from authors you trust.
    """
    from ecglm.bundle import parse_overrides
    from ecglm.commands.ask import _read_questions
    from ecglm.serving.requests import Limits

    if min(max_windows, max_questions, generate_batch_size, max_new_tokens) < 1 or max_upload_mb <= 0:
        raise DemoError(
            "--max_windows, --max_questions, --generate_batch_size, --max_new_tokens and --max_upload_mb "
            "must be positive"
        )
    if example and synthetic_example:
        raise DemoError("give --example RECORD or --synthetic_example, not both")
    presets = _read_questions(Path(questions)) if questions else None
    if host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("ecglm.demo").warning(
            "the demo on %s: anyone who can reach this port can use the model (it has no login)", host
        )
    # Gradio keeps uploads in its cache folder: a private one (mkdtemp: mode 700), removed when the
    # page stops, instead of a shared /tmp/gradio. Set before gradio is imported (it reads it then).
    cache = tempfile.mkdtemp(prefix="ecglm-demo-")
    os.environ["GRADIO_TEMP_DIR"] = cache
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from ecglm.records import read_recording
        from ecglm.serving.demo import DemoModel
        from ecglm.serving.demo import synthetic_example as make_example
        from ecglm.serving.page import build_page

        # The example is read before the model loads: a bad --example fails at once, naming the file.
        recording = read_recording(example) if example else None
        if synthetic_example:
            recording, asked = make_example()
            presets = presets or asked
        limits = Limits(round(max_upload_mb * 1024 * 1024), max_windows, max_questions)
        loaded = DemoModel(
            model,
            overrides=parse_overrides(override or []),
            max_new_tokens=max_new_tokens,
            generate_batch_size=generate_batch_size,
            limits=limits,
            device=device,
            questions=presets,
            example=recording,
            trust_remote_code=trust_remote_code,
        )
        page = build_page(loaded)
        page.queue(default_concurrency_limit=1, max_size=64)  # one ask at a time on the model
        # SIGTERM as Ctrl-C: Gradio closes its server, and the upload folder is removed below.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            page.launch(
                server_name=host,
                server_port=port,
                share=False,
                inbrowser=False,
                max_file_size=limits.max_upload_bytes,
                ssr_mode=False,
                show_error=True,
            )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return 0
