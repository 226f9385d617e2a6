"""Lightning's FSDPStrategy on CPU: two processes over gloo train a tiny ECG-language model, and the
trainable-only checkpoint they write loads into one process with the same weights.

Lightning 2.6 refuses FSDP without a GPU (its accelerator check compares the strategy's type with
``FSDPStrategy`` exactly), hands FSDP ``device_id=None`` for CPU devices (FSDP then looks for an
accelerator and fails), and gathers full state dicts with ``offload_to_cpu=True`` (for tensors already
on the CPU, FSDP frees storage still in use: the process segfaults). :class:`CPUFSDPStrategy` and
:func:`cpu_full_state_dict_context` change those three things and nothing else; sharding, flat
parameters, optimizer state and checkpoints are Lightning's and torch's own code. On a GPU none of
this is needed (docs/scaling.md).

The LLM is a tiny random Llama saved as a pretrained model (so that its frozen weights have a source
and stay out of checkpoints), with SmolLM2's tokenizer; the ranks are forked from a fork server that has
imported torch, Lightning and ecglm once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ecglm_testing import TINY, VOCAB

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

ROWS, SEQ, ANSWER, STEPS = 2, 48, 8, 3
#: The resume test: a TOTAL-step run checkpointed after its first epoch (BATCHES batches), resumed from there.
BATCHES, TOTAL = 4, 6


@pytest.fixture(scope="module")
def pretrained_llama(tokenizer_dir, tmp_path_factory) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("fsdp-llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY, vocab_size=VOCAB)).save_pretrained(
        folder
    )
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


def cpu_fsdp_strategy(**kwargs):
    """Lightning's FSDPStrategy, told that the CPU is its device."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
            from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing

            wrapped = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
            _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
            return wrapped

    return CPUFSDPStrategy(process_group_backend="gloo", **kwargs)


