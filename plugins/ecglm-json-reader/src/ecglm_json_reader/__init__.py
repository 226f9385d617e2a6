"""An example ecglm reader plugin: ECGs exported as JSON (``*.ecg.json``), one list of samples per lead.

``{"sampling_rate": 500, "units": "uV", "leads": {"I": [...], "II": [...], ...}}``; read into millivolts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ecglm.readers import ECGReader
from ecglm.records import RecordError, Recording

TO_MILLIVOLTS = {"uV": 1e-3, "mV": 1.0, "V": 1e3}


class JSONReader(ECGReader):
    """An ECG exported as JSON: ``sampling_rate`` (Hz), ``units`` (uV, mV, V), ``leads`` (name -> samples)."""

    suffixes = (".json",)

    def claims(self, path: Path) -> bool:
        return Path(path).name.lower().endswith(".ecg.json")  # not every JSON file in a folder

    def read(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> Recording:
        self.check(path)
        try:
            data = json.loads(Path(path).read_text())
            rate, units, by_lead = float(data["sampling_rate"]), data.get("units", "mV"), data["leads"]
            signal = np.array([by_lead[name] for name in by_lead], dtype=np.float64).T
        except (ValueError, KeyError, TypeError) as err:
            raise RecordError(
                f"{path}: not an ECG JSON export ({type(err).__name__}: {err}); it needs sampling_rate, "
                "units and leads (name -> list of samples, all the same length)"
            ) from err
        if units not in TO_MILLIVOLTS:
            raise RecordError(f"{path}: units {units!r} is not one of {', '.join(TO_MILLIVOLTS)}")
        return Recording(signal * TO_MILLIVOLTS[units], list(by_lead), rate, str(path), units="mV")
