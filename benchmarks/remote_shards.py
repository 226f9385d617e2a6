"""QA pairs/s streamed from a shard folder over HTTP (127.0.0.1) against the same folder on disk, one run.

Writes an ECG-QA-like shard set (float16 12 x 2500 ECGs, ``--qa-per-ecg`` questions each) into a
temporary folder, serves it with the fault-injecting HTTP server of the remote-shard tests
(``tests/data/remote_servers.py``) and reads its training epoch through :class:`ecglm.data.stream.QAStream`
(tar reading, sha256, decoding, checks, one item per QA pair; no tokenisation, which does not
depend on where the shards are) as: the local folder; HTTP streamed (hashed on the fly); HTTP
through ``cache_dir`` cold (first epoch fetches) and warm (next epoch, from disk); HTTP streamed
with 1% of GET requests answered 503 (retried). Conditions alternate over ``--repeats`` rounds; the
best of each is reported. Run:

    .venv/bin/python benchmarks/remote_shards.py [--ecgs 800] [--qa-per-ecg 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ecglm.data.shards import read_manifest, write_manifest, write_shards
from ecglm.data.stream import BadInput, EpochPlan, QAStream, ShardChecksums, ShardInfo
from ecglm.data.stream.remote import RemoteShards, join

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "data"))
from remote_servers import FaultyHTTP


def serve(folder: Path, fail_rate: float, url, counts) -> None:
    """The HTTP server in a process of its own, as a real one would be (not sharing the reader's GIL)."""
    with FaultyHTTP(folder, fail_rate=fail_rate) as http:
        url.put(http.url)
        while True:
            time.sleep(0.2)
            counts[0], counts[1] = http.failed, sum(1 for r in list(http.requests) if r[0] == "GET")


def start(folder: Path, fail_rate: float = 0.0):
    ctx = mp.get_context("fork")
    url, counts = ctx.Queue(), ctx.Array("l", 2)
    process = ctx.Process(target=serve, args=(folder, fail_rate, url, counts), daemon=True)
    process.start()
    return process, url.get(timeout=60), counts


def build(out: Path, ecgs: int, qa_per_ecg: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    samples = (
        {
            "__key__": f"ecg{i}",
            "ecg.npy": rng.standard_normal((12, 2500)).astype(np.float16),
            "json": {
                "dataset": "bench",
                "qa": [{"question": f"q{j} of {i}?", "answer": ["yes"]} for j in range(qa_per_ecg)],
            },
        }
        for i in range(ecgs)
    )
    shards = write_shards(samples, out, "bench", max_samples_per_shard=per_shard)
    split = {"num_qa": ecgs * qa_per_ecg, "datasets": {"bench": ecgs * qa_per_ecg}, "shards": shards}
    write_manifest(
        out, {"dataset": "bench", "preprocessing": {"num_samples": 2500}, "splits": {"train": split}}
    )


def stream(
    base: str, manifest: dict, remote: RemoteShards | None, epoch: int = 0
) -> tuple[int, float, BadInput]:
    entries = manifest["splits"]["train"]["shards"]
    shards = [
        ShardInfo(join(base, e["path"]), "bench", e["num_qa"], e["num_samples"], e["sha256"]) for e in entries
    ]
    plan = EpochPlan(shards, world_size=1, num_workers=1, batch_size=8, seed=0, shuffle=True)
    bad = BadInput({s.url: s.num_samples for s in shards})
    qa = QAStream(plan, 0, bad, 2500, checksums=ShardChecksums("manifest.json"), remote=remote)
    qa.epoch = epoch
    started = time.perf_counter()
    n = sum(1 for _ in qa)
    return n, time.perf_counter() - started, bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ecgs", type=int, default=800)
    parser.add_argument("--qa-per-ecg", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--block-mb", type=float, default=1.0, help="MB per ranged HTTP read")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        build(folder, args.ecgs, args.qa_per_ecg, args.per_shard)
        manifest = read_manifest(folder)
        mb = sum(e["bytes"] for e in manifest["splits"]["train"]["shards"]) / 1e6
        count = len(manifest["splits"]["train"]["shards"])
        print(f"{args.ecgs * args.qa_per_ecg} QA pairs in {count} shards, {mb:.1f} MB")
        best: dict[str, float] = {}
        block = int(args.block_mb * 1e6)
        failed = 0
        (server, http, _), (flaky_server, flaky, counts) = start(folder), start(folder, 0.01)
        try:
            for _ in range(args.repeats):
                cache = Path(tmp) / "cache"
                shutil.rmtree(cache, ignore_errors=True)
                runs = {
                    "local folder": lambda: stream(str(folder), manifest, None),
                    "HTTP, streamed": lambda: stream(http, manifest, RemoteShards(block_size=block)),
                    "HTTP, cache cold": lambda c=cache: stream(
                        http, manifest, RemoteShards(cache_dir=str(c), block_size=block)
                    ),
                    "HTTP, cache warm": lambda c=cache: stream(
                        http, manifest, RemoteShards(cache_dir=str(c), block_size=block)
                    ),
                    "HTTP, 1% of GETs fail": lambda: stream(
                        flaky, manifest, RemoteShards(backoff=0.05, block_size=block)
                    ),
                }
                for name, run in runs.items():
                    n, seconds, bad = run()
                    assert n == args.ecgs * args.qa_per_ecg and not bad.counts, (name, n, bad.counts)
                    best[name] = max(best.get(name, 0.0), n / seconds)
            time.sleep(0.5)
            failed, gets = counts[0], counts[1]
        finally:
            server.terminate()
            flaky_server.terminate()
        local = best["local folder"]
        for name, rate in best.items():
            print(f"{name:<24} {rate:9.0f} QA pairs/s  {rate / local:5.2f}x local")
        print(f"1% failing: {failed} of {gets} GET requests answered 503, every pair recovered")


if __name__ == "__main__":
    main()
