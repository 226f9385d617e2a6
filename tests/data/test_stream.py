"""The training stream: the epoch plan across ranks and workers, weights, resuming, DDP over gloo."""

from __future__ import annotations

import json
import socket
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ecglm.data.datamodule import ECGQADataModule
from ecglm.data.shards import write_manifest, write_shards
from ecglm.data.stream import EpochPlan, ShardInfo
from ecglm.wiring import connect

N = 50  # samples per lead
#: dataset -> shards -> QA pairs of each sample: uneven shard sizes and fan-outs on purpose.
SIZES = {
    "ptbxl": [[3, 1, 4, 1, 5], [9], [2, 6, 5, 3, 5, 8, 9, 7], [1]],
    "mimic": [[8, 8, 8, 8], [2]],
    "pulse": [[1] * 7],
}
TOTAL = sum(sum(sum(shard) for shard in shards) for shards in SIZES.values())  # 110 pairs


def _sample(dataset: str, shard: int, index: int, num_qa: int) -> dict:
    qa = [
        {
            "question": f"q{i} of {dataset} {shard}/{index}",
            "answer": ["yes"],
            "question_type": "single-verify",
        }
        for i in range(num_qa)
    ]
    ecg = np.full((12, N), shard + index / 10, dtype=np.float32)
    return {"__key__": f"{dataset}_{shard}_{index}", "ecg.npy": ecg, "json": {"dataset": dataset, "qa": qa}}


def write_dataset(out: Path, sizes: dict[str, list[list[int]]] = SIZES) -> set[str]:
    """Shards of ``sizes`` for every split (the same shards); returns every QA key."""
    shards, keys = [], set()
    for dataset, groups in sizes.items():
        for s, counts in enumerate(groups):
            samples = [_sample(dataset, s, i, n) for i, n in enumerate(counts)]
            shards += write_shards(samples, out, f"{dataset}-{s}", max_samples_per_shard=None, max_shard_mb=1)
            keys |= {f"{x['__key__']}_qa{i}" for x in samples for i in range(len(x["json"]["qa"]))}
    datasets = {d: sum(map(sum, groups)) for d, groups in sizes.items()}
    split = {"num_qa": sum(datasets.values()), "datasets": datasets, "shards": shards}
    write_manifest(
        out,
        {
            "dataset": "mix",
            "preprocessing": {"num_samples": N},
            "splits": dict.fromkeys(("train", "val", "test"), split),
        },
    )
    return keys


def _infos(sizes=SIZES) -> list[ShardInfo]:
    return [
        ShardInfo(f"{d}-{s}", d, sum(counts))
        for d, groups in sizes.items()
        for s, counts in enumerate(groups)
    ]


def _positions(plan: EpochPlan, epoch: int, rank: int, worker: int) -> list[tuple[str, str, int]]:
    return [
        (dataset, seg.shard.url, p)
        for dataset, segments in plan.segments(epoch, rank, worker).items()
        for seg in segments
        for p in range(seg.start, seg.stop)
    ]


@pytest.mark.parametrize(
    ("world", "workers", "batch"), [(1, 1, 4), (2, 2, 4), (3, 2, 5), (4, 3, 2), (2, 4, 8)]
)
def test_plan_gives_every_rank_the_same_whole_batches_and_no_pair_twice(world, workers, batch):
    plan = EpochPlan(_infos(), world_size=world, num_workers=workers, batch_size=batch, seed=1)

    per_rank_batches = TOTAL // (world * batch)
    for epoch in (0, 1):
        read = []
        for rank in range(world):
            assert plan.rank_length(rank) == per_rank_batches * batch
            for worker in range(workers):
                positions = _positions(plan, epoch, rank, worker)
                assert len(positions) == plan.targets[rank * workers + worker]
                assert plan.targets[rank * workers + worker] % batch == 0
                read += positions
        assert len(read) == len(set(read))  # no pair twice in an epoch, across every rank and worker
        assert TOTAL - len(read) == TOTAL - per_rank_batches * batch * world < world * batch  # only the tail


