"""Every training recipe builds through the CLI with tiny stand-ins of its backbone's architecture class
(4-bit recipes load theirs in 4-bit), applies its policy, and takes a training step."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ecglm.callbacks import AtomicCheckpointIO
from ecglm.commands.lightning import run_cli
from ecglm.data.datamodule import QACollator
from ecglm.data.monitor import SkippedInputLogger
from ecglm_testing import FAMILIES, REPO, TINY, VOCAB

RECIPES = sorted(p for p in (REPO / "recipes").glob("*/*.yaml"))
#: Hub id prefix -> the tiny stand-in's model type (same architecture class as the real checkpoint's
#: text model; the multimodal Gemma 4 class is covered in test_backbones.py).
STAND_INS = {
    "google/gemma-4": "gemma4_text",
    "google/medgemma": "gemma3_text",
    "Qwen/Qwen3.": "qwen3_5_text",
    "meta-llama/": "llama",
}
EXTRA = {"gemma3_text": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16}}
#: A small encoder so each build takes a fraction of a second (the recipes use the CMSC size).
TINY_ENCODER = [
    "--model.encoder.init_args.conv_layers=[[16, 10, 5], [16, 5, 5]]",
    "--model.encoder.init_args.embed_dim=32",
    "--model.encoder.init_args.num_layers=2",
    "--model.encoder.init_args.num_heads=2",
    "--model.encoder.init_args.ffn_dim=64",
    "--model.encoder.init_args.conv_pos_kernel=4",
    "--model.encoder.init_args.conv_pos_groups=2",
]


#: Hub id prefix -> the tiny vision-language stand-in's family, and the image size it reads.
VISION_STAND_INS = {"meta-llama/Llama-3.2-11B-Vision": "mllama", "google/medgemma": "gemma3"}


def stand_in(hub_id: str) -> str:
    for prefix, model_type in STAND_INS.items():
        if hub_id.startswith(prefix):
            return model_type
    raise AssertionError(f"no tiny stand-in for {hub_id}: add its architecture to STAND_INS")


@pytest.fixture(scope="module")
def saved(tokenizer_dir, tmp_path_factory):
    """``model_type -> folder`` holding a tiny random model and SmolLM2's tokenizer."""
    cache: dict[str, str] = {}

    def get(model_type: str) -> str:
        if model_type not in cache:
            torch.manual_seed(0)
            overrides = {
                **TINY,
                "vocab_size": VOCAB,
                **FAMILIES.get(model_type, {}),
                **EXTRA.get(model_type, {}),
            }
            config = AutoConfig.for_model(model_type, **overrides)
            folder = tmp_path_factory.mktemp(model_type)
            AutoModelForCausalLM.from_config(config).save_pretrained(folder)
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
            cache[model_type] = str(folder)
        return cache[model_type]

    return get


def stand_in_args(config: dict, saved, tmp_path: Path) -> list[str]:
    """The flags that put the tiny stand-in of a recipe's backbone (and encoder) in its place."""
    from ecglm.testing.tiny import TINY_IMAGE_SIZE, saved_vision_model

    backbone = config["model"]["backbone"]
    hub_id = backbone["init_args"]["model"]
    if backbone["class_path"] != "hf-vision-language":
        return [f"--model.backbone.init_args.model={saved(stand_in(hub_id))}", *TINY_ENCODER]
    # The image path: a tiny model of the same vision-language class, read at its image size.
    family = next(f for prefix, f in VISION_STAND_INS.items() if hub_id.startswith(prefix))
    height, width = TINY_IMAGE_SIZE[family]
    return [
        f"--model.backbone.init_args.model={saved_vision_model(tmp_path / family, family)}",
        f"--model.backbone.init_args.image_size=[{height}, {width}]",
    ]


def placeholder_shards(tmp_path: Path) -> str:
    """The model side only: the shards a paper recipe names are not built here, so a placeholder
    folder stands in (the command checks that the data folder holds a manifest before anything loads)."""
    (tmp_path / "shards").mkdir(exist_ok=True)
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    return f"--data.init_args.data_dir={tmp_path / 'shards'}"


#: The backbone's weights in float32 (what the CPU runs); a 4-bit FSDP variant keeps its own dtype.
FLOAT32 = "--model.backbone.init_args.dtype=float32"


