"""The loss path of a frozen LM that computes each distinct prompt prefix once (``prefix_reuse``):
:class:`PrefixReuseMixin`, the part of :class:`~ecglm.backbones.HFBackbone` that runs it.

The cache surgery (prefix states, batching them, the suffix layout) is :mod:`ecglm.prefix_reuse`.
Component layer: torch and transformers only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ecglm.backbones.base import answer_loss, answer_span
from ecglm.prefix_reuse import PrefixReuseUnsupported, PrefixState, SuffixLayout, batch_cache, prefix_state

log = logging.getLogger(__name__)


class PrefixReuseMixin:
    """:meth:`forward_reusing_prefix` for an :class:`~ecglm.backbones.HFBackbone`.

    Reads the backbone's ``model`` (a transformers causal LM), ``prefix_cache``
    (:class:`~ecglm.prefix_reuse.PrefixCache`), :meth:`splice`, :meth:`embed_tokens`,
    :meth:`token_inputs` and ``pad_token_id``; keeps in ``_prefix_unsupported`` why the LM's cache
    cannot be shared (once found) and in ``_prefix_warned`` the reasons already logged.
    """

    def forward_reusing_prefix(
        self, input_ids: Tensor, attention_mask: Tensor, ecg_mask: Tensor, ecg_tokens: Tensor, labels: Tensor
    ) -> CausalLMOutputWithPast | None:
        """The loss path with each row's prefix state from :attr:`prefix_cache`; ``None`` where it cannot run.

        A row's prefix is its tokens before its first ECG position, the same for every row that shares
        a system prompt. The LM runs on the suffixes only, laid out so that each row's tokens stay
        contiguous: the prefix states right-aligned over the longest prefix (zeros before a shorter
        one, masked), then each row's suffix directly after, right-padded to the longest suffix;
        position ids continue after each row's own prefix. Attention, sliding windows and recurrent
        states thus see what the left-padded batch shows them. The logits are put back in the
        left-padded layout of the answer span (positions before a row's suffix, never supervised,
        hold that row's first suffix logits).
        """
        blocker = self._prefix_blocker(attention_mask, ecg_mask)
        if blocker is not None:
            self._warn_prefix_once(blocker)
            return None
        layout = SuffixLayout.of(input_ids, attention_mask, ecg_mask, self.pad_token_id)
        fingerprint = self._lm_fingerprint(input_ids.device.type)
        try:
            states = {
                p: self.prefix_cache.get(p, fingerprint, lambda p: self._prefix_state(p, input_ids.device))
                for p in dict.fromkeys(layout.prefixes)
            }
            cache = batch_cache(self.model.config, [states[p] for p in layout.prefixes])
        except PrefixReuseUnsupported as err:
            self._prefix_unsupported = (
                f"{self.model.config.model_type}'s cache cannot be shared by rows: {err}"
            )
            self._warn_prefix_once(self._prefix_unsupported)
            return None
        width = layout.input_ids.shape[1]
        span = answer_span(labels)
        # Row i's part of the left-padded answer window starts at this suffix position.
        window = layout.lengths - span - 1
        keep_from = max(0, int(window.min()))
        index = ((window - keep_from)[:, None] + torch.arange(span + 1, device=input_ids.device)).clamp(min=0)
        with self._lm_head_rows(index, width - keep_from) as gathered:
            out = self.model(
                inputs_embeds=self.splice(layout.input_ids, layout.ecg_mask, ecg_tokens),
                attention_mask=layout.attention_mask,
                position_ids=layout.position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=width - keep_from,
                **self.token_inputs(layout.input_ids),
            )
        logits = out.logits
        if not gathered:  # the head ran without the hook: pick the rows' windows from its logits
            logits = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
        return CausalLMOutputWithPast(loss=answer_loss(logits, labels, span), logits=logits)

    @contextmanager
    def _lm_head_rows(self, index: Tensor, kept: int) -> Iterator[list[bool]]:
        """Feed the LM head only each row's answer window (``index`` into the ``kept`` last positions).

        Right-padded suffixes end at different positions, so the kept positions cover every row's
        window and more; gathering before the head (a forward pre-hook) keeps the vocabulary
        projection, often the largest single matmul, at the naive path's size. Yields a list that
        is non-empty once the hook has gathered.
        """
        head = self.model.get_output_embeddings()
        gathered: list[bool] = []

        def gather(module: nn.Module, args: tuple) -> tuple | None:
            hidden = args[0] if args else None
            if gathered or hidden is None or hidden.ndim != 3 or hidden.shape[1] != kept:
                return None
            gathered.append(True)
            return (hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])), *args[1:])

        handle = head.register_forward_pre_hook(gather) if head is not None else None
        try:
            yield gathered
        finally:
            if handle is not None:
                handle.remove()

    def _prefix_blocker(self, attention_mask: Tensor, ecg_mask: Tensor) -> str | None:
        """Why prefix reuse cannot run on this batch, or ``None``."""
        if self._prefix_unsupported:
            return self._prefix_unsupported
        if self.model.training:
            return "the LM is in training mode (dropout would differ between the prefix and the rest)"
        if any(getattr(m, "gradient_checkpointing", False) and m.training for m in self.model.modules()):
            return "gradient checkpointing is on (transformers drops the cache in checkpointed layers)"
        if any(p.requires_grad for p in self.model.parameters()):
            return "the LM has trainable parameters (LoRA or unfrozen layers): its prefix needs gradients"
        first = attention_mask.long().argmax(1)
        if not bool(ecg_mask.any(1).all()) or bool((ecg_mask.long().argmax(1) <= first).any()):
            return "a row has no ECG position or no prompt before it"
        return None

    def _warn_prefix_once(self, reason: str) -> None:
        if reason not in self._prefix_warned:
            self._prefix_warned.add(reason)
            log.warning("prefix reuse off, the whole sequence runs: %s", reason)

    def _lm_fingerprint(self, device_type: str) -> tuple:
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return autocast, tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    @torch.no_grad()
    def _prefix_state(self, prefix: tuple[int, ...], device: torch.device) -> PrefixState:
        ids = torch.tensor([prefix], device=device)
        out = self.model(
            inputs_embeds=self.embed_tokens(ids),
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(len(prefix), device=device)[None],
            use_cache=True,
            logits_to_keep=1,
            **self.token_inputs(ids),
        )
        return prefix_state(out.past_key_values, len(prefix))
