"""ECGs drawn as the 12-lead printout clinicians read: the first piece of the image-ECG path.

Standard layout: three rows of four 2.5 s columns (I, aVR, V1, V4 / II, aVL, V2, V5 / III, aVF, V3,
V6), a fourth row with the full 10 s lead II rhythm strip, a 1 mV x 0.2 s calibration pulse at the
start of every row, lead labels, and the millimetre grid (minor 1 mm, major 5 mm) at 25 mm/s and
10 mm/mV. Drawn with numpy (the grid, as array rows and columns) and Pillow's line drawing (the
traces; Pillow comes with matplotlib) on an image sized in millimetres, so a millimetre of paper is
``dpi / 25.4`` pixels whatever the resolution, and the same signal always gives the same pixels.
Not matplotlib: a figure with a thousand grid lines draws about 4 printouts a second, far too slow
for a loader.

Input: 12 leads in ``ecglm.ecg.LEADS`` order, in millivolts (physical units; a z-scored window is
drawn as if its units were millivolts), at least 10 s at ``fs`` Hz.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecglm.ecg import LEADS

PAPER_SPEED_MM_PER_S = 25.0
GAIN_MM_PER_MV = 10.0
SECONDS = 10.0
#: Rows of the 3 x 4 layout, each four 2.5 s columns; then the rhythm strip.
LAYOUT = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
RHYTHM_LEAD = "II"
ROW_HEIGHT_MM = 30.0  # 3 mV per row
CALIBRATION_MM = 5.0  # the pulse's width (0.2 s) on paper
MARGIN_MM = 5.0
GRID_MINOR = (1.0, 0.80, 0.80)
GRID_MAJOR = (0.95, 0.55, 0.55)


def paper_size_mm() -> tuple[float, float]:
    """Width and height of the printout: the 10 s traces after the calibration pulse, four rows."""
    width = 2 * MARGIN_MM + CALIBRATION_MM + SECONDS * PAPER_SPEED_MM_PER_S
    height = 2 * MARGIN_MM + (len(LAYOUT) + 1) * ROW_HEIGHT_MM
    return width, height


def render_ecg(signal: np.ndarray, fs: float, dpi: int = 100) -> np.ndarray:
    """The printout of ``signal`` (12 leads x samples, mV) as an RGB image ``(height, width, 3)`` uint8."""
    from PIL import Image, ImageDraw

    signal = np.asarray(signal, dtype=np.float64)
    if signal.ndim != 2 or signal.shape[0] != len(LEADS):
        raise ValueError(f"expected 12 leads x samples in {list(LEADS)} order, got shape {signal.shape}")
    needed = round(SECONDS * fs)
    if signal.shape[1] < needed:
        raise ValueError(f"{signal.shape[1] / fs:.2f} s of signal: the printout needs {SECONDS:g} s")
    if not np.isfinite(signal[:, :needed]).all():
        raise ValueError("the signal holds NaN or infinite samples: repair or drop them first")
    ppm = dpi / 25.4  # pixels per millimetre of paper
    width, height = paper_size_mm()
    image = Image.fromarray(_grid(width, height, ppm))
    draw = ImageDraw.Draw(image)
    line = max(1, round(0.15 * ppm))  # a 0.15 mm pen

    def xy(x_mm: np.ndarray, y_mm: np.ndarray) -> list[tuple[float, float]]:
        return list(zip((x_mm * ppm).tolist(), ((height - y_mm) * ppm).tolist(), strict=True))

    x0 = MARGIN_MM + CALIBRATION_MM
    for r, leads in enumerate([*LAYOUT, (RHYTHM_LEAD,)]):
        baseline = height - MARGIN_MM - (r + 0.6) * ROW_HEIGHT_MM
        pulse_x = MARGIN_MM + np.array([0, 1, 1, 4, 4, CALIBRATION_MM])
        pulse_y = baseline + GAIN_MM_PER_MV * np.array([0, 0, 1, 1, 0, 0])  # 1 mV for 0.2 s
        draw.line(xy(pulse_x, pulse_y), fill=(0, 0, 0), width=line)
        span = SECONDS / len(leads)
        for c, lead in enumerate(leads):
            start, stop = round(c * span * fs), round((c + 1) * span * fs)
            trace = signal[LEADS.index(lead), start:stop]
            t = x0 + (start + np.arange(trace.size)) / fs * PAPER_SPEED_MM_PER_S
            draw.line(xy(t, baseline + trace * GAIN_MM_PER_MV), fill=(0, 0, 0), width=line, joint="curve")
            draw.text(
                xy(np.array([t[0] + 1]), np.array([baseline + 0.45 * ROW_HEIGHT_MM]))[0], lead, fill=(0, 0, 0)
            )
            if c:  # the column boundary mark of a printout
                draw.line(
                    xy(np.array([t[0]] * 2), np.array([baseline - 2, baseline + 2])),
                    fill=(0, 0, 0),
                    width=line,
                )
    return np.asarray(image)


def _grid(width: float, height: float, ppm: float) -> np.ndarray:
    """White paper with the minor (1 mm) and major (5 mm) grid: a fresh copy of the one drawn for this
    size (every printout of a loader has the same paper)."""
    return _paper(width, height, ppm).copy()


@functools.cache
def _paper(width: float, height: float, ppm: float) -> np.ndarray:
    """The grid, drawn as array columns and rows (kept per size and resolution)."""
    image = np.full((round(height * ppm), round(width * ppm), 3), 255, dtype=np.uint8)
    for step, colour, thickness in ((1.0, GRID_MINOR, 1), (5.0, GRID_MAJOR, max(1, round(0.1 * ppm)))):
        rgb = np.array([round(255 * v) for v in colour], dtype=np.uint8)
        for x in np.arange(0, width + 1e-9, step):
            col = min(round(x * ppm), image.shape[1] - 1)
            image[:, col : col + thickness] = rgb
        for y in np.arange(0, height + 1e-9, step):
            row = min(round((height - y) * ppm), image.shape[0] - 1)
            image[row : row + thickness, :] = rgb
    return image


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an RGB image as PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def run_render(args: list[str]) -> Path:
    """``ecglm render --record PATH --out ecg.png [--dpi 100] [--fs HZ --leads ...] [--start SECONDS]``:
    the printout of a record's 12 standard leads (picked by name, in their own units and rate)."""
    import argparse

    from ecglm.data.preprocess import select_leads
    from ecglm.records import read_recording

    parser = argparse.ArgumentParser(
        prog="ecglm render", description="Draw an ECG record as a 12-lead printout."
    )
    parser.add_argument("--record", required=True, help="WFDB (.hea), EDF/BDF, .npy or .csv")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument("--start", type=float, default=0.0, help="seconds into the record")
    parser.add_argument("--fs", type=float, help="sampling rate of .npy / .csv files, Hz")
    parser.add_argument("--leads", help="lead order of .npy / .csv files, comma-separated")
    parser.add_argument("--augment", type=int, help="a seed: distort as a photographed printout")
    options = parser.parse_args(args)
    recording = read_recording(
        options.record, options.fs, options.leads.split(",") if options.leads else None
    )
    leads = select_leads(recording.signal, recording.leads, recording.source)
    start = round(options.start * recording.fs)
    image = render_ecg(leads[:, start:], recording.fs, dpi=options.dpi)
    if options.augment is not None:
        image = PrintoutAugment()(image, options.augment)
    return save_png(image, options.out)


