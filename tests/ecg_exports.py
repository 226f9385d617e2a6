"""ECG files in the formats hospitals export, written from a signal the test knows: DICOM waveforms
(with pydicom), HL7 aECG XML (per the HL7 v3 AnnotatedECG schema) and CODE-15%-layout HDF5 (h5py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
#: SCP-ECG lead numbers (DICOM channel source codes 5.6.3-9-N, MDC 2:N).
NUMBERS = {"I": 1, "II": 2, "V1": 3, "V2": 4, "V3": 5, "V4": 6, "V5": 7, "V6": 8}
NUMBERS |= {"III": 61, "aVR": 62, "aVL": 63, "aVF": 64}
TWELVE_LEAD_ECG = "1.2.840.10008.5.1.4.1.1.9.1.1"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


def ecg_signal(seconds: float, fs: float, leads: int = 12, seed: int = 0) -> np.ndarray:
    """A smooth test signal in mV, samples by leads (a sine per lead plus noise, about +-1.5 mV)."""
    t = np.arange(round(seconds * fs)) / fs
    rng = np.random.default_rng(seed)
    waves = [np.sin(2 * np.pi * (1 + k / 7) * t + k) * (0.5 + k / 12) for k in range(leads)]
    return np.stack(waves, axis=1) + 0.01 * rng.standard_normal((t.size, leads))


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def dicom_group(
    raw: np.ndarray,
    leads: list[str],
    fs: float,
    label: str = "RHYTHM",
    sensitivity: float = 2.5,
    baseline: float = 0.0,
    unit: str = "uV",
    mdc: bool = False,
):
    """A DICOM waveform multiplex group of int16 ``raw`` (samples by channels)."""
    from pydicom.dataset import Dataset

    group = Dataset()
    group.MultiplexGroupLabel = label
    group.WaveformOriginality = "ORIGINAL" if label == "RHYTHM" else "DERIVED"
    group.NumberOfWaveformChannels, group.NumberOfWaveformSamples = raw.shape[1], raw.shape[0]
    group.SamplingFrequency = fs
    group.WaveformBitsAllocated, group.WaveformSampleInterpretation = 16, "SS"
    channels = []
    for name in leads:
        channel = Dataset()
        number = NUMBERS.get(name, 99)
        source = (
            _code(f"2:{number}", "MDC", f"Lead {name}")
            if mdc
            else _code(f"5.6.3-9-{number}", "SCPECG", f"Lead {name}")
        )
        channel.ChannelSourceSequence = [source]
        channel.ChannelSensitivity = sensitivity
        channel.ChannelSensitivityUnitsSequence = [_code(unit, "UCUM", unit)]
        channel.ChannelSensitivityCorrectionFactor = 1
        channel.ChannelBaseline = baseline
        channel.WaveformBitsStored = 16
        channels.append(channel)
    group.ChannelDefinitionSequence = channels
    group.WaveformData = np.ascontiguousarray(raw, dtype="<i2").tobytes()
    return group


def write_dicom(path: Path, groups: list, sop_class: str = TWELVE_LEAD_ECG) -> Path:
    """A DICOM Part 10 file of ``groups`` (none: a file without a waveform, such as a PDF export)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "P-0001", "ECG"
    if groups:
        ds.WaveformSequence = groups
    ds.save_as(path, enforce_file_format=True)
    return path


def to_raw(signal_mv: np.ndarray, sensitivity_uv: float, baseline_uv: float = 0.0) -> np.ndarray:
    """Digital units of ``signal_mv`` for a channel of ``sensitivity_uv`` uV per unit and a baseline."""
    return np.round((signal_mv * 1000 - baseline_uv) / sensitivity_uv).astype(np.int16)


AECG_LEAD_CODES = {name: f"MDC_ECG_LEAD_{name.upper()}" for name in LEADS}


