"""ecglm encoder plugin: a compact diagonal state-space model (S4D) over 12-lead ECGs.

Registered as ``s4d`` in the ``ecglm.encoders`` entry-point group. Imports torch and ecglm's
component layer only, and has no import-time side effects, so it is safe to import in every process
and more than once.

The layer is S4D (Gu, Gupta, Goel and Ré, "On the Parameterization and Initialization of Diagonal
State Space Models", NeurIPS 2022, arXiv:2206.11893) with its S4D-Lin initialisation, in the
pre-norm residual block of the S4 papers (SSM -> GELU -> position-wise linear + GLU). A compact
structured state-space model, ECG-CPC, led five of seven task categories in a benchmark of ECG
foundation models (Al-Masud, Lopez Alcaraz and Strodthoff, ICLR 2026, arXiv:2509.25095); this
encoder is of that family, not that model (no pretrained weights ship with it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecglm.encoders import ECGEncoder, Preprocessing

__all__ = ["S4D", "S4DBlock", "S4DECGEncoder"]


class S4D(nn.Module):
    """Diagonal state-space convolution along time: one independent SSM per channel.

    Each channel ``h`` is a linear time-invariant system with ``state_dim / 2`` complex modes ``n``
    (their conjugates are implied, so the output is real)::

        x'(t) = A x(t) + u(t),   y(t) = 2 Re(C x(t)) + D u(t),   A_n = -exp(log_a_real_n) + i a_imag_n

    Zero-order hold with step ``dt = exp(log_dt)`` gives the recurrence, per sample ``k``::

        x_k = dA x_{k-1} + dB u_k,   dA = exp(dt A),   dB = (exp(dt A) - 1) / A
        y_k = 2 Re(sum_n C_n x_k[n]) + D u_k

    whose unrolling is a causal convolution ``y = K * u + D u`` with the kernel
    ``K_l = 2 Re(sum_n C_n dB_n dA_n^l)``, ``l = 0 .. L-1``. :meth:`forward` computes ``K`` (a
    Vandermonde product) and the convolution by FFT, in O(L log L); the recurrence gives the same
    numbers one step at a time. ``Re(A) < 0`` keeps every mode stable (``|dA| < 1``).

    Initialisation (S4D-Lin): ``A_n = -1/2 + i pi n``; ``log dt`` uniform in
    ``[log dt_min, log dt_max]``; ``C`` complex standard normal; ``D`` standard normal.
    ``bidirectional`` adds a second ``C`` that reads the time-reversed input (same ``A`` and
    ``dt``): ``y = K_fwd * u + flip(K_bwd * flip(u)) + D u``, so each output sees the whole record.

    The kernel and the convolution run in float32 whatever the input dtype (FFTs in bf16 are not
    generally available); the output is cast back.

    Args:
        channels: Channels ``H`` (each its own SSM).
        state_dim: State size ``N`` per channel (``N / 2`` complex modes); must be even.
        bidirectional: Read the input forwards and backwards (an encoder); False: causal.
        dt_min: Smallest initial step.
        dt_max: Largest initial step.
    """

    def __init__(
        self,
        channels: int,
        state_dim: int = 64,
        bidirectional: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ):
        super().__init__()
        if state_dim < 2 or state_dim % 2:
            raise ValueError(f"state_dim must be even and at least 2, got {state_dim}")
        modes = state_dim // 2
        directions = 2 if bidirectional else 1
        log_dt = torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.log_a_real = nn.Parameter(torch.full((channels, modes), math.log(0.5)))
        self.a_imag = nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).repeat(channels, 1))
        # Complex C stored as (..., 2) reals: optimizers and checkpoints then see plain float tensors.
        self.c = nn.Parameter(
            torch.view_as_real(torch.randn(directions, channels, modes, dtype=torch.cfloat)).clone()
        )
        self.d = nn.Parameter(torch.randn(channels))
        self.bidirectional = bidirectional

    def discretize(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(dt A, dB, C)``: ``(H, N/2)``, ``(H, N/2)``, ``(directions, H, N/2)``, complex64."""
        a = torch.complex(-torch.exp(self.log_a_real.float()), self.a_imag.float())
        dt_a = a * torch.exp(self.log_dt.float()).unsqueeze(-1)
        return dt_a, (torch.exp(dt_a) - 1) / a, torch.view_as_complex(self.c.float().contiguous())

    def kernel(self, length: int) -> Tensor:
        """``K``, ``(directions, H, length)``: ``K_l = 2 Re(sum_n C_n dB_n dA_n^l)``."""
        dt_a, d_b, c = self.discretize()
        steps = torch.arange(length, device=dt_a.device, dtype=torch.float32)
        powers = torch.exp(dt_a.unsqueeze(-1) * steps)  # dA^l = exp(l dt A), (H, N/2, L)
        return 2 * torch.einsum("chn,hnl->chl", c * d_b, powers).real

    def forward(self, u: Tensor) -> Tensor:
        """``(batch, H, L)`` -> ``(batch, H, L)``."""
        dtype, u = u.dtype, u.float()
        length = u.shape[-1]
        inputs = torch.stack([u, u.flip(-1)]) if self.bidirectional else u.unsqueeze(0)
        k = self.kernel(length)
        # Zero-padding to 2L turns the FFT's circular convolution into a linear (causal) one.
        spectrum = torch.fft.rfft(inputs, n=2 * length) * torch.fft.rfft(k, n=2 * length).unsqueeze(1)
        y = torch.fft.irfft(spectrum, n=2 * length)[..., :length]
        out = y[0] + y[1].flip(-1) if self.bidirectional else y[0]
        return (out + u * self.d.float().unsqueeze(-1)).to(dtype)


