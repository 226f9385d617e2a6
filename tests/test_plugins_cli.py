"""Entry-point discovery, recipe parsing through the CLI, layering, and clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ecglm.cli import main, run_cli
from ecglm.plugins import GROUPS, UnknownComponentError, discover, format_registry, resolve_class_paths

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))

BUILTINS = {
    "ecglm.encoders": {"wav2vec2", "raw"},
    "ecglm.connectors": {"mlp", "linear", "encoder-free"},
    "ecglm.backbones": {"hf"},
    "ecglm.peft": {"projection-only", "lora", "few-shot-connector"},
}


def test_builtins_register_through_entry_points():
    registry = discover()
    for group, names in BUILTINS.items():
        found = registry.plugins[group]
        assert names <= set(found), f"{group}: {sorted(found)}"
        for name in names:
            assert found[name].distribution == "ecglm" and found[name].version
    assert registry.plugins["ecglm.backbones"]["hf"].class_path == "ecglm.backbones.HFBackbone"


def test_plugins_command_lists_every_group(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for group in GROUPS.values():
        assert f"{group}:" in out
    assert "ecglm.backbones.HFBackbone" in out and "ecglm 0.1.0" in out


def write_dist(site: Path, dist: str, module: str, body: str, entry: str) -> None:
    """A real installed distribution (dist-info with entry_points.txt) in ``site``."""
    (site / f"{module}.py").write_text(body)
    info = site / f"{dist.replace('-', '_')}-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(f"[ecglm.backbones]\n{entry}\n")


def test_broken_plugin_is_reported_and_others_still_load(tmp_path, monkeypatch, capsys):
    body = "raise ImportError('needs libfoo')\n"
    write_dist(tmp_path, "broken-plugin", "broken_backbone", body, "broken = broken_backbone:Backbone")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = discover()
    assert [f.plugin.name for f in registry.failures] == ["broken"]
    failure = registry.failures[0]
    assert failure.plugin.distribution == "broken-plugin" and "needs libfoo" in failure.error
    assert "broken" not in registry.plugins["ecglm.backbones"]
    assert "hf" in registry.plugins["ecglm.backbones"]
    listing = format_registry(registry)
    assert "FAILED ecglm.backbones 'broken' from broken-plugin 9.9: ImportError: needs libfoo" in listing
    assert discover().failures[0].plugin == failure.plugin  # loading twice is safe
    assert main(["plugins"]) == 1  # the listing command says something is wrong
    assert "needs libfoo" in capsys.readouterr().out
    with pytest.raises(UnknownComponentError, match=r"from broken-plugin 9.9, which failed to load: Import"):
        resolve_class_paths({"model": {"backbone": {"class_path": "broken"}}}, registry)


def test_a_second_package_cannot_take_a_registered_name(tmp_path, monkeypatch):
    write_dist(tmp_path, "squatter", "squatter_backbone", "class B: ...\n", "hf = squatter_backbone:B")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = discover()
    assert registry.plugins["ecglm.backbones"]["hf"].distribution in {"ecglm", "squatter"}
    [failure] = registry.failures
    assert failure.plugin.name == "hf" and "already registered by" in failure.error


def test_entry_point_names_resolve_to_import_paths():
    config = {
        "model": {
            "backbone": {"class_path": "hf", "init_args": {"model": "x"}},
            "connector": {"class_path": "MLPConnector"},
        }
    }
    out = resolve_class_paths(config, discover())
    assert out["model"]["backbone"]["class_path"] == "ecglm.backbones.HFBackbone"
    assert out["model"]["connector"]["class_path"] == "ecglm.connectors.MLPConnector"
    with pytest.raises(UnknownComponentError) as err:
        resolve_class_paths({"model": {"backbone": {"class_path": "gpt5"}}}, discover())
    assert "unknown ecglm.backbones component 'gpt5' at model.backbone.class_path" in str(err.value)
    assert "registered names: hf" in str(err.value)


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(r.relative_to(REPO)) for r in RECIPES])
def test_every_recipe_parses(recipe, capsys):
    first_line = recipe.read_text().splitlines()[0]
    assert first_line.startswith("# ecglm "), f"{recipe}: the first line must be the command that runs it"
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", str(recipe), "--print_config"])
    assert exit_.value.code == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["backbone"]["class_path"].count(".") >= 1  # entry-point names were resolved


def test_recipes_found_in_subfolders():
    assert any(r.parent == REPO / "recipes" for r in RECIPES)
    assert len(RECIPES) == len(list((REPO / "recipes").glob("**/*.yaml")))


def broken_recipe(tmp_path: Path, old: str, new: str) -> Path:
    text = (REPO / "recipes" / "quickstart.yaml").read_text()
    assert old in text
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def parse_error(recipe: Path, capsys) -> str:
    """The CLI's complaint about ``recipe`` (it must refuse it)."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", str(recipe), "--print_config"])
    assert exit_.value.code != 0
    return capsys.readouterr().err


def test_unknown_component_name_lists_what_exists(tmp_path, capsys):
    err = parse_error(broken_recipe(tmp_path, "class_path: hf ", "class_path: gpt5 "), capsys)
    assert "unknown ecglm.backbones component 'gpt5'" in err and "registered names: hf" in err


def test_entry_point_names_in_command_line_flags_resolve():
    from ecglm.plugins import UnknownComponentError, resolve_cli_args

    registry = discover()
    args = ["fit", "--model.encoder.class_path=raw", "--model.connector.class_path", "linear", "--x", "raw"]
    assert resolve_cli_args(args, registry) == [
        "fit",
        "--model.encoder.class_path=ecglm.encoders.RawECGEncoder",
        "--model.connector.class_path",
        "ecglm.connectors.LinearConnector",
        "--x",
        "raw",
    ]
    with pytest.raises(UnknownComponentError, match=r"unknown ecglm\.backbones component 'gpt5'"):
        resolve_cli_args(["--model.backbone.class_path=gpt5"], registry)


def test_recipe_with_a_wrong_type_names_the_key(tmp_path, capsys):
    err = parse_error(broken_recipe(tmp_path, "num_tokens: 1", "num_tokens: four"), capsys)
    assert "num_tokens" in err and "four" in err


def test_missing_shards_name_the_folder(tmp_path):
    from ecglm.data.datamodule import ECGQADataModule

    data = ECGQADataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.setup("fit")


def test_component_layer_imports_without_lightning():
    code = textwrap.dedent(
        """
        import sys
        import ecglm.encoders, ecglm.connectors, ecglm.backbones, ecglm.peft, ecglm.plugins
        above = {"lightning", "pytorch_lightning", "webdataset", "mlflow"}
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in above)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
