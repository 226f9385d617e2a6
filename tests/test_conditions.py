"""The registry of evaluation conditions: the one list that the model's dispatch, every table and every gap
of evaluation, and the docs are derived from."""

from __future__ import annotations

import re
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ecglm import conditions
from ecglm.conditions import Condition, UnknownConditionError
from ecglm.errors import EcglmError
from ecglm.evaluation import AnswerEvaluation, MetricsConfig, intervals, render_markdown, summarize

REPO = Path(__file__).resolve().parents[1]
K = 2


def _flipped(model, batch, prompt):
    """The real ECG upside down: a condition this test registers."""
    return prompt or batch, model.ecg_tokens(-batch.ecg)


@pytest.fixture
def flipped():
    condition = conditions.register(Condition("flipped_ecg", "the ECG upside down", _flipped))
    yield condition
    conditions.unregister("flipped_ecg")


def test_the_built_in_conditions_and_what_each_needs():
    assert conditions.names() == (
        "ecg",
        "shuffled_ecg",
        "random_encoder",
        "noise_ecg",
        "zeroed_ecg",
        "text_only",
    )
    assert conditions.default_names() == ("ecg", "shuffled_ecg", "zeroed_ecg", "text_only")
    assert conditions.control_names() == conditions.names()[1:]  # everything but ecg, in gap order
    assert [c for c in conditions.names() if conditions.get(c).needs_donors] == ["shuffled_ecg"]
    assert [c for c in conditions.names() if not conditions.get(c).vision_language] == ["random_encoder"]
    assert all(conditions.get(c).description for c in conditions.names())
    with pytest.raises(ValueError, match="already registered"):
        conditions.register(Condition("ecg", "again", _flipped))
    with pytest.raises(ValueError, match="lower-case letters"):
        conditions.register(Condition("flipped.ecg", "a dot cannot key a metric collection", _flipped))
    with pytest.raises(ValueError, match="cannot be removed"):
        conditions.unregister("ecg")


def test_an_unknown_condition_is_refused_naming_the_registered_ones():
    with pytest.raises(
        UnknownConditionError, match=r"unknown condition 'nope'; choose from ecg, shuffled_ecg"
    ):
        conditions.get("nope")
    with pytest.raises(EcglmError, match=r"model.evaluation.conditions.*random_encoder"):
        MetricsConfig(conditions=("ecg", "nope"))
    with pytest.raises(ValueError, match="unknown condition 'nope'"):
        AnswerEvaluation(MetricsConfig(bertscore_model=None), ["d"], conditions=("ecg", "nope"))


def _run(conditions_: tuple[str, ...], accuracy: dict[str, float]) -> dict:
    """One pass of 12 questions about 6 records; condition ``c`` answers a share ``accuracy[c]`` right."""
    evaluation = AnswerEvaluation(
        MetricsConfig(metrics=("acc", "f1"), bertscore_model=None, conditions=conditions_), ["d"]
    )
    references = ["normal", "abnormal"] * 6
    batch = SimpleNamespace(
        key=[f"r{i // 2}_qa{i % 2}" for i in range(12)],
        dataset=["d"] * 12,
        question_type=["t"] * 12,
        answer=references,
        donor=[f"r{(i // 2 + 1) % 6}" for i in range(12)],
    )
    for condition in evaluation.conditions:
        right = round(accuracy.get(condition, 0.0) * 12)
        flip = {"normal": "abnormal", "abnormal": "normal"}
        evaluation.update(condition, [r if i < right else flip[r] for i, r in enumerate(references)], batch)
    return evaluation.compute()


def test_a_registered_condition_is_run_tabled_and_compared_with_no_other_list(flipped):
    assert conditions.control_names()[-1] == "flipped_ecg"  # registered last: its gap comes last
    result = _run(("ecg", "shuffled_ecg", "flipped_ecg"), {"ecg": 1.0, "shuffled_ecg": 0.5})
    assert list(result["conditions"]) == ["ecg", "shuffled_ecg", "flipped_ecg"]
    summary = summarize([result, result])
    assert list(summary["gaps"]) == ["ecg_minus_shuffled_ecg", "ecg_minus_flipped_ecg"]
    assert summary["gaps"]["ecg_minus_flipped_ecg"]["d"]["acc"]["mean"] == 1.0
    bands = intervals([result])
    assert list(bands["gaps"]) == ["ecg_minus_shuffled_ecg", "ecg_minus_flipped_ecg"]
    assert bands["gaps"]["ecg_minus_flipped_ecg"]["dataset: d"]["estimate"] == 1.0
    assert list(bands["accuracy"]["dataset: d"]) == ["ecg", "shuffled_ecg", "flipped_ecg"]
    assert "ecg_minus_flipped_ecg" in bands["metrics"]["f1"]["gaps"]
    text = render_markdown(summary, {"intervals": bands})
    assert "## Condition `flipped_ecg`" in text and "## Gap `ecg - flipped_ecg` (points)" in text
    assert "`ecg - flipped_ecg` (p)" in text and "| `flipped_ecg` |" in text
    # Only a condition that needs donors records them.
    assert all("donor" not in r for r in result["records"] if r["condition"] != "shuffled_ecg")
    assert all("donor" in r for r in result["records"] if r["condition"] == "shuffled_ecg")


