"""What an answer is to ecglm: a string, or a list of items (a label set), written as one string.

Standard library only, so the data side and the answering side use it without the metrics' imports.
"""

from __future__ import annotations

from collections.abc import Sequence


def answer_text(answer: str | Sequence[str]) -> str:
    """The answer as one string: list answers joined with ``", "``."""
    return answer if isinstance(answer, str) else ", ".join(answer)
