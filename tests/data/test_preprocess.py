"""Signal preprocessing: lead order by name, anti-aliased resampling, windows, NaN repair, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import wfdb
from scipy import signal

from ecglm.data.preprocess import (
    LEADS,
    MissingLeadError,
    PreprocessConfig,
    cut_windows,
    preprocess,
    preprocess_record,
)

#: float16 keeps 11 significant bits: a relative error of at most 2**-11 ~ 4.9e-4 after rounding.
F16_RTOL, F16_ATOL = 1e-3, 1e-3


def _reference(record, fs_out: int = 250, n: int = 2500) -> np.ndarray:
    rec = wfdb.rdrecord(str(record))
    names = [name.lower() for name in rec.sig_name]
    x = rec.p_signal[:, [names.index(lead.lower()) for lead in LEADS]].T
    x = signal.resample_poly(x, fs_out, int(rec.fs), axis=1)
    return x


def test_real_ptb_record_matches_wfdb_scipy_reference(ptb_record):
    out = preprocess_record(ptb_record, PreprocessConfig())

    assert out.drop_reason is None and out.windows.dtype == np.float16
    assert out.windows.shape == (1, 12, 2500)
    ref = _reference(ptb_record)[:, :2500]
    assert ref.shape == (12, 2500)  # 38.4 s at 1000 Hz -> 9600 samples at 250 Hz, first 10 s kept
    ref = (ref - ref.mean(axis=1, keepdims=True)) / ref.std(axis=1, keepdims=True)
    np.testing.assert_allclose(out.windows[0].astype(np.float64), ref, rtol=F16_RTOL, atol=F16_ATOL)


def test_real_ptb_record_cut_into_windows_and_minmax(ptb_record):
    out = preprocess_record(ptb_record, PreprocessConfig(window="all", normalization="minmax"))

    assert out.windows.shape == (3, 12, 2500)  # 9600 samples: three full windows, 600 discarded
    ref = _reference(ptb_record)
    for i, window in enumerate(out.windows):
        part = ref[:, i * 2500 : (i + 1) * 2500]
        expected = (part - part.min()) / (part.max() - part.min())
        np.testing.assert_allclose(window.astype(np.float64), expected, rtol=F16_RTOL, atol=F16_ATOL)
        assert window.min() == 0.0 and window.max() == 1.0


def test_centre_window_and_zero_padding():
    x = np.arange(10.0)[None, :]
    np.testing.assert_array_equal(cut_windows(x, 4, "centre")[0], [[3, 4, 5, 6]])
    np.testing.assert_array_equal(cut_windows(x, 4, "first")[0], [[0, 1, 2, 3]])
    assert [w[0, 0] for w in cut_windows(x, 4, "all")] == [0, 4]

    rng = np.random.default_rng(0)
    short = rng.normal(size=(1250, 12))  # 5 s at 250 Hz
    out = preprocess(short, list(LEADS), 250, "short", PreprocessConfig())
    window = out.windows[0].astype(np.float64)
    np.testing.assert_array_equal(window[:, 1250:], 0.0)
    np.testing.assert_allclose(window[:, :1250].mean(axis=1), 0.0, atol=1e-3)
    np.testing.assert_allclose(window[:, :1250].std(axis=1), 1.0, atol=1e-3)


def test_leads_are_reordered_by_name_case_insensitively_and_extras_dropped():
    # MIMIC-IV-ECG order (aVF before aVL), mixed case, plus a Frank lead; lead k carries (k + 1) * t.
    order = ["i", "II", "iii", "AVR", "aVF", "avl", "v1", "V2", "V3", "V4", "V5", "V6", "vx"]
    canonical = [lead.lower() for lead in LEADS]
    t = np.linspace(0.0, 1.0, 2500)
    x = np.stack([(canonical.index(n.lower()) + 1 if n.lower() in canonical else 99) * t for n in order], 1)
    out = preprocess(x, order, 250, "r", PreprocessConfig(normalization="minmax"))
    # global min-max: the row of canonical lead k spans [0, (k + 1) / 12]; vx (99 * t) is gone
    np.testing.assert_allclose(out.windows[0].max(axis=1), np.arange(1, 13) / 12, atol=1e-3)


def test_missing_lead_names_the_record_unless_zero_filled():
    names = [lead for lead in LEADS if lead != "V4"]
    x = np.ones((2500, 11))
    with pytest.raises(MissingLeadError, match=r"records500/00000/00007_hr.*V4"):
        preprocess(x, names, 250, "records500/00000/00007_hr", PreprocessConfig())
    out = preprocess(x, names, 250, "r", PreprocessConfig(zero_fill_missing=True))
    assert out.windows.shape == (1, 12, 2500)
    np.testing.assert_array_equal(out.windows[0, LEADS.index("V4")], 0.0)


def test_short_nan_gaps_are_interpolated_long_ones_and_many_dropped():
    t = np.arange(5000) / 500
    x = np.stack([np.sin(2 * np.pi * (k + 1) * t / 10) for k in range(12)], axis=1)
    gappy = x.copy()
    gappy[100:110, 3] = np.nan
    gappy[4000:4005, 7] = np.inf
    repaired = preprocess(gappy, list(LEADS), 500, "gappy", PreprocessConfig(normalization="minmax"))
    clean = preprocess(x, list(LEADS), 500, "clean", PreprocessConfig(normalization="minmax"))
    assert repaired.drop_reason is None
    # A 10-sample gap in a slow sine: linear interpolation is within ~1e-4 of the truth.
    np.testing.assert_allclose(repaired.windows.astype(float), clean.windows.astype(float), atol=2e-3)

    long_gap = x.copy()
    long_gap[1000:1300, 0] = np.nan  # 300 samples > max_gap 250, but only 0.5% of the record
    out = preprocess(long_gap, list(LEADS), 500, "long", PreprocessConfig())
    assert (out.dropped, out.drop_reason) == (True, "nan_gap") and "lead I" in out.detail

    many = x.copy()
    many[::10] = np.nan  # 10% of samples, in single-sample gaps
    out = preprocess(many, list(LEADS), 500, "many", PreprocessConfig())
    assert out.drop_reason == "nan_fraction"


def test_missing_record_is_a_counted_drop(tmp_path):
    out = preprocess_record(tmp_path / "nothing", PreprocessConfig(), record="ptbxl/1")
    assert (out.record, out.drop_reason) == ("ptbxl/1", "missing_record")


def test_config_rejects_unknown_choices():
    from ecglm.errors import EcglmError

    with pytest.raises(ValueError, match="normalization must be one of"):
        PreprocessConfig(normalization="robust")
    with pytest.raises(EcglmError, match="window"):
        PreprocessConfig(window="random")
    with pytest.raises(ValueError, match="positive"):
        PreprocessConfig(sampling_rate=0)


def test_manifest_entry_is_what_0_1_wrote():
    """A manifest of 0.1 stays current: the builders compare it key by key, so a respelt key would
    rebuild every shard set."""
    entry = PreprocessConfig(sampling_rate=500, normalization="minmax", window="all").manifest_entry()
    assert list(entry.items()) == [
        ("sampling_rate", 500),
        ("num_samples", 2500),
        ("normalisation", "minmax"),
        ("window", "all"),
        ("zero_fill_missing", False),
        ("max_gap", 250),
        ("max_nan_fraction", 0.05),
        ("leads", list(LEADS)),
        ("dtype", "float16"),
    ]


def test_the_input_spec_is_defined_once():
    from ecglm import ecg, encoders

    assert encoders.Preprocessing is ecg.Preprocessing and issubclass(PreprocessConfig, ecg.Preprocessing)
    spec = ecg.Preprocessing(sampling_rate=500, num_samples=5000, normalization="minmax")
    config = PreprocessConfig.of(spec, window="centre")
    assert (config.sampling_rate, config.num_samples, config.normalization, config.window) == (
        500,
        5000,
        "minmax",
        "centre",
    )


def test_the_0_1_spelling_normalisation_still_works_with_a_warning():
    from ecglm.data import preprocess as pre

    with pytest.warns(
        DeprecationWarning, match=r"normalisation=.*0\.3\.0.*PreprocessConfig\(normalization="
    ) as w:
        old = PreprocessConfig(normalisation="minmax", window="all")
    assert old == PreprocessConfig(normalization="minmax", window="all")
    assert w[0].filename == __file__  # the warning points at the caller's line
    with pytest.warns(DeprecationWarning, match="PreprocessConfig.normalization"):
        assert old.normalisation == "minmax"
    with pytest.warns(DeprecationWarning, match="ecglm.ecg.NORMALIZATIONS"):
        assert pre.NORMALISATIONS == ("zscore", "minmax")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="disagree"):
        PreprocessConfig(normalization="minmax", normalisation="zscore")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="normalization must be one of"):
        PreprocessConfig(normalisation="robust")


def test_leads_and_normalizations_have_one_definition():
    from ecglm import ecg, encoders
    from ecglm.data import preprocess as pre
    from ecglm.data import sources, synthetic

    assert pre.LEADS is synthetic.LEADS is ecg.LEADS and len(ecg.LEADS) == 12
    # PTB-XL's headers spell the augmented leads in capitals; the order is the canonical one.
    assert ("I", "II", "III", "AVR", "AVL", "AVF", *ecg.LEADS[6:]) == sources.PTBXL_LEADS
    assert encoders.NORMALIZATIONS is ecg.NORMALIZATIONS and tuple(ecg.NORMALIZATIONS) == ("zscore", "minmax")


def test_zscore_is_the_zscore_normalisation_and_keeps_float64():
    from ecglm.data.preprocess import normalise, zscore

    x = np.random.default_rng(0).normal(3.0, 2.0, size=(12, 500))
    z = zscore(x)
    assert z.dtype == np.float64
    np.testing.assert_array_equal(normalise(x, "zscore"), z)
    np.testing.assert_allclose(z.std(axis=1), 1.0, rtol=1e-12)
    assert zscore(x, np.float32).dtype == np.float32


def test_read_wfdb_names_a_missing_record_and_reads_a_real_one(tmp_path, ptb_record):
    from ecglm.data.preprocess import read_wfdb

    with pytest.raises(FileNotFoundError, match="nothing"):
        read_wfdb(tmp_path / "nothing")
    x, names, rate = read_wfdb(ptb_record)
    rec = wfdb.rdrecord(str(ptb_record))
    np.testing.assert_array_equal(x, rec.p_signal)
    assert names == list(rec.sig_name) and rate == float(rec.fs) == 1000.0
