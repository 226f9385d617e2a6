"""Contract checks: run a component forward and backward on tiny inputs and check what its base
class promises (shapes, declared widths, gradients), raising :class:`ContractError` with what broke.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ecglm.backbones import Backbone
from ecglm.connectors import Connector, MLPConnector
from ecglm.encoders import ECGEncoder, Preprocessing
from ecglm.peft import PEFTPolicy
from ecglm.prompts import IGNORE_INDEX, ChatTemplate, EncodedChat, PromptStyle

QA_PAIRS = [
    ("Is the rhythm regular or irregular?", "irregular"),
    ("Does this ECG show first degree av block? Answer briefly.", "no"),
]


class ContractError(AssertionError):
    """A component does not keep the contract of its base class."""


def _require(condition: object, message: str) -> None:
    # Not `assert`: `python -O` strips those, and a contract check must still check.
    if not condition:
        raise ContractError(message)


def _random(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def check_gradients(*modules: nn.Module, what: str = "") -> None:
    """Every trainable parameter of ``modules`` has a finite gradient, and no frozen one has any.

    Call after ``backward()``; the gradients are cleared afterwards.
    """
    named = [(n, p) for m in modules for n, p in m.named_parameters()]
    missing = [n for n, p in named if p.requires_grad and p.grad is None]
    broken = [n for n, p in named if p.requires_grad and p.grad is not None and not p.grad.isfinite().all()]
    leaked = [n for n, p in named if not p.requires_grad and p.grad is not None]
    for _, p in named:
        p.grad = None
    prefix = f"{what}: " if what else ""
    _require(not missing, f"{prefix}no gradient reaches the trainable parameters {missing}")
    _require(not broken, f"{prefix}non-finite gradients in {broken}")
    _require(not leaked, f"{prefix}frozen parameters got gradients: {leaked}")


def _check_rows_independent(module: nn.Module, run: Any, inputs: Tensor, what: str) -> Tensor:
    """``run(inputs)`` in eval mode; its first row must not depend on the rest of the batch."""
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out, first = run(inputs), run(inputs[:1])
    finally:
        module.train(training)
    close = torch.allclose(out[:1], first, rtol=1e-4, atol=1e-4)
    _require(close, f"{what}: a row's output depends on the other rows of its batch")
    return out


def check_encoder(
    encoder: ECGEncoder, leads: int = 12, num_samples: int | None = None, batch: int = 2
) -> Tensor:
    """Check :class:`~ecglm.encoders.ECGEncoder`'s contract on random ECGs; return its output.

    ``output_dim`` and ``preprocessing`` are declared; ``(batch, leads, samples)`` becomes
    ``(batch, frames, output_dim)``, finite, each row independent of the others (``num_frames(samples)``
    frames, if the encoder says); every trainable parameter gets a gradient. ``num_samples``
    defaults to ``preprocessing.num_samples``.
    """
    name = type(encoder).__name__
    _require(isinstance(encoder, ECGEncoder), f"{name} is not an ecglm.encoders.ECGEncoder")
    width = getattr(encoder, "output_dim", None)
    _require(isinstance(width, int) and width > 0, f"{name}.output_dim must be a positive int, not {width!r}")
    _require(
        isinstance(encoder.preprocessing, Preprocessing), f"{name}.preprocessing must be a Preprocessing"
    )
    samples = num_samples or encoder.preprocessing.num_samples
    ecg = _random(batch, leads, samples)
    frames = _check_rows_independent(encoder, encoder, ecg, name)
    _require(frames.ndim == 3, f"{name}: (batch, frames, output_dim) expected, got {tuple(frames.shape)}")
    _require(
        frames.shape[::2] == (batch, width), f"{name}: output {tuple(frames.shape)} for output_dim={width}"
    )
    _require(frames.isfinite().all(), f"{name}: non-finite output")
    if hasattr(encoder, "num_frames"):
        expected = encoder.num_frames(samples)
        _require(frames.shape[1] == expected, f"{name}: {frames.shape[1]} frames, num_frames says {expected}")
    if any(p.requires_grad for p in encoder.parameters()):
        out = encoder(ecg)
        # A random readout: a final LayerNorm makes a plain sum nearly constant, with gradients near 0.
        (out * _random(*out.shape, seed=1)).sum().backward()
        check_gradients(encoder, what=name)
    return frames


def check_connector(
    connector: Connector, input_dim: int = 32, output_dim: int = 64, num_frames: int = 100, batch: int = 2
) -> Tensor:
    """Check :class:`~ecglm.connectors.Connector`'s contract; return its output.

    ``configure(input_dim, output_dim)`` builds it (unless built already: its own widths are used);
    ``(batch, frames, input_dim)`` becomes ``(batch, num_tokens, output_dim)``, finite, each row
    independent; gradients reach every trainable parameter and the frames (so a trainable encoder
    below it learns).
    """
    name = type(connector).__name__
    _require(isinstance(connector, Connector), f"{name} is not an ecglm.connectors.Connector")
    if connector.input_dim is None:
        connector.configure(input_dim, output_dim)
    input_dim, output_dim = connector.input_dim, connector.output_dim
    _require(any(True for _ in connector.parameters()), f"{name}: configure() built no parameters")
    frames = _random(batch, num_frames, input_dim).requires_grad_()
    tokens = _check_rows_independent(connector, connector, frames.detach(), name)
    shape = (batch, connector.num_tokens, output_dim)
    _require(tokens.shape == shape, f"{name}: output {tuple(tokens.shape)}, expected {shape}")
    _require(tokens.isfinite().all(), f"{name}: non-finite output")
    out = connector(frames)
    (out * _random(*out.shape, seed=1)).sum().backward()
    _require(
        frames.grad is not None and frames.grad.abs().sum() > 0, f"{name}: no gradient reaches its input"
    )
    check_gradients(connector, what=name)
    return tokens


def left_padded_batch(encoded: list[EncodedChat], pad_id: int, num_ecg_tokens: int) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask``, ``ecg_mask`` and ``labels`` of encoded chats, left-padded."""
    width = max(len(e.input_ids) for e in encoded)
    batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "ecg_mask": [], "labels": []}
    for e in encoded:
        pad = width - len(e.input_ids)
        ecg = [False] * len(e.input_ids)
        for start in e.ecg_starts or (e.ecg_start,):
            ecg[start : start + num_ecg_tokens] = [True] * num_ecg_tokens
        batch["input_ids"].append([pad_id] * pad + e.input_ids)
        batch["attention_mask"].append([0] * pad + [1] * len(e.input_ids))
        batch["ecg_mask"].append([False] * pad + ecg)
        batch["labels"].append([IGNORE_INDEX] * pad + e.labels)
    return {k: torch.tensor(v) for k, v in batch.items()}


