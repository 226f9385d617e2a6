"""Printouts per second (``ecglm.render.render_ecg``) on one core: what an image-ECG loader could feed.

Renders ``--n`` random 10 s 12-lead ECGs at 250 Hz at ``--dpi`` and prints the rate. Run:

    .venv/bin/python benchmarks/render.py [--n 200] [--dpi 100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ecglm.render import render_ecg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    signals = [rng.standard_normal((12, 2500)).cumsum(axis=1) * 0.02 for _ in range(args.n)]
    image = render_ecg(signals[0], 250, dpi=args.dpi)  # warm-up (font cache)
    start = time.perf_counter()
    for s in signals:
        render_ecg(s, 250, dpi=args.dpi)
    rate = args.n / (time.perf_counter() - start)
    size = f"{image.shape[1]} x {image.shape[0]} px at {args.dpi} dpi"
    print(f"{args.n} printouts of {size}: {rate:.1f}/s on one core")


if __name__ == "__main__":
    main()
