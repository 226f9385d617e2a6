"""Bundles are untrusted input: loading one runs no code of its choosing, a changed or damaged file is
refused (one line naming it) before the LLM loads, and every recipe family exports and answers.

The table of tampered bundles in docs/sharing.md is this file's output: ``ECGLM_WRITE_DOCS=1 pytest
tests/test_bundle_safety.py -k table`` writes it; the test fails when the docs and the behaviour differ.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ecglm.bundle import CONFIG_FILE, WEIGHTS_FILE, BundleError, file_digests
from ecglm.commands import main
from ecglm.data.synthetic import SyntheticHeartQA
from ecglm.model import ECGLM
from ecglm.testing import TINY_ENCODER
from ecglm.testing.tiny import saved_causal_lm, saved_vision_model, tokenizer_dir
from ecglm_testing import REPO

QUESTION = "What is the heart rate category of this ECG?"
PRINTOUT = {"dpi": 40, "mv_per_unit": 0.3}


def _recipe(root: Path, shards: Path, model: dict, image: dict | None) -> Path:
    data = {"data_dir": str(shards), "batch_size": 2, "eval_batch_size": 2}
    if image is not None:
        data["image"] = image  # as recipes/image-quickstart.yaml gives it: no class_path
    config = {
        "seed_everything": 0,
        "model": {**model, "learning_rate": 0.01, "val_generation_samples": 0},
        "data": {"class_path": "ecglm.data.datamodule.ECGQADataModule", "init_args": data},
        "trainer": {
            "max_steps": 1,
            "accelerator": "cpu",
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "logger": False,
            "default_root_dir": str(root / "run"),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(root / "ckpt"), "save_last": True},
                }
            ],
        },
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    SyntheticHeartQA(num_train=4, num_val=2, num_test=2).build(out)
    return out


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> str:
    return str(saved_causal_lm(tmp_path_factory.mktemp("llm") / "llm", tokenizer_dir()))


def _export(root: Path, recipe: Path) -> Path:
    assert main(["fit", "--config", str(recipe)]) == 0
    bundle = root / "bundle"
    assert main(["export", "--config", str(recipe), "--ckpt_path", "last", "--out", str(bundle)]) == 0
    return bundle


@pytest.fixture(scope="module")
def signal_bundle(tmp_path_factory, shards, llm) -> Path:
    root = tmp_path_factory.mktemp("signal")
    model = {
        "encoder": {"class_path": "wav2vec2", "init_args": TINY_ENCODER},
        "connector": {"class_path": "mlp", "init_args": {"num_tokens": 2}},
        "backbone": {"class_path": "hf", "init_args": {"model": llm}},
    }
    return _export(root, _recipe(root, shards, model, None))


def _family(tmp_path_factory, shards, llm, family: str) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp(family)
    if family == "image-encoder":
        model = {
            "encoder": {
                "class_path": "image-cnn",
                "init_args": {"image_size": [64, 128], "channels": [8, 16]},
            },
            "connector": {"class_path": "mlp", "init_args": {"num_tokens": 2}},
            "backbone": {"class_path": "hf", "init_args": {"model": llm}},
            "policy": {"class_path": "projection-only", "init_args": {"train_encoder": True}},
        }
        image, base = PRINTOUT, llm
    else:
        base = str(saved_vision_model(root / "vlm", "gemma3"))
        model = {
            "encoder": None,
            "connector": None,
            "backbone": {"class_path": "hf-vision-language", "init_args": {"model": base}},
            "policy": {"class_path": "lora", "init_args": {"r": 2, "target_modules": "all-linear"}},
        }
        image = PRINTOUT
    return _export(root, _recipe(root, shards, model, image)), base


def _ask(bundle: Path, base: str, *source: str) -> subprocess.CompletedProcess:
    """``ecglm ask`` in a fresh process, the base model (a local folder) given by the user."""
    args = [sys.executable, "-m", "ecglm", "ask", "--model", str(bundle), "--question", QUESTION]
    args += ["--override", f"backbone.model={base}", "--max_new_tokens", "3", *source]
    return subprocess.run(args, capture_output=True, text=True, timeout=110)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["signal", "image-encoder", "vision-language"])
def test_every_recipe_family_exports_and_answers_a_record_and_a_picture(
    family, tmp_path_factory, shards, llm, ptb_record, tmp_path, request
):
    if family == "signal":
        bundle, base = request.getfixturevalue("signal_bundle"), llm
    else:
        bundle, base = _family(tmp_path_factory, shards, llm, family)
    config = yaml.safe_load((bundle / CONFIG_FILE).read_text())
    if family != "signal":  # how ECGs are drawn for the model, a registered component
        assert config["image"]["class_path"] == "ecglm.render.ECGPrintout"
        assert config["image"]["init_args"]["dpi"] == PRINTOUT["dpi"]
    record = _ask(bundle, base, "--record", str(ptb_record))
    assert record.returncode == 0, record.stderr
    assert f"{ptb_record} [window 0] {QUESTION}\n  -> " in record.stdout
    picture = tmp_path / "ecg.png"
    assert main(["render", "--record", str(ptb_record), "--out", str(picture), "--dpi", "40"]) == 0
    answered = _ask(bundle, base, "--image", str(picture))
    if family == "signal":
        assert answered.returncode == 2
        assert answered.stderr.strip().splitlines() == [
            f"ecglm ask: {bundle} reads ECG signals, not pictures: give it a record (--record FILE)"
        ]
    else:
        assert answered.returncode == 0, answered.stderr
        assert f"{picture} {QUESTION}\n  -> " in answered.stdout


# --- a bundle runs no code ------------------------------------------------------------------------


class _Touch:
    """A pickle that creates a file when loaded (what a malicious checkpoint does)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _tampered(bundle: Path, tmp_path: Path, edit) -> Path:
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    config = yaml.safe_load((copy / CONFIG_FILE).read_text())
    edit(config, copy)
    (copy / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


@pytest.fixture
def no_llm(monkeypatch):
    """Fails the test if an LLM starts loading: every refusal must come before that. (The signature is
    kept, as the command's parser reads it.)"""
    import functools

    from ecglm.backbones import HFBackbone

    @functools.wraps(HFBackbone.__init__)
    def loaded(*args, **kwargs):
        raise AssertionError("an LLM was loaded before the error was found")

    monkeypatch.setattr(HFBackbone, "__init__", loaded)


ATTACKS = {
    "Popen as the encoder": lambda config, copy, marker: config["components"].__setitem__(
        "encoder", {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}
    ),
    "a pickle the bundle trusts": lambda config, copy, marker: (
        (copy / "evil.pt").write_bytes(pickle.dumps(_Touch(marker))),
        config["components"]["encoder"]["init_args"].update(checkpoint="evil.pt", trust_pickle=True),
        config.__setitem__("files", file_digests(copy)),
    ),
    "remote code for the LLM": lambda config, copy, marker: config["components"]["backbone"][
        "init_args"
    ].update(trust_remote_code=True),
    "os.system as the prompt style": lambda config, copy, marker: config.__setitem__(
        "prompt", {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}
    ),
    "a file outside the bundle": lambda config, copy, marker: config["components"]["backbone"][
        "init_args"
    ].update(model="/etc"),
}
REFUSALS = {
    "Popen as the encoder": r"encoder\.class_path: 'subprocess\.Popen' is not a registered ecglm\.encoders",
    "a pickle the bundle trusts": r"encoder\.init_args\.(checkpoint|trust_pickle) = .* is not honoured",
    "remote code for the LLM": r"backbone\.init_args\.trust_remote_code = True is not honoured from a "
    r"bundle: it runs code from the model's repository",
    "os.system as the prompt style": r"prompt\.class_path: 'os\.system' is not a registered ecglm\.prompts",
    "a file outside the bundle": r"backbone\.init_args\.model = '/etc' is not honoured from a bundle: it "
    r"names a file outside the bundle",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_bundle_that_would_run_code_is_refused_and_runs_none(attack, signal_bundle, tmp_path, no_llm):
    marker = tmp_path / "pwned"
    base = yaml.safe_load((signal_bundle / CONFIG_FILE).read_text())["components"]["backbone"]["init_args"]
    copy = _tampered(signal_bundle, tmp_path, lambda config, copy: ATTACKS[attack](config, copy, marker))
    # The base LLM is a local folder here, which the user gives (unless it is the attack).
    overrides = None if attack == "a file outside the bundle" else {"backbone": {"model": base["model"]}}
    with pytest.raises(BundleError, match=REFUSALS[attack]):
        ECGLM.from_pretrained(copy, overrides=overrides)
    assert not marker.exists()


def test_trusting_a_bundle_still_builds_only_components_of_the_right_kind(signal_bundle, tmp_path, no_llm):
    from ecglm.plugins import UnknownComponentError

    marker = tmp_path / "pwned"
    copy = _tampered(
        signal_bundle, tmp_path, lambda c, copy: ATTACKS["Popen as the encoder"](c, copy, marker)
    )
    with pytest.raises(UnknownComponentError, match=r"subprocess\.Popen is not a subclass of .*ECGEncoder"):
        ECGLM.from_pretrained(copy, trust_remote_code=True)
    assert not marker.exists()


# --- changed or damaged files ---------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _header_end(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _resign(copy: Path) -> None:
    config = yaml.safe_load((copy / CONFIG_FILE).read_text())
    (copy / CONFIG_FILE).write_text(yaml.safe_dump({**config, "files": file_digests(copy)}, sort_keys=False))


TAMPERING = {
    "one byte of a weight changed": lambda c: _flip(c / WEIGHTS_FILE, _header_end(c / WEIGHTS_FILE) + 3),
    "one byte of the safetensors header changed": lambda c: _flip(c / WEIGHTS_FILE, 12),
    "a pickle renamed model.safetensors": lambda c: (c / WEIGHTS_FILE).write_bytes(pickle.dumps({"w": 1})),
    "the model card edited": lambda c: (c / "README.md").write_text("# edited\n"),
    "a file added": lambda c: (c / "extra.pkl").write_bytes(b"\x80\x04N."),
    "the weights file deleted": lambda c: (c / WEIGHTS_FILE).unlink(),
    "damaged weights with their digests recorded anew": lambda c: (
        _flip(c / WEIGHTS_FILE, 12),
        _resign(c),
    ),
    "ecglm.yaml not YAML": lambda c: (c / CONFIG_FILE).write_text("components: [\n"),
}
#: What `ecglm ask` prints for each (paths and digests elided): the table in docs/sharing.md.
TAMPERING_SEEN = {
    "one byte of a weight changed": "BUNDLE/model.safetensors does not match ecglm.yaml: expected sha256 "
    "<sha256> (N bytes), found <sha256> (N bytes); the file was changed or damaged after export: ask "
    "the sender for it again",
    "one byte of the safetensors header changed": "BUNDLE/model.safetensors does not match ecglm.yaml: "
    "expected sha256 <sha256> (N bytes), found <sha256> (N bytes); the file was changed or damaged after "
    "export: ask the sender for it again",
    "a pickle renamed model.safetensors": "BUNDLE/model.safetensors does not match ecglm.yaml: expected "
    "sha256 <sha256> (N bytes), found <sha256> (N bytes); the file was changed or damaged after export: "
    "ask the sender for it again",
    "the model card edited": "BUNDLE/README.md does not match ecglm.yaml: expected sha256 <sha256> "
    "(N bytes), found <sha256> (N bytes); the file was changed or damaged after export: ask the sender "
    "for it again",
    "a file added": "BUNDLE/extra.pkl is not one of the files BUNDLE/ecglm.yaml lists: a file was added to "
    "the bundle (1 in all); remove it, or ask the sender for the bundle",
    "the weights file deleted": "BUNDLE/model.safetensors: listed in ecglm.yaml but missing; the bundle is "
    "incomplete",
    "damaged weights with their digests recorded anew": "BUNDLE/model.safetensors: not a readable "
    "safetensors file (Error while deserializing header: <reason>); the bundle is damaged",
    "ecglm.yaml not YAML": "BUNDLE/ecglm.yaml: not readable YAML (ParserError); the bundle is damaged",
}


def _seen(stderr: str, copy: Path) -> str:
    [line] = stderr.strip().splitlines()
    line = line.removeprefix("ecglm ask: ").replace(str(copy), "BUNDLE")
    line = re.sub(r"\b[0-9a-f]{64}\b", "<sha256>", line)
    line = re.sub(r"\(\d+ bytes\)", "(N bytes)", line)
    return re.sub(r"(deserializing header: )[^)]*", r"\1<reason>", line)


def test_tampered_bundles_are_refused_in_one_line_before_the_llm_loads_and_the_table_says_so(
    signal_bundle, llm, ptb_record, tmp_path, no_llm, capsys
):
    rows = []
    for change, tamper in TAMPERING.items():
        copy = Path(shutil.copytree(signal_bundle, tmp_path / re.sub(r"\W+", "-", change)))
        tamper(copy)
        args = ["ask", "--model", str(copy), "--record", str(ptb_record), "--question", QUESTION]
        args += ["--override", f"backbone.model={llm}"]
        assert main(args) == 2, change
        seen = _seen(capsys.readouterr().err, copy)
        assert seen == TAMPERING_SEEN[change], change
        rows.append(f"| {change} | `` {seen} `` |")
    table = "\n".join(["| What was changed | What `ecglm ask` says (exit status 2) |", "|---|---|", *rows])
    _check_docs(REPO / "docs" / "sharing.md", "tampered-bundles", table)


def _check_docs(path: Path, name: str, table: str) -> None:
    """The block between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path`` is ``table``;
    with ``ECGLM_WRITE_DOCS=1`` it is written."""
    text = path.read_text()
    start, end = f"<!-- {name}:start -->\n", f"\n<!-- {name}:end -->"
    assert start in text and end in text, f"{path} has no {name} block"
    head, rest = text.split(start)
    _, tail = rest.split(end)
    if os.environ.get("ECGLM_WRITE_DOCS") == "1":
        path.write_text(head + start + table + end + tail)
    else:
        assert rest.split(end)[0] == table, f"{path}: the {name} table differs; ECGLM_WRITE_DOCS=1 writes it"


def test_a_bundle_of_an_earlier_format_loads_with_a_warning_that_it_cannot_be_checked(
    signal_bundle, tmp_path
):
    from ecglm.bundle import check_bundle

    def earlier(config, copy):
        config.pop("files")
        config["format"] = 1

    copy = _tampered(signal_bundle, tmp_path, earlier)
    with pytest.warns(UserWarning, match="recorded no file digests: its files cannot be checked"):
        check_bundle(copy, overrides={"backbone": {"model": "x"}})
