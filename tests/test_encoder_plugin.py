"""The example encoder plugin ``plugins/ecglm-s4-encoder``, installed for real by pip: found, named in
a recipe, run on a real ECG, trained through, and its FFT convolution checked against the recurrence."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch

from ecglm.encoders import ECGEncoder, check_preprocessing
from ecglm.plugins import discover, format_registry
from ecglm_testing import REPO, TINY, import_fresh_from, package_version, pip_install_copy

PLUGIN_SRC = REPO / "plugins" / "ecglm-s4-encoder"
DIST, PACKAGE, NAME, GROUP = "ecglm-s4-encoder", "ecglm_s4_encoder", "s4d", "ecglm.encoders"
CLASS_PATH = f"{PACKAGE}.S4DECGEncoder"
LEADS = ["i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6"]
SMALL = dict(dim=32, state_dim=16, num_layers=2, dropout=0.0)


def plugin_version() -> str:
    return package_version(PLUGIN_SRC)


def plugin_module():
    """The plugin's module, loaded as ecglm loads it: through its entry point."""
    return sys.modules[entry_points(group=GROUP)[NAME].load().__module__]


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    """The plugin pip-installed (wheel built by setuptools) into a folder of its own."""
    return pip_install_copy(PLUGIN_SRC, tmp_path_factory.mktemp("encoder-plugin"))


@pytest.fixture
def installed(site_dir, monkeypatch) -> Iterator[Path]:
    """``site_dir`` first on ``sys.path``, and the plugin imported from there (not from any other install)."""
    yield from import_fresh_from(site_dir, PACKAGE, monkeypatch)


@pytest.fixture(scope="module")
def ptb_window(ptb_record) -> np.ndarray:
    """10 s of the real PTB record s0010_re: 12 standard leads, 1000 -> 250 Hz, z-scored per lead."""
    import wfdb
    from scipy.signal import resample_poly

    record = wfdb.rdrecord(str(ptb_record))
    assert record.fs == 1000
    names = [n.lower() for n in record.sig_name]
    signal = record.p_signal[:, [names.index(lead) for lead in LEADS]].T
    window = resample_poly(signal, up=1, down=4, axis=-1)[:, :2500]
    window = (window - window.mean(axis=1, keepdims=True)) / window.std(axis=1, keepdims=True)
    return window.astype(np.float32)


def test_discovered_and_listed(installed):
    registry = discover()

    plugin = registry.plugins[GROUP][NAME]
    assert (plugin.distribution, plugin.version, plugin.class_path) == (DIST, plugin_version(), CLASS_PATH)
    assert not [f for f in registry.failures if f.plugin.distribution == DIST]
    assert Path(sys.modules[PACKAGE].__file__).is_relative_to(installed)
    assert issubclass(entry_points(group=GROUP)[NAME].load(), ECGEncoder)
    line = rf"^  {NAME} +{re.escape(CLASS_PATH)} +{DIST} {re.escape(plugin_version())}$"
    assert re.search(line, format_registry(registry), re.M)


def plugin_recipe(path: Path) -> Path:
    """The quickstart recipe with its encoder section naming the plugin by its entry point."""
    text = (REPO / "recipes" / "quickstart.yaml").read_text()
    encoder = re.search(r"^  encoder:\n(?:    .*\n)+", text, re.M)
    assert encoder is not None and "class_path: wav2vec2" in encoder.group(0)
    init_args = "".join(f"      {key}: {value}\n" for key, value in SMALL.items())
    section = f"  encoder:\n    class_path: {NAME}\n    init_args:\n{init_args}"
    path.write_text(text[: encoder.start()] + section + text[encoder.end() :])
    return path