def _check_encoded(formatter: PromptStyle, e: EncodedChat, k: int, answer: str | None, name: str) -> None:
    placeholders = e.input_ids[e.ecg_start : e.ecg_start + k]
    _require(placeholders == [formatter.placeholder_token_id] * k, f"{name}: no ECG positions at ecg_start")
    supervised = sum(label != IGNORE_INDEX for label in e.labels)
    _require(
        (supervised > 0) == (answer is not None), f"{name}: {supervised} supervised tokens for {answer!r}"
    )
    _require(e.labels[: e.prompt_length] == [IGNORE_INDEX] * e.prompt_length, f"{name}: loss on the prompt")


def _backbone_batch(backbone: Backbone, prompt: PromptStyle, k: int, with_answers: bool) -> dict[str, Tensor]:
    name = type(backbone).__name__
    encoded = []
    for question, answer in QA_PAIRS:
        answer = answer if with_answers else None
        encoded.append(prompt.encode(question, answer, k))
        _check_encoded(prompt, encoded[-1], k, answer, name)
    return left_padded_batch(encoded, backbone.pad_token_id, k)


def check_backbone(
    backbone: Backbone, num_ecg_tokens: int = 2, max_new_tokens: int = 3, prompt: PromptStyle | None = None
) -> Tensor:
    """Check :class:`~ecglm.backbones.Backbone`'s contract on two QA pairs; return the loss.

    ``hidden_size`` and ``tokenizer`` are set; ``prompt`` (default the chat template), bound to the
    backbone, puts ``num_ecg_tokens`` placeholders at ``ecg_start`` and labels on the answer only
    (also a check of a prompt style); ``embed_tokens`` gives ``(batch, seq, hidden_size)``;
    the loss is finite, depends on the ECG tokens and sends them a gradient, as it does every
    trainable parameter; ``generate`` returns only new token ids, one row per prompt.
    """
    name, k = type(backbone).__name__, num_ecg_tokens
    _require(isinstance(backbone, Backbone), f"{name} is not an ecglm.backbones.Backbone")
    width = getattr(backbone, "hidden_size", None)
    _require(
        isinstance(width, int) and width > 0, f"{name}.hidden_size must be a positive int, not {width!r}"
    )
    _require(getattr(backbone, "tokenizer", None) is not None, f"{name}.tokenizer must be set")
    prompt = (prompt or ChatTemplate()).bind(backbone.tokenizer, backbone.placeholder_token_id)
    batch = _backbone_batch(backbone, prompt, k, with_answers=True)
    embeds = backbone.embed_tokens(batch["input_ids"])
    shape = (*batch["input_ids"].shape, width)
    _require(
        tuple(embeds.shape) == shape, f"{name}.embed_tokens gave {tuple(embeds.shape)}, expected {shape}"
    )
    ecg_tokens = _random(len(QA_PAIRS), k, width).to(embeds.dtype).requires_grad_()
    loss = backbone(**batch, ecg_tokens=ecg_tokens).loss
    _require(loss is not None and loss.ndim == 0 and loss.isfinite(), f"{name}: loss {loss!r} with labels")
    with torch.no_grad():
        other = backbone(**batch, ecg_tokens=_random(len(QA_PAIRS), k, width, seed=2).to(embeds.dtype)).loss
    _require(not torch.equal(loss.detach(), other), f"{name}: the loss does not depend on the ECG tokens")
    loss.backward()
    _require(
        ecg_tokens.grad is not None and ecg_tokens.grad.abs().sum() > 0,
        f"{name}: no gradient reaches the ECG tokens",
    )
    check_gradients(backbone, what=name)
    _check_generate(backbone, prompt, k, max_new_tokens)
    return loss.detach()


