"""The DICOM reader against files pydicom writes from a known signal: millivolts after the round trip,
the rhythm group over median beats, lead names from source codes, 8-lead exports, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from ecg_exports import ENCAPSULATED_PDF, LEADS, dicom_group, ecg_signal, to_raw, write_dicom
from ecglm.encoders import Preprocessing
from ecglm.readers import DICOMReader
from ecglm.records import RecordError, prepare, read_recording, record_format

pytest.importorskip("pydicom")


def test_a_twelve_lead_file_reads_back_in_millivolts_with_its_leads_named_by_source_code(tmp_path):
    signal = ecg_signal(10, 500)
    order = [6, 0, 7, 1, 8, 2, 9, 3, 10, 4, 11, 5]  # channels stored out of the standard order
    raw = to_raw(signal[:, order], sensitivity_uv=2.5, baseline_uv=40.0)
    group = dicom_group(raw, [LEADS[k] for k in order], 500, sensitivity=2.5, baseline=40.0)
    path = write_dicom(tmp_path / "ecg.dcm", [group])
    recording = read_recording(path)
    assert record_format(path) == "dicom" and recording.units == "mV"
    assert recording.leads == [LEADS[k] for k in order] and recording.fs == 500.0
    # (raw * sensitivity + baseline) uV, in mV: exactly, and the signal within half a step (1.25 uV).
    np.testing.assert_allclose(recording.signal, (raw * 2.5 + 40.0) / 1000, rtol=0, atol=1e-12)
    np.testing.assert_allclose(recording.signal, signal[:, order], rtol=0, atol=1.25e-3 + 1e-9)
    assert recording.metadata["patient_id"] == "P-0001" and recording.metadata["group_kind"] == "rhythm"
    assert prepare(recording, Preprocessing()).shape == (1, 12, 2500)


def test_mdc_codes_and_millivolt_channels(tmp_path):
    signal = ecg_signal(10, 250)
    raw = np.round(signal / 0.005).astype(np.int16)  # 5 uV per unit, stated in mV
    path = write_dicom(
        tmp_path / "mdc.dcm", [dicom_group(raw, LEADS, 250, sensitivity=0.005, unit="mV", mdc=True)]
    )
    recording = read_recording(path)
    assert recording.leads == LEADS
    np.testing.assert_allclose(recording.signal, raw * 0.005, rtol=0, atol=1e-12)


def test_the_rhythm_group_is_read_over_median_beats_and_the_other_by_address(tmp_path):
    rhythm = to_raw(ecg_signal(10, 500), 2.5)
    median = to_raw(ecg_signal(1.2, 500, seed=1), 2.5)  # one averaged beat per lead
    groups = [dicom_group(median, LEADS, 500, label="MEDIAN BEAT"), dicom_group(rhythm, LEADS, 500)]
    path = write_dicom(tmp_path / "two.dcm", groups)
    assert read_recording(path).signal.shape == (5000, 12)
    by_kind = read_recording(f"{path}#median")
    assert by_kind.signal.shape == (600, 12) and by_kind.metadata["group_kind"] == "median"
    np.testing.assert_allclose(by_kind.signal, median * 2.5e-3, atol=1e-12)
    assert read_recording(f"{path}#0").signal.shape == (600, 12)
    with pytest.raises(RecordError, match=r"two\.dcm#5: no waveform group 5 \(groups: 0: median"):
        read_recording(f"{path}#5")
    only_median = write_dicom(tmp_path / "median.dcm", [groups[0]])
    with pytest.raises(RecordError, match=r"median\.dcm: no rhythm waveform group .*median\.dcm#N"):
        read_recording(only_median)


def test_an_eight_lead_export_gets_its_limb_leads_derived_from_i_and_ii(tmp_path):
    eight = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    raw = to_raw(ecg_signal(10, 500, leads=8), 2.5)
    recording = read_recording(write_dicom(tmp_path / "eight.dcm", [dicom_group(raw, eight, 500)]))
    assert recording.leads == [*eight, "III", "aVR", "aVL", "aVF"]
    assert recording.metadata["derived_leads"] == ["III", "aVR", "aVL", "aVF"]
    lead_i, lead_ii = raw[:, 0] * 2.5e-3, raw[:, 1] * 2.5e-3
    np.testing.assert_allclose(recording.signal[:, 8], lead_ii - lead_i, atol=1e-12)  # Einthoven
    np.testing.assert_allclose(recording.signal[:, 9], -(lead_i + lead_ii) / 2, atol=1e-12)  # aVR
    np.testing.assert_allclose(recording.signal[:, 11], lead_ii - lead_i / 2, atol=1e-12)  # aVF
    assert prepare(recording, Preprocessing()).shape == (1, 12, 2500)


def test_fewer_leads_no_waveform_and_unknown_channels_are_refused_with_the_reason(tmp_path):
    three = write_dicom(
        tmp_path / "three.dcm", [dicom_group(to_raw(ecg_signal(10, 500, 3), 2.5), ["I", "II", "V1"], 500)]
    )
    with pytest.raises(RecordError, match=r"three\.dcm lacks lead\(s\) \['V2'.*12 standard leads"):
        prepare(read_recording(three), Preprocessing())
    pdf = write_dicom(tmp_path / "report.dcm", [], sop_class=ENCAPSULATED_PDF)
    with pytest.raises(RecordError, match=r"report\.dcm: no waveform in this DICOM file \(Encapsulated PDF"):
        read_recording(pdf)
    odd = write_dicom(
        tmp_path / "odd.dcm", [dicom_group(to_raw(ecg_signal(10, 500, 2), 2.5), ["X1", "X2"], 500)]
    )
    with pytest.raises(RecordError, match=r"odd\.dcm: no channel is a standard ECG lead"):
        read_recording(odd)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(RecordError, match=r"junk\.dcm: not a readable DICOM file"):
        read_recording(tmp_path / "junk.dcm")


def test_a_dicom_file_without_a_suffix_is_recognised_by_its_preamble(tmp_path):
    path = write_dicom(tmp_path / "ECG0001", [dicom_group(to_raw(ecg_signal(10, 500), 2.5), LEADS, 500)])
    assert DICOMReader().claims(path) and record_format(path) == "dicom"
    (tmp_path / "README").write_text("no preamble")
    assert not DICOMReader().claims(tmp_path / "README")
