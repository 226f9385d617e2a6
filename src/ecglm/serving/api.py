"""The model side of ``ecglm serve``: a LitServe ``LitAPI`` that loads a bundle once per worker and
answers the jobs of many requests in one batched ``generate`` (as ``ecglm ask`` batches).

LitServe gathers up to ``max_batch_size`` requests (waiting at most ``batch_timeout`` seconds) and
hands them to :meth:`ECGLMAPI.predict` together: every (window, question) pair of every job is
answered in batches of ``generate_batch_size`` (:func:`ecglm.serving.answering.answer_jobs`, which
``ecglm demo`` answers through too), and the answers are cut back into one list per job. Jobs reach
here already checked (:mod:`ecglm.serving.requests`), so one client's bad file never fails a batch.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

import litserve as ls
from fastapi import HTTPException, Request

from ecglm.serving.requests import Job


class ECGLMAPI(ls.LitAPI):
    """Answers :class:`~ecglm.serving.requests.Job` s with the bundle ``model``.

    Args:
        model: The bundle folder.
        overrides: ``{part: {key: value}}`` given by the user (``--override``), as ``ecglm ask`` takes them.
        max_new_tokens: Longest answer, in tokens (the decoding is the server's, the same for all).
        generate_batch_size: (window, question) pairs per ``generate`` call.
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        api_key: When set, every request must carry it (``Authorization: Bearer KEY`` or ``X-API-Key``).
        trust_remote_code: As for ``ecglm ask``.
    """

    def __init__(
        self,
        model: str,
        overrides: dict[str, dict[str, Any]] | None = None,
        max_new_tokens: int = 64,
        generate_batch_size: int = 16,
        device: str | None = None,
        api_key: str | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.model_dir = str(model)
        self.overrides = overrides or {}
        self.max_new_tokens = max_new_tokens
        self.generate_batch_size = generate_batch_size
        self.device_name = device
        self.api_key = api_key
        self.trust_remote_code = trust_remote_code

    def setup(self, device: str) -> None:
        import torch

        from ecglm.model import ECGLM, Decoding
        from ecglm.serving.lifetime import exit_with_parent

        exit_with_parent()

        # Plain CPU serving keeps to the threads it was given (a shared workstation); CUDA as LitServe says.
        chosen = self.device_name or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = ECGLM.from_pretrained(
            self.model_dir, device=chosen, trust_remote_code=self.trust_remote_code, overrides=self.overrides
        )
        self.model.eval()
        self.decoding = Decoding(max_new_tokens=self.max_new_tokens)

    def authorize(self, request: Request) -> None:
        """The API key check LitServe runs before every endpoint (a FastAPI dependency)."""
        if not self.api_key:
            return
        given = request.headers.get("x-api-key") or ""
        bearer = request.headers.get("authorization") or ""
        if bearer.lower().startswith("bearer "):
            given = given or bearer[7:].strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer KEY or X-API-Key: KEY)")

    def decode_request(self, request: Job, **kwargs: Any) -> Job:
        return request

    def predict(self, jobs: Job | list[Job], **kwargs: Any) -> list[str] | list[list[str]]:
        """One list of answers per job (window by window, each window's questions in order)."""
        from ecglm.serving.answering import answer_jobs

        single = isinstance(jobs, Job)
        answers = answer_jobs(
            self.model, [jobs] if single else list(jobs), self.decoding, self.generate_batch_size
        )
        return answers[0] if single else answers

    def encode_response(self, output: list[str], **kwargs: Any) -> list[str]:
        return output


def api_key_from_env(name: str | None) -> str | None:
    """The API key in environment variable ``name`` (``--api-key-env``); an unset or empty one is refused."""
    if not name:
        return None
    key = os.environ.get(name, "")
    if not key:
        from ecglm.serving.requests import RequestError

        raise RequestError(f"--api-key-env {name}: that environment variable is not set or empty", 2)
    return key
