"""The built-in rewards (entry-point group ``ecglm.rewards``): a parsing table, weights, discovery."""

from __future__ import annotations

import pytest

from ecglm.judges import Judge, Verdict
from ecglm.plugins import component_class, discover
from ecglm.rewards import ExactMatchReward, FormatReward, JudgeReward, LabelF1Reward, RewardItem

HR = "What is the heart rate category of this ECG: bradycardia, normal or tachycardia?"
RHYTHM = "Is the rhythm regular or irregular?"
LABELS = "Which abnormalities does this ECG show?"

# question, reference, completion -> exact match, label F1, format
TABLE = [
    (HR, "normal", "normal", 1, 1, 1),
    (HR, "normal", "Normal.", 1, 1, 1),
    (HR, "normal", "  NORMAL  ", 1, 1, 1),
    (HR, "normal", "tachycardia", 0, 0, 1),
    (HR, "normal", "the rate is normal", 0, 0, 0),
    (HR, "normal", "sinus", 0, 0, 0),
    (HR, "normal", "", 0, 0, 0),
    (RHYTHM, "irregular", "irregular", 1, 1, 1),
    (RHYTHM, "irregular", "regular", 0, 0, 1),
    (RHYTHM, "irregular", "or", 0, 0, 0),
    (RHYTHM, "irregular", "rhythm", 0, 0, 1),  # words of the question's choice clause parse (a known limit)
    (LABELS, ["afib", "lvh"], "lvh, afib", 1, 1, 0),
    (LABELS, ["afib", "lvh"], "afib", 0, 2 / 3, 0),
    (LABELS, ["afib", "lvh"], "afib; rbbb", 0, 0.5, 0),
    (LABELS, ["none"], "none", 1, 1, 0),
    (LABELS, ["afib"], "none", 0, 0, 0),
]


@pytest.mark.parametrize(("question", "reference", "completion", "em", "f1", "fmt"), TABLE)
def test_the_rewards_parse_answers_as_the_metrics_do(question, reference, completion, em, f1, fmt):
    item = RewardItem(question, reference, completion)
    assert ExactMatchReward()([item]) == [em]
    assert LabelF1Reward()([item]) == [pytest.approx(f1)]
    assert FormatReward()([item]) == [fmt]


def test_the_format_reward_takes_listed_options_per_question_type():
    reward = FormatReward(options={"abnormality": ["afib", "lvh", "rbbb", "none"]})
    items = [
        RewardItem(LABELS, ["afib"], "afib, rbbb", question_type="abnormality"),
        RewardItem(LABELS, ["afib"], "afib, stemi", question_type="abnormality"),
        RewardItem(LABELS, ["afib"], "none", question_type="abnormality"),
    ]
    assert reward(items) == [1, 0, 1]


class FixedJudge(Judge):
    def judge(self, items):
        return [
            Verdict(0.7, "", "Score: 7") if "sinus" in it.prediction else Verdict(None, "", "?")
            for it in items
        ]


def test_the_judge_reward_is_the_judges_score_and_zero_when_unreadable():
    reward = JudgeReward(FixedJudge(), weight=0.5)
    items = [RewardItem("Describe.", "sinus rhythm", "sinus rhythm"), RewardItem("Describe.", "x", "garbled")]
    assert reward(items) == [0.7, 0.0] and reward.weight == 0.5 and reward.name == "judge"


def test_rewards_are_discovered_and_checked_like_every_component():
    registry = discover(groups=["ecglm.rewards", "ecglm.objectives"])
    assert {"exact-match", "label-f1", "format", "judge"} <= set(registry.names("ecglm.rewards"))
    assert {"sft", "grpo", "dpo"} <= set(registry.names("ecglm.objectives"))
    assert component_class("exact-match", "ecglm.rewards", registry) is ExactMatchReward
    with pytest.raises(Exception, match=r"not a subclass of ecglm\.rewards\.Reward"):
        component_class("ecglm.judges.LocalJudge", "ecglm.rewards", registry)


def test_a_reward_returning_the_wrong_number_of_scores_is_refused():
    class Short(ExactMatchReward):
        def score(self, items):
            return [1.0]

    with pytest.raises(ValueError, match="returned 1 scores for 2 answers"):
        Short()([RewardItem("q", "a", "a")] * 2)
