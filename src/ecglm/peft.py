"""PEFT policies: which parameters of encoder, connector and backbone train, and how the backbone is adapted.

Component layer: imports torch (and, for the LoRA family, peft) only. A policy is one object applied
to any backbone — never a model subclass or a training script of its own — so every strategy runs
through the same training path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn

from ecglm.backbones import Backbone
from ecglm.connectors import Connector
from ecglm.encoders import ECGEncoder


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a 4-bit weight counts its original elements.

    bitsandbytes packs two 4-bit values per stored element, so ``numel()`` of a quantised weight is
    half its parameter count; its ``quant_state.shape`` is the original shape.
    """
    total = trainable = 0
    for p in module.parameters():
        state = getattr(p, "quant_state", None)
        n = state.shape.numel() if state is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


class PEFTPolicy(ABC):
    """Base class of every PEFT policy.

    :meth:`apply` sets ``requires_grad`` on every parameter of the three parts and may replace
    modules inside the backbone (adapters). It runs once, before the optimizer is built.
    """

    @abstractmethod
    def apply(self, encoder: ECGEncoder, connector: Connector, backbone: Backbone) -> None:
        """Freeze, unfreeze or adapt the parts in place."""


class ProjectionOnly(PEFTPolicy):
    """Train the connector only; the language model stays frozen.

    Args:
        train_encoder: Train the encoder too (for an encoder without pretrained weights, as in
            the quickstart).
    """

    def __init__(self, train_encoder: bool = False):
        self.train_encoder = train_encoder

    def apply(self, encoder: ECGEncoder, connector: Connector, backbone: Backbone) -> None:
        set_trainable(encoder, self.train_encoder)
        set_trainable(connector, True)
        set_trainable(backbone, False)
