"""``ecglm.backbones`` is a package of one file per job: every public name of the former module is
imported from ``ecglm.backbones``, the entry points name classes there, and the names ecglm 0.1 had
there and that moved since resolve, with a DeprecationWarning naming their new place."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import ecglm.backbones
from ecglm_testing import REPO

#: The public names of the module ``ecglm/backbones.py`` before it became a package.
MODULE_NAMES = {
    "ATTENTION_LAYER_TYPES",
    "CROSS_ATTENTION_FAMILIES",
    "IMAGE_TOKEN_FAMILIES",
    "MULTIMODAL_ROPE_FAMILIES",
    "RECURRENT_CONFIG_FIELDS",
    "VISION_MODULES",
    "Backbone",
    "DType",
    "HFBackbone",
    "Quantization",
    "VisionLanguageBackbone",
    "answer_loss",
    "answer_span",
    "keep_4bit_layout_on_cpu",
    "positions_from_mask",
    "processor_chat_template",
    "quantized_device_map",
    "resolve_model_path",
    "torch_dtype",
}
#: Names of ecglm 0.1's ``ecglm.backbones`` that live elsewhere since, and where.
MOVED_0_1 = {
    "ECG_MARKER": "ecglm.prompts",
    "EncodedChat": "ecglm.prompts",
    "IGNORE_INDEX": "ecglm.batch",
    "KERNEL_DISTRIBUTIONS": "ecglm.kernels",
    "kernel_bindings": "ecglm.kernels",
    "log_kernels": "ecglm.kernels",
    "PrefixCache": "ecglm.prefix_reuse",
    "PrefixReuseUnsupported": "ecglm.prefix_reuse",
    "PrefixState": "ecglm.prefix_reuse",
    "REUSABLE_CACHE_LAYERS": "ecglm.prefix_reuse",
    "SuffixLayout": "ecglm.prefix_reuse",
    "batch_cache": "ecglm.prefix_reuse",
    "prefix_state": "ecglm.prefix_reuse",
}


def test_every_name_of_the_module_is_exported_from_the_package():
    exported = set(ecglm.backbones.__all__)
    assert sorted(MODULE_NAMES - exported) == []
    assert sorted(name for name in exported if not hasattr(ecglm.backbones, name)) == []


@pytest.mark.parametrize("name", sorted(MOVED_0_1))
def test_a_name_that_moved_warns_and_is_the_new_one(name):
    where = MOVED_0_1[name]
    with pytest.warns(
        DeprecationWarning, match=rf"ecglm\.backbones\.{name} is deprecated .* 0\.3\.0: use {where}"
    ):
        old = getattr(ecglm.backbones, name)
    assert old is getattr(importlib.import_module(where), name)


def test_chat_formatter_is_a_prompt_style_stand_in():
    from ecglm.prompts import PromptStyle

    with pytest.warns(DeprecationWarning, match=r"use ecglm\.prompts\.PromptStyle .*data\.init_args\.prompt"):
        assert issubclass(ecglm.backbones.ChatFormatter, PromptStyle)
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        ecglm.backbones.NoSuchName  # noqa: B018


def test_entry_points_name_classes_of_the_package():
    text = (REPO / "pyproject.toml").read_text()
    table = text.split('[project.entry-points."ecglm.backbones"]', 1)[1].split("\n[", 1)[0]
    targets = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', table, re.M))
    assert targets, "no built-in backbones registered"
    for name, target in targets.items():
        module, _, attribute = target.partition(":")
        assert module == "ecglm.backbones", f"{name}: {target} (keep the public path)"
        assert issubclass(getattr(ecglm.backbones, attribute), ecglm.backbones.Backbone), name


def test_no_file_of_the_package_is_over_500_lines():
    folder = Path(ecglm.backbones.__file__).parent
    sizes = {p.name: len(p.read_text().splitlines()) for p in folder.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 500} == {}