def _check_generate(backbone: Backbone, prompt: PromptStyle, k: int, max_new_tokens: int) -> None:
    name = type(backbone).__name__
    prompts = _backbone_batch(backbone, prompt, k, with_answers=False)
    del prompts["labels"]
    ecg_tokens = _random(len(QA_PAIRS), k, backbone.hidden_size).to(
        backbone.embed_tokens(prompts["input_ids"]).dtype
    )
    new = backbone.generate(**prompts, ecg_tokens=ecg_tokens, max_new_tokens=max_new_tokens, do_sample=False)
    rows = len(QA_PAIRS)
    _require(
        new.ndim == 2 and new.shape[0] == rows, f"{name}.generate gave {tuple(new.shape)} for {rows} prompts"
    )
    _require(
        new.shape[1] <= max_new_tokens, f"{name}.generate must return only the new tokens, not the prompt"
    )


def check_policy(
    policy: PEFTPolicy,
    encoder: ECGEncoder | None = None,
    connector: Connector | None = None,
    backbone: Backbone | None = None,
) -> dict[str, list[str]]:
    """Apply ``policy`` and check that it trains what it says; return the trainable names per part.

    Parts left out are :func:`~ecglm.testing.tiny_encoder`, an ``MLPConnector`` of 2 tokens and
    :func:`~ecglm.testing.tiny_backbone`. Something trains; one training step's backward gives every
    trainable parameter a gradient and no frozen one any.
    """
    from ecglm.testing.tiny import tiny_backbone, tiny_encoder

    name = type(policy).__name__
    _require(isinstance(policy, PEFTPolicy), f"{name} is not an ecglm.peft.PEFTPolicy")
    encoder = encoder or tiny_encoder()
    connector = connector or MLPConnector(num_tokens=2)
    backbone = backbone or tiny_backbone()
    connector.configure(encoder.output_dim, backbone.hidden_size)
    policy.apply(encoder, connector, backbone)
    parts = {"encoder": encoder, "connector": connector, "backbone": backbone}
    trainable = {part: [n for n, p in m.named_parameters() if p.requires_grad] for part, m in parts.items()}
    _require(any(trainable.values()), f"{name}: nothing trains after apply()")
    prompt = ChatTemplate().bind(backbone.tokenizer, backbone.placeholder_token_id)
    batch = _backbone_batch(backbone, prompt, connector.num_tokens, with_answers=True)
    ecg = _random(len(QA_PAIRS), 12, encoder.preprocessing.num_samples)
    backbone(**batch, ecg_tokens=connector(encoder(ecg))).loss.backward()
    check_gradients(encoder, connector, backbone, what=name)
    return trainable
