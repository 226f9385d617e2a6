"""Shards streamed from object storage: HTTP and S3 servers on 127.0.0.1, faults at chosen bytes, cache."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from remote_servers import Fault, FaultyHTTP, MotoS3

from ecglm.data.datamodule import BadSampleError, ECGQADataModule
from ecglm.data.shards import read_manifest, write_manifest, write_shards
from ecglm.data.stream import REASONS
from ecglm.data.stream.remote import RemoteShards, ShardReader, is_remote

N = 50
#: dataset -> shards -> QA pairs per sample (uneven on purpose); 49 pairs.
SIZES = {"ptbxl": [[3, 1, 4, 1, 5], [2, 6, 5, 3, 5]], "mimic": [[8, 1], [2]]}
TOTAL = sum(sum(map(sum, groups)) for groups in SIZES.values())
UNREACHABLE = "unreachable shard"


def _sample(dataset: str, shard: int, index: int, num_qa: int) -> dict:
    qa = [{"question": f"q{i} {dataset} {shard}/{index}", "answer": ["yes"]} for i in range(num_qa)]
    # Random signals: shards of some kilobytes, so that faults land inside a shard's tar members.
    ecg = np.random.default_rng(shard * 100 + index).standard_normal((12, N)).astype(np.float32)
    return {"__key__": f"{dataset}_{shard}_{index}", "ecg.npy": ecg, "json": {"dataset": dataset, "qa": qa}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("remote")
    entries = []
    for dataset, groups in SIZES.items():
        for s, counts in enumerate(groups):
            samples = [_sample(dataset, s, i, n) for i, n in enumerate(counts)]
            entries += write_shards(
                samples, out, f"{dataset}-{s}", max_samples_per_shard=None, max_shard_mb=1
            )
    datasets = {d: sum(map(sum, g)) for d, g in SIZES.items()}
    split = {"num_qa": TOTAL, "datasets": datasets, "shards": entries}
    write_manifest(
        out,
        {
            "dataset": "mix",
            "preprocessing": {"num_samples": N},
            "splits": dict.fromkeys(("train", "val", "test"), split),
        },
    )
    return out


@pytest.fixture(scope="module")
def formatter(tokenizer_dir):
    from transformers import AutoTokenizer

    from ecglm.prompts import ChatTemplate

    return ChatTemplate(AutoTokenizer.from_pretrained(tokenizer_dir), "Answer briefly.")


def _module(data_dir: str, formatter, block: int = 2048, **kwargs) -> ECGQADataModule:
    args = {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 8, "retry_backoff": 0.01, **kwargs}
    dm = ECGQADataModule(data_dir, **args)
    dm.setup("fit")
    dm.attach(formatter, 1)
    if dm.remote is not None:
        dm.remote.block_size = block  # 2048: several ranged reads per shard, so faults fall between them
    return dm


def _train(dm: ECGQADataModule, epoch: int = 1) -> list[str]:
    dm.epoch = epoch
    return [k for batch in dm.train_dataloader() for k in dm.on_before_batch_transfer(batch, 0).key]


def _val(dm: ECGQADataModule) -> list[str]:
    return [k for batch in dm.val_dataloader() for k in batch.key]


def _shard(shards: Path, name: str) -> dict:
    entries = read_manifest(shards)["splits"]["train"]["shards"]
    return next(e for e in entries if e["path"] == name)


def test_urls_and_local_paths_are_told_apart():
    assert is_remote("s3://bucket/mix") and is_remote("https://host/mix/") and is_remote("gs://b/x")
    assert not is_remote("/data/mix") and not is_remote("file:///data/mix") and not is_remote(Path("x"))


@pytest.mark.timeout(300)  # moto answers slowly on a loaded machine
def test_local_http_and_s3_give_the_same_epoch(shards, formatter, tmp_path):
    local = _module(str(shards), formatter, num_workers=2)
    expected = _train(local)
    assert len(expected) == TOTAL // 4 * 4 and len(set(expected)) == len(expected)
    file_url = _module(f"file://{shards}", formatter, num_workers=2)
    assert _train(file_url) == expected
    with FaultyHTTP(shards) as http:
        over_http = _module(http.url + "/", formatter, num_workers=2)
        assert _train(over_http) == expected
        assert _val(over_http) == _val(local)
        ranged = [r for r in http.requests if r[0] == "GET" and r[2]]
        assert ranged  # the shards were read in ranges of block_size bytes
    with MotoS3() as s3:
        url = s3.upload(shards, "ecg", "mix")
        over_s3 = _module(
            url, formatter, num_workers=2, storage_options={"endpoint_url": s3.endpoint}, block=1 << 20
        )
        assert _train(over_s3) == expected
        # resumable mid-epoch as a local folder: 5 batches, then a new loader from the saved position
        first = _module(url, formatter, storage_options={"endpoint_url": s3.endpoint}, block=1 << 20)
        first.epoch = 1
        seen = []
        for batch in first.train_dataloader():
            seen.append(first.on_before_batch_transfer(batch, 0).key)
            if len(seen) == 5:
                break
        resumed = _module(url, formatter, storage_options={"endpoint_url": s3.endpoint}, block=1 << 20)
        resumed.load_state_dict(first.state_dict())
        uninterrupted = _module(url, formatter, storage_options={"endpoint_url": s3.endpoint}, block=1 << 20)
        assert [k for b in seen for k in b] + _train(resumed) == _train(uninterrupted)


@pytest.mark.parametrize(
    ("kind", "ranges"), [("drop", True), ("5xx", True), ("stall", True), ("drop", False), ("5xx", False)]
)
def test_faults_within_the_retries_recover_every_pair_once(shards, formatter, kind, ranges):
    local = _val(_module(str(shards), formatter))
    size = _shard(shards, "ptbxl-1-000000.tar")["bytes"]
    with FaultyHTTP(shards, ranges=ranges, stall=2.0) as http:
        http.faults = [
            Fault("ptbxl-1-000000.tar", size // 2, kind, times=2),
            Fault("mimic-0-000000.tar", 5000, kind),
        ]
        dm = _module(http.url, formatter, retries=3, read_timeout=0.5)
        assert _val(dm) == local
        assert dm.skipped == Counter()
        assert all(f.times == 0 for f in http.faults)  # every fault happened
        after = [r for r in http.requests if r[0] == "GET" and r[1] == "ptbxl-1-000000.tar"]
        if ranges and kind != "5xx":
            # resumed where it stopped: after the first request, ranged reads only, two of them
            # retries from the same byte before the dropped one
            starts = [r[2] for r in after]
            assert starts[0] == 0 and all(s > 0 for s in starts[1:])
            assert any(starts.count(s) >= 2 and s <= size // 2 for s in starts[1:])
        if not ranges:
            assert all(r[2] is None for r in after) and len(after) >= 3  # read again from the start


def test_a_shard_failing_past_its_retries_is_counted_lost_with_its_url(shards, formatter, caplog):
    local = _val(_module(str(shards), formatter))
    with FaultyHTTP(shards) as http:
        http.faults = [Fault("ptbxl-1-000000.tar", 3000, "5xx", times=10**6)]
        dm = _module(http.url, formatter, retries=2)
        with caplog.at_level(logging.WARNING, logger="ecglm.data"):
            got = _val(dm)
        url = f"{http.url}/ptbxl-1-000000.tar"
        # the pairs before the failing byte came through; the shard's rest is lost and counted
        lost = [k for k in local if k not in got]
        assert got == [k for k in local if k in got] and lost and all(k.startswith("ptbxl_1_") for k in lost)
        assert dm.skipped == Counter({UNREACHABLE: len(lost)})
        warnings = [r.getMessage() for r in caplog.records if UNREACHABLE in r.getMessage()]
        assert warnings and url in warnings[0] and "3 tries failed" in warnings[0]
        tries = [r for r in http.requests if r[0] == "GET" and r[1] == "ptbxl-1-000000.tar"]
        assert len(tries) >= 3


def test_a_missing_object_is_lost_at_once_and_strict_stops_the_run(shards, formatter, tmp_path):
    folder = tmp_path / "mix"
    folder.mkdir()
    for path in shards.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "mimic-1-000000.tar").unlink()
    with FaultyHTTP(folder) as http:
        dm = _module(http.url, formatter, retries=3)
        got = _val(dm)
        assert len(got) == TOTAL - 2 and dm.skipped == Counter({UNREACHABLE: 2})
        assert len([r for r in http.requests if r[1] == "mimic-1-000000.tar"]) <= 2  # no retries (HEAD, GET)
        with pytest.raises(BadSampleError, match=r"mimic-1-000000\.tar: unreachable shard"):
            _val(_module(http.url, formatter, retries=3, strict=True))


def test_a_damaged_remote_shard_is_reported_streamed_and_dropped_from_the_cache(
    shards, formatter, tmp_path, caplog
):
    folder = tmp_path / "mix"
    folder.mkdir()
    for path in shards.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    entry = _shard(shards, "mimic-1-000000.tar")
    damaged = bytearray((folder / entry["path"]).read_bytes())
    damaged[-1] ^= 1  # in the tar's end padding: every pair still reads, only the sha256 tells
    (folder / entry["path"]).write_bytes(bytes(damaged))
    local = _val(_module(str(folder), formatter))
    assert len(local) == TOTAL - 2  # a local shard is checked before use and skipped
    with FaultyHTTP(folder) as http:
        with caplog.at_level(logging.WARNING, logger="ecglm.data"):
            streamed = _module(http.url, formatter)
            got = _val(streamed)
        # streamed: known at its end; its pairs were used, and counted
        assert len(got) == TOTAL and streamed.skipped == Counter({"sha256 mismatch": 2})
        assert any(
            "sha256 mismatch" in r.getMessage() and entry["path"] in r.getMessage() for r in caplog.records
        )
        with pytest.raises(BadSampleError, match="sha256"):
            _val(_module(http.url, formatter, strict=True))
        # cached: fetched whole and checked before use, exactly as a local shard
        cache = tmp_path / "cache"
        cached = _module(http.url, formatter, cache_dir=str(cache))
        assert _val(cached) == local and cached.skipped == Counter({"sha256 mismatch": 2})
        assert not (cache / f"{entry['sha256']}.tar").exists()
        assert not [p for p in os.listdir(cache) if p.startswith(".partial")]


def test_the_cache_serves_the_next_epoch_and_fetches_a_damaged_copy_again(shards, formatter, tmp_path):
    local = _val(_module(str(shards), formatter))
    cache = tmp_path / "cache"
    with FaultyHTTP(shards) as http:
        dm = _module(http.url, formatter, cache_dir=str(cache))
        assert _val(dm) == local
        files = sorted(cache.glob("*.tar"))
        assert len(files) == 4 and not list(cache.glob(".partial*"))
        gets = len([r for r in http.requests if r[0] == "GET" and r[1] != "manifest.json"])
        assert _val(dm) == local
        assert (
            len([r for r in http.requests if r[0] == "GET" and r[1] != "manifest.json"]) == gets
        )  # from disk
        victim = cache / f"{_shard(shards, 'ptbxl-0-000000.tar')['sha256']}.tar"
        data = bytearray(victim.read_bytes())
        data[100] ^= 1
        victim.write_bytes(bytes(data))
        os.utime(victim, ns=(1, 1))  # another size/mtime: hashed again
        assert _val(dm) == local
        fetched = [r for r in http.requests[-10:] if r[0] == "GET" and r[1] == "ptbxl-0-000000.tar"]
        assert fetched and victim.read_bytes() == (shards / "ptbxl-0-000000.tar").read_bytes()


def test_the_cache_stays_within_its_bound(shards, tmp_path):
    entries = read_manifest(shards)["splits"]["train"]["shards"]
    biggest = max(e["bytes"] for e in entries)
    with FaultyHTTP(shards) as http:
        remote = RemoteShards(cache_dir=str(tmp_path), cache_gb=biggest * 1.5 / 1e9)
        for e in entries:
            path, digest = remote.fetch(f"{http.url}/{e['path']}", e["sha256"])
            assert digest == e["sha256"] and path.read_bytes() == (shards / e["path"]).read_bytes()
            assert sum(p.stat().st_size for p in tmp_path.glob("*.tar")) <= biggest * 1.5
        assert path.exists()  # the newest stays


def test_the_reader_hashes_what_it_passes_on(shards):
    import hashlib

    data = (shards / "ptbxl-1-000000.tar").read_bytes()
    with FaultyHTTP(shards) as http:
        http.faults = [Fault("ptbxl-1-000000.tar", 5000, "drop")]
        remote = RemoteShards(backoff=0.0, block_size=1024)
        with ShardReader(remote, f"{http.url}/ptbxl-1-000000.tar") as reader:
            out = b"".join(iter(lambda: reader.read(777), b""))
        assert out == data and reader.hexdigest() == hashlib.sha256(data).hexdigest() and reader.retried == 1


def test_reasons_include_unreachable_shards():
    assert UNREACHABLE in REASONS


@pytest.mark.timeout(300)  # builds the quickstart shards, then moto; slow on a loaded machine
def test_ecglm_shard_writes_to_s3_each_object_once_and_the_manifest_last(tmp_path, formatter):
    from ecglm.commands.shard import run_shard

    config = (Path(__file__).resolve().parents[2] / "shards/quickstart.yaml").read_text()
    for key, value in (
        ("num_train: 720", "num_train: 3"),
        ("num_val: 32", "num_val: 1"),
        ("num_test: 96", "num_test: 2"),
    ):
        config = config.replace(key, value)
    (tmp_path / "shard.yaml").write_text(config)
    with MotoS3() as s3:
        fs = s3.fs()
        fs.mkdir("lab")
        puts: list[str] = []
        original = type(fs).put_file

        args = ["--config", str(tmp_path / "shard.yaml"), "--out_dir", "s3://lab/quick/"]
        args += [
            "--staging_dir",
            str(tmp_path / "stage"),
            "--storage_options",
            f'{{"endpoint_url": "{s3.endpoint}"}}',
        ]

        def spy(self, lpath, rpath, *a, **k):
            puts.append(rpath.rsplit("/", 1)[-1])
            return original(self, lpath, rpath, *a, **k)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(fs), "put_file", spy)
            manifest = run_shard(args)
            names = sorted({e["path"] for split in manifest["splits"].values() for e in split["shards"]})
            assert puts[-1] == "manifest.json" and sorted(puts[:-1]) == names  # each once, manifest last
            puts.clear()
            run_shard(args)  # again: every shard is there already, only the manifest is written
            assert puts == ["manifest.json"]
        for name in names:
            assert fs.cat_file(f"lab/quick/{name}") == (tmp_path / "stage" / name).read_bytes()
        dm = _module(
            "s3://lab/quick", formatter, storage_options={"endpoint_url": s3.endpoint}, block=1 << 20
        )
        assert len(_val(dm)) == manifest["splits"]["val"]["num_qa"]


def _fetch_and_read(url: str, sha256: str, cache: str, out) -> None:
    remote = RemoteShards(cache_dir=cache, backoff=0.0, block_size=1024)
    seen = []
    for _ in range(5):
        path = remote.cached(url, sha256) or remote.fetch(url, sha256)[0]
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # another process dropped it in between: never half of it
            continue
        seen.append(__import__("hashlib").sha256(data).hexdigest() == sha256)
        path.unlink(missing_ok=True)  # the others race to fetch it again
    out.put(all(seen))


def test_processes_sharing_a_cache_never_read_a_partial_copy(shards, tmp_path):
    import multiprocessing as mp

    entry = _shard(shards, "ptbxl-1-000000.tar")
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    with FaultyHTTP(shards) as http:
        url = f"{http.url}/{entry['path']}"
        procs = [
            ctx.Process(target=_fetch_and_read, args=(url, entry["sha256"], str(tmp_path), out))
            for _ in range(4)
        ]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=10)
    assert results == [True] * 4
    assert not list(tmp_path.glob(".partial*"))


def test_a_url_data_dir_passes_the_command_line_check_and_refuses_a_builder():
    from ecglm.commands.lightning import check_data_folder
    from ecglm.errors import EcglmError

    data = {"class_path": "ecglm.data.datamodule.ECGQADataModule", "init_args": {"data_dir": "s3://lab/mix/"}}
    check_data_folder(data)  # read through fsspec in setup, not looked for on disk
    dm = ECGQADataModule("s3://lab/mix/", builder=object())
    assert dm.data_dir == "s3://lab/mix" and dm.remote is not None
    with pytest.raises(EcglmError, match="ecglm shard --config CONFIG --out_dir URL"):
        dm.prepare_data()
    assert ECGQADataModule("file:///tmp/mix").data_dir == Path("/tmp/mix")