@dataclass(frozen=True)
class PrintoutAugment:
    """Distortions of the kind photographed and scanned printouts carry (ECGInstruct's images):
    rotation, perspective skew, scale, cropping, blur, sensor noise and paper/ink colour, each drawn
    uniformly up to its bound from a generator seeded per call. ``0`` turns a distortion off.

    Args:
        rotation_deg: Largest rotation either way, degrees.
        perspective: Largest corner displacement, as a fraction of the image's width and height.
        scale: Largest zoom in or out (0.05: 0.95x to 1.05x), the image kept at its size.
        crop: Largest fraction cut from each side (then resized back).
        blur: Largest blur radius (a box blur, as a defocused camera's), pixels of ``size``.
        noise: Largest standard deviation of additive noise, in 0-255 units.
        colour: Largest per-channel gain change (0.15: 0.85x to 1.15x) of paper, grid and ink.
        grid: Probability of a grid printed otherwise (:data:`GRID_STYLES`: grey, blue, green, a
            faint one, or none, each at a random strength), as carts and printers differ.
    """

    rotation_deg: float = 3.0
    perspective: float = 0.03
    scale: float = 0.05
    crop: float = 0.02
    blur: float = 1.0
    noise: float = 6.0
    colour: float = 0.12
    grid: float = 0.3

    def __call__(self, image: np.ndarray, seed: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """``image`` distorted, at ``size`` (``(height, width)``; default: its own).

        Rotation, perspective, scale and crop are composed into one projective map, and the resize to
        ``size`` with them, so the picture is resampled once (bilinear, Pillow: a quarter of the time
        of four resamples, which a loader drawing a distorted printout per QA pair needs); blur,
        colour and noise then act at ``size`` (their bounds are in the model's pixels).

        The one transform samples the drawing at one point per output pixel, so at the usual 2x
        reduction a 1-pixel trace comes out dark and broken where an area-filtered resize
        (:func:`resize_printout`, which clean printouts get) leaves it continuous and grey. That
        looks like a defect, and was "fixed" once (distort at the drawn resolution, then resize as
        the clean ones): the image quickstart then read heart rate far worse (issue 28: its gap to
        another record's printout fell from 33 to 5 points). The sharp, broken traces are a harder
        and more varied training picture than the clean one, and what the small CNN learns from
        them carries over; ``tests/test_printout_learning.py`` keeps the quickstart's pictures as
        they were measured.
        """
        from PIL import Image, ImageFilter

        rng = np.random.default_rng(seed)
        if self.grid and rng.uniform() < self.grid:
            image = regrid(image, GRID_STYLES[rng.integers(len(GRID_STYLES))], rng.uniform(0.4, 1.0))
        height, width = image.shape[:2]
        out_h, out_w = size or (height, width)
        centre = np.array([[1, 0, width / 2], [0, 1, height / 2], [0, 0, 1]])
        uncentre = np.linalg.inv(centre)
        # Output pixel -> input pixel, built right to left: resize, crop, zoom, perspective, rotation.
        mapping = np.diag([width / out_w, height / out_h, 1.0])
        if self.crop:
            left, top, right, bottom = rng.uniform(0, self.crop, size=4) * (width, height, width, height)
            keep_x, keep_y = (width - left - right) / width, (height - top - bottom) / height
            mapping = np.array([[keep_x, 0, left], [0, keep_y, top], [0, 0, 1]]) @ mapping
        if self.scale:
            factor = rng.uniform(1 - self.scale, 1 + self.scale)  # >1 zooms in, about the centre
            mapping = centre @ np.diag([1 / factor, 1 / factor, 1]) @ uncentre @ mapping
        if self.perspective:
            shift = rng.uniform(-self.perspective, self.perspective, size=(4, 2)) * (width, height)
            corners = np.array([(0, 0), (width, 0), (width, height), (0, height)], dtype=np.float64)
            skew = np.append(_perspective_coefficients(corners, corners + shift), 1.0).reshape(3, 3)
            mapping = skew @ mapping
        if self.rotation_deg:
            # Pillow's rotate(angle) turns the picture counter-clockwise: each output pixel reads the
            # input at the point turned the other way about the centre.
            a = -np.radians(rng.uniform(-self.rotation_deg, self.rotation_deg))
            turn = np.array([[np.cos(a), np.sin(a), 0], [-np.sin(a), np.cos(a), 0], [0, 0, 1]])
            mapping = centre @ turn @ uncentre @ mapping
        mapping = mapping / mapping[2, 2]
        picture = Image.fromarray(image).transform(
            (out_w, out_h),
            Image.Transform.PERSPECTIVE,
            tuple(mapping.reshape(9)[:8]),
            Image.Resampling.BILINEAR,
            fillcolor=(255, 255, 255),
        )
        if self.blur:
            # One box pass (Pillow's Gaussian is three): camera defocus is a disc, not a Gaussian, and
            # a third of the time.
            picture = picture.filter(ImageFilter.BoxBlur(rng.uniform(0, self.blur)))
        if not (self.colour or self.noise):
            return np.asarray(picture)
        out = np.asarray(picture, dtype=np.float32)
        if self.colour:
            out = out * rng.uniform(1 - self.colour, 1 + self.colour, size=3).astype(np.float32)
        if self.noise:
            # A window at a random offset of a fixed Gaussian field (per process): sensor noise at a
            # tenth of the cost of drawing every pixel's anew, the offset and strength seeded per call.
            field = _noise_field(*out.shape[:2])
            dy = rng.integers(0, field.shape[0] - out.shape[0] + 1)
            dx = rng.integers(0, field.shape[1] - out.shape[1] + 1)
            window = field[dy : dy + out.shape[0], dx : dx + out.shape[1]]
            out = out + np.float32(rng.uniform(0, self.noise)) * window
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_printout(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB ``(height, width, 3)`` image at ``size`` (``(height, width)``), as clean printouts and a
    dataset's own images reach the model: Pillow's bilinear ``resize``, which widens its filter by
    the reduction factor (an area average when shrinking), so a 1-pixel trace drawn at 50 dpi stays
    a continuous, lighter line at the model's size. (Distorted printouts are resized inside their
    one projective transform, :class:`PrintoutAugment`.)"""
    from PIL import Image

    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


@functools.cache
def _noise_field(height: int, width: int) -> np.ndarray:
    """Standard normal noise twice the size of a ``height x width`` image, drawn once per process and size."""
    return np.random.default_rng(0).standard_normal((2 * height, 2 * width, 3), dtype=np.float32)


@dataclass(frozen=True)
class ECGPrintout:
    """How an image model sees a QA pair's ECG: the signal drawn as a printout (:func:`render_ecg`),
    distorted per pair and epoch (``augment``), resized to the model's input; or, for a dataset
    that ships only images (ECGInstruct), its image resized alike. The data side's ``image``
    component (``ECGQADataModule(image=...)``): it runs in the loader workers, on the signal the
    shards store once, so a printout is never stored and every epoch can draw it differently.

    Args:
        dpi: Resolution the printout is drawn at before resizing (50: 531 x 256 px).
        size: ``(height, width)`` the model reads; ``None``: as drawn. The model side sets it when
            the recipe leaves it out (:func:`ecglm.wiring.connect`, from the encoder or backbone).
        augment: Distortions of photographed printouts (:class:`PrintoutAugment`), seeded by
            :func:`augment_seed` (QA key, epoch, ``seed``): the same image in any worker or resumed
            run, a new one every epoch. ``None``: clean printouts (evaluation never distorts).
        seed: Seed of the distortions.
        mv_per_unit: Millivolts per unit of the stored signal (1 for signals in mV; z-scored
            signals have no unit: 0.25 draws a lead of standard deviation 1 about as tall as a
            typical printed lead).
        fs: Sampling rate of the stored signals, Hz (the DataModule sets it from its manifest).
    """

    dpi: int = 50
    size: tuple[int, int] | None = None
    augment: PrintoutAugment | None = None
    seed: int = 0
    mv_per_unit: float = 1.0
    fs: float | None = None

    def __call__(self, item: dict, epoch: int = 0, augment: bool = True) -> np.ndarray:
        """The item's image(s), ``(count, 3, height, width)`` uint8: one per ECG of the pair (two for
        a comparison question), from ``item["image"]`` if it has one, else drawn from ``item["ecg"]``."""
        if item.get("image") is not None:
            return np.stack([self.resized(np.asarray(item["image"]))])
        if self.fs is None:
            raise ValueError("ECGPrintout needs the signals' sampling rate (fs) to draw them")
        ecg = np.asarray(item["ecg"], dtype=np.float32)
        signals = ecg if ecg.ndim == 3 else ecg[None]
        images = []
        for i, signal in enumerate(signals):
            image = render_ecg(signal * self.mv_per_unit, self.fs, dpi=self.dpi)
            if augment and self.augment is not None:  # distorted and resized in one resample
                seed = augment_seed(f"{item['key']}#{i}", epoch, self.seed)
                image = self.augment(image, seed, self.size)
            images.append(self.resized(image))
        return np.stack(images)

    def resized(self, image: np.ndarray) -> np.ndarray:
        """An RGB ``(height, width, 3)`` image as ``(3, *size)`` uint8 (:func:`resize_printout`)."""
        if self.size is not None:
            image = resize_printout(image, self.size)
        return np.ascontiguousarray(image.transpose(2, 0, 1))

    def blank(self) -> np.ndarray:
        """A blank page at the model's size, ``(3, height, width)`` of white: the no-signal image."""
        height, width = self.size or tuple(round(v * self.dpi / 25.4) for v in paper_size_mm()[::-1])
        return np.full((3, height, width), 255, dtype=np.uint8)