class S4DBlock(nn.Module):
    """Pre-norm residual block: ``x + Dropout(GLU(Linear(Dropout(GELU(S4D(LayerNorm(x)))))))``.

    The SSM mixes along time within each channel; the linear layer with GLU mixes channels.
    """

    def __init__(
        self, dim: int, state_dim: int, bidirectional: bool, dropout: float, dt_min: float, dt_max: float
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ssm = S4D(dim, state_dim, bidirectional, dt_min, dt_max)
        self.mix = nn.Linear(dim, 2 * dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, frames, dim)`` -> same shape."""
        z = self.ssm(self.norm(x).transpose(1, 2)).transpose(1, 2)
        z = self.dropout(F.gelu(z))
        return x + self.dropout(F.glu(self.mix(z), dim=-1))


class S4DECGEncoder(ECGEncoder):
    """A compact S4D encoder: a strided convolution stem, then S4D blocks, then LayerNorm.

    The stem's convolutions (each ``dim`` channels, ``padding = kernel // 2``, GELU) downsample the
    signal: the default ``((7, 4), (5, 4))`` turns 2,500 samples (10 s at 250 Hz) into 157 frames
    of 64 ms. ``num_layers`` :class:`S4DBlock` s follow, and a final LayerNorm. The defaults have
    325,632 parameters. Random initialisation (``pretrained`` is False): frozen, its weights are
    saved in ecglm's checkpoints.

    Args:
        in_channels: Number of leads.
        dim: Width of the stem and blocks, and ``output_dim``.
        state_dim: SSM state size per channel (even).
        num_layers: S4D blocks.
        stem: ``(kernel, stride)`` of each stem convolution.
        bidirectional: Each SSM reads the record forwards and backwards (False: causal).
        dropout: Dropout in the blocks.
        dt_min: Smallest initial SSM step (in frames).
        dt_max: Largest initial SSM step.
        sampling_rate: Expected sampling rate in Hz.
        num_samples: Expected samples per lead (any length runs; this is what the data is checked against).
        normalization: Expected normalisation (``"zscore"`` or ``"minmax"``).
    """

    def __init__(
        self,
        in_channels: int = 12,
        dim: int = 128,
        state_dim: int = 64,
        num_layers: int = 4,
        stem: Sequence[tuple[int, int]] = ((7, 4), (5, 4)),
        bidirectional: bool = True,
        dropout: float = 0.1,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        sampling_rate: int = 250,
        num_samples: int = 2500,
        normalization: str = "zscore",
    ):
        super().__init__()
        self.in_channels = in_channels
        self.output_dim = dim
        self.stem_layers = tuple((int(k), int(s)) for k, s in stem)
        self.preprocessing = Preprocessing(sampling_rate, num_samples, normalization)
        convs: list[nn.Module] = []
        for i, (kernel, stride) in enumerate(self.stem_layers):
            channels = in_channels if i == 0 else dim
            convs += [nn.Conv1d(channels, dim, kernel, stride=stride, padding=kernel // 2), nn.GELU()]
        self.stem = nn.Sequential(*convs)
        self.blocks = nn.ModuleList(
            S4DBlock(dim, state_dim, bidirectional, dropout, dt_min, dt_max) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(dim)

    def num_frames(self, num_samples: int) -> int:
        """Frames for ``num_samples`` samples: ``floor((n + 2 (k // 2) - k) / s) + 1`` per convolution."""
        for kernel, stride in self.stem_layers:
            num_samples = (num_samples + 2 * (kernel // 2) - kernel) // stride + 1
        return num_samples

    def forward(self, ecg: Tensor) -> Tensor:
        """``(batch, leads, samples)`` -> ``(batch, frames, dim)``."""
        if ecg.dim() != 3 or ecg.shape[1] != self.in_channels:
            raise ValueError(
                f"expected ECGs of shape (batch, {self.in_channels}, samples), got {tuple(ecg.shape)}"
            )
        x = self.stem(ecg).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)
