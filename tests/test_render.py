"""The 12-lead printout: paper size, 10 mm/mV and 25 mm/s in pixels, the layout, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from ecglm.ecg import LEADS
from ecglm.render import GRID_MAJOR, GRID_MINOR, MARGIN_MM, ROW_HEIGHT_MM, paper_size_mm, render_ecg

DPI = 254  # 10 pixels per millimetre
FS = 250


def _dark(image: np.ndarray) -> np.ndarray:
    return (image < 80).all(axis=-1)  # the black trace, not the pink grid


def _row_baseline_px(row: int) -> int:
    """Pixels from the top of the image to the baseline of ``row``."""
    return round((MARGIN_MM + (row + 0.6) * ROW_HEIGHT_MM) * DPI / 25.4)


def test_paper_size_and_determinism():
    signal = np.zeros((12, 10 * FS))
    image = render_ecg(signal, FS, dpi=DPI)
    width, height = paper_size_mm()
    assert image.shape == (round(height * 10), round(width * 10), 3) and image.dtype == np.uint8
    assert np.array_equal(image, render_ecg(signal, FS, dpi=DPI))
    # Traces 0.5 mm above their baselines, which lie on grid lines: between lines, so that none is hidden.
    assert_grid_lines_every_mm(render_ecg(signal + 0.05, FS, dpi=DPI), px_per_mm=10)


def assert_grid_lines_every_mm(image: np.ndarray, px_per_mm: int) -> None:
    """Vertical and horizontal lines, major every 5 mm and minor every 1 mm between them, each across the
    whole paper. A column (row) counts as a line where the colour fills over half of it: one that only
    crosses the other direction's lines (a fifth of it in either colour) does not."""
    height, width, _ = image.shape
    major, minor = (np.all(image == np.round(255 * np.array(c)), axis=-1) for c in (GRID_MAJOR, GRID_MINOR))

    def lines(step_mm: int, size: int, from_end: bool = False, skip_mm: int = 0) -> list[int]:
        """Pixels of lines every ``step_mm`` from the first column, or from the last row (the grid starts
        at the paper's bottom edge), clipped to the image, without those a major line draws over."""
        ticks = [
            t for t in range(0, size + 1, step_mm * px_per_mm) if not skip_mm or t % (skip_mm * px_per_mm)
        ]
        return sorted({min(size - t if from_end else t, size - 1) for t in ticks})

    filled = lambda mask, axis: np.flatnonzero(mask.mean(axis=axis) > 0.5).tolist()  # noqa: E731
    assert filled(major, 0) == lines(5, width)
    assert filled(minor, 0) == lines(1, width, skip_mm=5)
    assert filled(major, 1) == lines(5, height, from_end=True)
    assert filled(minor, 1) == lines(1, height, from_end=True, skip_mm=5)


def test_one_millivolt_is_ten_millimetres_and_one_second_twenty_five():
    """Lead I steps to 1 mV at 0.4 s and back at 1.4 s: in the first column of the first row, the step is
    100 px high (10 mm/mV) and 250 px long (25 mm/s)."""
    signal = np.zeros((12, 10 * FS))
    signal[LEADS.index("I"), int(0.4 * FS) : int(1.4 * FS)] = 1.0
    image = render_ecg(signal, FS, dpi=DPI)
    dark = _dark(image)
    baseline = _row_baseline_px(0)
    top = baseline - 100
    x0 = round((MARGIN_MM + 5.0) * 10)  # after the calibration pulse
    plateau = np.flatnonzero(dark[top - 2 : top + 3, x0 : x0 + 625].any(axis=0))
    assert plateau.size and abs(plateau[0] - 100) <= 3 and abs(plateau[-1] - 350) <= 3  # 0.4 s .. 1.4 s
    # The calibration pulse of every row: its top 100 px (1 mV) above the row's baseline.
    column = dark[:, round(MARGIN_MM * 10) + 25]  # mid-pulse
    for row in range(4):
        base = _row_baseline_px(row)
        band = np.flatnonzero(column[base - 150 : base + 50]) + base - 150
        assert band.size and abs((base - band.min()) - 100) <= 3, row


