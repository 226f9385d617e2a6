"""``ecglm benchmark fetch``: ECGBench read with ``datasets.load_dataset`` from a local copy of a hub
dataset repository laid out as ``PULSE-ECG/ECGBench`` is (a parquet file per subset, its configs in the
README's metadata; columns id, image_path, image, conversations), written in the layout PULSE's README
writes, which ``ecglm benchmark run`` reads; resumed, and refusing a path out of ``images/``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ecglm.benchmarks.ecgbench import read_subset
from ecglm.commands import main

CONFIGS = """---
configs:
- config_name: ptb-test
  data_files:
  - split: test
    path: data/ptb-test/test.parquet
- config_name: mmmu-ecg
  data_files:
  - split: test
    path: data/mmmu-ecg/test.parquet
---
"""


def _picture(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _rows(prefix: str, questions: list[tuple[str, str]], folder: str = "ptb-xl") -> dict[str, list]:
    return {
        "id": [f"{prefix}-{i}" for i in range(len(questions))],
        "image_path": [f"{folder}/{prefix}-{i}.png" for i in range(len(questions))],
        "image": [_picture(100 * len(prefix) + i) for i in range(len(questions))],
        "conversations": [
            [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}] for q, a in questions
        ],
    }


def _write_repo(root, subsets: dict[str, dict[str, list]]):
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image_path": datasets.Value("string"),
            "image": datasets.Image(),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        }
    )
    for name, rows in subsets.items():
        (root / "data" / name).mkdir(parents=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(root / "data" / name / "test.parquet")
    (root / "README.md").write_text(CONFIGS)
    return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_fetch_writes_the_distributed_layout_that_run_reads_and_keeps_what_is_there(tmp_path, hub_cache):
    ptb = _rows("ptb", [("Which diagnostic classes?", "NORM"), ("Which diagnostic classes?", "MI; STTC")])
    mmmu = _rows("mmmu", [("Which rhythm? A. sinus B. AF", "A")], folder="mmmu-ecg")
    repo = _write_repo(tmp_path / "repo", {"ptb-test": ptb, "mmmu-ecg": mmmu})
    out = tmp_path / "ECGBench"
    args = ["benchmark", "fetch", "--out", str(out), "--repo", str(repo)]
    assert main([*args, "--subsets", "ptb-test", "--subsets", "mmmu-ecg"]) == 0
    written = json.loads((out / "ptb-test.json").read_text())
    assert written == [
        {"id": "ptb-0", "image": "ptb-xl/ptb-0.png", "conversations": ptb["conversations"][0]},
        {"id": "ptb-1", "image": "ptb-xl/ptb-1.png", "conversations": ptb["conversations"][1]},
    ]
    for i in range(2):  # the pictures as the dataset holds them, pixel for pixel
        saved = np.asarray(Image.open(out / "images" / "ptb-xl" / f"ptb-{i}.png"))
        assert np.array_equal(saved, np.asarray(ptb["image"][i]))
    items = read_subset(out, "mmmu-ecg")
    assert [(item.id, item.image, item.gold) for item in items] == [("mmmu-0", "mmmu-ecg/mmmu-0.png", "A")]
    # A rerun keeps the pictures already written (a fetch cut short resumes where it stopped).
    picture = out / "images" / "ptb-xl" / "ptb-0.png"
    before = picture.stat().st_mtime_ns
    assert main([*args, "--subsets", "ptb-test"]) == 0
    assert picture.stat().st_mtime_ns == before


def test_fetch_refuses_a_path_out_of_images_and_an_unknown_config(tmp_path, hub_cache, capsys):
    evil = _rows("ptb", [("Which diagnostic classes?", "NORM")])
    evil["image_path"] = ["../../escaped.png"]
    repo = _write_repo(tmp_path / "repo", {"ptb-test": evil, "mmmu-ecg": _rows("m", [("Q?", "A")])})
    out = tmp_path / "ECGBench"
    args = ["benchmark", "fetch", "--out", str(out), "--repo", str(repo), "--subsets"]
    assert main([*args, "ptb-test"]) == 2
    assert "item 'ptb-0' has image_path '../../escaped.png', outside images/" in capsys.readouterr().err
    assert not (tmp_path / "escaped.png").exists() and not (out / "ptb-test.json").exists()
    assert main([*args, "cpsc-test"]) == 2  # a subset the copy does not hold
    assert "cannot load it with datasets" in capsys.readouterr().err
