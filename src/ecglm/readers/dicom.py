"""DICOM waveforms (12-lead ECG, General ECG, Ambulatory ECG and other waveform storage) through pydicom.

A DICOM ECG holds one or more multiplex groups (``WaveformSequence`` items), each a block of channels
at one rate. The *rhythm* group (the whole recording) is read, not the *median beat* group (one
averaged beat per lead, which some carts add): a group is rhythm when its label says ``RHYTHM`` or,
unlabelled, when its originality is ``ORIGINAL``; median when the label says ``MEDIAN`` (or the
originality is ``DERIVED``). ``FILE#median`` reads the median beats, ``FILE#N`` the group at index
``N``. Samples become millivolts with pydicom (channel sensitivity, correction factor and baseline,
DICOM PS3.3 C.10.9) and each channel's sensitivity units (uV, mV, V). Lead names come from each
channel's source code (SCPECG ``5.6.3-9-N`` or MDC ``2:N``, else its meaning, ``Lead aVR``); an
8-lead export (I, II, V1-V6) gets III, aVR, aVL and aVF derived from I and II.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecglm.readers.base import ECGReader, file_head, split_address
from ecglm.readers.leads import complete_limb_leads, standard_lead
from ecglm.records import RecordError, Recording

#: Millivolts per unit of a channel's sensitivity (its ``ChannelSensitivityUnitsSequence`` code).
TO_MILLIVOLTS = {"uV": 1e-3, "mV": 1.0, "V": 1e3, "nV": 1e-6}
GROUPS = ("rhythm", "median")


def _is_dicom(path: Path) -> bool:
    """DICOM Part 10: a 128-byte preamble, then ``DICM``."""
    return file_head(path, 132)[128:132] == b"DICM"


def _kind(group) -> str:
    label = str(group.get("MultiplexGroupLabel", "")).upper()
    if "RHYTHM" in label:
        return "rhythm"
    if "MEDIAN" in label or "BEAT" in label:
        return "median"
    return "rhythm" if group.get("WaveformOriginality", "ORIGINAL") == "ORIGINAL" else "median"


class DICOMReader(ECGReader):
    """A DICOM ECG waveform file (``.dcm``, or any file with the DICOM preamble): its rhythm group in mV."""

    suffixes = (".dcm", ".dicom")

    def claims(self, path: Path) -> bool:
        file, _ = split_address(path)
        return super().claims(path) or (not file.suffix and file.is_file() and _is_dicom(file))

    def read(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> Recording:
        import pydicom

        file, key = split_address(path)
        self.check(path)
        try:
            ds = pydicom.dcmread(file)
        except Exception as err:  # pydicom raises several types for files that are not DICOM
            raise RecordError(f"{file}: not a readable DICOM file ({type(err).__name__}: {err})") from err
        groups = list(ds.get("WaveformSequence") or [])
        if not groups:
            what = ds.get("SOPClassUID")
            what = f"{what.name} ({what})" if what is not None else "no SOP class"
            raise RecordError(
                f"{file}: no waveform in this DICOM file ({what}); an ECG exported as a picture or PDF "
                "holds no signal: export it as 12-lead ECG Waveform Storage, or read the picture (--image)"
            )
        index = self._group(file, groups, key or "rhythm")
        group = groups[index]
        try:
            signal = ds.waveform_array(index).astype(np.float64)
        except Exception as err:  # malformed groups fail in numpy's reshape or pydicom's checks
            raise RecordError(
                f"{file}: unreadable waveform group {index} ({type(err).__name__}: {err})"
            ) from err
        names, scale = self._channels(file, group)
        signal = signal * scale
        signal, names, derived = complete_limb_leads(signal, names)
        rate = float(group.get("SamplingFrequency") or 0)
        if rate <= 0:
            raise RecordError(f"{file}: waveform group {index} states no sampling frequency")
        metadata = {
            "group": index,
            "group_kind": _kind(group),
            "sop_class": str(ds.get("SOPClassUID", "")),
            "patient_id": str(ds.get("PatientID", "")),
            "derived_leads": derived,
        }
        return Recording(signal, names, rate, str(path), units="mV", metadata=metadata)

    @staticmethod
    def _group(file: Path, groups: list, key: str) -> int:
        kinds = [_kind(g) for g in groups]
        listed = ", ".join(
            f"{i}: {k} ({g.get('MultiplexGroupLabel', 'unlabelled')})"
            for i, (g, k) in enumerate(zip(groups, kinds, strict=True))
        )
        if key.isdigit():
            if int(key) >= len(groups):
                raise RecordError(f"{file}#{key}: no waveform group {key} (groups: {listed})")
            return int(key)
        if key not in GROUPS:
            raise RecordError(f"{file}#{key}: give #rhythm, #median or a group index (groups: {listed})")
        if key not in kinds:
            raise RecordError(f"{file}: no {key} waveform group (groups: {listed}); name one as {file}#N")
        return kinds.index(key)

    @staticmethod
    def _channels(file: Path, group) -> tuple[list[str], np.ndarray]:
        names, scale = [], []
        for number, channel in enumerate(group.get("ChannelDefinitionSequence") or [], start=1):
            source = (channel.get("ChannelSourceSequence") or [None])[0]
            code, meaning = (
                (source.get("CodeValue", ""), source.get("CodeMeaning", "")) if source else ("", "")
            )
            name = standard_lead(str(code), str(meaning), str(channel.get("ChannelLabel", "")))
            names.append(name or str(meaning or code or f"channel {number}"))
            units = (channel.get("ChannelSensitivityUnitsSequence") or [None])[0]
            unit = str(units.get("CodeValue", "uV")) if units else "uV"
            if unit not in TO_MILLIVOLTS:
                raise RecordError(
                    f"{file}: channel {number} ({names[-1]}) is in {unit!r}, not a voltage "
                    f"({', '.join(TO_MILLIVOLTS)}): not an ECG lead"
                )
            scale.append(TO_MILLIVOLTS[unit])
        if not names:
            raise RecordError(f"{file}: the waveform group defines no channels")
        if not any(standard_lead(n) for n in names):
            raise RecordError(
                f"{file}: no channel is a standard ECG lead (channels: {names}); ecglm reads the 12 "
                "leads I, II, III, aVR, aVL, aVF, V1-V6 named by their SCPECG or MDC source codes"
            )
        return names, np.asarray(scale)
