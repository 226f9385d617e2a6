"""The published ECGBench numbers, to set beside ours: rows of the PULSE paper's Tables 3 (in-domain) and
4 (out-of-domain) — Liu et al., "Teach Multimodal LLMs to Comprehend Electrocardiographic Images",
arXiv:2410.19008v1 — scored by ``evaluate_ecgbench.py`` (``--scoring pulse``) and, for the report and
arena subsets, by a GPT-4o judge. Stored as printed (percent); :func:`published` gives fractions.
"""

from __future__ import annotations

SOURCE = "Liu et al. 2024, arXiv:2410.19008v1, Tables 3 and 4 (percent; scored as --scoring pulse)"

# subset -> the metric names of its columns, in the paper's order.
COLUMNS: dict[str, tuple[str, ...]] = {
    "ptb-test": ("auc", "f1", "hamming_loss"),
    "ptb-test-report": ("report_score",),
    "code15-test": ("auc", "f1", "hamming_loss"),
    "ecgqa-test": ("accuracy",),
    "cpsc-test": ("auc", "f1", "hamming_loss"),
    "csn-test-no-cot": ("accuracy",),
    "g12-test-no-cot": ("accuracy",),
    "mmmu-ecg": ("accuracy",),
    "arena": ("arena_score",),
}
_ORDER = tuple(COLUMNS)

# model -> every column of Tables 3 and 4, in the order of COLUMNS (None: not reported).
_ROWS: dict[str, tuple[float | None, ...]] = {
    "Random": (50.3, 33.2, 50.1, 0, 48.8, 15.0, 32.1, 16.2, 51.2, 15.1, 28.8, 11.6, 12.1, 24.2, 0),
    "GPT-4o": (55.6, 28.3, 26.2, 50.2, 59.9, 24.9, 15.7, 35.2, 50.9, 10.6, 18.2, 57.5, 49.2, 43.5, 33.5),
    "GPT-4o mini": (52.0, 20.4, 31.7, 37.1, 57.5, 22.0, 15.1, 14.9, 49.2, 11.0, 25.5, 32.1, 33.2, 39.5, 30.1),
    "Gemini 1.5 Pro": (
        50.7,
        15.3,
        27.9,
        35.9,
        56.7,
        20.0,
        15.9,
        33.2,
        50.1,
        7.4,
        20.5,
        50.5,
        36.0,
        40.0,
        31.2,
    ),
    "Claude 3.5 Sonnet": (
        54.0,
        27.5,
        29.6,
        43.7,
        58.3,
        20.3,
        17.8,
        34.2,
        52.8,
        11.5,
        18.9,
        51.5,
        51.4,
        42.0,
        37.1,
    ),
    "LLaVA-1.6-Vicuna-7B": (
        50.0,
        15.8,
        29.4,
        16.5,
        50.1,
        1.0,
        13.6,
        13.3,
        50.5,
        19.7,
        66.0,
        23.7,
        23.3,
        28.0,
        16.0,
    ),
    "Qwen2-VL-72B": (54.0, 28.3, 30.2, 48.9, 60.6, 23.6, 16.1, 23.7, 50.7, 9.8, 18.9, 35.5, 42.9, 35.0, 10.3),
    "InternVL2-Llama3-76B": (
        50.4,
        9.4,
        35.6,
        41.4,
        59.0,
        20.2,
        20.5,
        21.8,
        51.3,
        6.5,
        20.4,
        26.6,
        34.7,
        38.0,
        22.5,
    ),
    "PULSE-7B": (82.4, 74.8, 11.0, 61.3, 90.7, 85.4, 5.0, 73.8, 76.9, 57.6, 8.6, 85.2, 78.2, 58.0, 38.9),
}


def published(subset: str) -> dict[str, dict[str, float | None]]:
    """Each published model's metrics on ``subset``, as fractions (0-1), like ``scores.json``'s."""
    start = sum(len(COLUMNS[name]) for name in _ORDER[: _ORDER.index(subset)]) if subset in COLUMNS else 0
    names = COLUMNS.get(subset, ())
    return {
        model: {
            m: None if v is None else v / 100
            for m, v in zip(names, row[start : start + len(names)], strict=True)
        }
        for model, row in _ROWS.items()
    }
