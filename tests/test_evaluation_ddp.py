"""Under DDP, every rank scores its own share of the answers; the synced result must equal one process
scoring them all. Two CPU processes over gloo, as Lightning's DDP strategy would run them."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ecglm.evaluation import AnswerEvaluation, MetricsConfig

DATASETS = ["ecgqa-ptbxl", "pulse-ecg-instruct"]
TYPES = ["single-verify", "single-query", "report"]
VOCABULARY = ["yes", "no", "none", "left ventricular hypertrophy", "first degree av block"]
REFERENCES = [
    (["yes"], "ecgqa-ptbxl", "single-verify"),
    (["none"], "ecgqa-ptbxl", "single-query"),
    (["left ventricular hypertrophy", "first degree av block"], "ecgqa-ptbxl", "single-query"),
    (["no"], "ecgqa-ptbxl", "single-verify"),
    ("sinus rhythm with left ventricular hypertrophy", "pulse-ecg-instruct", "report"),
    ("atrial fibrillation with rapid ventricular response", "pulse-ecg-instruct", "report"),
    (["first degree av block"], "ecgqa-ptbxl", "single-query"),
]
PREDICTIONS = [
    "yes",
    "none",
    "first degree av block, left ventricular hypertrophy",
    "yes",
    "sinus rhythm, left ventricular hypertrophy",
    "atrial flutter",
    "sinus bradycardia",
]


def _evaluation() -> AnswerEvaluation:
    config = MetricsConfig(
        metrics=("acc", "f1", "bleu4", "rouge_l"),
        bertscore_model=None,
        label_vocabularies={"ecgqa-ptbxl": VOCABULARY},
    )
    return AnswerEvaluation(config, DATASETS, TYPES, conditions=("ecg",))


def _score(rows: list[int]) -> dict:
    evaluation = _evaluation()
    batch = SimpleNamespace(  # the per-row fields of an ECGQABatch that evaluation reads
        key=[f"k{i}" for i in rows],
        answer=[REFERENCES[i][0] for i in rows],
        dataset=[REFERENCES[i][1] for i in rows],
        question_type=[REFERENCES[i][2] for i in rows],
    )
    evaluation.update("ecg", [PREDICTIONS[i] for i in rows], batch)
    return evaluation.compute()


def _rank(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Uneven shares, as a DistributedSampler's last batch can be.
        result = _score(list(range(rank, len(REFERENCES), world)))
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_two_ranks_give_the_single_process_result(tmp_path):
    out = tmp_path / "rank0.json"
    mp.spawn(_rank, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    synced = json.loads(out.read_text())
    single = json.loads(json.dumps(_score(list(range(len(REFERENCES))))))

    key = lambda r: r["key"]  # noqa: E731
    assert sorted(synced.pop("records"), key=key) == sorted(single.pop("records"), key=key)
    assert _close(synced, single)


def _close(a, b) -> bool:
    """Nested equality with floats compared to 1e-9 (sums of float64 states in another order)."""
    if isinstance(a, dict):
        assert set(a) == set(b), (sorted(a), sorted(b))
        return all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b)
        return all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-9), (a, b)
        return True
    assert a == b, (a, b)
    return True


def test_single_process_numbers_are_the_hand_computed_ones():
    ecg = _score(list(range(len(REFERENCES))))["conditions"]["ecg"]
    # Exact matches: rows 0, 1, 2 of PTB-XL's five answers; none of PULSE's two reports.
    assert ecg["datasets"]["ecgqa-ptbxl"]["acc"] == pytest.approx(3 / 5)
    assert ecg["datasets"]["pulse-ecg-instruct"]["acc"] == 0.0
    assert ecg["datasets"]["all"]["n"] == 7.0
    assert ecg["question_types"]["single-query"]["acc"] == pytest.approx(2 / 3)
