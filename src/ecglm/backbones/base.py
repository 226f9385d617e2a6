"""The interface every language-model backbone implements (:class:`Backbone`), and the answer-span
arithmetic of left-padded batches that backbones share.

Component layer: torch and transformers only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from ecglm.prompts import IGNORE_INDEX, default_placeholder_id


class Backbone(nn.Module, ABC):
    """Base class of every language-model backbone.

    Subclasses set ``hidden_size`` and ``tokenizer`` and implement :meth:`embed_tokens`,
    :meth:`forward` and :meth:`generate`. ``pretrained`` says whether the weights can be loaded
    again from their source; frozen weights that cannot are saved in checkpoints.
    ``prefix_reuse`` (set by a policy that keeps the LM frozen) lets :meth:`forward` compute the
    prompt prefix that rows share once, without gradients; a backbone that cannot ignores it.
    """

    hidden_size: int
    tokenizer: PreTrainedTokenizerBase
    pretrained: bool = True
    prefix_reuse: bool = False

    #: What a subclass must set in ``__init__``, and why (named when it is missing).
    REQUIRED_ATTRIBUTES = {
        "hidden_size": "the width of its token embeddings, which the connector projects the ECG to",
        "tokenizer": "the tokenizer its prompts are written with (the data side's prompt style binds it)",
    }

    def __getattr__(self, name: str) -> Any:
        # nn.Module.__getattr__ runs only for attributes not found the usual way; its message names
        # neither the contract nor the class that broke it.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in self.REQUIRED_ATTRIBUTES:
                raise
        raise AttributeError(
            f"{type(self).__name__} has no {name}: a Backbone must set self.{name} in __init__ "
            f"({self.REQUIRED_ATTRIBUTES[name]})"
        )

    @property
    def placeholder_token_id(self) -> int:
        """The token id written at the ECG positions (their embeddings are overwritten). Only its
        position matters, except for models that look ids up beside the embeddings (Gemma 4's
        per-layer embeddings see it at the ECG positions). Default: pad, else end of sequence."""
        return default_placeholder_id(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return default_placeholder_id(self.tokenizer)

    #: ``(height, width)`` of the ECG images a backbone with a vision tower of its own reads
    #: (:class:`VisionLanguageBackbone`); ``None``: it reads ECG tokens from ecglm's encoder.
    image_size: tuple[int, int] | None = None

    @property
    def ecg_frame(self) -> tuple[str, str]:
        """Text the prompt writes before and after each ECG's positions (default: none). A
        vision-language model's processor frames an image with delimiters of its own."""
        return "", ""

    @property
    def transformers_model(self) -> PreTrainedModel | None:
        """Optional: the wrapped ``transformers`` model, which adapters (LoRA, DoRA, QLoRA) and gradient
        checkpointing act on. ``None`` (the default) for a backbone that wraps none: those policy
        options then refuse it, naming the backbone."""
        return None

    @abstractmethod
    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Input embeddings of ``input_ids``, ``(batch, seq, hidden_size)``."""

    def splice(self, input_ids: Tensor, ecg_mask: Tensor, ecg_tokens: Tensor) -> Tensor:
        """Token embeddings with the ECG tokens written over the positions where ``ecg_mask`` is set."""
        embeds = self.embed_tokens(input_ids)
        expected = ecg_tokens.shape[0] * ecg_tokens.shape[1]
        if int(ecg_mask.sum()) != expected:
            raise ValueError(f"{int(ecg_mask.sum())} ECG positions in the batch for {expected} ECG tokens")
        return embeds.masked_scatter(ecg_mask.unsqueeze(-1), ecg_tokens.to(embeds.dtype))

    @abstractmethod
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        ecg_mask: Tensor,
        ecg_tokens: Tensor,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Run the LM on the spliced sequence; with ``labels``, ``loss`` is the mean answer-token loss.

        ``position_ids`` comes with packed rows only (:func:`ecglm.batch.pack`), and only to a
        backbone whose :meth:`packing_blocker` is ``None``.
        """

    def last_logits(
        self, input_ids: Tensor, attention_mask: Tensor, ecg_mask: Tensor, ecg_tokens: Tensor
    ) -> Tensor:
        """Vocabulary logits at the last position of left-padded prompts, ``(rows, vocab)``: the
        distribution of each answer's first token. Default: from :meth:`forward`'s logits."""
        return self.forward(input_ids, attention_mask, ecg_mask, ecg_tokens).logits[:, -1]

    def packing_blocker(self) -> str | None:
        """Why this backbone cannot take packed rows (:func:`ecglm.batch.pack`); ``None`` if it can.

        A backbone that can takes ``position_ids`` in :meth:`forward` (each QA pair numbered from 0)
        and attends within each pair only, so that the loss is the padded batch's.
        """
        return f"{type(self).__name__} does not take packed rows (it does not override packing_blocker)"

    @abstractmethod
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        ecg_mask: Tensor,
        ecg_tokens: Tensor,
        **generation_kwargs: Any,
    ) -> Tensor:
        """Continue left-padded prompts; returns only the new token ids, ``(batch, new_tokens)``."""


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (rows are left-padded)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def answer_span(labels: Tensor) -> int:
    """Length of the trailing span that holds every supervised position of left-padded ``labels``."""
    supervised = (labels != IGNORE_INDEX).any(0).nonzero()
    if supervised.numel() == 0:
        raise ValueError("no supervised token in the batch (every label is ignored)")
    return labels.shape[1] - int(supervised[0])


def answer_loss(logits: Tensor, labels: Tensor, span: int) -> Tensor:
    """Mean loss of the answer tokens from the logits of the last ``span + 1`` positions (left-padded)."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, -span:].reshape(-1), ignore_index=IGNORE_INDEX
    )
