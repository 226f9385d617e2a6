"""Readers as plugins: ecglm.records dispatches through the ecglm.readers group, ecglm's own first; the
example plugin (plugins/ecglm-json-reader) reads in ``ecglm render``; a folder mixing every format."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from ecg_exports import LEADS, ecg_json, ecg_signal, mixed_folder
from ecglm.commands import main
from ecglm.encoders import Preprocessing
from ecglm.inference import find_records
from ecglm.plugins import discover
from ecglm.records import installed_readers, prepare, read_recording, record_format

pytest.importorskip("pydicom")
pytest.importorskip("h5py")
pytest.importorskip("defusedxml")


def test_files_are_offered_to_ecglms_readers_first_then_to_plugins():
    names = list(installed_readers())
    assert names[:7] == ["aecg", "csv", "dicom", "edf", "hdf5", "numpy", "wfdb"]
    assert "json" in names[7:]  # the example plugin, installed by `make setup`
    registry = discover(groups=["ecglm.readers"])
    assert registry.plugins["ecglm.readers"]["json"].distribution == "ecglm-json-reader"
    assert list(registry.plugins) == ["ecglm.readers"]


def test_a_plugin_cannot_take_over_a_builtin_format_and_a_bad_one_is_refused(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "greedy_reader.py").write_text(
        "from ecglm.readers import ECGReader\n"
        "class GreedyReader(ECGReader):\n"
        "    suffixes = ('.csv', '.greedy')\n"
        "    def read(self, path, fs=None, leads=None):\n"
        "        raise RuntimeError('never')\n"
        "class NotAReader:\n"
        "    pass\n"
    )
    info = site / "greedy_reader-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: greedy-reader\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(
        "[ecglm.readers]\ngreedy = greedy_reader:GreedyReader\nbroken = greedy_reader:NotAReader\n"
    )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert record_format(tmp_path / "x.csv") == "csv"  # ecglm's own reader keeps its format
    assert record_format(tmp_path / "x.greedy") == "greedy"  # a new one is the plugin's
    registry = discover(groups=["ecglm.readers"])
    (failure,) = registry.failures
    assert failure.plugin.name == "broken" and "not a subclass of ecglm.readers.ECGReader" in failure.error
    sys.modules.pop("greedy_reader", None)


def test_the_example_plugin_reads_its_files_in_millivolts_and_render_draws_them(tmp_path, capsys):
    signal = ecg_signal(10, 500)
    path = ecg_json(tmp_path / "x.ecg.json", signal, 500)
    recording = read_recording(path)
    assert recording.leads == LEADS and recording.fs == 500.0
    np.testing.assert_allclose(recording.signal, signal, atol=5e-7)  # written in uV to 3 decimals
    out = tmp_path / "x.png"
    assert main(["render", "--record", str(path), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


def test_a_folder_mixing_every_format_lists_each_record_once_with_its_reader(tmp_path, ptb_record):
    expected = mixed_folder(tmp_path / "mixed", ptb_record)
    found = find_records(tmp_path / "mixed")
    assert {p.name: record_format(p) for p in found} == expected
    assert [p.name for p in find_records(tmp_path / "mixed" / "e.hdf5")] == ["e.hdf5#17", "e.hdf5#18"]
    for path in found:  # each gives the encoder its 12 leads
        assert prepare(read_recording(path, fs=500, leads=LEADS), Preprocessing()).shape == (1, 12, 2500)
