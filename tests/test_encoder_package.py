"""``ecglm.encoders`` is a package of one file per job; every name the 0.1 module had is still imported
from ``ecglm.encoders``, and the entry points in pyproject.toml still name classes there."""

from __future__ import annotations

import re
from pathlib import Path

import ecglm.encoders

REPO = Path(__file__).resolve().parents[1]

#: The public names of the 0.1 module ``ecglm/encoders.py``.
NAMES_0_1 = {
    "ARCHITECTURE_DEFAULTS",
    "FAIRSEQ_ARCHITECTURE_FIELDS",
    "FINETUNING_HEADS",
    "NORMALIZATIONS",
    "PRETRAINED_CONFIG_KEYS",
    "PRETRAINING_ONLY",
    "SAFE_GLOBALS",
    "BackbonePixels",
    "CNNImageEncoder",
    "CheckpointImportError",
    "ConvFeatureExtractor",
    "ConvPositionalEmbedding",
    "ECGEncoder",
    "FairseqLayout",
    "HFVisionEncoder",
    "ImageECGEncoder",
    "Preprocessing",
    "PreprocessingMismatchWarning",
    "RawECGEncoder",
    "SelfAttention",
    "TransformerEncoder",
    "TransformerLayer",
    "ViTImageEncoder",
    "Wav2Vec2ECGEncoder",
    "architecture_from_fairseq",
    "check_preprocessing",
    "convert_fairseq_state_dict",
    "explain_unpickling_error",
    "fairseq_model_config",
    "fairseq_sample_rate",
    "find_fairseq_model_config",
    "load_fairseq_checkpoint",
    "parse_conv_layers",
    "stated_architecture",
    "pixels_to_unit",
}


def test_every_0_1_name_is_exported_from_the_package():
    exported = set(ecglm.encoders.__all__)
    assert sorted(NAMES_0_1 - exported) == []
    assert sorted(name for name in exported if not hasattr(ecglm.encoders, name)) == []


def test_entry_points_name_classes_of_the_package():
    text = (REPO / "pyproject.toml").read_text()
    table = text.split('[project.entry-points."ecglm.encoders"]', 1)[1].split("\n[", 1)[0]
    targets = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', table, re.M))
    assert targets, "no built-in encoders registered"
    for name, target in targets.items():
        module, _, attribute = target.partition(":")
        assert module == "ecglm.encoders", f"{name}: {target} (keep the public path)"
        assert issubclass(getattr(ecglm.encoders, attribute), ecglm.encoders.ECGEncoder), name


def test_no_file_of_the_package_is_over_500_lines():
    sizes = {
        p.name: len(p.read_text().splitlines()) for p in Path(ecglm.encoders.__file__).parent.glob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > 500} == {}
