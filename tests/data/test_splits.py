"""The split names and the hash behind MIMIC's patient split and the evaluation subsets."""

from __future__ import annotations

import hashlib

import numpy as np

from ecglm.data.datamodule import subset_fraction
from ecglm.data.sources import mimic_split
from ecglm.data.splits import SPLITS, hash_uniform


def test_hash_uniform_is_blake2b_in_unit_interval_and_uniform():
    digest = hashlib.blake2b(b"mimic-iv-ecg:10000032", digest_size=8).digest()
    assert hash_uniform("mimic-iv-ecg:10000032") == int.from_bytes(digest, "big") / 2**64
    u = np.array([hash_uniform(f"name{i}") for i in range(20_000)])
    assert u.min() >= 0.0 and u.max() < 1.0
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 1_800  # ~2,000 per bin


def test_subsets_and_mimic_splits_use_the_same_hash():
    assert subset_fraction(3, "key0") == hash_uniform("3:key0")
    for subject in range(200):
        u = hash_uniform(f"mimic-iv-ecg:{subject}")
        assert mimic_split(subject) == ("train" if u < 0.8 else "val" if u < 0.9 else "test")
    assert SPLITS == ("train", "val", "test")
