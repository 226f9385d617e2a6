"""Bundles: an exported run loads without Lightning, same loss and answers; PEFT reads its adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ecglm import ECGLM
from ecglm.bundle import ADAPTER_DIR, CONFIG_FILE, WEIGHTS_FILE, BundleError
from ecglm.commands import main
from ecglm.commands.lightning import run_cli
from ecglm.data.datamodule import QACollator
from ecglm.data.synthetic import SyntheticHeartQA
from ecglm.resume import peek_checkpoint
from ecglm.testing import TINY_ENCODER, saved_causal_lm

LOAD_AND_ANSWER = """
import json, sys, torch
from ecglm import ECGLM
# The base LLM is a local folder, which a bundle cannot name for its user: the user gives it.
model = ECGLM.from_pretrained(sys.argv[1], overrides={"backbone": {"model": sys.argv[4]}})
train, generation = (torch.load(p, weights_only=False) for p in sys.argv[2:4])  # batches this test wrote
with torch.no_grad():
    loss = model(train).loss.item()
answers = model.generate(generation, max_new_tokens=4)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))
print(json.dumps({"loss": loss, "answers": answers, "lightning": heavy}))
"""


@pytest.fixture(scope="module")
def trained(tokenizer_dir, tmp_path_factory) -> dict:
    """Three steps of connector + LoRA training on a tiny pretrained Llama, then ``ecglm export``."""
    root = tmp_path_factory.mktemp("bundle")
    llm = Path(saved_causal_lm(root / "llm", tokenizer_dir))
    shards = root / "shards"
    SyntheticHeartQA(num_train=8, num_val=2, num_test=2).build(shards)
    config = {
        "seed_everything": 0,
        "model": {
            "encoder": {"class_path": "wav2vec2", "init_args": TINY_ENCODER},
            "connector": {"class_path": "mlp", "init_args": {"num_tokens": 2}},
            "backbone": {"class_path": "hf", "init_args": {"model": str(llm), "dtype": "float32"}},
            "policy": {"class_path": "lora", "init_args": {"r": 4, "alpha": 8, "dropout": 0.0}},
            "learning_rate": 0.01,
            "evaluation": {"metrics": ["acc"]},
        },
        "data": {
            "class_path": "ecglm.data.datamodule.ECGQADataModule",
            "init_args": {
                "data_dir": str(shards),
                "batch_size": 4,
                "eval_batch_size": 4,
                "prompt": {"class_path": "chat", "init_args": {"system_prompt": "Answer in one word."}},
            },
        },
        "trainer": {
            "max_steps": 3,
            "accelerator": "cpu",
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "default_root_dir": str(root / "run"),
            "logger": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(root / "ckpt"), "save_last": True},
                }
            ],
        },
    }
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config))
    run_cli(["fit", "--config", str(recipe)])
    out = root / "bundle"
    assert main(["export", "--config", str(recipe), "--ckpt_path", "last", "--out", str(out)]) == 0
    return {"recipe": recipe, "bundle": out, "llm": str(llm), "root": root}


def load(trained: dict, bundle: Path | None = None) -> ECGLM:
    """The bundle, its base LLM (a local folder, which only the user may name) given at load time."""
    return ECGLM.from_pretrained(
        bundle or trained["bundle"], overrides={"backbone": {"model": trained["llm"]}}
    )


def llm_flag(trained: dict) -> list[str]:
    return ["--override", f"backbone.model={trained['llm']}"]


def _items(n: int = 3) -> list[dict]:
    rng = np.random.default_rng(1)
    answers = ["tachycardia", "regular", "normal"]
    return [
        {
            "key": f"r{i}_qa0",
            "ecg": rng.standard_normal((12, 2500)).astype(np.float16),
            "question": "What is the heart rate category of this ECG?",
            "answer": answers[i % 3],
            "question_type": "heart-rate",
        }
        for i in range(n)
    ]


def test_an_exported_bundle_answers_as_the_checkpoint_does_without_lightning(trained, tmp_path):
    bundle = trained["bundle"]
    assert {p.name for p in bundle.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, ADAPTER_DIR, "README.md"}
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < 5 * 2**20  # no base LLM weights in it
    config = yaml.safe_load((bundle / CONFIG_FILE).read_text())
    assert config["components"]["backbone"]["init_args"]["model"] == trained["llm"]
    assert config["prompt"]["init_args"]["system_prompt"] == "Answer in one word."
    assert config["preprocessing"]["num_samples"] == 2500
    assert not any(k.startswith("backbone.") for k in config["weights"])  # pretrained: not copied
    assert config["adapters"] and all(".lora_" in k for k in config["adapters"])
    card = (bundle / "README.md").read_text()
    assert "Not a medical device" in card and trained["llm"] in card

    # The checkpoint, loaded as evaluation loads it, in this process.
    cli = run_cli(["--config", str(trained["recipe"])], run=False)
    task = cli.model
    checkpoint = peek_checkpoint(trained["root"] / "ckpt" / "last.ckpt")
    task.load_state_dict(checkpoint["state_dict"], strict=False)
    task.eval()
    prompt = cli.datamodule.prompt
    train = QACollator(prompt, task.num_ecg_tokens)(_items())
    generation = QACollator(prompt, task.num_ecg_tokens, for_generation=True)(_items())
    with torch.no_grad():
        loss = task.model(train).loss.item()
    answers = task.model.generate(generation, max_new_tokens=4)
    torch.save(train, tmp_path / "train.pt")
    torch.save(generation, tmp_path / "generation.pt")
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(LOAD_AND_ANSWER))
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            str(bundle),
            str(tmp_path / "train.pt"),
            str(tmp_path / "generation.pt"),
            trained["llm"],
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=100,  # under the per-test timeout (120 s), so this one names the command
    )
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert fresh["lightning"] == []
    assert fresh["loss"] == pytest.approx(loss, abs=1e-5)
    assert fresh["answers"] == answers


def test_peft_alone_loads_the_adapters_on_the_same_base(trained):
    from peft import PeftModel

    model = load(trained)
    base = AutoModelForCausalLM.from_pretrained(trained["llm"])
    peft_model = PeftModel.from_pretrained(base, str(trained["bundle"] / ADAPTER_DIR)).eval()
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    with torch.no_grad():
        ours = model.backbone.transformers_model(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    adapter_config = json.loads((trained["bundle"] / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == trained["llm"] and adapter_config["r"] == 4


def _copy(bundle: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def test_a_bundle_from_a_newer_ecglm_is_refused(trained, tmp_path):
    copy = _copy(trained["bundle"], tmp_path)
    config = yaml.safe_load((copy / CONFIG_FILE).read_text())
    (copy / CONFIG_FILE).write_text(yaml.safe_dump({**config, "ecglm_version": "99.0"}))
    with pytest.raises(BundleError, match=r"written by ecglm 99\.0.*upgrade ecglm"):
        ECGLM.from_pretrained(copy)


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_a_bundle_whose_tensors_differ_is_refused_naming_them(trained, tmp_path, change):
    copy = _copy(trained["bundle"], tmp_path)
    weights = load_file(str(copy / WEIGHTS_FILE))
    if change == "missing":
        del weights["connector.mlp.0.weight"]
    else:
        weights["connector.surplus"] = torch.zeros(1)
    save_file(weights, str(copy / WEIGHTS_FILE))
    with pytest.raises(BundleError, match=r"model\.safetensors does not match ecglm\.yaml: expected sha256"):
        load(trained, copy)
    # Re-signed (digests recorded anew, as a bundle written for other components would be).
    from ecglm.bundle import file_digests

    config = yaml.safe_load((copy / CONFIG_FILE).read_text())
    (copy / CONFIG_FILE).write_text(yaml.safe_dump({**config, "files": file_digests(copy)}))
    expected = "connector.mlp.0.weight" if change == "missing" else "connector.surplus"
    with pytest.raises(BundleError, match=rf"model.safetensors does not fit.*{expected}"):
        load(trained, copy)


def test_export_refuses_an_existing_folder_and_missing_flags(trained, capsys):
    args = ["export", "--config", str(trained["recipe"]), "--ckpt_path", "last"]
    assert main([*args, "--out", str(trained["bundle"])]) == 2
    assert "exists: give a new folder" in capsys.readouterr().err
    assert main(args) == 2
    assert "--out NEW_DIR" in capsys.readouterr().err
    with pytest.raises(BundleError, match="not an ecglm bundle"):
        ECGLM.from_pretrained(trained["root"])


def test_the_card_carries_the_headline_evaluation_with_its_controls(trained):
    from ecglm.bundle import default_card

    config = yaml.safe_load((trained["bundle"] / CONFIG_FILE).read_text())
    acc = {"datasets": {"d": {"acc": {"mean": 0.671, "std": 0.036}}}}
    gap = {"d": {"acc": {"mean": 0.373, "std": 0.05}}}
    report = {
        "summary": {"conditions": {"ecg": acc, "shuffled_ecg": acc}, "gaps": {"ecg_minus_shuffled_ecg": gap}}
    }
    card = default_card(config, report)
    assert "## Evaluation" in card and "gap `ecg - shuffled_ecg`" in card
    assert "| d | 67.1 ± 3.6 | 67.1 ± 3.6 | 37.3 ± 5.0 |" in card
    # The folder and its files get the user's umask, not mkdtemp's owner-only mode.
    umask = os.umask(0)
    os.umask(umask)
    assert trained["bundle"].stat().st_mode & 0o777 == 0o777 & ~umask
    assert (trained["bundle"] / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o666 & ~umask


# --- answers on ECG files: ECGLM.answer and ecglm ask ------------------------------------------------


def test_ecglm_ask_answers_the_real_ptb_record_from_its_12_standard_leads(trained, ptb_record, tmp_path):
    """15 leads at 1000 Hz in (12 standard + 3 Frank), the 12 standard leads at 250 Hz used."""
    from scipy import signal as scipy_signal

    from ecglm.records import prepare, read_recording

    model = load(trained)
    recording = read_recording(ptb_record.with_suffix(".hea"))
    assert (recording.fs, len(recording.leads), recording.signal.shape[0]) == (1000.0, 15, 38400)
    first = prepare(recording, model.encoder.preprocessing)
    every = prepare(recording, model.encoder.preprocessing, window="all")
    assert first.shape == (1, 12, 2500) and every.shape == (3, 12, 2500)  # 38.4 s: three 10 s windows
    # Row k is lead LEADS[k] picked by name, resampled 1000 -> 250 Hz (polyphase) and z-scored.
    lead_v6 = recording.signal[:, recording.leads.index("v6")]
    expected = scipy_signal.resample_poly(lead_v6, 1, 4)[:2500]
    expected = (expected - expected.mean()) / expected.std()
    np.testing.assert_allclose(first[0, 11].astype(np.float64), expected, atol=2e-2)

    out = tmp_path / "answers.jsonl"
    question = "What is the heart rate category of this ECG?"
    args = ["ask", "--model", str(trained["bundle"]), "--record", str(ptb_record), "--question", question]
    args += llm_flag(trained)
    plots = tmp_path / "plots"
    assert (
        main([*args, "--out", str(out), "--window", "all", "--max_new_tokens", "4", "--plot", str(plots)])
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # What the model saw, drawn: one PNG per answer, named in its row.
    assert [Path(r["plot"]).name for r in rows] == [f"s0010_re_w{i}_q0.png" for i in range(3)]
    assert all(Path(r["plot"]).stat().st_size > 20_000 for r in rows)
    assert [r["window"] for r in rows] == [0, 1, 2] and all(r["record"] == str(ptb_record) for r in rows)
    assert rows[0]["decoding"]["max_new_tokens"] == 4 and rows[0]["model"] == str(trained["bundle"])
    # The Python API gives the same answer from the same signal.
    from ecglm.inference import answer
    from ecglm.model import Decoding

    direct = answer(model, recording.signal, 1000, recording.leads, question, Decoding(max_new_tokens=4))
    assert direct == rows[0]["answer"]


def test_a_folder_run_skips_bad_files_reports_them_and_resumes(trained, tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "records"
    folder.mkdir()
    leads = "I,II,III,aVR,aVL,aVF,V1,V2,V3,V4,V5,V6"
    np.save(folder / "a.npy", rng.standard_normal((12, 2600)))
    np.save(folder / "b.npy", rng.standard_normal((2600, 12)))  # samples by leads works too
    np.save(folder / "short.npy", rng.standard_normal((12, 1000)))  # 4 s: shorter than the window
    gap = rng.standard_normal((12, 2600))
    gap[3, 100:400] = np.nan  # 300 samples of NaN: more than max_gap
    np.save(folder / "gap.npy", gap)
    (folder / "notes.txt").write_text("not an ECG")  # not picked up at all
    questions = tmp_path / "questions.txt"
    questions.write_text("Is the rhythm regular?\nWhat is the heart rate category of this ECG?\n")
    out = tmp_path / "answers.jsonl"
    args = ["ask", "--model", str(trained["bundle"]), "--records", str(folder), "--questions", str(questions)]
    args += ["--fs", "250", "--leads", leads, "--out", str(out), "--batch_size", "3", "--max_new_tokens", "3"]
    args += llm_flag(trained)
    assert main(args) == 1  # some files skipped
    err = capsys.readouterr().err
    assert "short.npy: 10.40 s long" not in err and "short.npy: 4.00 s long, shorter than" in err
    assert "gap.npy: nan gap (lead aVR has a NaN/Inf run of 300 samples" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((Path(r["record"]).name, r["question"][:2]) for r in rows) == [
        ("a.npy", "Is"),
        ("a.npy", "Wh"),
        ("b.npy", "Is"),
        ("b.npy", "Wh"),
    ]
    # A rerun answers only what is missing: nothing here.
    assert main(args) == 1
    assert len(out.read_text().splitlines()) == 4
    # An interrupted file (its last line cut): the cut line is dropped and its pair answered again, so
    # the file stays valid JSON lines (pandas reads it).
    import pandas as pd

    out.write_text("".join(line + "\n" for line in out.read_text().splitlines()[:3]) + '{"record": "x')
    assert main(args) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and len(pd.read_json(out, lines=True)) == 4


def test_ecglm_ask_answers_a_folder_mixing_every_format_a_reader_claims(trained, ptb_record, tmp_path):
    """WFDB, EDF, .npy, CSV, DICOM (with and without a suffix), HL7 aECG, two HDF5 exams and the example
    plugin's JSON in one folder: every record answered, nothing else picked up."""
    for module in ("pydicom", "h5py", "defusedxml"):
        pytest.importorskip(module)
    from ecg_exports import LEADS, mixed_folder

    expected = mixed_folder(tmp_path / "mixed", ptb_record)
    out = tmp_path / "answers.jsonl"
    args = ["ask", "--model", str(trained["bundle"]), "--records", str(tmp_path / "mixed")]
    args += ["--question", "Is the rhythm regular?", "--fs", "500", "--leads", ",".join(LEADS)]
    args += ["--out", str(out), "--max_new_tokens", "2", *llm_flag(trained)]
    assert main(args) == 0  # none skipped
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["record"]).name for r in rows) == sorted(expected)


