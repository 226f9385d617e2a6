"""FDA HL7 annotated ECG (aECG) XML, parsed with defusedxml: entity declarations (a billion-laughs file)
and external entities or DTDs fetched from elsewhere are refused, never expanded.

Read: the first ``series`` whose code is ``RHYTHM`` (not the ``REPRESENTATIVE_BEAT`` series a
derivation holds), its first ``sequenceSet``: the time sequence's ``increment`` (s or ms) gives the
rate; each lead sequence (``MDC_ECG_LEAD_*``) is ``origin + scale * digits`` in the units of ``scale``
(uV, mV or V), turned into millivolts. An 8-lead file gets III, aVR, aVL and aVF derived from I and II.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecglm.readers.base import ECGReader, file_head, split_address
from ecglm.readers.leads import complete_limb_leads, standard_lead
from ecglm.records import RecordError, Recording

HL7 = "{urn:hl7-org:v3}"
TO_MILLIVOLTS = {"uV": 1e-3, "mV": 1.0, "V": 1e3}
TO_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def _tag(element) -> str:
    return element.tag.rpartition("}")[2]


def _children(element, name: str) -> list:
    return [child for child in element if _tag(child) == name]


def _code(element) -> str:
    code = next(iter(_children(element, "code")), None)
    return code.get("code", "") if code is not None else ""


class AECGReader(ECGReader):
    """An HL7 aECG XML file (``.xml`` whose start holds ``AnnotatedECG``): its rhythm leads in mV."""

    suffixes = (".xml",)

    def claims(self, path: Path) -> bool:
        file, _ = split_address(path)
        return super().claims(path) and b"AnnotatedECG" in file_head(file, 4096)

    def read(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> Recording:
        from defusedxml import DefusedXmlException
        from defusedxml.ElementTree import ParseError, parse

        file, _ = split_address(path)
        self.check(path)
        try:
            root = parse(str(file), forbid_dtd=False, forbid_entities=True, forbid_external=True).getroot()
        except DefusedXmlException as err:
            raise RecordError(
                f"{file}: refused: the XML declares entities or loads external ones ({err}); an aECG "
                "export needs neither (a file that does may be an attack: billion laughs, external entity)"
            ) from err
        except ParseError as err:
            raise RecordError(f"{file}: not well-formed XML ({err})") from err
        sequence_set = self._rhythm(file, root)
        names, columns, rate = [], [], None
        for component in _children(sequence_set, "component"):
            for sequence in _children(component, "sequence"):
                code, value = _code(sequence), next(iter(_children(sequence, "value")), None)
                if value is None:
                    continue
                if code.startswith("TIME_"):
                    rate = self._rate(file, value)
                    continue
                names.append(standard_lead(code) or code)
                columns.append(self._samples(file, code, value))
        if rate is None:
            raise RecordError(f"{file}: the rhythm sequence set has no TIME_ABSOLUTE/TIME_RELATIVE increment")
        if not columns:
            raise RecordError(f"{file}: the rhythm sequence set holds no lead")
        lengths = {len(c) for c in columns}
        if len(lengths) != 1:
            raise RecordError(f"{file}: leads of different lengths {sorted(lengths)} in one sequence set")
        signal, names, derived = complete_limb_leads(np.stack(columns, axis=1), names)
        metadata = {"series": "RHYTHM", "derived_leads": derived}
        return Recording(signal, names, rate, str(path), units="mV", metadata=metadata)

    @staticmethod
    def _rhythm(file: Path, root):
        if _tag(root) != "AnnotatedECG":
            raise RecordError(f"{file}: the root element is {_tag(root)}, not an HL7 AnnotatedECG")
        for series in root.iter(f"{HL7}series"):
            if _code(series) == "RHYTHM":
                sets = [s for c in _children(series, "component") for s in _children(c, "sequenceSet")]
                if sets:
                    return sets[0]
        raise RecordError(f"{file}: no RHYTHM series with a sequenceSet (only median beats are not read)")

    @staticmethod
    def _rate(file: Path, value) -> float:
        increment = next(iter(_children(value, "increment")), None)
        try:
            step = float(increment.get("value")) * TO_SECONDS[increment.get("unit", "s")]
        except (AttributeError, TypeError, ValueError, KeyError) as err:
            raise RecordError(
                f"{file}: the time sequence has no usable increment (value, unit s/ms)"
            ) from err
        if step <= 0:
            raise RecordError(f"{file}: the time increment {step} s is not positive")
        return 1.0 / step

    @staticmethod
    def _samples(file: Path, code: str, value) -> np.ndarray:
        origin = next(iter(_children(value, "origin")), None)
        scale = next(iter(_children(value, "scale")), None)
        digits = next(iter(_children(value, "digits")), None)
        if scale is None or digits is None:
            raise RecordError(f"{file}: lead {code} has no scale or digits (an SLIST_PQ value)")
        unit = scale.get("unit", "uV")
        if unit not in TO_MILLIVOLTS:
            raise RecordError(f"{file}: lead {code} is scaled in {unit!r}, not uV, mV or V")
        try:
            samples = np.array((digits.text or "").split(), dtype=np.float64)
            gain, offset = (
                float(scale.get("value")),
                float(origin.get("value")) if origin is not None else 0.0,
            )
        except (TypeError, ValueError) as err:
            raise RecordError(f"{file}: lead {code}: non-numeric origin, scale or digits ({err})") from err
        origin_unit = origin.get("unit", unit) if origin is not None else unit
        return (samples * gain) * TO_MILLIVOLTS[unit] + offset * TO_MILLIVOLTS.get(
            origin_unit, TO_MILLIVOLTS[unit]
        )