def test_quickstart_recipe_can_name_it(installed, ptb_window, tokenizer_dir, tmp_path, monkeypatch):
    from ecglm.commands.lightning import run_cli

    monkeypatch.chdir(tmp_path)  # the recipe's relative paths (runs/, shards/) land here
    recipe = plugin_recipe(tmp_path / "s4d.yaml")
    cli = run_cli(
        [
            "--config",
            str(recipe),
            # A tiny random Llama instead of SmolLM2: this test is about the encoder.
            "--model.backbone.init_args.model=llama",
            f"--model.backbone.init_args.tokenizer={tokenizer_dir}",
            "--model.backbone.init_args.gguf_file=null",
            "--model.backbone.init_args.random_init=true",
            f"--model.backbone.init_args.config_overrides={json.dumps(dict(TINY, vocab_size=49152))}",
            "--trainer.logger=false",
        ],
        run=False,
    )

    encoder = cli.model.encoder
    assert type(encoder).__module__ == PACKAGE and type(encoder).__name__ == "S4DECGEncoder"
    assert (encoder.output_dim, len(encoder.blocks)) == (32, 2)
    assert cli.model.connector.input_dim == 32
    with torch.no_grad():
        tokens = cli.model.model.ecg_tokens(torch.from_numpy(ptb_window)[None].repeat(2, 1, 1))
    assert tokens.shape == (2, 1, TINY["hidden_size"]) and torch.isfinite(tokens).all()


def test_real_ptb_record(installed, ptb_window, ptb_record):
    torch.manual_seed(0)
    encoder = plugin_module().S4DECGEncoder(dim=64).eval()
    data = {"sampling_rate": 250, "num_samples": ptb_window.shape[1], "normalization": "zscore"}
    assert check_preprocessing(encoder.preprocessing, data, str(ptb_record)) == []

    with torch.no_grad():
        frames = encoder(torch.from_numpy(ptb_window)[None])

    assert encoder.num_frames(2500) == 157
    assert frames.shape == (1, 157, 64)
    assert torch.isfinite(frames).all() and frames.std(dim=1).min() > 0


def test_gradients_reach_every_parameter(installed, ptb_window):
    torch.manual_seed(0)
    encoder = plugin_module().S4DECGEncoder(**SMALL)
    ecg = torch.from_numpy(ptb_window)[None] + 0.1 * torch.randn(2, 12, 2500)
    frames = encoder(ecg)
    # A random readout: the final LayerNorm makes a plain sum of squares nearly constant.
    (frames * torch.randn_like(frames)).sum().backward()

    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def recurrent_reference(layer, u: torch.Tensor) -> torch.Tensor:
    """The S4D layer one step at a time, in complex128, from its parameters (zero-order hold):
    ``x_k = dA x_{k-1} + dB u_k``, ``y_k = 2 Re(C x_k) + D u_k``; bidirectional layers add the same
    recurrence over the reversed input with the second ``C``."""
    a = torch.complex(-torch.exp(layer.log_a_real.double()), layer.a_imag.double())
    d_a = torch.exp(torch.exp(layer.log_dt.double()).unsqueeze(-1) * a)
    d_b = (d_a - 1) / a
    c = torch.view_as_complex(layer.c.double())
    u = u.double()

    def run(c_direction: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        state = torch.zeros(*signal.shape[:2], a.shape[-1], dtype=torch.complex128)
        outputs = []
        for k in range(signal.shape[-1]):
            state = d_a * state + d_b * signal[..., k, None]
            outputs.append(2 * (c_direction * state).sum(-1).real)
        return torch.stack(outputs, dim=-1)

    y = run(c[0], u)
    if layer.bidirectional:
        y = y + run(c[1], u.flip(-1)).flip(-1)
    return y + layer.d.double().unsqueeze(-1) * u


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_fft_convolution_matches_the_recurrence(installed, ptb_window, bidirectional):
    """The real ECG's 12 leads as 12 SSM channels, 2,500 steps; float32 FFT vs complex128 recurrence."""
    torch.manual_seed(0)
    layer = plugin_module().S4D(channels=12, state_dim=16, bidirectional=bidirectional)
    u = torch.from_numpy(ptb_window)[None]

    with torch.no_grad():
        fast = layer(u)
    slow = recurrent_reference(layer, u)

    assert fast.dtype == torch.float32
    # Measured: max |error| 1.5e-5 (causal), 1.7e-5 (bidirectional) on outputs up to ~11 in size, from
    # float32 rounding of exp(l dt A) and the FFT. Without the 2L zero-padding the error is O(1).
    torch.testing.assert_close(fast.double(), slow, rtol=1e-4, atol=1e-4)
