"""A data set from another package, registered under ``ecglm.sources``: found, checked against
:class:`ecglm.data.source.ShardSource` at discovery (refused naming what is wrong), and built by its
entry-point name as a recipe's ``builder`` names it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import webdataset as wds

from ecglm.plugins import build_component, discover, resolve_class_paths, resolve_cli_args

SOURCE = textwrap.dedent(
    '''
    import numpy as np

    from ecglm.data.source import ShardSource, SourceRecord


    class Ramps(ShardSource):
        """Four records of two patients; each ECG a ramp scaled by its record id."""

        dataset = "ramps"
        question_types = ("size",)
        sampling_rate = 250

        def __init__(self, scale: float = 1.0) -> None:
            self.scale = scale

        @property
        def params(self):
            return {"scale": self.scale}

        def records(self):
            for k in range(4):
                yield SourceRecord(k, f"p{k // 2}", split="train" if k < 3 else "test")

        def items(self, record):
            return [{"question": "How big?", "answer": str(record.record_id), "question_type": "size"}]

        def signal(self, record):
            return self.scale * record.record_id * np.tile(np.linspace(0, 1, 2500), (1, 12, 1))


    class NotASource:
        pass


    class Unfinished(ShardSource):
        dataset = "unfinished"

        @property
        def params(self):
            return {}

        def records(self):
            return iter(())
    '''
)


def install(site: Path, entries: str) -> None:
    """A real installed distribution (dist-info with entry_points.txt) of the module above in ``site``."""
    (site / "ramps_source.py").write_text(SOURCE)
    info = site / "ramps_source-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ramps-source\nVersion: 1.0\n")
    (info / "RECORD").write_text(f"ramps_source.py,,\n{info.name}/METADATA,,\n")
    (info / "entry_points.txt").write_text(f"[ecglm.sources]\n{entries}\n")


def test_a_source_plugin_is_found_and_builds_by_its_name(tmp_path, monkeypatch):
    install(tmp_path, "ramps = ramps_source:Ramps")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = discover(groups=["ecglm.sources"])
    assert registry.plugins["ecglm.sources"]["ramps"].distribution == "ramps-source"
    assert {"synthetic", "ecgqa-mixture", "ecg-instruct-images", "code15"} <= set(
        registry.names("ecglm.sources")
    )

    config = resolve_class_paths({"data": {"init_args": {"builder": {"class_path": "ramps"}}}}, registry)
    spec = config["data"]["init_args"]["builder"] | {"init_args": {"scale": 2.0}}
    manifest = build_component(spec, "ecglm.sources", registry).build(tmp_path / "out")

    assert manifest["dataset"] == "ramps" and manifest["params"] == {"scale": 2.0}
    assert (manifest["splits"]["train"]["num_ecgs"], manifest["splits"]["test"]["num_qa"]) == (3, 1)
    shard = tmp_path / "out" / manifest["splits"]["test"]["shards"][0]["path"]
    (sample,) = list(wds.WebDataset(str(shard), shardshuffle=False).decode())
    assert sample["__key__"] == "ramps_3_w0" and sample["json"]["patient_id"] == "p1"
    np.testing.assert_allclose(sample["ecg.npy"][5, [0, -1]], [0.0, 6.0])


def test_a_source_plugin_that_is_not_a_shard_source_is_refused_naming_why(tmp_path, monkeypatch):
    install(tmp_path, "plain = ramps_source:NotASource\nunfinished = ramps_source:Unfinished")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = discover(groups=["ecglm.sources"])
    errors = {f.plugin.name: f.error for f in registry.failures}
    assert errors == {
        "plain": "ramps_source.NotASource is not a subclass of ecglm.data.source.ShardSource",
        "unfinished": "ramps_source.Unfinished is abstract: it does not implement items",
    }
    assert "plain" not in registry.plugins["ecglm.sources"] and "code15" in registry.plugins["ecglm.sources"]


def test_a_builder_named_on_the_command_line_resolves_and_null_unsets_it():
    registry = discover(groups=["ecglm.sources"])
    assert resolve_cli_args(["--data.init_args.builder", "code15"], registry) == [
        "--data.init_args.builder",
        "ecglm.data.code15.CODE15LabelQA",
    ]
    for unset in (["--data.init_args.builder", "null"], ["--data.init_args.builder=None"]):
        assert resolve_cli_args(unset, registry) == unset
