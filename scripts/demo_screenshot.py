"""The README's screenshot of ``ecglm demo`` (docs/images/demo.png), reproduced.

Starts ``ecglm demo`` on 127.0.0.1 with a bundle (default: a tiny random one built here, whose
answers are noise: pass a trained bundle for real ones), uploads a record in Debian's headless
Chromium (``apt-get install chromium chromium-driver``) through Selenium, asks the preset question
and saves the page:

    python scripts/demo_screenshot.py --model quickstart-bundle --record ../shared/data/ptb-s0010/s0010_re.hea
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ECGLM_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a bundle (default: a tiny random one)")
    parser.add_argument("--override", action="append", default=[], help="PART.KEY=VALUE, as for ecglm demo")
    parser.add_argument("--record", default=str(SHARED / "ptb-s0010" / "s0010_re.hea"), help="a WFDB .hea")
    parser.add_argument(
        "--question",
        default="What is the heart rate category of this ECG: bradycardia, normal or tachycardia?",
    )
    parser.add_argument("--out", default=str(REPO / "docs" / "images" / "demo.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ecglm-demo-shot-") as scratch:
        model, overrides = args.model, list(args.override)
        if model is None:
            from ecglm.testing import saved_signal_bundle

            model, llm = saved_signal_bundle(Path(scratch) / "tiny")
            overrides.append(f"backbone.model={llm}")
        questions = Path(scratch) / "questions.txt"
        questions.write_text(args.question + "\n")
        port = _free_port()
        command = [sys.executable, "-m", "ecglm", "demo", "--model", model, "--port", str(port)]
        command += ["--questions", str(questions), "--max_new_tokens", "8"]
        command += [x for o in overrides for x in ("--override", o)]
        server = subprocess.Popen(command)
        try:
            url = _wait(f"http://127.0.0.1:{port}/", server)
            _shoot(url, Path(args.record), args.question, Path(args.out), args.width, args.height)
        finally:
            server.terminate()
            try:
                server.wait(120)  # Gradio closes its server; slow on a loaded machine
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    print(f"screenshot: {args.out}")
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, server: subprocess.Popen, seconds: float = 900) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("ecglm demo exited before its page was up")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return url
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"ecglm demo did not answer at {url} within {seconds:g} s")


def _shoot(url: str, record: Path, question: str, out: Path, width: int, height: int) -> None:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"  # Debian's; Selenium downloads nothing
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
    browser = webdriver.Chrome(service=service, options=options)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 300)
        upload = wait.until(
            ready.presence_of_element_located((By.CSS_SELECTOR, "#ecg-upload input[type=file]"))
        )
        files = sorted(
            p for p in record.parent.glob(record.stem + ".*") if p.suffix in (".hea", ".dat", ".xyz")
        )
        upload.send_keys("\n".join(str(p) for p in files))
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#printouts img")))
        browser.find_element(By.ID, "ask").click()
        wait.until(
            lambda d: any(
                question in r.get_attribute("textContent")
                for r in d.find_elements(By.CSS_SELECTOR, "#answers [role=row][data-index]")
            )
        )
        time.sleep(1)  # the gallery's image settles
        out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(out))
    finally:
        browser.quit()
    _shrink(out)


def _shrink(path: Path) -> None:
    """A palette PNG: a screenshot of a page is a few dozen colours, a third of the bytes."""
    from PIL import Image

    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=128).save(path, optimize=True)


if __name__ == "__main__":
    raise SystemExit(main())
