"""The S4D layer and encoder on their own: ecglm's encoder contract, FFT path, causality, symmetry,
initialisation, frames.

ecglm's tests/test_encoder_plugin.py checks the installed package: discovery, recipes, a real
ECG, gradients, and the convolution against a step-by-step recurrence.
"""

from __future__ import annotations

import math

import pytest
import torch
from ecglm_s4_encoder import S4D, S4DECGEncoder

from ecglm.testing import check_encoder


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_keeps_the_encoder_contract(bidirectional):
    """Shapes, output_dim, num_frames, rows independent, a gradient for every parameter."""
    torch.manual_seed(0)
    encoder = S4DECGEncoder(dim=16, state_dim=4, num_layers=2, bidirectional=bidirectional, dropout=0.0)

    frames = check_encoder(encoder)

    assert frames.shape == (2, 157, 16)


def test_fft_convolution_equals_the_kernel_impulse_response():
    torch.manual_seed(0)
    layer = S4D(channels=3, state_dim=8, bidirectional=False)
    impulse = torch.zeros(1, 3, 40)
    impulse[..., 0] = 1.0

    with torch.no_grad():
        response = layer(impulse)[0]
        expected = layer.kernel(40)[0]
        expected[:, 0] += layer.d

    torch.testing.assert_close(response, expected, rtol=1e-5, atol=1e-5)


def test_unidirectional_layer_is_causal():
    torch.manual_seed(0)
    layer = S4D(channels=4, state_dim=8, bidirectional=False)
    u = torch.randn(2, 4, 64)
    changed = u.clone()
    changed[..., 30:] += torch.randn(2, 4, 34)

    with torch.no_grad():
        y, y_changed = layer(u), layer(changed)

    torch.testing.assert_close(y[..., :30], y_changed[..., :30], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y[..., 30:], y_changed[..., 30:])


def test_bidirectional_layer_reverses_with_its_input():
    """Reversing the input and swapping the two output matrices reverses the output."""
    torch.manual_seed(0)
    layer = S4D(channels=4, state_dim=8, bidirectional=True)
    u = torch.randn(2, 4, 50)

    with torch.no_grad():
        y = layer(u)
        layer.c.copy_(layer.c.flip(0))
        y_reversed = layer(u.flip(-1))

    torch.testing.assert_close(y_reversed, y.flip(-1), rtol=1e-5, atol=1e-5)


def test_s4d_lin_initialisation_is_stable():
    layer = S4D(channels=2, state_dim=8, dt_min=1e-3, dt_max=1e-1)
    a = torch.complex(-torch.exp(layer.log_a_real), layer.a_imag)
    expected = torch.complex(torch.full((4,), -0.5), math.pi * torch.arange(4.0))
    torch.testing.assert_close(a, expected.expand(2, 4))
    dt = torch.exp(layer.log_dt)
    assert ((dt >= 1e-3) & (dt <= 1e-1)).all()
    assert (torch.exp(layer.discretize()[0]).abs() < 1).all()
    with pytest.raises(ValueError, match="state_dim must be even"):
        S4D(channels=2, state_dim=7)


@pytest.mark.parametrize(("samples", "frames"), [(2500, 157), (5000, 313), (1000, 63)])
def test_frame_counts(samples, frames):
    encoder = S4DECGEncoder(dim=16, state_dim=4, num_layers=1, dropout=0.0)
    assert encoder.num_frames(samples) == frames
    with torch.no_grad():
        assert encoder(torch.randn(1, 12, samples)).shape == (1, frames, 16)


def test_rejects_wrong_leads_and_runs_in_bf16():
    encoder = S4DECGEncoder(dim=16, state_dim=4, num_layers=1, dropout=0.0)
    with pytest.raises(ValueError, match=r"\(batch, 12, samples\)"):
        encoder(torch.randn(1, 8, 2500))
    encoder = encoder.to(torch.bfloat16)
    with torch.no_grad():
        out = encoder(torch.randn(1, 12, 2500, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
