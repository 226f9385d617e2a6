# ruff: noqa: E501 - the digests below are longer than a line
"""The built-in shard builders write the same bytes as before they were re-expressed on
:class:`ecglm.data.source.ShardSource`: every shard's sha256 and the manifest's (its absolute input
paths and the inputs' mtime fingerprint put aside) are pinned to the digests the 0.x builders wrote
from the same fixture inputs (recorded on main before the change, scipy/numpy/Pillow at constraints.txt).

To record them again after a change that is meant to alter the shards:
``ECGLM_PRINT_DIGESTS=1 pytest -q -s tests/data/test_source_golden.py`` prints each builder's digests.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

from ecglm.data.ecg_instruct import ECGInstructImages
from ecglm.data.mixture import ECGQAMixture
from ecglm.data.shards import json_bytes
from ecglm.data.synthetic import SyntheticHeartQA

GOLDEN: dict[str, dict[str, str]] = {
    "synthetic": {
        "manifest": "de5081abb7891fc6675e765b0002e0ed72b7b999b2ea8696843f2bf438d1a721",
        "test-000000.tar": "52aff99db667f536b8e27b6676dab8784d3bbc0405d6d0ef8491a2fff7992de9",
        "test-000001.tar": "3949320b504955e10ccfb2b3f9a8710fd47279d5c0eeff56a6c4db79fc6b4dce",
        "train-000000.tar": "3d6631339d30adcdcd345a55fa630fe1c17b098bb2693014c89627f1a5a95569",
        "train-000001.tar": "d0b1462cfdbd2e3bc2c4f14ece69eb548f9cfeebf894f072fba3a809f1914e59",
        "train-000002.tar": "ab0aae1e0a0460e7c3cae40f1069ce9b9205ce238cfc4130c3dd538535ed72b8",
        "val-000000.tar": "9fce60e9cd14bd86a92dabe65d1f3e7fd98d1f568f6b5f4a257b34239d20572b",
    },
    "ecgqa-mixture": {
        "manifest": "6d1cc0d606f9501f520f337f123c7408d4f475c173db561bb2fa17cd2e96961d",
        "test-ecgqa-mimic-iv-ecg-000000.tar": "78c33f112a0148505ba7b51dd75c38d3879f859a586d4246608e6cb4d8d6eb73",
        "test-ecgqa-ptbxl-000000.tar": "3eb0205d3150d1e237cb93dc90613beec67bdfa6e7b3bb407aea7de98b1c147f",
        "train-comparison-ecgqa-mimic-iv-ecg-000000.tar": "f99ca9be884477a640bbe7d4f508218f000ce8d7774c07e455de5bc01f5c7c15",
        "train-comparison-ecgqa-ptbxl-000000.tar": "bee269e451147bf04dd00ab189dedda437a2f51ecd1fa893adfd4d2b54568270",
        "train-ecgqa-mimic-iv-ecg-000000.tar": "f72ed899a0094f6d61a43b5f49b4804cf8d3d8f6d52798e2d27eb8a690a63483",
        "train-ecgqa-ptbxl-000000.tar": "87412033c25b361a658a48c63095c7d0e66f153ca53a47e1b48c77e97a1d3918",
        "train-pulse-ecg-instruct-000000.tar": "248cc7548731aab4fd4739abef6d445b3e7108e6528296f446a6dc98b8a4833f",
        "val-ecgqa-mimic-iv-ecg-000000.tar": "5a95f3458757b9434d2fa35216eef020c02f703597e67378e2906e2d9ebbf07b",
        "val-ecgqa-ptbxl-000000.tar": "64947a7ca166d0318907a9071a8de9a60943f49a17ad007d53dfce8c5b2e8da7",
        "val-pulse-ecg-instruct-000000.tar": "36a56f6e81ea1fae7c35fb6baece9e59b7c77768f9633c853f04588d5da87c8a",
    },
    "ecgqa-mixture-windows": {
        "manifest": "3786a0fe351c7fb5621a63e4b3bb5d2c06241c48ac46feea0a8ce5c259ee7d5d",
        "test-ecgqa-mimic-iv-ecg-000000.tar": "09f033da6871717d4f9ec0304a356fad5a642a983db5fea0419ed77422d5d007",
        "test-ecgqa-ptbxl-000000.tar": "e99afd3d2c8cc2160c61732bfa025cdd34c74b4319142d6614fa8fdc74bbf0bc",
        "test-ecgqa-ptbxl-000001.tar": "454d64a92af95ec99c818cd8b608f86b7be1219567a89051dc3522642bc1a812",
        "train-comparison-ecgqa-mimic-iv-ecg-000000.tar": "607b86a2950f675612ea1345058774f67c91f92aae280d354c2ca8d602e38e1d",
        "train-comparison-ecgqa-ptbxl-000000.tar": "0db54d7c94c6323727f68031b49b1c9414dce65fb6db4750a7bef985a528cad4",
        "train-ecgqa-mimic-iv-ecg-000000.tar": "1b16ae9ae5b5fc8cbb7eead34617c2af76b81f8b92b0a3bef31807a446052bab",
        "train-ecgqa-ptbxl-000000.tar": "7c1fc9898785c3679cd9c574371495a64e3f285f0606bad0916f41c88cfa5987",
        "train-ecgqa-ptbxl-000001.tar": "f0462cb91a38a7db061996c6195ebb92008bf454ed9a4aec54e3b5ca000b2fee",
        "train-pulse-ecg-instruct-000000.tar": "2128542e18114fbc04f719820704ca268b3afa03ba10e831c89b3e7d5a591d9f",
        "val-ecgqa-mimic-iv-ecg-000000.tar": "d9d376db14e26ece794be622b034d011f2a2cbc669144471033d37bf2538920b",
        "val-ecgqa-ptbxl-000000.tar": "128e323eeaa45ddedd7e117036c71de9f5b1660ccfe95887c835757fa2faa031",
        "val-pulse-ecg-instruct-000000.tar": "bd35233e1d3b5220d4d5cc0f7bc985c7fd96288a3919ae23ca2b089082baa865",
    },
    "ecg-instruct-images": {
        "manifest": "cdc3a3fc597ed7fe572549d2dd0859e3df36e06f062a190c92bc26c59d78e549",
        "test-000000.tar": "03d95aa216323ae3de4186e5547d9eb14d44e7590c6c21d2e4926c01fe48cc71",
        "train-000000.tar": "0b13ee546b4f0fe12206ca839ac2e59171b7cc552d7bca13532f5708f3d6fa34",
        "train-000001.tar": "69e2d8dbe9df6c187a0a698f9b88450c41b53e0ebe8407af15b8e1b499489dc0",
        "train-000002.tar": "2c73dacc32f96dc66c151bb3465ca385e9a4b1e77817d2da2ebaface9a2a6ec8",
        "train-000003.tar": "90ef7b536de46e8073bf61df9cb3d195f835e0810830d9257ebb457883d2649a",
        "val-000000.tar": "41ac91bb6b14a66f8df2db313a65e506bdb892898b8dbb4ab61a95d9ac380c5f",
    },
}


def _digests(out_dir: Path, manifest: dict, roots: list[Path]) -> dict[str, str]:
    text = json.dumps(manifest, sort_keys=True)
    for root in roots:
        text = text.replace(json.dumps(str(root))[1:-1], "<root>")
    normalised = json.loads(text)
    normalised.pop("inputs_fingerprint", None)
    normalised.get("params", {}).pop("inputs_fingerprint", None)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out_dir.glob("*.tar"))}
    digests["manifest"] = hashlib.sha256(json_bytes(normalised)).hexdigest()
    return digests


def _check(name: str, digests: dict[str, str]) -> None:
    if os.environ.get("ECGLM_PRINT_DIGESTS"):
        print(f"\n    {name!r}: {json.dumps(digests, indent=8, sort_keys=True)},")
        return
    assert digests == GOLDEN[name]


def _png(shade: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (shade, 255 - shade, shade // 2)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_synthetic_shards_are_byte_identical_to_the_recorded_build(tmp_path, ptb_record):
    builder = SyntheticHeartQA(
        num_train=5, num_val=2, num_test=3, max_samples_per_shard=2, seconds=4.0, beat_source=str(ptb_record)
    )
    _check("synthetic", _digests(tmp_path, builder.build(tmp_path), [ptb_record, tmp_path]))


def test_ecgqa_mixture_shards_are_byte_identical_to_the_recorded_build(tmp_path, sources):
    manifest = ECGQAMixture(**sources, max_samples_per_shard=2).build(tmp_path)
    roots = sorted({Path(p).parent for p in sources.values()}, key=lambda p: -len(str(p)))
    _check("ecgqa-mixture", _digests(tmp_path, manifest, roots))


def test_ecgqa_mixture_windows_are_byte_identical_to_the_recorded_build(tmp_path, sources):
    manifest = ECGQAMixture(**sources, seconds=4.0, window="all", max_samples_per_shard=3).build(tmp_path)
    roots = sorted({Path(p).parent for p in sources.values()}, key=lambda p: -len(str(p)))
    _check("ecgqa-mixture-windows", _digests(tmp_path, manifest, roots))


def test_ecg_instruct_image_shards_are_byte_identical_to_the_recorded_build(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    items = []
    for i in range(12):
        (root / f"{i}.png").write_bytes(_png(20 * i))
        turns = [{"from": "human", "value": "<image>\nRhythm?"}, {"from": "gpt", "value": f"answer {i}"}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "Rate?"}, {"from": "gpt", "value": f"{60 + i} bpm"}]
        items.append({"id": f"item{i}", "image": f"{i}.png", "conversations": turns})
    items.insert(2, {"id": "gone", "image": "missing.png", "conversations": items[0]["conversations"]})
    (tmp_path / "ECGInstruct.json").write_text(json.dumps(items))
    builder = ECGInstructImages(
        str(tmp_path / "ECGInstruct.json"),
        str(root),
        val_fraction=0.2,
        test_fraction=0.2,
        max_samples_per_shard=2,
    )
    out = tmp_path / "shards"
    _check("ecg-instruct-images", _digests(out, builder.build(out), [tmp_path]))
