"""The identity encoder: the signal itself as frames, for connectors that read raw ECGs."""

from __future__ import annotations

from torch import Tensor

from ecglm.encoders.base import ECGEncoder, Preprocessing


class RawECGEncoder(ECGEncoder):
    """No encoder: the signal itself, one frame per sample, for connectors that read raw ECGs.

    Returns ``ecg`` transposed to ``(batch, samples, leads)``, so ``output_dim`` is the number of
    leads. It has no parameters; pair it with the ``encoder-free`` connector
    (:class:`ecglm.connectors.EncoderFreeConnector`), which patches and projects the signal.

    Args:
        in_channels: Number of leads (default 12).
        sampling_rate: Expected sampling rate in Hz.
        num_samples: Expected samples per lead.
        normalization: Expected normalisation, one of :data:`NORMALIZATIONS`.
    """

    def __init__(
        self,
        in_channels: int = 12,
        sampling_rate: int = 250,
        num_samples: int = 2500,
        normalization: str = "zscore",
    ):
        super().__init__()
        self.in_channels = in_channels
        self.output_dim = in_channels
        self.preprocessing = Preprocessing(sampling_rate, num_samples, normalization)

    def forward(self, ecg: Tensor) -> Tensor:
        if ecg.dim() != 3 or ecg.shape[1] != self.in_channels:
            raise ValueError(
                f"expected ECGs of shape (batch, {self.in_channels}, samples), got {tuple(ecg.shape)}"
            )
        return ecg.transpose(1, 2)
