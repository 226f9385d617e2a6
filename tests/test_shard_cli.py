"""``ecglm shard``: builds shards from a config, idempotently, and names bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecglm.commands import main
from ecglm.commands.shard import run_shard
from ecglm.data.shards import read_manifest

REPO = Path(__file__).resolve().parents[1]


def test_shard_command_builds_then_keeps_an_up_to_date_folder(tmp_path, capsys):
    config = (REPO / "shards/quickstart.yaml").read_text()
    for key, value in (
        ("num_train: 720", "num_train: 3"),
        ("num_val: 32", "num_val: 1"),
        ("num_test: 96", "num_test: 2"),
    ):
        assert key in config
        config = config.replace(key, value)
    config = config.replace("out_dir: shards/quickstart", f"out_dir: {tmp_path / 'out'}")
    (tmp_path / "shard.yaml").write_text(config)

    assert main(["shard", "--config", str(tmp_path / "shard.yaml")]) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["splits"]["train"]["num_qa"] == 6 and manifest["splits"]["test"]["num_ecgs"] == 2
    assert "train 3 ECGs, 6 QA pairs in 1 shards" in capsys.readouterr().out
    shard = tmp_path / "out" / manifest["splits"]["train"]["shards"][0]["path"]
    mtime = shard.stat().st_mtime_ns
    assert run_shard(["--config", str(tmp_path / "shard.yaml")]) == manifest
    assert shard.stat().st_mtime_ns == mtime  # up to date: nothing rewritten


def test_a_build_never_deletes_another_data_sets_shards(tmp_path, capsys):
    """A builder rebuilds a stale build of its own data set, but a folder holding another data set's shards
    (preference pairs, say) is refused and left as it was."""
    out = tmp_path / "pairs"
    out.mkdir()
    manifest = '{"dataset": "preference-pairs", "splits": {}}'
    (out / "manifest.json").write_text(manifest)
    (out / "train-000000.tar").write_bytes(b"the pairs")
    config = (REPO / "shards/quickstart.yaml").read_text()
    config = config.replace("out_dir: shards/quickstart", f"out_dir: {out}")
    (tmp_path / "shard.yaml").write_text(config)
    assert main(["shard", "--config", str(tmp_path / "shard.yaml")]) == 2
    err = capsys.readouterr().err
    assert "holds preference-pairs shards" in err
    assert "building synthetic-heart-qa there would delete them" in err
    assert (out / "manifest.json").read_text() == manifest
    assert (out / "train-000000.tar").read_bytes() == b"the pairs"


def test_shard_command_names_a_bad_builder_argument(tmp_path, capsys):
    config = (REPO / "shards/quickstart.yaml").read_text().replace("num_val: 32", "num_val: many")
    (tmp_path / "shard.yaml").write_text(config)
    assert main(["shard", "--config", str(tmp_path / "shard.yaml")]) == 2
    err = capsys.readouterr().err
    assert "builder.init_args.num_val: expected int, got 'many'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("config", sorted((REPO / "shards").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shard_config_parses(config):
    from ecglm.commands.shard import shard_parser

    assert config.read_text().startswith("# ecglm shard --config shards/"), "first line: the command"
    parsed = shard_parser().parse_args(["--config", str(config)])
    assert "." in parsed.builder.class_path and parsed.out_dir.startswith("shards/")


def test_a_shard_config_with_0_1_normalisation_builds_with_a_warning(tmp_path):
    from ecglm.commands.shard import shard_parser

    text = (REPO / "shards/ecg-qa-mix.yaml").read_text()
    assert "    normalization: zscore " in text
    (tmp_path / "old.yaml").write_text(
        text.replace("    normalization: zscore ", "    normalisation: minmax ")
    )
    parser = shard_parser()
    with pytest.warns(DeprecationWarning, match=r"builder\.init_args\.normalisation.*use normalization"):
        builder = parser.instantiate_classes(
            parser.parse_args(["--config", str(tmp_path / "old.yaml")])
        ).builder
    assert builder.config.normalization == "minmax"
    assert builder.params["preprocessing"]["normalisation"] == "minmax"  # the manifest as 0.1 wrote it