def test_a_condition_registered_as_default_runs_without_being_asked_for():
    before = MetricsConfig().conditions
    conditions.register(Condition("flipped_ecg", "the ECG upside down", _flipped, default=True))
    try:
        assert MetricsConfig().conditions == (*before, "flipped_ecg")
    finally:
        conditions.unregister("flipped_ecg")
    assert MetricsConfig().conditions == before


def test_the_model_dispatches_through_the_registry(
    flipped, tiny_backbone_factory, tiny_encoder_factory, monkeypatch
):
    from ecglm.connectors import MLPConnector
    from ecglm.data.collate import QACollator
    from ecglm.model import ECGLM
    from ecglm.testing import bound_prompt

    model = ECGLM(tiny_encoder_factory(), MLPConnector(num_tokens=K), tiny_backbone_factory("llama")).eval()
    rng = np.random.default_rng(0)
    items = [
        {
            "key": f"r{i}_qa0",
            "ecg": rng.standard_normal((12, 2500)).astype(np.float16),
            "question": "Is the rhythm regular?",
            "answer": "yes",
            "question_type": "rhythm",
        }
        for i in range(2)
    ]
    batch = QACollator(bound_prompt(model.backbone), K, for_generation=True)(items)
    fields, tokens = model.condition_inputs(batch, "flipped_ecg")
    assert fields is batch and torch.equal(tokens, model.ecg_tokens(-batch.ecg))
    flipped_answers = model.generate(batch, condition="flipped_ecg", max_new_tokens=3)
    assert flipped_answers == model.generate(replace(batch, ecg=-batch.ecg), max_new_tokens=3)
    with pytest.raises(UnknownConditionError, match="unknown condition 'nope'"):
        model.generate(batch, condition="nope")
    # A model whose vision-language backbone reads the images itself refuses what does not apply to it.
    monkeypatch.setattr(model.backbone, "image_size", (8, 8), raising=False)
    with pytest.raises(ValueError, match="random_encoder condition does not apply to HFBackbone"):
        model.condition_inputs(batch, "random_encoder")
    assert torch.equal(model.condition_inputs(batch, "flipped_ecg")[1], tokens)


def test_the_old_constants_warn_and_read_the_registry(flipped):
    import ecglm.evaluation
    import ecglm.model

    expected = {
        (ecglm.model, "CONDITIONS"): conditions.names(),
        (ecglm.model, "DEFAULT_CONDITIONS"): conditions.default_names(),
        (ecglm.evaluation, "CONDITIONS"): conditions.names(),
        (ecglm.evaluation, "DEFAULT_CONDITIONS"): conditions.default_names(),
        (ecglm.evaluation, "CONTROLS"): conditions.control_names(),
    }
    for (module, name), value in expected.items():
        pattern = rf"{module.__name__}\.{name} is deprecated.*0\.3\.0: use ecglm\.conditions\.\w+\(\)"
        with pytest.warns(DeprecationWarning, match=pattern) as caught:
            assert getattr(module, name) == value
        assert caught[0].filename == __file__  # the warning points at the code that used the old name
    with pytest.warns(DeprecationWarning):
        assert "flipped_ecg" in ecglm.model.CONDITIONS  # read now, not a copy taken at import
    with pytest.warns(DeprecationWarning, match=r"use ecglm\.conditions\.matched_noise"):
        from ecglm.model import matched_noise
    assert matched_noise is conditions.matched_noise
    with pytest.warns(DeprecationWarning, match=r"use ecglm\.metrics\.plot_confusion") as caught:
        from ecglm.evaluation import plot_confusion  # noqa: F401
    assert caught[0].filename == __file__
    with pytest.raises(AttributeError, match="no attribute 'nope'"), warnings.catch_warnings():
        warnings.simplefilter("error")
        ecglm.evaluation.nope  # noqa: B018


def test_the_docs_table_lists_the_registered_conditions():
    text = (REPO / "docs/evaluation.md").read_text()
    rows = re.findall(r"^\| `(\w+)`( \(optional\))? \|", text, flags=re.MULTILINE)
    assert sorted(name for name, _ in rows) == sorted(conditions.names())
    optional = {name for name, mark in rows if mark}
    assert optional == set(conditions.names()) - set(conditions.default_names())
