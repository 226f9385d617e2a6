"""The field's benchmarks run with any ecglm model and scored as their authors score them (``pulse``) and
as they should be scored (``strict``): ECGBench (PULSE's nine subsets). See docs/benchmarks.md."""

from ecglm.benchmarks.ecgbench import (
    SUBSETS,
    BenchmarkError,
    Conversation,
    Item,
    Subset,
    read_conversations,
    read_predictions,
    read_subset,
)
from ecglm.benchmarks.scoring import score_ecgbench, score_subset

__all__ = [
    "SUBSETS",
    "BenchmarkError",
    "Conversation",
    "Item",
    "Subset",
    "read_conversations",
    "read_predictions",
    "read_subset",
    "score_ecgbench",
    "score_subset",
]