#: Grids of other carts and printers: (minor, major) colours as 0-1 RGB; ``None`` leaves paper.
GRID_STYLES: tuple[tuple[tuple[float, float, float] | None, tuple[float, float, float] | None], ...] = (
    ((0.85, 0.85, 0.85), (0.62, 0.62, 0.62)),  # grey
    ((0.82, 0.88, 1.0), (0.55, 0.66, 0.95)),  # blue
    ((0.82, 0.95, 0.82), (0.55, 0.80, 0.55)),  # green
    (None, (0.95, 0.70, 0.70)),  # major lines only
    (None, None),  # plain paper
)


def regrid(image: np.ndarray, style: tuple, strength: float = 1.0) -> np.ndarray:
    """A printout of :func:`render_ecg` with its grid in ``style``'s colours, blended towards the paper
    by ``1 - strength``; paper and ink untouched.

    A printout's paper, grid and ink differ in their green value (255, 204, 140, 0), so it is
    recoloured through one 256-entry palette indexed by green, every other value mapped to its grey
    (the anti-aliased edges of the lead labels lose the old grid's tint): one lookup per pixel.
    """
    palette = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    for drawn, wanted in zip((GRID_MINOR, GRID_MAJOR), style, strict=True):
        target = np.array([255.0] * 3 if wanted is None else [255 * v for v in wanted])
        palette[round(255 * drawn[1])] = np.rint(255 - strength * (255 - target)).astype(np.uint8)
    return palette[image[..., 1]]


def augment_seed(key: str, epoch: int, seed: int = 0) -> int:
    """The augmentation seed of one QA pair in one epoch: a new distortion every epoch, the same one
    for the same (key, epoch, seed) in any worker or resumed run."""
    return zlib.crc32(f"{seed}|{epoch}|{key}".encode())


def _perspective_coefficients(source: np.ndarray, target: np.ndarray) -> tuple[float, ...]:
    """Pillow's 8 perspective coefficients mapping output points ``source`` to input points ``target``."""
    rows = []
    for (x, y), (u, v) in zip(source, target, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    solution = np.linalg.solve(np.array(rows), target.reshape(8))
    return tuple(float(c) for c in solution)
