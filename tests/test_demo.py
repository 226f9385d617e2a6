"""``ecglm demo``: the page's logic (:class:`ecglm.serving.demo.DemoModel`) on the real PTB record
against :func:`ecglm.inference.answer` and ``ecglm render``, bad uploads refused naming the problem,
and the real page (``ecglm demo`` in a subprocess) driven by Debian's headless Chromium through
Selenium: upload the record, ask, read the answer off the page, save a screenshot."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio")

#: A loaded machine (other jobs on two cores) can take minutes to load a model and start a page.
pytestmark = pytest.mark.timeout(900)

QUESTION = "Is the rhythm regular or irregular?"
MAX_NEW_TOKENS = 6
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CELL = "[role=gridcell]"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[str, str]:
    from ecglm.testing import saved_signal_bundle

    return saved_signal_bundle(tmp_path_factory.mktemp("signal"))


@pytest.fixture(scope="module")
def demo_model(bundle):
    from ecglm.serving.demo import DemoModel
    from ecglm.serving.requests import Limits

    path, llm = bundle
    return DemoModel(
        path,
        overrides={"backbone": {"model": llm}},
        max_new_tokens=MAX_NEW_TOKENS,
        device="cpu",
        limits=Limits(3 * 1024 * 1024, 4, 3),
    )


@pytest.fixture(scope="module")
def ptb_files(ptb_record) -> list[Path]:
    return [ptb_record.with_suffix(s) for s in (".hea", ".dat", ".xyz")]


def _expected(model, recording, questions, window="first"):
    from ecglm.inference import answer
    from ecglm.model import Decoding

    return answer(
        model,
        recording.signal,
        recording.fs,
        recording.leads,
        list(questions),
        Decoding(MAX_NEW_TOKENS),
        window,
    )


def test_the_record_uploaded_as_its_files_or_zipped_is_read_as_ecglm_ask_reads_it(
    demo_model, ptb_files, ptb_record, tmp_path
):
    import zipfile

    from ecglm.records import read_recording

    expected = read_recording(ptb_record.with_suffix(".hea"))
    archive = tmp_path / "ptb.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for path in ptb_files:
            out.write(path, path.name)
    for upload in (ptb_files, [archive]):
        read = demo_model.read_files(upload)
        np.testing.assert_array_equal(read.signal, expected.signal)
        assert read.leads == expected.leads and read.fs == expected.fs == 1000.0


def test_answers_per_window_are_what_answer_gives_on_the_same_record(demo_model, ptb_files, ptb_record):
    from ecglm.records import read_recording

    recording = demo_model.read_files(ptb_files)
    questions = [QUESTION, "Which leads show ST elevation?"]
    answered = demo_model.ask(recording, questions, "all")
    reference = read_recording(ptb_record.with_suffix(".hea"))
    expected = _expected(demo_model.model, reference, questions, "all")
    windows = int(reference.seconds // 10)
    assert windows == 3  # 38.4 s
    assert [row[:3] for row in answered.rows] == [
        [w, f"{10 * w}-{10 * (w + 1)} s", q] for w in range(windows) for q in questions
    ]
    assert [row[3] for row in answered.rows] == expected
    assert len(answered.printouts) == windows


def test_the_printout_is_what_ecglm_render_draws(demo_model, ptb_files, ptb_record, tmp_path):
    from PIL import Image

    from ecglm.commands.render import render

    recording = demo_model.read_files(ptb_files)
    answered = demo_model.ask(recording, [QUESTION], "all")
    for window, (image, caption) in enumerate(answered.printouts):
        out = tmp_path / f"render{window}.png"
        render(str(ptb_record.with_suffix(".hea")), str(out), start=10.0 * window)
        np.testing.assert_array_equal(image, np.asarray(Image.open(out).convert("RGB")))
        assert caption.startswith(f"window {window}: {10 * window}-{10 * (window + 1)} s")


def test_bad_uploads_are_refused_naming_the_problem(demo_model, ptb_files, tmp_path):
    from ecglm.serving.requests import RequestError

    text = tmp_path / "notes.txt"
    text.write_text("not an ECG")
    csv = tmp_path / "ecg.csv"
    csv.write_text("I,II\n0.1,0.2\n")
    big = tmp_path / "big.npy"
    big.write_bytes(b"\0" * (3 * 1024 * 1024 + 1))
    cases = {
        "unsupported format .txt": [text],
        "a .csv file carries no sampling rate": [csv],
        "over the limit of": [big],
        "upload one record": [ptb_files[1], csv],
        "no file": [],
    }
    for message, files in cases.items():
        with pytest.raises(RequestError, match=message):
            demo_model.read_files(files)
    recording = demo_model.read_files(ptb_files)
    with pytest.raises(RequestError, match="no question"):
        demo_model.ask(recording, ["  "])
    with pytest.raises(RequestError, match="at most 3"):
        demo_model.ask(recording, ["a", "b", "c", "d"])
    with pytest.raises(RequestError, match="no example"):
        demo_model.example_recording()


def test_the_card_shows_the_bundle_card_and_not_a_medical_device(demo_model):
    text = demo_model.card_markdown()
    assert "Not a medical device" in text
    assert "library_name" not in text  # the front matter is not shown
    assert "records no evaluation" in text
    assert "base LLM" in text


def test_an_image_model_answers_a_photo_of_a_printout_as_answer_image_does(tmp_path, ptb_record):
    from PIL import Image

    from ecglm.inference import answer_image
    from ecglm.model import Decoding
    from ecglm.render import render_ecg
    from ecglm.serving.demo import DemoModel
    from ecglm.testing import saved_image_bundle

    path, llm = saved_image_bundle(tmp_path / "image")
    model = DemoModel(
        path, overrides={"backbone": {"model": llm}}, max_new_tokens=MAX_NEW_TOKENS, device="cpu"
    )
    assert ".png" in model.upload_formats()
    rng = np.random.default_rng(0)
    picture = render_ecg(rng.normal(0, 0.3, (12, 2500)), 250.0, dpi=40)
    png = tmp_path / "photo.png"
    Image.fromarray(picture).save(png)
    answered = model.ask(model.read_files([png]), [QUESTION])
    assert [row[3] for row in answered.rows] == [
        answer_image(model.model, str(png), QUESTION, Decoding(MAX_NEW_TOKENS))
    ]
    np.testing.assert_array_equal(answered.printouts[0][0], picture)


# --- the page in a real browser ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    """Debian's headless Chromium through its own chromedriver (Selenium never downloads one)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = (
            "Chromium not installed: apt-get install chromium chromium-driver (the Makefile does, as root)"
        )
        if os.environ.get("ECGLM_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail(f"{reason}; ECGLM_REQUIRE_BROWSER is set, so this test may not skip")
        pytest.skip(reason)
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    return webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options
    )


