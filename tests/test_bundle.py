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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ecglm import ECGLM
from ecglm.bundle import ADAPTER_DIR, CONFIG_FILE, WEIGHTS_FILE, BundleError
from ecglm.cli import main, run_cli
from ecglm.data.datamodule import QACollator
from ecglm.data.synthetic import SyntheticHeartQA
from ecglm.resume import peek_checkpoint
from ecglm_testing import TINY, VOCAB

ENCODER = dict(conv_layers=[[16, 10, 5], [16, 5, 5]], embed_dim=32, num_layers=1, num_heads=2, ffn_dim=64)
ENCODER |= dict(dropout=0.0, conv_pos_kernel=4, conv_pos_groups=2)

LOAD_AND_ANSWER = """
import json, sys, torch
from ecglm import ECGLM
model = ECGLM.from_pretrained(sys.argv[1])
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
    torch.manual_seed(0)
    llm = root / "llm"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY, vocab_size=VOCAB)).save_pretrained(
        llm
    )
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(llm)
    shards = root / "shards"
    SyntheticHeartQA(num_train=8, num_val=2, num_test=2).build(shards)
    config = {
        "seed_everything": 0,
        "model": {
            "encoder": {"class_path": "wav2vec2", "init_args": ENCODER},
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
    prompt = cli.datamodule.formatter
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
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert fresh["lightning"] == []
    assert fresh["loss"] == pytest.approx(loss, abs=1e-5)
    assert fresh["answers"] == answers


def test_peft_alone_loads_the_adapters_on_the_same_base(trained):
    from peft import PeftModel

    model = ECGLM.from_pretrained(trained["bundle"])
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
    expected = "connector.mlp.0.weight" if change == "missing" else "connector.surplus"
    with pytest.raises(BundleError, match=rf"model.safetensors does not fit.*{expected}"):
        ECGLM.from_pretrained(copy)


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