def cpu_full_state_dict_context(module, world_size: int, rank0_only: bool = True):
    """Lightning's full-state-dict context without ``offload_to_cpu`` (the tensors are on the CPU)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


def build_model(folder: str, four_bit: str | None = None):
    """Tiny encoder, MLP connector, the saved Llama and LoRA (QLoRA over NF4 stored as ``four_bit``)."""
    from ecglm.backbones import HFBackbone
    from ecglm.connectors import MLPConnector
    from ecglm.module import ECGLanguageModel
    from ecglm.peft import LoRA
    from ecglm.testing.tiny import tiny_encoder

    torch.manual_seed(0)
    if four_bit:
        storage = None if four_bit == "uint8" else four_bit  # None: bitsandbytes' default, uint8
        four = {"quantization": "nf4", "bnb_compute_dtype": "float32", "bnb_quant_storage": storage}
        backbone = HFBackbone(folder, dtype="float32", **four)
    else:
        backbone = HFBackbone(folder)
    policy = LoRA(r=4, dropout=0.0, kbit=four_bit is not None)
    return ECGLanguageModel(tiny_encoder(), MLPConnector(num_tokens=2), backbone, policy, learning_rate=1e-2)


def batch(seed: int):
    """Full rows (no padding), two ECG positions, the last ``ANSWER`` tokens supervised."""
    from ecglm.testing import token_batch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 1000, (ROWS, SEQ), generator=generator)
    ecg_mask = torch.zeros(ROWS, SEQ, dtype=torch.bool)
    ecg_mask[:, 3:5] = True
    labels = torch.full((ROWS, SEQ), -100)
    labels[:, -ANSWER:] = ids[:, -ANSWER:]
    return token_batch(
        torch.randn(ROWS, 12, 2500, generator=generator),
        input_ids=ids,
        attention_mask=torch.ones(ROWS, SEQ, dtype=torch.long),
        ecg_mask=ecg_mask,
        labels=labels,
    )


def trainer(world: int, root: str, max_steps: int, callbacks=(), **strategy):
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=cpu_fsdp_strategy(state_dict_type="full", **strategy),
        max_steps=max_steps,
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=root,
    )


def _worker(rank: int, world: int, port: int, folder: str, root: str, options: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world),
    )
    with mock.patch(
        "lightning.pytorch.strategies.fsdp._get_full_state_dict_context", cpu_full_state_dict_context
    ):
        _train(rank, world, folder, root, options)


def _train(rank: int, world: int, folder: str, root: str, options: dict) -> None:
    strategy = {"auto_wrap_policy": _decoder_layers()} if options.get("wrap") else {}
    loader = torch.utils.data.DataLoader([batch(100 * rank + i) for i in range(BATCHES)], batch_size=None)
    if options.get("resume"):
        _run_straight_and_resumed(rank, world, folder, root, loader)
        return
    model = build_model(folder, options.get("four_bit"))
    fit = trainer(world, root, STEPS, **strategy)
    fit.fit(model, train_dataloaders=loader)
    checkpoint = Path(root, "fsdp.ckpt")
    fit.save_checkpoint(checkpoint)
    wrapped = fit.strategy.model
    wrapped.eval()
    with torch.no_grad():
        loss = float(wrapped(batch(7)).loss)
    local = sum(p.numel() for p in model.parameters())
    shards = [None] * world
    dist.all_gather_object(shards, local)
    result = {"loss": loss, "shards": shards, "global_step": fit.global_step}
    if options.get("uint8"):  # FSDP's own verdict on 4-bit weights stored as integers
        from torch.distributed.fsdp import FullyShardedDataParallel

        try:
            FullyShardedDataParallel(
                build_model(folder, "uint8").backbone.model, device_id=torch.device("cpu")
            )
            result["uint8"] = "wrapped"
        except ValueError as err:
            result["uint8"] = str(err)
    if rank == 0:
        Path(root, "result.json").write_text(json.dumps(result))


class StepCounter(L.Callback):
    """Counts the optimizer steps its fit takes, and writes a checkpoint at step ``save_at`` (in
    ``on_train_batch_end``, where ``ModelCheckpoint(every_n_train_steps=...)`` writes one)."""

    def __init__(self, save_at: int | None = None, path: Path | None = None):
        self.save_at, self.path, self.taken = save_at, path, 0

    def on_train_batch_end(self, trainer, *args) -> None:
        self.taken += 1
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)


def _run_straight_and_resumed(rank: int, world: int, folder: str, root: str, loader) -> None:
    """A TOTAL-step run that writes a checkpoint after its first epoch, as a job saving every N steps
    does, and a second run resumed from that checkpoint (as after a preemption); each writes its full
    checkpoint (weights, optimizer and scheduler state) at the end."""
    steps = {}
    saved = Path(root, "after-one-epoch.ckpt")
    for name, save_at, resume_from in (("straight", BATCHES, None), ("resumed", None, saved)):
        counter = StepCounter(save_at, saved)
        fit = trainer(world, root, TOTAL, callbacks=[counter])
        fit.fit(build_model(folder), train_dataloaders=loader, ckpt_path=resume_from)
        fit.save_checkpoint(Path(root, f"{name}.ckpt"))
        steps[name] = {"global_step": fit.global_step, "taken": counter.taken}
    if rank == 0:
        Path(root, "result.json").write_text(json.dumps(steps))


def _decoder_layers() -> set[type]:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return {LlamaDecoderLayer}


def run_two_ranks(folder: str, root: Path, timeout: float = 100, **options) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # From a fork server: forking this process once it has computed (OpenMP threads started) can
    # deadlock the children; the server only imports, once, and forks the ranks cheaply.
    mp.set_forkserver_preload(["torch", "lightning", "transformers", "ecglm.module", "ecglm.peft", __name__])
    workers = mp.start_processes(
        _worker, args=(2, port, folder, str(root), options), nprocs=2, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + timeout
    while not workers.join(timeout=1):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the two FSDP ranks did not finish within {timeout:.0f} s")
    return json.loads((root / "result.json").read_text())


def load_in_one_process(folder: str, path: Path, four_bit: str | None = None):
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(folder, four_bit)
    model.on_load_checkpoint(checkpoint)  # ecglm's key check: raises on a missing or unknown key
    _, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    assert not unexpected
    return model, checkpoint


def test_two_fsdp_ranks_train_and_their_trainable_checkpoint_loads_in_one_process(pretrained_llama, tmp_path):
    result = run_two_ranks(pretrained_llama, tmp_path)
    assert result["global_step"] == STEPS
    fresh = build_model(pretrained_llama)
    total = sum(p.numel() for p in fresh.parameters())
    assert all(0 < shard <= total // 2 + 2 for shard in result["shards"])  # each rank holds half
    assert abs(sum(result["shards"]) - total) <= 4  # FSDP pads the flat parameter to an even split

    model, checkpoint = load_in_one_process(pretrained_llama, tmp_path / "fsdp.ckpt")
    keys = set(checkpoint["state_dict"])
    assert keys == model.model.persistent_keys()
    backbone = {k for k in keys if k.startswith("backbone.")}
    assert backbone and all(".lora_" in k for k in backbone)  # no frozen LLM weight in the checkpoint
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(model.get_parameter(n), fresh.get_parameter(n)) for n in trained)
    model.eval()
    with torch.no_grad():
        assert float(model(batch(7)).loss) == pytest.approx(result["loss"], abs=1e-5)


def test_fsdp_shards_qlora_with_4bit_weights_stored_as_float32_and_refuses_uint8(pretrained_llama, tmp_path):
    """QLoRA's k-bit preparation leaves every unquantised weight in float32, so 4-bit weights stored as
    float32 flatten with them; stored as uint8 (bitsandbytes' default) FSDP refuses them, which
    ``ecglm.estimate.check_strategy`` says at start."""
    pytest.importorskip("bitsandbytes")
    result = run_two_ranks(pretrained_llama, tmp_path, four_bit="float32", uint8=True)
    assert result["global_step"] == STEPS
    assert "flatten" in result["uint8"] and ("uint8" in result["uint8"] or "integer" in result["uint8"])
    model, checkpoint = load_in_one_process(pretrained_llama, tmp_path / "fsdp.ckpt", four_bit="float32")
    assert set(checkpoint["state_dict"]) == model.model.persistent_keys()
    model.eval()
    with torch.no_grad():
        assert float(model(batch(7)).loss) == pytest.approx(result["loss"], abs=1e-5)


def test_auto_wrapped_decoder_layers_keep_their_adapters_in_the_checkpoint(pretrained_llama, tmp_path):
    run_two_ranks(pretrained_llama, tmp_path, wrap=True)
    checkpoint = torch.load(tmp_path / "fsdp.ckpt", map_location="cpu", weights_only=False)
    assert any(".lora_" in k for k in checkpoint["state_dict"])


def test_a_resumed_fsdp_run_ends_with_the_weights_and_optimizer_state_of_an_uninterrupted_one(
    pretrained_llama, tmp_path
):
    steps = run_two_ranks(pretrained_llama, tmp_path, resume=True)
    assert steps == {
        "straight": {"global_step": TOTAL, "taken": TOTAL},
        "resumed": {"global_step": TOTAL, "taken": TOTAL - BATCHES},  # only the steps left, not a restart
    }
    saved, resumed, straight = (
        torch.load(tmp_path / f"{name}.ckpt", map_location="cpu", weights_only=False)
        for name in ("after-one-epoch", "resumed", "straight")
    )
    assert saved["global_step"] == BATCHES
    # The same arithmetic in the same order: equal (a tolerance of float32 rounding, in case it is not).
    exact = {"rtol": 1e-6, "atol": 1e-7}
    assert set(resumed["state_dict"]) == set(straight["state_dict"])
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, **exact, msg=key)
    (optimizer,), (reference,) = resumed["optimizer_states"], straight["optimizer_states"]
    assert set(optimizer["state"]) == set(reference["state"]) and reference["state"]
    for name, state in reference["state"].items():
        assert set(optimizer["state"][name]) == {"step", "exp_avg", "exp_avg_sq"} == set(state), name
        for field, value in state.items():
            torch.testing.assert_close(optimizer["state"][name][field], value, **exact, msg=f"{name} {field}")
    assert optimizer["param_groups"] == reference["param_groups"]  # learning rates where the schedule is
    assert resumed["lr_schedulers"] == straight["lr_schedulers"]
    # Not vacuous: the steps after the checkpoint changed the trained weights.
    trained = [k for k in straight["state_dict"] if ".lora_" in k or k.startswith("connector.")]
    assert trained and any(
        not torch.equal(saved["state_dict"][k], straight["state_dict"][k]) for k in trained
    )


def test_the_documented_fsdp_strategy_builds_and_lightning_refuses_it_without_a_gpu():
    """The FSDP block of docs/scaling.md parses into Lightning's strategy (as LightningCLI parses a
    recipe's trainer), passes ecglm's start-up check, and is refused on CPU by Lightning itself."""
    import lightning as L
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy

    from ecglm.estimate import check_strategy
    from ecglm_testing import REPO

    text = (REPO / "docs" / "scaling.md").read_text()
    block = text.split("<!-- fsdp-trainer -->")[1].split("```yaml")[1].split("```")[0]
    trainer_node = yaml.safe_load(block)["trainer"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=str | Strategy)
    strategy = parser.instantiate_classes(
        parser.parse_object({"strategy": trainer_node["strategy"]})
    ).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy.name == "FULL_SHARD" and strategy._state_dict_type == "full"
    assert "auto_wrap_policy" in strategy.kwargs and strategy.kwargs["use_orig_params"]
    check_strategy(
        strategy,
        backbone_dtype="float32",
        precision=trainer_node["precision"],
        gradient_clip_val=trainer_node.get("gradient_clip_val"),
    )
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy=FSDPStrategy(), logger=False)