@pytest.fixture
def page(bundle, tmp_path):
    """``ecglm demo`` of the tiny bundle on a free port, once it answers: ``(url, process, log)``."""
    path, llm = bundle
    port = _free_port()
    questions = tmp_path / "questions.txt"
    questions.write_text(QUESTION + "\n")
    log = tmp_path / "demo.log"
    scratch = tmp_path / "tmp"  # the demo's temporary folders (its uploads) go here, and must go
    scratch.mkdir()
    args = [sys.executable, "-m", "ecglm", "demo", "--model", path, "--override", f"backbone.model={llm}"]
    args += ["--port", str(port), "--max_new_tokens", str(MAX_NEW_TOKENS), "--questions", str(questions)]
    with log.open("w") as out:
        env = {**os.environ, "TMPDIR": str(scratch)}
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 600  # minutes on a loaded machine
        while True:
            if process.poll() is not None:
                pytest.fail(f"ecglm demo exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ecglm demo did not start: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, process, log
    finally:
        process.terminate()
        try:
            process.wait(120)  # Gradio closes its server; slow on a loaded machine
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()[-3000:]
    assert list(scratch.iterdir()) == []  # the uploads' folder went with the page


def test_the_page_in_a_browser_answers_the_uploaded_ptb_record_as_answer_does(
    page, demo_model, ptb_files, ptb_record, tmp_path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    from ecglm.records import read_recording

    url, _, log = page
    expected = _expected(demo_model.model, read_recording(ptb_record.with_suffix(".hea")), [QUESTION])[0]
    browser = _browser()
    shot = tmp_path / "demo-page.png"
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 300)
        upload = wait.until(
            ready.presence_of_element_located((By.CSS_SELECTOR, "#ecg-upload input[type=file]"))
        )
        upload.send_keys("\n".join(str(p) for p in ptb_files))
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#printouts img")))
        assert "Not a medical device" in browser.find_element(By.TAG_NAME, "body").text
        browser.find_element(By.ID, "ask").click()

        def answer_row(driver):  # Gradio's table: rows of grid cells (a hidden copy sizes the columns)
            rows = [
                [
                    cell.get_attribute("textContent").strip()
                    for cell in row.find_elements(By.CSS_SELECTOR, CELL)
                ]
                for row in driver.find_elements(By.CSS_SELECTOR, "#answers [role=row][data-index]")
            ]
            rows = [r for r in rows if len(r) == 4 and r[2] == QUESTION]
            return rows[0] if rows else False

        row = wait.until(answer_row)
        browser.save_screenshot(str(shot))
    except Exception:
        browser.save_screenshot(str(shot))
        print(f"ecglm demo's log: {log.read_text()[-3000:]}")
        raise
    finally:
        print(f"screenshot of the page: {shot}")
        browser.quit()
    assert row[0] == "0" and row[3] == expected.strip()
    assert shot.stat().st_size > 10_000