def test_bad_signals_are_refused():
    with pytest.raises(ValueError, match="12 leads x samples"):
        render_ecg(np.zeros((15, 2500)), FS)
    with pytest.raises(ValueError, match="needs 10 s"):
        render_ecg(np.zeros((12, 2000)), FS)
    signal = np.zeros((12, 2500))
    signal[3, 10] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        render_ecg(signal, FS)


def test_ecglm_render_draws_a_real_record(ptb_record, tmp_path):
    from PIL import Image

    from ecglm.commands import main

    out = tmp_path / "ptb.png"
    assert main(["render", "--record", str(ptb_record), "--out", str(out), "--dpi", "100"]) == 0
    image = np.asarray(Image.open(out).convert("RGB"))
    width, height = paper_size_mm()
    assert image.shape[:2] == (round(height * 100 / 25.4), round(width * 100 / 25.4))
    assert _dark(image).mean() > 0.01  # traces drawn over the grid
    assert main(["render", "--record", str(tmp_path / "none.npy"), "--out", str(out), "--fs", "250"]) == 2


def test_augmentations_are_seeded_and_each_distorts_the_printout():
    from dataclasses import replace

    from ecglm.render import PrintoutAugment, augment_seed

    t = np.arange(10 * FS) / FS
    signal = np.stack([np.sin(2 * np.pi * 1.2 * t) * (1 + 0.05 * k) for k in range(12)])
    image = render_ecg(signal, FS, dpi=100)
    augment = PrintoutAugment()
    once, again = augment(image, 7), augment(image, 7)
    assert once.shape == image.shape and once.dtype == np.uint8 and np.array_equal(once, again)
    assert not np.array_equal(once, augment(image, 8))
    off = PrintoutAugment(0, 0, 0, 0, 0, 0, 0, 0)
    assert np.array_equal(off(image, 7), image)  # every distortion off: the printout itself
    bounds = {**vars(augment), "grid": 1.0}  # grid: a probability; 1 redraws it every time
    only = {name: replace(off, **{name: value}) for name, value in bounds.items()}
    changed = {name: float(np.abs(a(image, 3).astype(int) - image).mean()) for name, a in only.items()}
    assert all(v > 0.01 for v in changed.values()), changed  # blur at seed 3: 0.04; rotation: 32
    # Blur removes fine detail (the 1 mm grid): less energy in pixel-to-pixel differences.
    blurred = replace(off, blur=2.0)(image, 3).astype(float)
    assert np.abs(np.diff(blurred, axis=1)).mean() < np.abs(np.diff(image.astype(float), axis=1)).mean()
    # Another grid: the traces' black pixels stay where they were, the pink grid's become grey.
    from ecglm.render import GRID_STYLES, regrid

    grey = regrid(image, GRID_STYLES[0])
    ink = np.all(image == 0, axis=-1)
    assert np.array_equal(grey[ink], image[ink]) and not np.all(grey == image)
    minor, major = (np.all(image == c, axis=-1) for c in ((255, 204, 204), (242, 140, 140)))
    assert minor.sum() > 1000 and major.sum() > 1000  # the grid, drawn pink
    assert np.all(grey[minor] == (217, 217, 217)) and np.all(grey[major] == (158, 158, 158))
    paper = np.all(image == 255, axis=-1)
    assert np.array_equal(grey[paper], image[paper])
    plain = regrid(image, GRID_STYLES[-1])
    for pink in ((255, 204, 204), (242, 140, 140)):  # the grid's colours, gone from plain paper
        assert np.all(image == pink, axis=-1).any() and not np.all(plain == pink, axis=-1).any()
    assert np.array_equal(plain[ink], image[ink])
    # A pair's seed changes with the epoch and is the same for the same pair everywhere.
    assert augment_seed("r1_qa0", 0) == augment_seed("r1_qa0", 0) != augment_seed("r1_qa0", 1)
