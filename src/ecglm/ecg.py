"""What an ECG is to ecglm: the 12 standard leads in their canonical order, and the normalisations a
signal can carry. The encoders state what they expect in these terms and the data builders write them
into every manifest, so both import them from here (standard library only)."""

from __future__ import annotations

#: The 12 standard leads in the order of every ECG array's lead axis.
LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

#: Normalisations an ECG can carry (and an encoder can expect), and what each means.
NORMALIZATIONS: dict[str, str] = {
    "zscore": "per lead: subtract each lead's mean and divide by its standard deviation",
    "minmax": "global: map the record's minimum over all leads to 0 and its maximum to 1",
}