def aecg_xml(
    digits: np.ndarray, leads: list[str], increment_s: float, origin_uv: float, scale_uv: float
) -> str:
    """An HL7 aECG document (urn:hl7-org:v3 AnnotatedECG) with one RHYTHM series of ``digits``
    (samples by leads) and a REPRESENTATIVE_BEAT derived series that must not be read."""
    sequences = [
        '<component><sequence><code code="TIME_ABSOLUTE" codeSystem="2.16.840.1.113883.5.4"/>'
        '<value xsi:type="GLIST_TS"><head value="20240101120000.000"/>'
        f'<increment value="{increment_s}" unit="s"/></value></sequence></component>'
    ]
    for k, name in enumerate(leads):
        numbers = " ".join(str(int(v)) for v in digits[:, k])
        sequences.append(
            f'<component><sequence><code code="{AECG_LEAD_CODES[name]}" codeSystem="2.16.840.1.113883.6.24"/>'
            f'<value xsi:type="SLIST_PQ"><origin value="{origin_uv}" unit="uV"/>'
            f'<scale value="{scale_uv}" unit="uV"/><digits>{numbers}</digits></value></sequence></component>'
        )
    beat = (
        '<derivation><derivedSeries><code code="REPRESENTATIVE_BEAT" codeSystem="2.16.840.1.113883.5.4"/>'
        "<component><sequenceSet>"
        '<component><sequence><code code="TIME_RELATIVE" codeSystem="2.16.840.1.113883.5.4"/>'
        '<value xsi:type="GLIST_PQ"><head value="0" unit="s"/><increment value="0.001" unit="s"/></value>'
        "</sequence></component></sequenceSet></component></derivedSeries></derivation>"
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<AnnotatedECG xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        '<id root="2.16.840.1.113883.3.1"/><code code="93000" codeSystem="2.16.840.1.113883.6.12"/>'
        '<effectiveTime><low value="20240101120000"/><high value="20240101120010"/></effectiveTime>'
        '<component><series><id root="1.2.3"/><code code="RHYTHM" codeSystem="2.16.840.1.113883.5.4"/>'
        f"{beat}<component><sequenceSet>{''.join(sequences)}</sequenceSet></component>"
        "</series></component></AnnotatedECG>\n"
    )


def code15_h5(path: Path, exams: dict[int, np.ndarray], samples: int = 4096) -> Path:
    """A CODE-15%-layout HDF5 file: each exam's signal (samples by 12 leads) zero-padded, centred, to
    ``samples``, then the part files' closing row of zeros with exam_id 0."""
    import h5py

    tracings = np.zeros((len(exams) + 1, samples, 12), dtype=np.float32)
    for row, signal in enumerate(exams.values()):
        start = (samples - signal.shape[0]) // 2
        tracings[row, start : start + signal.shape[0]] = signal
    with h5py.File(path, "w") as h5:
        h5.create_dataset("tracings", data=tracings)
        h5.create_dataset("exam_id", data=np.array([*exams, 0], dtype=np.int64))
    return path


def ecg_json(path: Path, signal_mv: np.ndarray, fs: float, leads: list[str] = LEADS) -> Path:
    """A ``*.ecg.json`` file of the example reader plugin (plugins/ecglm-json-reader), in uV."""
    import json

    by_lead = {name: [round(v * 1000, 3) for v in signal_mv[:, k]] for k, name in enumerate(leads)}
    path.write_text(json.dumps({"sampling_rate": fs, "units": "uV", "leads": by_lead}))
    return path


def mixed_folder(folder: Path, wfdb_record: Path) -> dict[str, str]:
    """A folder of one 12-lead record in every format ecglm reads (and two files it must not list):
    record as ``find_records`` lists it -> its reader. ``.npy`` and ``.csv`` are at 500 Hz in the
    order :data:`LEADS`."""
    import shutil

    from wfdb.io.convert.edf import wfdb_to_edf

    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".hea", ".dat", ".xyz"):
        if wfdb_record.with_suffix(suffix).is_file():
            shutil.copy(wfdb_record.with_suffix(suffix), folder / f"ptb{suffix}")
    (folder / "ptb.hea").write_text((folder / "ptb.hea").read_text().replace(wfdb_record.name, "ptb"))
    wfdb_to_edf(str(folder / "ptb"), output_filename=str(folder / "ptb.edf"))
    signal = ecg_signal(10.2, 500)
    np.save(folder / "a.npy", signal.T)
    np.savetxt(folder / "b.csv", signal, delimiter=",", header=",".join(LEADS), comments="")
    write_dicom(folder / "c.dcm", [dicom_group(to_raw(signal, 2.5), LEADS, 500)])
    write_dicom(folder / "C0002", [dicom_group(to_raw(signal, 2.5), LEADS, 500)])
    (folder / "d.xml").write_text(aecg_xml(to_raw(signal, 5), LEADS, 0.002, 0, 5))
    code15_h5(folder / "e.hdf5", {17: ecg_signal(10.2, 400)[:4080], 18: ecg_signal(10.2, 400, seed=3)})
    ecg_json(folder / "f.ecg.json", signal, 500)
    (folder / "notes.txt").write_text("not an ECG")
    (folder / "settings.xml").write_text("<settings/>")
    records = {"ptb.hea": "wfdb", "ptb.edf": "edf", "a.npy": "numpy", "b.csv": "csv", "c.dcm": "dicom"}
    records |= {"C0002": "dicom", "d.xml": "aecg", "e.hdf5#17": "hdf5", "e.hdf5#18": "hdf5"}
    return records | {"f.ecg.json": "json"}