def cpu_args(configs: list[Path], config: dict, saved, tmp_path: Path) -> list[str]:
    """``configs`` merged in order, with the tiny stand-in of ``config``'s backbone, a placeholder data
    folder, and a float32 CPU run logging into ``tmp_path``."""
    return [
        *(arg for path in configs for arg in ("--config", str(path))),
        *stand_in_args(config, saved, tmp_path),
        placeholder_shards(tmp_path),
        "--model.backbone.init_args.bnb_compute_dtype=float32",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        f"--trainer.logger.init_args.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ]


def overlay_base(overlay: Path) -> Path:
    """The recipe an overlay merges over, from the command on its first line (which names both)."""
    command = overlay.read_text().splitlines()[0]
    configs = re.findall(r"--config (\S+)", command)
    assert command.startswith("# ecglm fit --config") and configs[1] == str(overlay.relative_to(REPO))
    return REPO / configs[0]


def verify_items(question: str, negative: str) -> list[dict]:
    """Two training QA pairs on random ECGs: the second answers ``yes``, the first ``negative``."""
    rng = np.random.default_rng(0)
    return [
        {
            "key": str(i),
            "ecg": rng.standard_normal((12, 2500)).astype(np.float32),
            "question": question,
            "answer": ["yes"] if i else [negative],
            "question_type": "single-verify",
            "dataset": "ecgqa-ptbxl",
        }
        for i in range(2)
    ]


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(r.relative_to(REPO / "recipes")) for r in RECIPES])
def test_recipe_builds_with_tiny_stand_ins_and_trains_a_step(recipe: Path, saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(recipe.read_text())
    backbone = config["model"]["backbone"]["init_args"]
    quantized = backbone.get("quantization") is not None
    vision = config["model"]["backbone"]["class_path"] == "hf-vision-language"
    cli = run_cli([*cpu_args([recipe], config, saved, tmp_path), FLOAT32], run=False)
    model = cli.model
    # Every run logs the QA pairs bad input cost, and saves checkpoints staged beside their target.
    assert any(isinstance(c, SkippedInputLogger) for c in cli.trainer.callbacks)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    policy = config["model"]["policy"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("connector.", "backbone.")) for n in trainable)
    lora = {n for n in trainable if ".lora_" in n}
    assert bool(lora) == (cli.config["model"]["policy"]["class_path"] == "ecglm.peft.LoRA"), policy
    if quantized:
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.backbone.model.modules())
    assert model.hparams.lr_scheduler == "cosine_with_restarts"
    assert model.hparams.lr_scheduler_kwargs == {"num_cycles": 25}

    items = verify_items("Does this ECG show left ventricular hypertrophy?", "none")
    model.train()
    # The recipe's prompt style, bound to the backbone by the CLI's wiring (ecglm.wiring.connect).
    prompt = cli.datamodule.prompt
    assert prompt is cli.datamodule.prompt and prompt.tokenizer is model.backbone.tokenizer
    assert prompt.max_length == config["data"]["init_args"]["prompt"].get("init_args", {}).get("max_length")
    image = cli.datamodule.image
    assert (image is not None) == vision
    if vision:  # printouts drawn at the backbone's size (ecglm.wiring.connect set it)
        assert image.size == model.model.image_size
        image = replace(image, fs=250.0)
    batch = QACollator(prompt, model.num_ecg_tokens, images=image)(items)
    model(batch).loss.backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)


