"""A user's mistake is one line naming the file, key or name at fault (exit status 2), found before any
LLM loads; ``--debug`` adds the traceback.

docs/errors.md's table is this file's output: ``ECGLM_WRITE_DOCS=1 pytest tests/test_user_errors.py``
writes it; the test fails when the docs and the behaviour differ.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from ecglm.commands import main
from ecglm_testing import REPO

QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
FIT = ["fit", "--config", QUICKSTART]
QUESTION = ["--question", "Rate?"]
LEADS = "I,II,III,aVR,aVL,aVF,V1,V2,V3,V4,V5,V6"


def _recipe(tmp: Path, old: str, new: str) -> str:
    text = Path(QUICKSTART).read_text()
    assert old in text
    path = tmp / "recipe.yaml"
    path.write_text(text.replace(old, new, 1))
    return str(path)


def _file(tmp: Path, name: str, data: bytes = b"") -> str:
    path = tmp / name
    path.write_bytes(data)
    return str(path)


def _npy(tmp: Path) -> str:
    np.save(tmp / "ecg.npy", np.zeros((12, 2500)))
    return str(tmp / "ecg.npy")


def _pair_shards(tmp: Path) -> str:
    """A folder of another data set's shards (as ecglm shard writes preference pairs)."""
    (tmp / "pairs").mkdir()
    (tmp / "pairs" / "manifest.json").write_text('{"dataset": "preference-pairs", "splits": {}}')
    return str(tmp / "pairs")


#: (what the user did, the command as a function of a scratch folder, what ecglm says: a regex).
CASES = [
    (
        "an unknown component name in a recipe",
        lambda t: ["fit", "--config", _recipe(t, "class_path: wav2vec2 ", "class_path: wav2vec3 ")],
        r"unknown ecglm\.encoders component 'wav2vec3' at model\.encoder\.class_path; registered names: "
        r".*wav2vec2",
    ),
    (
        "an unknown name as a flag",
        lambda t: [*FIT, "--model.encoder.class_path", "wav2vec3"],
        r"unknown ecglm\.encoders component 'wav2vec3' .*registered names: .*wav2vec2",
    ),
    (
        "an unknown name in the short form",
        lambda t: [*FIT, "--model.encoder", "wav2vec3"],
        r"unknown ecglm\.encoders component 'wav2vec3' .*registered names: .*wav2vec2",
    ),
    (
        "a value of the wrong type",
        lambda t: [*FIT, "--data.init_args.batch_size", "four"],
        r"^data\.init_args\.batch_size: expected int, got 'four'$",
    ),
    (
        "a key no component takes",
        lambda t: [*FIT, "--model.connector.init_args.num_tokenz", "4"],
        r"num_tokenz",
    ),
    (
        "no data folder",
        lambda t: [*FIT, "--data.init_args.data_dir", "null"],
        r"^data\.init_args\.data_dir is not set: give the folder of the shards",
    ),
    (
        "a data folder with no shards and no builder",
        lambda t: [*FIT, "--data.init_args.builder", "null", "--data.init_args.data_dir", str(t / "none")],
        r"^data\.init_args\.data_dir .*none: no manifest\.json there; build the shards first",
    ),
    (
        "a builder pointed at another data set's shards",
        lambda t: [*FIT, "--data.init_args.data_dir", _pair_shards(t)],
        r"^TMP/pairs holds preference-pairs shards \(TMP/pairs/manifest\.json\); building synthetic-heart-qa "
        r"there would delete them: give this build another folder",
    ),
    (
        "a truncated checkpoint",
        lambda t: [*FIT, "--ckpt_path", _file(t, "cut.ckpt", b"PK\x03\x04 cut short")],
        r"cut\.ckpt is not a complete checkpoint",
    ),
    (
        "a checkpoint that is not there",
        lambda t: ["evaluate", "--config", QUICKSTART, "--ckpt_path", str(t / "absent.ckpt")],
        r"absent\.ckpt",
    ),
    (
        "a bundle folder that is not one",
        lambda t: ["ask", "--model", str(t), "--record", _npy(t), "--fs", "250", "--leads", LEADS, *QUESTION],
        r"ecglm\.yaml not found: .* is not an ecglm bundle \(ecglm export writes one\)$",
    ),
    (
        "an ECG format no installed reader reads",
        lambda t: ["ask", "--model", str(t), "--record", _file(t, "ecg.scp"), *QUESTION],
        r"^no readable ECG file to answer: .*ecg\.scp: unknown ECG format \(supported: \.bdf, \.csv, \.dcm",
    ),
    (
        "two sources for ask",
        lambda t: ["ask", "--model", str(t), "--record", "a.hea", "--image", "b.png", *QUESTION],
        r"^give one of --record FILE, --records FOLDER_OR_LIST, --image PNG$",
    ),
    (
        "no question",
        lambda t: ["ask", "--model", str(t), "--record", "a.hea"],
        r"^give --question TEXT or --questions FILE",
    ),
    (
        "a flag ask does not have",
        lambda t: ["ask", "--model", str(t), "--recrod", "a.hea", *QUESTION],
        r"unrecognized arguments: --recrod a\.hea",
    ),
    (
        "two examples for the demo page",
        lambda t: ["demo", "--model", str(t), "--example", "a.hea", "--synthetic_example", "true"],
        r"give --example RECORD or --synthetic_example, not both$",
    ),
    (
        "a demo example that is not there",
        lambda t: ["demo", "--model", str(t), "--example", str(t / "absent.hea")],
        r"absent",
    ),
    (
        "a record that is not there",
        lambda t: ["render", "--record", str(t / "absent.hea"), "--out", str(t / "x.png")],
        r"absent: .*needs its \.hea and the data files it names",
    ),
    (
        "a .npy without its rate",
        lambda t: ["render", "--record", _npy(t), "--out", str(t / "x.png")],
        r"ecg\.npy: a numpy file does not state its sampling rate: give it \(--fs HZ\)$",
    ),
    (
        "a report that is not one",
        lambda t: ["compare", "--report", f"a={_file(t, 'r.json', b'{}')}", "--out", str(t / "c.md")],
        r"^--report a: .*r\.json is not an ecglm evaluate report\.json \(no summary\)$",
    ),
    (
        "export without --out",
        lambda t: ["export", "--config", QUICKSTART, "--ckpt_path", "last"],
        r"^give --config RECIPE, --ckpt_path PATH \(or last\) and --out NEW_DIR$",
    ),
    (
        "a bad shard builder value",
        lambda t: ["shard", "--config", _shard_config(t), "--out_dir", str(t / "s")],
        r"^builder\.init_args\.num_val: expected int, got 'many'$",
    ),
    (
        "a CODE-15% folder without its exams.csv",
        lambda t: ["shard", "--config", str(REPO / "shards" / "code15.yaml"), "--out_dir", str(t / "s")],
        r"^CODE-15% table data/code15/exams\.csv not found: give root the folder holding exams\.csv",
    ),
    (
        "an unknown command",
        lambda t: ["trian", "--config", QUICKSTART],
        r"unknown command 'trian'; commands: fit, ",
    ),
]


