"""Bootstrap intervals and paired sign-flip tests over records (ecglm.uncertainty), against references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from ecglm.uncertainty import bootstrap_mean, paired_gap, record_of


def test_unclustered_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    correct = (rng.random(400) < 0.7).astype(float)
    interval = bootstrap_mean(correct, n_resamples=4000)
    p = correct.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / correct.size)
    assert interval.estimate == pytest.approx(p)
    assert interval.low == pytest.approx(p - half, abs=0.01)
    assert interval.high == pytest.approx(p + half, abs=0.01)
    assert (interval.n, interval.records) == (400, 400)


def record_bootstrap(values, records, n_resamples: int, seed: int, statistic=np.mean) -> tuple[float, float]:
    """The 95% percentile interval written out, as the definition reads (no scipy): draw as many records
    as there are, with replacement, pool all the questions of the drawn records and take ``statistic``."""
    values, records = np.asarray(values, dtype=float), np.asarray(records)
    per_record = [values[records == r] for r in np.unique(records)]
    rng = np.random.default_rng(seed)
    draws = rng.integers(len(per_record), size=(n_resamples, len(per_record)))
    pooled = [statistic(np.concatenate([per_record[i] for i in draw])) for draw in draws]
    low, high = np.percentile(pooled, [2.5, 97.5])
    return float(low), float(high)


def test_clustered_interval_matches_a_record_level_reference_and_is_wider():
    """10 questions per ECG answered alike: the record is the unit, so the interval is ~sqrt(10) wider."""
    rng = np.random.default_rng(2)
    per_record = (rng.random(60) < 0.6).astype(float)
    values = np.repeat(per_record, 10)
    records = np.repeat([f"ecg{i}" for i in range(60)], 10)
    clustered = bootstrap_mean(values, records, n_resamples=4000)
    naive = bootstrap_mean(values, n_resamples=4000)
    # Reference: scipy's percentile bootstrap of the 60 record means (equal sizes: the same estimator).
    reference = stats.bootstrap(
        (per_record,), np.mean, n_resamples=4000, method="percentile", rng=np.random.default_rng(7)
    ).confidence_interval
    assert clustered.records == 60 and clustered.n == 600
    assert clustered.low == pytest.approx(reference.low, abs=0.02)
    assert clustered.high == pytest.approx(reference.high, abs=0.02)
    ratio = (clustered.high - clustered.low) / (naive.high - naive.low)
    assert 2.5 < ratio < 4.0


def test_clustered_interval_of_records_of_unequal_size_matches_the_written_out_bootstrap():
    """Records of 1 to 12 questions, the large ones mostly right: the mean over questions (0.66) is not
    the mean of the record means (0.53), and the interval must be the former's."""
    rng = np.random.default_rng(5)
    sizes = np.tile(np.arange(1, 13), 4)
    records = np.repeat([f"ecg{i}" for i in range(sizes.size)], sizes)
    values = (rng.random(records.size) < np.repeat(sizes / 13, sizes)).astype(float)
    interval = bootstrap_mean(values, records, n_resamples=4000)
    low, high = record_bootstrap(values, records, n_resamples=4000, seed=11)
    assert interval.estimate == pytest.approx(values.mean()) and interval.records == sizes.size
    # Two Monte Carlo estimates of the same percentiles (4,000 draws each): within 0.015 of each other.
    assert interval.low == pytest.approx(low, abs=0.015) and interval.high == pytest.approx(high, abs=0.015)
    # The record-mean estimator sits far outside that tolerance: the check tells them apart.
    means = np.array([values[records == r].mean() for r in np.unique(records)])
    assert abs(means.mean() - values.mean()) > 0.1


def test_unequal_records_are_weighted_by_their_questions():
    values = [1, 1, 1, 1, 0]  # record a: 4 correct; record b: 1 wrong
    interval = bootstrap_mean(values, ["a", "a", "a", "a", "b"], n_resamples=500)
    assert interval.estimate == pytest.approx(0.8)
    # Resampling two records gives {a,a}: 1.0, {a,b}: 0.8, {b,b}: 0.0, nothing else.
    assert interval.low == pytest.approx(0.0) and interval.high == pytest.approx(1.0)


def test_sign_flip_p_value_equals_exact_enumeration():
    diffs = np.array([1.0, 1.0, 0.5, 1.0, -0.5, 1.0, 0.0, 1.0])  # per-record mean differences
    records = [f"r{i}" for i in range(8) for _ in range(2)]
    a = np.repeat(diffs, 2)
    gap = paired_gap(a, np.zeros_like(a), records, n_resamples=10_000)
    observed = abs(diffs.sum())
    flips = [abs((diffs * signs).sum()) for signs in itertools.product([1, -1], repeat=8)]
    exact = np.mean([f >= observed - 1e-12 for f in flips])
    assert gap.p_value == pytest.approx(exact)
    assert gap.interval.estimate == pytest.approx(diffs.mean())


def test_a_model_that_reads_the_signal_has_a_gap_excluding_zero():
    """Scripted: with its own ECG it is right 90% of the time, with another record's ECG at chance (1/3)."""
    rng = np.random.default_rng(3)
    records = np.repeat([f"ecg{i}" for i in range(50)], 4)
    with_ecg = (rng.random(200) < 0.9).astype(float)
    shuffled = (rng.random(200) < 1 / 3).astype(float)
    gap = paired_gap(with_ecg, shuffled, records)
    assert gap.interval.excludes(0.0) and gap.interval.low > 0.3
    assert gap.p_value < 0.001


def test_a_model_that_ignores_the_signal_has_a_gap_including_zero():
    """Scripted: the answer depends only on the question, so it is the same under both conditions,
    up to sampling noise that is independent of the ECG."""
    rng = np.random.default_rng(4)
    records = np.repeat([f"ecg{i}" for i in range(50)], 4)
    prior = rng.random(200) < 0.5  # right or wrong by the question alone
    noise = rng.random((2, 200)) < 0.1  # decoding noise flips an answer now and then
    with_ecg, shuffled = (prior ^ noise[0]).astype(float), (prior ^ noise[1]).astype(float)
    gap = paired_gap(with_ecg, shuffled, records)
    assert not gap.interval.excludes(0.0)
    assert gap.p_value > 0.05
    same = paired_gap(with_ecg, with_ecg, records)
    assert (same.interval.low, same.interval.high, same.p_value) == (0.0, 0.0, 1.0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="differ in length"):
        paired_gap([1, 0], [1], None)
    with pytest.raises(ValueError, match="one record id per value"):
        bootstrap_mean([1, 0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([])
    single = bootstrap_mean([1, 0, 1], ["a", "a", "a"])
    assert single.estimate == pytest.approx(2 / 3) and math.isnan(single.low)


def test_record_of_strips_the_question_index():
    assert record_of("ptbxl/00123_qa7") == "ptbxl/00123"
    assert record_of("a_qa_b_qa12") == "a_qa_b"
