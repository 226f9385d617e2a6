"""``ecglm render``: a record drawn as the 12-lead printout an image-path model reads."""

from __future__ import annotations

from pathlib import Path


def render(
    record: str,
    out: str,
    dpi: int = 100,
    start: float = 0.0,
    fs: float | None = None,
    leads: str | None = None,
    augment: int | None = None,
) -> int:
    """Draw an ECG record as a 12-lead printout (its 12 standard leads picked by name, in their own
    units and rate).

    Args:
        record: WFDB (.hea), EDF/BDF, .npy, .csv, DICOM, HL7 aECG (.xml), FILE.h5#EXAM_ID, or any
            format a reader plugin adds (docs/records.md).
        out: PNG file to write.
        dpi: Resolution of the drawing.
        start: Seconds into the record.
        fs: Sampling rate of .npy / .csv files, Hz.
        leads: Lead order of .npy / .csv files, comma-separated.
        augment: A seed: distort as a photographed printout.
    """
    from ecglm.data.preprocess import select_leads
    from ecglm.records import read_recording
    from ecglm.render import PrintoutAugment, render_ecg, save_png

    recording = read_recording(record, fs, leads.split(",") if leads else None)
    signal = select_leads(recording.signal, recording.leads, recording.source)
    image = render_ecg(signal[:, round(start * recording.fs) :], recording.fs, dpi=dpi)
    if augment is not None:
        image = PrintoutAugment()(image, augment)
    print(f"printout: {save_png(image, Path(out))}")
    return 0
