"""Training objectives of :class:`ecglm.module.ECGLanguageModel` (entry-point group ``ecglm.objectives``):
``sft`` (the default), ``grpo`` and ``dpo``; the math is in :mod:`ecglm.objectives.losses`."""

from ecglm.objectives.base import Objective
from ecglm.objectives.dpo import DPO
from ecglm.objectives.grpo import GRPO
from ecglm.objectives.sft import SFT

__all__ = ["DPO", "GRPO", "SFT", "Objective"]
