"""Entry-point discovery, recipe parsing through the CLI, layering, and clear errors for bad input."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ecglm.commands import main
from ecglm.commands.lightning import run_cli
from ecglm.plugins import GROUPS, UnknownComponentError, discover, format_registry, resolve_class_paths
from ecglm.version import __version__

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
    assert "ecglm.backbones.HFBackbone" in out and f"ecglm {__version__}" in out


def write_dist(
    site: Path, dist: str, module: str, body: str, entry: str, group: str = "ecglm.backbones"
) -> None:
    """A real installed distribution (dist-info with entry_points.txt and RECORD) in ``site``."""
    (site / f"{module}.py").write_text(body)
    info = site / f"{dist.replace('-', '_')}-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 9.9\n")
    (info / "RECORD").write_text(f"{module}.py,,\n{info.name}/METADATA,,\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry}\n" if entry else "")


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


def discovered_first(dist: str, monkeypatch) -> None:
    """``discover`` sees the entry points of ``dist`` before every other (the order is the file system's)."""
    import importlib.metadata

    real = importlib.metadata.entry_points

    def ordered(group: str) -> list:
        return sorted(real(group=group), key=lambda ep: ep.dist.name != dist)

    monkeypatch.setattr("ecglm.plugins.entry_points", ordered)


SQUATTER = "from ecglm.backbones import HFBackbone\n\nclass Squatter(HFBackbone): ...\n"


@pytest.mark.parametrize("first", ["squatter", "ecglm"])
def test_a_plugin_cannot_take_a_builtin_name_whatever_the_order(first, tmp_path, monkeypatch):
    write_dist(tmp_path, "squatter", "squatter_backbone", SQUATTER, "hf = squatter_backbone:Squatter")
    monkeypatch.syspath_prepend(str(tmp_path))
    discovered_first(first, monkeypatch)

    registry = discover()

    hf = registry.plugins["ecglm.backbones"]["hf"]
    assert (hf.distribution, hf.class_path) == ("ecglm", "ecglm.backbones.HFBackbone")
    [failure] = registry.failures
    assert (failure.plugin.name, failure.plugin.distribution) == ("hf", "squatter")
    assert (
        f"already registered by ecglm's own ecglm {__version__} (ecglm.backbones.HFBackbone)" in failure.error
    )
    assert "FAILED ecglm.backbones 'hf' from squatter 9.9: " in format_registry(registry)
    config = {"model": {"backbone": {"class_path": "hf"}}}
    assert (
        resolve_class_paths(config, registry)["model"]["backbone"]["class_path"]
        == "ecglm.backbones.HFBackbone"
    )


@pytest.mark.parametrize("first", ["alpha-plugin", "beta-plugin"])
def test_two_plugins_with_one_name_are_both_refused_whatever_the_order(first, tmp_path, monkeypatch):
    for dist in ("alpha-plugin", "beta-plugin"):
        module = dist.replace("-", "_")
        write_dist(tmp_path, dist, module, SQUATTER, f"twin = {module}:Squatter")
    monkeypatch.syspath_prepend(str(tmp_path))
    discovered_first(first, monkeypatch)

    registry = discover()

    assert "twin" not in registry.plugins["ecglm.backbones"]
    assert sorted(f.plugin.distribution for f in registry.failures) == ["alpha-plugin", "beta-plugin"]
    both = "alpha-plugin 9.9 (alpha_plugin.Squatter); beta-plugin 9.9 (beta_plugin.Squatter)"
    for failure in registry.failures:
        assert f"name 'twin' is registered by more than one distribution: {both}" in failure.error
    with pytest.raises(
        UnknownComponentError, match=r"which clashes with another plugin: .*alpha-plugin.*beta-plugin"
    ):
        resolve_class_paths({"model": {"backbone": {"class_path": "twin"}}}, registry)


INVALID = """
from torch import nn
from ecglm.backbones import Backbone
from ecglm.encoders import ECGEncoder

class NoGenerate(Backbone):
    def embed_tokens(self, input_ids): ...
    def forward(self, *args): ...

class NoForward(ECGEncoder): ...

class NotABackbone(nn.Module): ...

def make_backbone(): ...
"""


def test_invalid_components_are_reported_at_discovery(tmp_path, monkeypatch, capsys):
    entries = {
        "ecglm.backbones": [
            "abstract = invalid:NoGenerate",
            "wrong-base = invalid:NotABackbone",
            "function = invalid:make_backbone",
        ],
        "ecglm.encoders": [
            "abstract-encoder = invalid:NoForward",
            "backbone-as-encoder = ecglm.backbones:HFBackbone",
        ],
    }
    write_dist(tmp_path, "invalid-plugin", "invalid", INVALID, "")
    text = "".join(f"[{group}]\n" + "".join(f"{e}\n" for e in lines) for group, lines in entries.items())
    (tmp_path / "invalid_plugin-9.9.dist-info" / "entry_points.txt").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))

    registry = discover()

    errors = {f.plugin.name: f.error for f in registry.failures}
    assert errors == {
        "abstract": "invalid.NoGenerate is abstract: it does not implement generate",
        "wrong-base": "invalid.NotABackbone is not a subclass of ecglm.backbones.Backbone",
        "function": "invalid.make_backbone is a function, not a class",
        "abstract-encoder": "invalid.NoForward is abstract: it does not implement forward",
        "backbone-as-encoder": "ecglm.backbones.HFBackbone is not a subclass of ecglm.encoders.ECGEncoder",
    }
    assert not set(errors) & {name for group in registry.plugins.values() for name in group}
    assert main(["plugins"]) == 1
    assert "FAILED ecglm.backbones 'abstract' from invalid-plugin 9.9: invalid.NoGenerate is abstract" in (
        capsys.readouterr().out
    )


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
    # The command as written: a multi-GPU variant names its recipe first, then itself.
    configs = re.findall(r"--config (\S+)", first_line.split("&&")[0])
    assert configs[-1] == str(recipe.relative_to(REPO)), f"{recipe}: its first line does not run it"
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", *(a for c in configs for a in ("--config", str(REPO / c))), "--print_config"])
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
    """The command's complaint about ``recipe``: it must refuse it with one line and exit status 2."""
    assert main(["fit", "--config", str(recipe), "--print_config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ecglm fit: "), err
    return err


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


@pytest.mark.parametrize(
    ("flags", "class_path"),
    [
        (["--model.backbone.help", "hf"], "ecglm.backbones.HFBackbone"),
        (["--model.connector.help=linear"], "ecglm.connectors.LinearConnector"),
    ],
    ids=["flag-value", "flag=value"],
)
def test_help_for_one_component_takes_its_entry_point_name(flags, class_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *flags])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err
    flag = flags[0].split("=")[0]
    assert f"Help for {flag}={class_path}" in out.out