def test_every_worker_mixes_every_dataset_in_proportion():
    plan = EpochPlan(_infos(), world_size=2, num_workers=2, batch_size=4)
    for rank in range(2):
        for worker in range(2):
            counts = plan.slot_counts(rank, worker)
            target = plan.targets[rank * 2 + worker]
            assert sum(counts.values()) == target
            for dataset, n in counts.items():
                assert abs(n - target * plan.quotas[dataset] / TOTAL) < 1 + 1e-9, (rank, worker, counts)


@pytest.mark.parametrize(("world", "workers", "batch"), [(1, 1, 32), (2, 2, 4), (3, 2, 5)])
def test_evaluation_plan_reads_every_pair_once(world, workers, batch):
    plan = EpochPlan(
        _infos(), world_size=world, num_workers=workers, batch_size=batch, shuffle=False, drop_last=False
    )

    read = [p for r in range(world) for w in range(workers) for p in _positions(plan, 0, r, w)]
    assert len(read) == len(set(read)) == TOTAL
    lengths = [plan.rank_length(r) for r in range(world)]
    assert sum(lengths) == TOTAL and max(lengths) - min(lengths) <= 1


def test_passes_reshuffle_shards_and_weights_set_each_datasets_share():
    plan = EpochPlan(
        _infos(), weights={"ptbxl": 1, "mimic": 1, "pulse": 2}, samples_per_epoch=100, batch_size=4
    )
    assert plan.quotas == {"mimic": 25, "ptbxl": 25, "pulse": 50}
    # pulse (7 pairs) is read 50 times an epoch: seven passes and a part, each pass in a new order.
    pulse = _positions(plan, 0, 0, 0)
    assert Counter(d for d, _, _ in pulse) == {"mimic": 25, "ptbxl": 25, "pulse": 50}
    # ptbxl (69 pairs) gives 25 an epoch: epochs 0, 1 and the first 19 of epoch 2 are one pass, no repeat.
    ptbxl = [x for e in (0, 1, 2) for x in _positions(plan, e, 0, 0) if x[0] == "ptbxl"][:69]
    assert len(set(ptbxl)) == 69
    with pytest.raises(ValueError, match=r"missing \['pulse'\]"):
        EpochPlan(_infos(), weights={"ptbxl": 1, "mimic": 1})
    with pytest.raises(ValueError, match=r"unknown \['code15'\]"):
        EpochPlan(_infos(), weights={"ptbxl": 1, "mimic": 1, "pulse": 1, "code15": 1})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> tuple[Path, set[str]]:
    out = tmp_path_factory.mktemp("stream")
    return out, write_dataset(out)


@pytest.fixture(scope="module")
def formatter(tokenizer_dir):
    from transformers import AutoTokenizer

    from ecglm.prompts import ChatTemplate

    return ChatTemplate(AutoTokenizer.from_pretrained(tokenizer_dir), "Answer briefly.")


def _module(data_dir: Path, formatter, **kwargs) -> ECGQADataModule:
    dm = ECGQADataModule(str(data_dir), **{"batch_size": 4, "num_workers": 2, "shuffle_buffer": 16, **kwargs})
    dm.setup("fit")
    dm.attach(formatter, 1)
    return dm


def _batches(dm: ECGQADataModule, limit: int | None = None) -> list[list[str]]:
    """Training batches' keys, passed through the hook Lightning calls on every batch."""
    out = []
    for batch in dm.train_dataloader():
        out.append(dm.on_before_batch_transfer(batch, 0).key)
        if len(out) == limit:
            break
    return out


def test_an_epoch_through_the_loader_is_every_pair_once_in_whole_batches(data_dir, formatter):
    out, keys = data_dir
    dm = _module(out, formatter)

    epochs = []
    for epoch in (0, 1):
        dm.epoch = epoch
        batches = _batches(dm)
        assert len(batches) == len(dm.train_dataloader()) == TOTAL // 4
        assert all(len(b) == 4 for b in batches)
        flat = [k for b in batches for k in b]
        assert len(set(flat)) == len(flat) and set(flat) <= keys and len(keys) - len(flat) < 4
        epochs.append(flat)
    assert epochs[0] != epochs[1]  # a new order each epoch
    dm.epoch = 0
    assert [k for b in _batches(dm) for k in b] == epochs[0]  # and the same order again for the same epoch


