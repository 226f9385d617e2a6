"""Command-line arguments of ecglm's own commands, derived from their typed functions by jsonargparse,
and jsonargparse's nested error messages condensed into one line: the key, what it expects, the value.

Each command is a plain function with typed parameters and an ``Args:`` docstring; its flags are its
parameter names (``--batch_size 8``). A ``list`` parameter may be given several times (``--image a.png
--image b.png``), as a JSON list (``--image '[a.png, b.png]'``), or with jsonargparse's ``--image+``.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from typing import Any

from jsonargparse import ArgumentParser


def function_parser(function: Callable[..., Any], prog: str) -> ArgumentParser:
    """The parser of ``function``'s parameters (its docstring's summary is the description)."""
    summary = (inspect.getdoc(function) or "").split("\n\n")[0].replace("\n", " ")
    parser = ArgumentParser(prog=prog, description=summary, exit_on_error=False)
    parser.add_function_arguments(function, as_group=False)
    return parser


def _list_parameters(function: Callable[..., Any]) -> set[str]:
    hints = typing.get_type_hints(function)
    lists = set()
    for name, hint in hints.items():
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else ()
        if typing.get_origin(hint) is list or any(typing.get_origin(o) is list for o in options):
            lists.add(name)
    return lists


def repeated_lists(function: Callable[..., Any], args: list[str]) -> list[str]:
    """``--image a --image b`` as jsonargparse's appending ``--image+ a --image+ b`` (a JSON list is
    left as it is)."""
    out: list[str] = []
    lists = _list_parameters(function)
    it = iter(args)
    for arg in it:
        name, sep, value = arg.partition("=")
        if name.startswith("--") and name[2:] in lists:
            value = value if sep else next(it, "")
            out += [f"{name}+", value] if not value.lstrip().startswith("[") else [name, value]
        else:
            out.append(arg)
    return out


def call(function: Callable[..., Any], args: list[str], prog: str) -> Any:
    """Parse ``args`` for ``function`` and call it with them."""
    parser = function_parser(function, prog)
    options = parser.parse_args(repeated_lists(function, args)).as_dict()
    if "config" not in inspect.signature(function).parameters:  # a command's own --config is kept
        options.pop("config", None)
    return function(**options)


_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS = re.compile(r"Problem with given class_path '([^']+)'")
_NOISE = re.compile(
    r"^(- )?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value( type)?:"
    r"|Expected a <class 'NoneType'>|Expected a path but |Expected a dot import path string)"
)


def _short_type(text: str) -> str:
    return re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", text)


def condense_argument_error(message: str) -> str:
    """jsonargparse's error (a tree of union members and nested class arguments) as one line.

    ``Parser key "data": ... Problem with given class_path '...ECGQADataModule': Parser key
    "batch_size": Expected a <class 'int'>. Got value: four`` becomes ``data.init_args.batch_size:
    expected int, got 'four'``.
    """
    keys: list[str] = []
    detail = ""
    message = re.sub(r"^Problems parsing config\s*:\s*", "", message.strip())
    for raw in message.splitlines():
        line = raw.strip()
        if not line:
            continue
        key, cls = _KEY.search(line), _CLASS.search(line)
        if key:
            keys.append(key.group(1))
            rest = line[key.end() :].lstrip(":").strip()
            if rest and not _NOISE.match(rest):
                detail = rest
        elif cls:
            keys.append("init_args")
        elif not _NOISE.match(line) and not detail:
            detail = line.removeprefix("- ")
    if not detail:
        detail = message.strip().splitlines()[-1] if message.strip() else "invalid arguments"
    got = re.match(r"Expected an? (.+?)\. Got value: (.*)$", detail)
    if got:
        detail = f"expected {_short_type(got.group(1))}, got {got.group(2)!r}"
    path = ".".join(k for i, k in enumerate(keys) if k != "init_args" or (i and keys[i - 1] != "init_args"))
    return f"{path}: {_short_type(detail)}" if path else _short_type(detail)