def _shard_config(tmp: Path) -> str:
    text = (REPO / "shards" / "quickstart.yaml").read_text().replace("num_val: 32", "num_val: many")
    path = tmp / "shard.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def no_llm(monkeypatch):
    """Fails the test if an LLM starts loading: every refusal must come before that. (The signature is
    kept, as the command's parser reads it.)"""
    import functools

    from ecglm.backbones import HFBackbone

    @functools.wraps(HFBackbone.__init__)
    def loaded(*args, **kwargs):
        raise AssertionError("an LLM was loaded before the error was found")

    monkeypatch.setattr(HFBackbone, "__init__", loaded)


def _said(argv: list[str], capsys, tmp: Path) -> str:
    assert main(argv) == 2, argv
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err  # one line, no traceback, no usage
    command = argv[0] if argv[0] in ("fit", "evaluate", "ask", "render", "compare", "export", "shard") else ""
    return err[0].removeprefix(f"ecglm {command}: " if command else "ecglm: ").replace(str(tmp), "TMP")


def test_every_user_error_is_one_line_before_any_llm_loads_and_the_table_says_so(
    tmp_path, capsys, no_llm, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # nothing a command writes lands in the repository
    rows = []
    for what, argv, expected in CASES:
        folder = tmp_path / re.sub(r"\W+", "-", what)
        folder.mkdir()
        said = _said(argv(folder), capsys, folder)
        assert re.search(expected, said), f"{what}: {said}"
        said = said.replace(str(REPO) + "/", "")
        rows.append(f"| {what} | `` {said} `` |")
    table = "\n".join(["| What the user did | What ecglm says (exit status 2) |", "|---|---|", *rows])
    from test_bundle_safety import _check_docs

    _check_docs(REPO / "docs" / "errors.md", "user-errors", table)


def test_debug_shows_the_traceback_too(tmp_path, capsys):
    assert main(["render", "--record", str(tmp_path / "absent.npy"), "--out", "x.png", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RecordError" in err
    assert err.strip().splitlines()[-1].startswith("ecglm render: ")


def test_a_recipe_of_0_1_is_migrated_naming_the_new_key(tmp_path):
    """0.1 recipes put the system prompt on the backbone; 0.2 on the prompt style (the data side)."""
    from ecglm.commands.lightning import use_recipe_loader
    from ecglm.commands.recipe_keys import migrate_recipe
    from ecglm.plugins import discover, resolve_class_paths

    use_recipe_loader(discover())
    old = {
        "model": {
            "backbone": {"class_path": "hf", "init_args": {"model": "x", "system_prompt": "Be brief."}}
        },
        "data": {"class_path": "ecglm.data.datamodule.ECGQADataModule", "init_args": {"data_dir": "s"}},
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = migrate_recipe(resolve_class_paths(old, discover()))
    assert "system_prompt" not in new["model"]["backbone"]["init_args"]
    prompt = new["data"]["init_args"]["prompt"]
    assert prompt == {"class_path": "ecglm.prompts.ChatTemplate", "init_args": {"system_prompt": "Be brief."}}
    [warning] = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert "model.backbone.init_args.system_prompt" in str(warning.message)
    assert "data.init_args.prompt.init_args.system_prompt" in str(warning.message)
    assert "0.3.0" in str(warning.message)


def test_the_short_form_of_a_valid_name_is_accepted(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*FIT, "--model.policy", "lora", "--print_config"])
    assert exit_.value.code == 0
    assert "class_path: ecglm.peft.LoRA" in capsys.readouterr().out