OVERLAYS = sorted((REPO / "recipes").glob("*/multi-gpu/*.yaml"))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[str(r.relative_to(REPO / "recipes")) for r in OVERLAYS])
def test_multi_gpu_variant_merges_over_its_recipe_and_passes_the_start_checks(
    overlay: Path, saved, tmp_path, monkeypatch
):
    """Each multi-GPU variant names, in its first line, the command that merges it over its single-GPU
    recipe; merged, it keeps the recipe's effective batch, builds the recipe's model with the tiny
    stand-in, and builds its strategy (FSDP: to the point where Lightning refuses a CPU; DDP: the
    Trainer). Breaking what the variant fixes for its strategy is refused before the LLM loads."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy

    from ecglm.estimate import StrategyError

    monkeypatch.chdir(tmp_path)
    base_path = overlay_base(overlay)
    base, layer = yaml.safe_load(base_path.read_text()), yaml.safe_load(overlay.read_text())
    trainer = layer["trainer"]
    assert trainer["accelerator"] == "gpu" and trainer["devices"] == 8 and trainer["num_nodes"] == 1

    def effective_batch(cfg: dict, fallback: dict) -> int:
        data = {**fallback["data"]["init_args"], **(cfg.get("data") or {}).get("init_args", {})}
        t = {**fallback["trainer"], **cfg["trainer"]}
        return data["batch_size"] * t["accumulate_grad_batches"] * t["devices"] * t.get("num_nodes", 1)

    assert effective_batch(layer, base) == effective_batch(base, base)
    args = cpu_args([base_path, overlay], base, saved, tmp_path)
    strategy = trainer["strategy"]
    if strategy == "ddp":
        cli = run_cli([*args, FLOAT32], run=False)
        assert isinstance(cli.trainer.strategy, DDPStrategy) and cli.trainer.num_devices == 8
        assert cli.model.policy.gradient_checkpointing
        checkpoint = next(c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint))
        assert checkpoint.dirpath.endswith(trainer["default_root_dir"] + "/checkpoints")
        return
    assert strategy["class_path"].endswith("FSDPStrategy")
    with pytest.raises(ValueError, match="requires a GPU accelerator"):  # Lightning's own check, on CPU
        run_cli(args, run=False)
    quantized = layer["model"]["backbone"]["init_args"].get("quantization")
    broken = (
        ["--model.backbone.init_args.bnb_quant_storage=null"]  # uint8 4-bit weights
        if quantized
        else ["--model.backbone.init_args.dtype=bfloat16", "--trainer.precision=bf16-mixed"]
    )
    with pytest.raises(StrategyError, match="FSDP"):
        run_cli([*args, *broken], run=False)


RL_OVERLAYS = sorted((REPO / "recipes").glob("*/rl/*.yaml"))


def test_every_paper_model_has_a_grpo_stage():
    assert {p.parent.parent.name for p in RL_OVERLAYS} == {
        p.parent.name for p in RECIPES if p.parent.name != "recipes"
    }


@pytest.mark.parametrize(
    "overlay", RL_OVERLAYS, ids=[str(r.relative_to(REPO / "recipes")) for r in RL_OVERLAYS]
)
def test_grpo_stage_merges_over_its_lora_recipe_and_takes_a_step(overlay: Path, saved, tmp_path, monkeypatch):
    """Each GRPO overlay names, in its first line, the command that merges it over its LoRA SFT recipe;
    merged, it starts from that run's last checkpoint, writes to a run folder of its own, uses the
    adapters-off reference (no second copy of the LLM) and no restarts, and takes a GRPO step on the
    tiny stand-in: sampled answers, rewards, a loss whose gradient reaches the adapters."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ecglm.objectives import GRPO
    from ecglm.objectives.sequences import snapshot_trainable

    monkeypatch.chdir(tmp_path)
    base_path = overlay_base(overlay)
    base = yaml.safe_load(base_path.read_text())
    assert base_path.parent == overlay.parent.parent and base["model"]["policy"]["class_path"] == "lora"
    cli = run_cli([*cpu_args([base_path, overlay], base, saved, tmp_path), FLOAT32], run=False)
    model, objective = cli.model, cli.model.objective
    assert isinstance(objective, GRPO) and objective.adapters_off and objective.beta > 0
    sft_run = base["trainer"]["default_root_dir"]
    assert objective.init_from == f"{sft_run}/checkpoints/last.ckpt"
    checkpoint = next(c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint))
    assert cli.trainer.default_root_dir.endswith(sft_run + "-grpo")
    assert checkpoint.dirpath.endswith(sft_run + "-grpo/checkpoints")  # never over the SFT run's checkpoints
    assert model.hparams.lr_scheduler == "cosine" and not model.hparams.lr_scheduler_kwargs
    assert cli.trainer.max_steps > 0
    assert {r.name for r in objective.rewards} == {"exact_match", "label_f1", "format"}

    items = verify_items("Does this ECG show left ventricular hypertrophy? Options: yes, no.", "no")
    image = cli.datamodule.image
    if image is not None:
        image = replace(image, fs=250.0)
    batch = QACollator(cli.datamodule.prompt, model.num_ecg_tokens, images=image)(items)  # a training batch
    objective.group_size, objective.max_new_tokens = 2, 3  # a quick rollout of the tiny stand-in
    model.train()
    start = snapshot_trainable(model.model)
    loss = objective.training_step(model, batch, 0)
    loss.backward()
    lora = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    assert lora and objective.reference.keys() == start.keys()
    rollout = objective._rollout
    assert rollout.completion.shape[0] == 2 * 2 and rollout.ref_logp is not None
    # The adapters-off reference is not the policy: LoRA's B starts at zero, so both agree only until the
    # adapters learn; what matters is that the step's gradient reaches them.
    assert any(model.get_parameter(n).grad is not None for n in lora)
