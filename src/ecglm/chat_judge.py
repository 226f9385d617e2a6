"""A judge served over the OpenAI chat-completions protocol: a hosted model or one served locally
(vLLM, llama.cpp's server, Ollama), at a base URL, with the API key read from an environment variable.

The rubric is the system turn (a file the user may replace: ``rubric_file``); each answer is one
request (``POST {base_url}/chat/completions``, temperature 0); the reply is read as
:func:`ecglm.judges.parse_verdict` reads a local judge's, and a reply it cannot read is counted,
never scored as zero. Registered as ``openai-chat`` in ``ecglm.judges``.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ecglm.errors import EcglmError
from ecglm.judges import DEFAULT_RUBRIC, USER_TEMPLATE, Judge, JudgeItem, Verdict, parse_verdict


class JudgeServiceError(EcglmError, RuntimeError):
    """A chat-completions service that refused a request or answered in another shape."""


class OpenAIChatJudge(Judge):
    """A judge behind an OpenAI-compatible chat-completions endpoint.

    Args:
        model: The model name the service knows (``gpt-4o``, a served model's name).
        base_url: The API's base URL (``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1``).
        api_key_env: The environment variable holding the API key (none is sent when it is unset
            and ``require_key`` is false, as local servers need none).
        require_key: Refuse to start without the key.
        rubric: System prompt; ``{scale}`` is filled in.
        rubric_file: A text file replacing ``rubric``.
        scale: Highest score (scores are reported as fractions of it).
        max_tokens: Longest reply.
        timeout: Seconds to wait for one reply.
        datasets, conditions: See :class:`ecglm.judges.Judge`.
        response_format: ``json_object`` asks the service for a reply that is one JSON object
            (OpenAI's JSON mode, also served by vLLM, llama.cpp's server and Ollama): for a rubric
            that asks for JSON, as the arena's does (``ecglm benchmark score`` asks for it there
            unless ``judge_args`` set it, ``null`` included); ``None`` (default): plain text, as
            ``Score: N`` rubrics want.
    """

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str = "OPENAI_API_KEY",
        require_key: bool = False,
        rubric: str = DEFAULT_RUBRIC,
        rubric_file: str | None = None,
        scale: int = 10,
        max_tokens: int = 256,
        timeout: float = 120.0,
        datasets: list[str] | None = None,
        conditions: tuple[str, ...] = ("ecg", "shuffled_ecg"),
        response_format: str | None = None,
    ):
        super().__init__(datasets, conditions)
        if scale < 1:
            raise ValueError(f"scale must be at least 1; got {scale}")
        if rubric_file is not None:
            try:
                rubric = Path(rubric_file).read_text(encoding="utf-8")
            except OSError as err:
                raise JudgeServiceError(f"rubric_file {rubric_file}: cannot read it ({err})") from None
        self.key = os.environ.get(api_key_env)
        if require_key and not self.key:
            raise JudgeServiceError(f"the judge's API key: set the environment variable {api_key_env}")
        self.model, self.url = model, base_url.rstrip("/") + "/chat/completions"
        self.rubric, self.scale = rubric.replace("{scale}", str(scale)), scale
        if response_format not in (None, "json_object", "text"):
            raise JudgeServiceError(
                f"response_format {response_format!r}: json_object (a JSON reply), text or null"
            )
        self.max_tokens, self.timeout, self.response_format = max_tokens, timeout, response_format

    def request(self, item: JudgeItem) -> dict:
        """The body of ``item``'s chat-completions request."""
        user = USER_TEMPLATE.format(**asdict(item))
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": self.rubric}, {"role": "user", "content": user}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        if self.response_format is not None:
            body["response_format"] = {"type": self.response_format}
        return body

    def reply(self, body: dict) -> str:
        # The standard library, not the openai package: one JSON POST, no dependency for users who
        # judge locally.
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise JudgeServiceError(f"{self.url} refused the request: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, TimeoutError) as err:
            raise JudgeServiceError(f"{self.url}: no answer ({getattr(err, 'reason', err)})") from None
        try:
            return str(answer["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise JudgeServiceError(f"{self.url} answered without choices[0].message.content") from None

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return [parse_verdict(self.reply(self.request(item)), self.scale) for item in items]
