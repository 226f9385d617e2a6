"""The QA stream under the DataModule: an epoch plan over WebDataset shards, split across DDP ranks
and loader workers, mixed by dataset weight, resumable mid-epoch, and safe with bad input.

One file per job; every name is importable from ``ecglm.data.stream`` as before:

- ``plan.py``: :class:`ShardInfo`, :class:`Segment` and :class:`EpochPlan`, which QA positions of
  which shards each (rank, loader worker) slot reads in an epoch (why, in its docstring);
- ``qa.py``: :func:`expand_qa` (one item per QA pair) and :class:`CheckedQA` (the same behind checks,
  reading one shard segment), :data:`NUM_LEADS`;
- ``bad_input.py``: :class:`BadInput` (raise, or log and count bad input by reason),
  :class:`BadSampleError`, :data:`REASONS`, :data:`TAR_ERROR`;
- ``checksums.py``: :class:`ShardChecksums` (a shard that no longer matches its manifest is not read);
- ``qastream.py``: :class:`QAStream`, one rank's pairs of an epoch, and :func:`interleave`, which
  mixes a slot's datasets.

What an ECG picture must be (``MIN_IMAGE_SIDE``, ...) is in :mod:`ecglm.data.images`, which the
inference side imports without WebDataset.
"""

from __future__ import annotations

from ecglm._deprecation import moved_names
from ecglm.data.stream.bad_input import REASONS, TAR_ERROR, BadInput, BadSampleError
from ecglm.data.stream.checksums import ShardChecksums
from ecglm.data.stream.plan import EpochPlan, Segment, ShardInfo
from ecglm.data.stream.qa import NUM_LEADS, CheckedQA, expand_qa
from ecglm.data.stream.qastream import QAStream, interleave

__all__ = [
    "NUM_LEADS",
    "REASONS",
    "TAR_ERROR",
    "BadInput",
    "BadSampleError",
    "CheckedQA",
    "EpochPlan",
    "QAStream",
    "Segment",
    "ShardChecksums",
    "ShardInfo",
    "expand_qa",
    "interleave",
]

__getattr__ = moved_names(
    __name__,
    {
        "MIN_IMAGE_SIDE": "ecglm.data.images:MIN_IMAGE_SIDE",
        "IMAGE_MEMBERS": "ecglm.data.images:IMAGE_MEMBERS",
    },
)