def test_bad_ecg_files_are_refused_naming_the_file(tmp_path):
    from ecglm.encoders import Preprocessing
    from ecglm.records import RecordError, prepare, read_recording

    pre = Preprocessing()
    with pytest.raises(RecordError, match=r"notes\.txt: unknown ECG format"):
        read_recording(tmp_path / "notes.txt")
    np.save(tmp_path / "x.npy", np.zeros((12, 3000)))
    with pytest.raises(RecordError, match=r"x\.npy: a numpy file does not state its sampling rate"):
        read_recording(tmp_path / "x.npy")
    with pytest.raises(RecordError, match=r"x\.npy: a \.npy file does not name its leads"):
        read_recording(tmp_path / "x.npy", fs=250)
    (tmp_path / "three.csv").write_text("I,II,III\n" + "0.1,0.2,0.3\n" * 3000)
    with pytest.raises(
        RecordError, match=r"lacks lead\(s\) \['aVR'.*the encoder reads the 12 standard leads"
    ):
        prepare(read_recording(tmp_path / "three.csv", fs=250), pre)
    with pytest.raises(RecordError, match="no such file"):
        read_recording(tmp_path / "absent.npy", fs=250, leads=["I"])


def test_a_wfdb_header_without_its_data_file_is_named(ptb_record, tmp_path):
    import shutil

    from ecglm.records import RecordError, read_recording

    shutil.copy(ptb_record.with_suffix(".hea"), tmp_path / "s0010_re.hea")
    with pytest.raises(RecordError, match=r"s0010_re\.dat.*needs its \.hea and the data files it names"):
        read_recording(tmp_path / "s0010_re")


