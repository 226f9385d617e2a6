"""The HTTP endpoints of ``ecglm serve``, as a LitServe ``LitSpec``.

LitServe's own ``OpenAISpec`` validates messages with a pydantic model whose content parts are text,
image and audio only, so OpenAI's ``file`` parts (the ECG file) would be refused before reaching us,
and it would check requests inside the inference worker, where one bad request fails its whole batch.
This spec registers the endpoints itself: each request is read and checked here, in the HTTP process
(:mod:`ecglm.serving.requests`, in a thread), and only a good :class:`~ecglm.serving.requests.Job`
joins LitServe's request queue, to be batched with other clients' jobs by LitServe's loop.

- ``POST /v1/chat/completions``: OpenAI's chat completion (non-streaming); the ECG as a ``file``
  part (or an ``image_url`` part for image models), ``ecg_fs`` / ``ecg_leads`` / ``ecg_window`` as
  extra body fields; the answer in ``choices[0].message.content``, every window's in ``ecg_answers``.
- ``POST /v1/answer``: multipart upload (``file``, one or more ``question``, ``fs``, ``leads``,
  ``window``) -> every (window, question) answer, the decoding, the model's id and version.
- ``GET /v1/models``: the bundle as OpenAI lists a model, with its card.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.concurrency import run_in_threadpool

from ecglm.ecg import Preprocessing
from ecglm.serving.requests import (
    IMAGE_MIMES,
    Job,
    Limits,
    RequestError,
    chat_job,
    image_job,
    parse_fs,
    parse_json,
    parse_leads,
    parse_questions,
    read_upload,
    recording_job,
)

#: The endpoints' paths.
CHAT_PATH = "/v1/chat/completions"
ANSWER_PATH = "/v1/answer"
MODELS_PATH = "/v1/models"


def error_response(err: RequestError | HTTPException) -> JSONResponse:
    """An error in OpenAI's shape (``{"error": {"message", "type", "code"}}``), which its clients read."""
    status = err.status if isinstance(err, RequestError) else err.status_code
    message = str(err) if isinstance(err, RequestError) else str(err.detail)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class ECGSpec(LitSpec):
    """The endpoints of one bundle.

    Args:
        model_id: The name clients see (``model`` in responses; the bundle folder's name by default).
        config: The bundle's ``ecglm.yaml`` (parts, preprocessing, version).
        card: The bundle's model card (``README.md``), Markdown.
        limits: What one request may ask (:class:`~ecglm.serving.requests.Limits`).
        decoding: The server's decoding, reported with every answer.
    """

    def __init__(
        self, model_id: str, config: dict[str, Any], card: str, limits: Limits, decoding: dict[str, Any]
    ):
        super().__init__()
        self.api_path = ANSWER_PATH
        self.model_id = model_id
        self.config = config
        self.card = card
        self.limits = limits
        self.decoding = decoding
        pre = config.get("preprocessing")
        self.preprocessing = Preprocessing(**pre) if isinstance(pre, dict) else None
        self.image_model = bool(config.get("image")) or config.get("components", {}).get("encoder") is None
        self.add_endpoint(CHAT_PATH, self.chat_completion, ["POST"])
        self.add_endpoint(ANSWER_PATH, self.answer, ["POST"])
        self.add_endpoint(MODELS_PATH, self.models, ["GET"])

    def decode_request(self, request: Job, context_kwargs: dict | None = None) -> Job:
        return request

    def encode_response(self, output: list[str], context_kwargs: dict | None = None) -> list[str]:
        return output

    async def _answers(self, job: Job) -> list[str]:
        """``job`` through LitServe's queue to a worker (batched with others); its answers."""
        uid = uuid.uuid4()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event)
        try:
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
            await event.wait()
            response, status = self.response_buffer[uid].response
        finally:  # also when the client went away: nothing left behind
            self.response_buffer.pop(uid, None)
        if status == LitAPIStatus.ERROR:
            if isinstance(response, HTTPException):
                raise response
            raise HTTPException(500, "the model failed on this batch; see the server's log")
        return response

    def _version(self) -> dict[str, Any]:
        from ecglm.version import __version__

        return {"ecglm": __version__, "bundle_ecglm": self.config.get("ecglm_version")}

    async def chat_completion(self, request: Request) -> JSONResponse:
        try:
            body = parse_json(await request.body())
            job, window = await run_in_threadpool(
                chat_job, body, self.preprocessing, self.image_model, self.limits
            )
            answers = await self._answers(job)
        except RequestError as err:
            return error_response(err)
        except HTTPException as err:
            return error_response(err)
        listed = [{"window": i, "answer": a} for i, a in enumerate(answers)]
        content = (
            answers[0] if window == "first" else "\n".join(f"window {i}: {a}" for i, a in enumerate(answers))
        )
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                "ecg_answers": listed,
                "ecg_source": job.source,
                "decoding": self.decoding,
            }
        )

    async def answer(self, request: Request) -> JSONResponse:
        try:
            job = await self._form_job(request)
            answers = await self._answers(job)
        except RequestError as err:
            return error_response(err)
        except HTTPException as err:
            return error_response(err)
        per_window = max(len(job.windows), len(job.images))
        rows = [
            {"window": w, "question": q, "answer": answers[w * len(job.questions) + i]}
            for w in range(per_window)
            for i, q in enumerate(job.questions)
        ]
        return JSONResponse(
            {
                "model": self.model_id,
                "version": self._version(),
                "decoding": self.decoding,
                "source": job.source,
                "answers": rows,
            }
        )

    async def _form_job(self, request: Request) -> Job:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestError("send multipart/form-data: a file field, one or more question fields", 415)
        try:
            form = await request.form(max_files=1, max_fields=self.limits.max_questions + 8)
        except Exception as err:  # starlette's own parse errors (too many fields, a cut body)
            raise RequestError(f"malformed multipart body ({err})", 400) from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError("no file field: upload the ECG as the multipart field 'file'", 422)
        questions = parse_questions(form.getlist("question"), self.limits)
        data = await upload.read()
        name = upload.filename or ""
        if len(data) > self.limits.max_upload_bytes:
            raise RequestError(f"file {name!r}: over the limit of {self.limits.max_upload_bytes} bytes", 413)
        if name.lower().endswith((".png", ".jpg", ".jpeg")) or upload.content_type in IMAGE_MIMES:
            if not self.image_model:
                raise RequestError("this model reads ECG signals, not pictures: upload a record", 422)
            return await run_in_threadpool(image_job, data, questions, name)
        fs, leads = parse_fs(form.get("fs")), parse_leads(form.get("leads"))
        window = str(form.get("window") or "first")
        recording = await run_in_threadpool(read_upload, name, data, fs, leads)
        return await run_in_threadpool(
            recording_job, recording, questions, self.preprocessing, window, self.limits, name
        )

    async def models(self) -> JSONResponse:
        components = self.config.get("components", {})
        parts = {
            p: (components.get(p) or {}).get("class_path")
            for p in ("encoder", "connector", "backbone", "policy")
        }
        base = ((components.get("backbone") or {}).get("init_args") or {}).get("model")
        entry = {
            "id": self.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "ecglm",
            "parts": parts,
            "base_llm": base,
            "preprocessing": asdict(self.preprocessing) if self.preprocessing else None,
            "reads": "pictures" if self.image_model else "signals",
            "version": self._version(),
            "decoding": self.decoding,
            "card": self.card,
            "limits": asdict(self.limits),
        }
        return JSONResponse({"object": "list", "data": [entry]})