def test_interrupted_and_resumed_stream_continues_with_the_next_unseen_pairs(data_dir, formatter):
    out, _ = data_dir
    full = _module(out, formatter)
    full.epoch = 1
    uninterrupted = _batches(full)

    first = _module(out, formatter)
    first.epoch = 1
    seen = _batches(first, limit=7)  # an odd number: the two workers stand at different positions
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 7

    resumed = _module(out, formatter)
    resumed.epoch = 1
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as stored in a checkpoint
    rest = _batches(resumed)

    assert seen + rest == uninterrupted
    resumed.epoch = 2
    assert len(_batches(resumed)) == len(uninterrupted)  # the resume point applies to its epoch only


def test_resume_under_another_plan_warns_and_restarts_the_epoch(data_dir, formatter):
    out, _ = data_dir
    first = _module(out, formatter)
    _batches(first, limit=3)
    other = _module(out, formatter, batch_size=5)
    other.load_state_dict(first.state_dict())
    with pytest.warns(UserWarning, match="another epoch plan"):
        assert len(_batches(other)) == TOTAL // 5


def test_weighted_mixture_through_the_loader(data_dir, formatter):
    out, _ = data_dir
    dm = _module(out, formatter, weights={"ptbxl": 1, "mimic": 1, "pulse": 2}, samples_per_epoch=96)
    flat = [k for b in _batches(dm) for k in b]

    assert Counter(k.split("_")[0] for k in flat) == {"ptbxl": 24, "mimic": 24, "pulse": 48}
    first_half = Counter(k.split("_")[0] for k in flat[:48])
    assert min(first_half.values()) >= 6  # every dataset throughout the epoch, not one after another


def test_bad_input_counts_are_gathered_from_every_worker(tmp_path, formatter):
    write_dataset(tmp_path, {"ptbxl": [[2, 2], [2, 2]]})
    for shard in ("ptbxl-0-000000.tar", "ptbxl-1-000000.tar"):
        data = bytearray((tmp_path / shard).read_bytes())
        start = data.index(b'"qa":[{"answer"')  # the first sample's QA list: now invalid JSON
        data[start : start + 4] = b"@@@@"
        (tmp_path / shard).write_bytes(bytes(data))
    # Unchecked: the sha256 check would skip both changed shards whole.
    dm = _module(tmp_path, formatter, batch_size=1, num_workers=2, shuffle_buffer=0, verify_checksums=False)

    batches = _batches(dm)

    assert dm.skipped == dm.train_skipped == {"unreadable json": 4}  # two pairs in each worker's shard
    assert len(batches) == 8  # each worker repeats its good pairs to keep the batch count


def test_a_bad_sample_split_between_workers_counts_each_of_its_pairs_once(tmp_path, formatter):
    samples = [_sample("ptbxl", 0, i, n) for i, n in enumerate([1, 4, 1])]
    samples[1]["ecg.npy"] = np.zeros((12, N + 1), dtype=np.float32)  # wrong shape
    shards = write_shards(samples, tmp_path, "ptbxl")
    split = {"num_qa": 6, "datasets": {"ptbxl": 6}, "shards": shards}
    splits = dict.fromkeys(("train", "val", "test"), split)
    write_manifest(tmp_path, {"dataset": "mix", "preprocessing": {"num_samples": N}, "splits": splits})
    # Worker 0 reads positions 0-2, worker 1 positions 3-5: the bad sample's are 1-4.
    dm = _module(tmp_path, formatter, batch_size=1, num_workers=2, shuffle_buffer=0)

    _batches(dm)

    assert dm.train_skipped == {"wrong shape": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, data_dir: str, tokenizer_dir: str, out: str) -> None:
    from transformers import AutoTokenizer

    from ecglm.prompts import ChatTemplate

    # mp.spawn makes spawn the default start method in its children, and loader workers would re-import
    # torch (seconds each); Lightning's ddp strategy starts ranks as fresh scripts, where workers fork.
    mp.set_start_method("fork", force=True)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        dm = ECGQADataModule(data_dir, batch_size=4, num_workers=2, shuffle_buffer=16, seed=5)
        dm.setup("fit")
        dm.attach(ChatTemplate(AutoTokenizer.from_pretrained(tokenizer_dir), "Answer briefly."), 1)
        epochs = []
        for epoch in (0, 1):
            dm.epoch = epoch
            batches = []
            for batch in dm.train_dataloader():
                batches.append(batch.key)
                # What DDP does every step: a rank with a batch fewer would leave the other waiting here.
                dist.all_reduce(torch.ones(1))
            epochs.append(batches)
        gathered = [None] * world
        dist.all_gather_object(gathered, epochs)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_two_ddp_ranks_over_gloo_stream_the_epoch_once(data_dir, tokenizer_dir, tmp_path):
    out, keys = data_dir
    result = tmp_path / "keys.json"
    mp.spawn(_ddp_rank, args=(2, _free_port(), str(out), tokenizer_dir, str(result)), nprocs=2, join=True)

    ranks = json.loads(result.read_text())
    for epoch in (0, 1):
        per_rank = [ranks[r][epoch] for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) == TOTAL // 8  # same batch count: nobody waits
        union = [k for batches in per_rank for b in batches for k in b]
        assert len(union) == len(set(union)) == TOTAL // 8 * 8  # no pair on two ranks or twice
        assert set(union) <= keys and len(keys - set(union)) < 8  # the epoch, less a tail < 2 batches
    assert ranks[0][0] != ranks[0][1]