def test_edf_and_csv_records_read_as_the_wfdb_original(ptb_record, tmp_path):
    from wfdb.io.convert.edf import wfdb_to_edf

    from ecglm.encoders import Preprocessing
    from ecglm.records import prepare, read_recording

    edf = tmp_path / "ptb.edf"
    wfdb_to_edf(str(ptb_record), output_filename=str(edf))
    original = read_recording(ptb_record)
    converted = read_recording(edf)
    assert converted.fs == original.fs and [n.lower() for n in converted.leads] == original.leads
    pre = Preprocessing()
    np.testing.assert_allclose(
        prepare(converted, pre).astype(np.float32), prepare(original, pre).astype(np.float32), atol=2e-2
    )
    csv_path = tmp_path / "ptb.csv"
    header = ",".join(original.leads)
    np.savetxt(csv_path, original.signal[:3000], delimiter=",", header=header, comments="")
    from_csv = read_recording(csv_path, fs=1000)
    assert from_csv.leads == original.leads
    np.testing.assert_allclose(from_csv.signal, original.signal[:3000], rtol=1e-6, atol=1e-9)


def test_ecglm_predict_answers_the_test_split_into_the_run(trained):
    """``ecglm predict --config --ckpt_path``: a predict_step over the DataModule's test split."""
    recipe, run = str(trained["recipe"]), trained["root"] / "run"
    with pytest.raises(RuntimeError, match="refusing to answer with untrained weights"):
        run_cli(["predict", "--config", recipe])
    run_cli(["predict", "--config", recipe, "--ckpt_path", "last"])
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # 2 test ECGs x 2 questions
    assert {r["dataset"] for r in rows} == {"synthetic-heart-qa"} and all(
        isinstance(r["answer"], str) for r in rows
    )
    assert all(r["question"] and r["reference"] for r in rows) and rows[0]["decoding"]["num_beams"] == 1


def test_a_projection_only_bundle_over_pretrained_parts_is_the_connectors_size(
    trained, tiny_encoder_factory, tmp_path
):
    from ecglm.backbones import HFBackbone
    from ecglm.bundle import save_bundle
    from ecglm.connectors import MLPConnector

    encoder = tiny_encoder_factory()
    encoder.pretrained = True  # as an encoder loaded from a CMSC / ECG-FM file is
    model = ECGLM(encoder, MLPConnector(num_tokens=1), HFBackbone(trained["llm"], dtype="float32"))
    spec = {"class_path": "x.Y", "init_args": {}}
    out = save_bundle(model, tmp_path / "b", {"encoder": spec, "connector": spec, "backbone": spec})
    weights = load_file(str(out / WEIGHTS_FILE))
    assert set(weights) == {f"connector.{k}" for k in model.connector.state_dict()}
    connector_bytes = sum(t.numel() * t.element_size() for t in model.connector.state_dict().values())
    assert connector_bytes <= (out / WEIGHTS_FILE).stat().st_size < connector_bytes + 4096  # + the header
