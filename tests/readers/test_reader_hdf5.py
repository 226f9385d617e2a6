"""The HDF5 reader against a file in the CODE-15% layout: exams by exam_id or row, padding trimmed."""

from __future__ import annotations

import numpy as np
import pytest

from ecg_exports import LEADS, code15_h5, ecg_signal
from ecglm.encoders import Preprocessing
from ecglm.readers import trim_zero_padding
from ecglm.records import RecordError, check_readable, prepare, read_recording, records_in

pytest.importorskip("h5py")


@pytest.fixture
def exams() -> dict[int, np.ndarray]:
    short = ecg_signal(7.3, 400).astype(np.float32)  # 2920 samples, padded 588 each side
    long = ecg_signal(10.2, 400, seed=1).astype(np.float32)  # 4080 samples, padded 8 each side
    long[0, 1:] = 0.0  # a first sample where only lead I is non-zero stays
    return {1169160: short, 3007: long}


def test_exams_read_by_exam_id_or_row_with_the_zero_padding_trimmed(tmp_path, exams):
    path = code15_h5(tmp_path / "exams_part0.hdf5", exams)
    short = read_recording(f"{path}#1169160")
    assert short.fs == 400.0 and short.leads == LEADS and short.units == "mV"
    np.testing.assert_array_equal(short.signal, exams[1169160])  # the 2920 samples, nothing more
    assert short.metadata == {"exam_id": 1169160, "row": 0, "padded_samples": 4096 - 2920}
    by_row = read_recording(f"{path}#index:1")
    np.testing.assert_array_equal(by_row.signal, exams[3007])
    assert by_row.metadata["exam_id"] == 3007
    assert prepare(by_row, Preprocessing()).shape == (1, 12, 2500)
    # 7.3 s is shorter than the encoder's 10 s window: refused, not answered from the file's padding.
    with pytest.raises(RecordError, match=r"#1169160: 7\.30 s long, shorter than the encoder's window"):
        prepare(short, Preprocessing())


def test_a_folder_lists_every_exam_but_the_padding_row(tmp_path, exams):
    path = code15_h5(tmp_path / "exams_part0.hdf5", exams)
    assert [p.name for p in records_in(path)] == ["exams_part0.hdf5#1169160", "exams_part0.hdf5#3007"]


def test_bad_addresses_name_the_file_and_what_to_write(tmp_path, exams):
    path = code15_h5(tmp_path / "p.h5", exams)
    with pytest.raises(
        RecordError, match=r"p\.h5: an HDF5 file holds many exams: name one as .*p\.h5#EXAM_ID"
    ):
        check_readable(path)
    with pytest.raises(RecordError, match=r"p\.h5: no exam_id 42 in it"):
        read_recording(f"{path}#42")
    with pytest.raises(RecordError, match=r"p\.h5#index:9: no row 9; the file holds 3 exams"):
        read_recording(f"{path}#index:9")
    with pytest.raises(RecordError, match=r"p\.h5#index:2: every sample is 0 \(a padding row"):
        read_recording(f"{path}#index:2")
    (tmp_path / "broken.h5").write_bytes(b"\x89HDF but not really")
    with pytest.raises(RecordError, match=r"broken\.h5: not a readable HDF5 file"):
        read_recording(f"{tmp_path / 'broken.h5'}#1")


def test_trim_zero_padding_keeps_inner_zeros():
    signal = np.zeros((10, 2))
    signal[3, 0], signal[6, 1] = 1.0, -1.0  # samples 4 and 5 are zero in both leads: kept
    np.testing.assert_array_equal(trim_zero_padding(signal), signal[3:7])
    assert trim_zero_padding(np.zeros((5, 2))).shape == (0, 2)