def _fit(model, data_dir: Path, root: Path, ckpt_path: str | None = None, **trainer_args) -> list[list[str]]:
    """Train with a real Trainer; returns the keys of every training batch, in order."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Keys(L.Callback):
        def __init__(self):
            self.keys: list[list[str]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.keys.append(list(batch.key))

    keys = Keys()
    every_8 = ModelCheckpoint(dirpath=root, every_n_train_steps=8, save_top_k=-1, filename="{epoch}-{step}")
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[keys, every_8],
        default_root_dir=root,
        **trainer_args,
    )
    dm = ECGQADataModule(str(data_dir), batch_size=8, num_workers=2, shuffle_buffer=16, seed=7)
    connect(model, dm)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return keys.keys


def test_trainer_resumed_from_a_mid_epoch_checkpoint_sees_the_uninterrupted_sequence(
    data_dir, tmp_path, tiny_backbone_factory, tiny_encoder_factory
):
    from ecglm.connectors import MLPConnector
    from ecglm.module import ECGLanguageModel

    def model():
        return ECGLanguageModel(
            tiny_encoder_factory(), MLPConnector(num_tokens=1), tiny_backbone_factory("llama")
        )

    out, keys = data_dir
    per_epoch = TOTAL // 8  # 13 batches
    uninterrupted = _fit(model(), out, tmp_path / "a", max_epochs=2)
    assert len(uninterrupted) == 2 * per_epoch
    interrupted = _fit(model(), out, tmp_path / "b", max_steps=19)  # stops in epoch 1, batch 6
    assert interrupted == uninterrupted[:19]

    # The checkpoint of step 16 was written after batch 3 of epoch 1 (an odd batch: workers out of step).
    resumed = _fit(
        model(), out, tmp_path / "c", ckpt_path=str(tmp_path / "b/epoch=1-step=16.ckpt"), max_epochs=2
    )

    assert resumed == uninterrupted[16:]  # nothing repeated, nothing skipped
    epoch_1 = [k for batch in uninterrupted[per_epoch:] for k in batch]
    assert len(set(epoch_1)) == len(epoch_1) and set(epoch_1) <= keys


def test_the_image_limits_load_without_webdataset_and_their_old_place_warns():
    """The inference side checks a user's picture with the stream's limits without loading WebDataset."""
    import subprocess
    import sys

    import ecglm.data.images
    import ecglm.data.stream

    code = "import sys, ecglm.data.images; assert 'webdataset' not in sys.modules, 'webdataset imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    moved = r"stream\.MIN_IMAGE_SIDE is deprecated .* 0\.3\.0: use ecglm\.data\.images\.MIN_IMAGE_SIDE"
    with pytest.warns(DeprecationWarning, match=moved):
        from ecglm.data.stream import MIN_IMAGE_SIDE
    assert MIN_IMAGE_SIDE == ecglm.data.images.MIN_IMAGE_SIDE == 64
    assert all(getattr(ecglm.data.stream, name) is not None for name in ecglm.data.stream.__all__)