def test_provenance_names_the_distribution_of_each_component(tmp_path, monkeypatch):
    from ecglm import __version__
    from ecglm.connectors import LinearConnector
    from ecglm.plugins import component_provenance

    write_dist(tmp_path, "provider", "provider_module", "class Thing: ...\n", "")
    monkeypatch.syspath_prepend(str(tmp_path))
    from provider_module import Thing

    class Local:
        pass

    provenance = component_provenance(LinearConnector(), Thing(), Local())

    assert provenance == {
        "ecglm.connectors.LinearConnector": {
            "class_path": "ecglm.connectors.LinearConnector",
            "distribution": "ecglm",
            "version": __version__,
        },
        "provider_module.Thing": {
            "class_path": "provider_module.Thing",
            "distribution": "provider",
            "version": "9.9",
        },
        f"{__name__}.{Local.__qualname__}": {
            "class_path": f"{__name__}.{Local.__qualname__}",
            "distribution": "unknown",
            "version": "unknown",
        },
    }


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
        import ecglm.encoders, ecglm.connectors, ecglm.backbones, ecglm.peft, ecglm.plugins, ecglm.model
        import ecglm.conditions
        import ecglm.bundle, ecglm.records, ecglm.inference, ecglm.data.collate
        above = {"lightning", "pytorch_lightning", "webdataset", "mlflow"}
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in above)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_for_a_prompt_style_as_the_docs_write_it(capsys):
    """``ecglm fit --data.prompt.help plain`` (docs/prompts.md) with no DataModule named before it."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--data.prompt.help", "plain"])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err
    assert "--prompt.prompt_template" in out.out and "--prompt.system_prompt" in out.out
