"""The DataLoader of a :class:`ecglm.data.stream.QAStream`, which tells the stream its epoch and resume
point when a pass starts (an iterable dataset has no sampler for Lightning to tell)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

from ecglm.data.stream import QAStream


class StreamLoader(DataLoader):
    """A DataLoader over a :class:`QAStream` that sets the stream's epoch and resume point when a pass starts.

    Lightning tells samplers the epoch (``set_epoch``), but an iterable dataset has no sampler; here
    ``on_iter(dataset)`` does it, at the first batch of each pass rather than when the iterator is
    made: Lightning makes the training iterator while setting up (``estimated_stepping_batches``),
    before a checkpoint's loop state is restored, and only then would the epoch be wrong. The
    workers copy the dataset when they start, which is then too. ``state_dict`` /
    ``load_state_dict`` hand over to the DataModule's stream position, which makes this a
    resumable loader to Lightning.
    """

    def __init__(
        self,
        dataset: QAStream,
        on_iter: Callable[[QAStream], None],
        position: Callable[[], dict[str, Any]] | None = None,
        resume: Callable[[dict[str, Any]], None] | None = None,
        **kwargs: Any,
    ):
        super().__init__(dataset, **kwargs)
        self.on_iter, self.position, self.resume = on_iter, position, resume

    def __iter__(self) -> Iterator[Any]:
        return _StartsAtFirstBatch(self)

    def state_dict(self) -> dict[str, Any]:
        return self.position() if self.position else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.resume and state_dict:
            self.resume(state_dict)


class _StartsAtFirstBatch:
    """The loader's iterator, made (and its workers started) when the first batch is asked for."""

    def __init__(self, loader: StreamLoader):
        self.loader, self.iterator = loader, None

    def __iter__(self) -> _StartsAtFirstBatch:
        return self

    def __next__(self) -> Any:
        if self.iterator is None:
            self.loader.on_iter(self.loader.dataset)
            self.iterator = DataLoader.__iter__(self.loader)
        return next(self.iterator)
