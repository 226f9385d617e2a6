"""Lead names as ECG export formats code them, mapped to ecglm's 12 standard names, and the four limb
leads an 8-lead export leaves out, derived from I and II."""

from __future__ import annotations

import re

import numpy as np

#: SCP-ECG / ISO 11073 (MDC) lead numbers: the last number of a DICOM channel source code
#: (``5.6.3-9-1`` in SCPECG, ``2:1`` in MDC) and the order of ``MDC_ECG_LEAD_*``.
LEAD_NUMBERS = {
    1: "I", 2: "II", 3: "V1", 4: "V2", 5: "V3", 6: "V4", 7: "V5", 8: "V6",
    61: "III", 62: "aVR", 63: "aVL", 64: "aVF",
}  # fmt: skip
_BY_NAME = {name.lower(): name for name in LEAD_NUMBERS.values()}


def standard_lead(*names: str) -> str | None:
    """The standard name (``I`` ... ``V6``) that one of ``names`` spells (``Lead aVR``, ``MDC_ECG_LEAD_AVR``,
    ``5.6.3-9-62``, ``2:62``, ``avr``), or ``None``."""
    for name in names:
        text = (name or "").strip()
        number = re.fullmatch(r"(?:5\.6\.3-9-|2:)(\d+)", text)
        if number:
            found = LEAD_NUMBERS.get(int(number.group(1)))
            if found:
                return found
        text = re.sub(r"^(MDC_ECG_LEAD_|LEAD[ _]?)", "", text, flags=re.I)
        if text.lower() in _BY_NAME:
            return _BY_NAME[text.lower()]
    return None


def complete_limb_leads(signal: np.ndarray, leads: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """``signal`` (samples by leads) with III, aVR, aVL and aVF added from I and II where missing
    (Einthoven and Goldberger: III = II - I, aVR = -(I + II)/2, aVL = I - II/2, aVF = II - I/2), as
    8-lead exports (I, II, V1-V6) leave them out; the names added."""
    if "I" not in leads or "II" not in leads:
        return signal, leads, []
    lead_i, lead_ii = signal[:, leads.index("I")], signal[:, leads.index("II")]
    formulas = {
        "III": lead_ii - lead_i,
        "aVR": -(lead_i + lead_ii) / 2,
        "aVL": lead_i - lead_ii / 2,
        "aVF": lead_ii - lead_i / 2,
    }
    added = [name for name in formulas if name not in leads]
    if not added:
        return signal, leads, []
    columns = np.stack([formulas[name] for name in added], axis=1)
    return np.concatenate([signal, columns], axis=1), [*leads, *added], added
