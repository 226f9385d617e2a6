"""The ``ecglm`` command: one table from subcommand to the function that runs it (:data:`COMMANDS`), and
one place that turns errors into exit codes (:func:`main`).

Two kinds of command: *recipe* commands take the raw arguments and hand them to a parser of their own
(Lightning's CLI for ``fit``, ``validate``, ``test``, ``predict``, ``evaluate``, ``export``; the shard
builder's for ``shard``; ``estimate``'s overrides); *typed* commands are plain functions whose flags
jsonargparse derives from their signature and docstring (:mod:`ecglm.commands.arguments`).

Exit codes: 0 done; 1 done with some inputs skipped (``ask``) or a plugin that failed to register
(``plugins``); 2 a user error: bad input, a bad recipe key or value, an unknown name — printed as one
line (``ecglm <command>: <message>``) with no traceback unless ``--debug`` is given or
``ECGLM_DEBUG=1`` is set; 130 interrupted.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
import warnings
from argparse import ArgumentError
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ecglm.errors import EcglmError


@dataclass(frozen=True)
class Command:
    """A subcommand: the function that runs it (``module:function``), whether it takes the raw
    arguments (a recipe command) or typed flags, and one line for ``ecglm --help``."""

    target: str
    summary: str
    raw: bool = False

    def function(self) -> Callable[..., Any]:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    "fit": Command("ecglm.commands.lightning:fit", "train a recipe", raw=True),
    "validate": Command("ecglm.commands.lightning:validate", "validate a checkpoint", raw=True),
    "test": Command("ecglm.commands.lightning:test", "test a checkpoint under the controls", raw=True),
    "predict": Command("ecglm.commands.lightning:predict", "run a recipe's predict loop", raw=True),
    "evaluate": Command(
        "ecglm.commands.lightning:evaluate", "the evaluation protocol: seeds, controls, intervals", raw=True
    ),
    "export": Command("ecglm.commands.lightning:export", "a checkpoint as a portable bundle", raw=True),
    "ask": Command("ecglm.commands.ask:ask", "answer questions about ECG files with a bundle"),
    "serve": Command("ecglm.commands.serve:serve", "a bundle behind an HTTP API (OpenAI-compatible)"),
    "demo": Command("ecglm.commands.demo:demo", "a bundle behind a web page (Gradio), for colleagues"),
    "render": Command("ecglm.commands.render:render", "draw a record as the printout a model reads"),
    "compare": Command("ecglm.commands.compare:compare", "evaluation reports side by side"),
    "estimate": Command(
        "ecglm.commands.estimate:estimate", "parameters and peak memory of a recipe, no weights", raw=True
    ),
    "shard": Command("ecglm.commands.shard:shard", "build WebDataset shards from a builder", raw=True),
    "benchmark": Command(
        "ecglm.commands.benchmark:benchmark", "ECGBench answered by a bundle and scored two ways", raw=True
    ),
    "plugins": Command("ecglm.commands.plugins:plugins", "registered components and failed plugins"),
}

#: Exit status of a user error.
USER_ERROR = 2


def usage() -> str:
    from ecglm.version import __version__

    lines = [f"ecglm {__version__}: train and use ECG-language models", "", "commands:"]
    lines += [f"  {name:<10} {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "ecglm COMMAND --help for a command's options; --debug shows tracebacks of errors"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``ecglm ARGS`` (``argv``; ``sys.argv[1:]`` by default) and return its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ECGLM_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else USER_ERROR
    if args[0] == "--version":
        from ecglm.version import __version__

        print(f"ecglm {__version__}")
        return 0
    name, rest = args[0], args[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"ecglm: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return USER_ERROR
    if argv is None:
        sys.argv[1:] = []  # the arguments travel explicitly; Lightning's CLI would warn about both
    # A user of the command sees what their recipe or code uses that is deprecated.
    warnings.filterwarnings("default", category=DeprecationWarning, message=r".*deprecated since ecglm")
    try:
        if command.raw:
            result = command.function()(rest)
        else:
            from ecglm.commands.arguments import call

            result = call(command.function(), rest, prog=f"ecglm {name}")
    except KeyboardInterrupt:
        print(f"ecglm {name}: interrupted", file=sys.stderr)
        return 130
    except (EcglmError, ArgumentError) as err:
        return _user_error(name, err, debug)
    except ValueError as err:
        if command.raw:  # a recipe command turns the values it refused into ConfigError; this is a failure
            raise
        return _user_error(name, err, debug, hint=True)  # a component's own check of what it was given
    return result if isinstance(result, int) else 0


def _user_error(name: str, err: BaseException, debug: bool, hint: bool = False) -> int:
    from ecglm.commands.arguments import condense_argument_error
    from ecglm.commands.recipe_keys import moved_key_hint

    if debug:
        traceback.print_exception(err)
    if isinstance(err, ArgumentError):
        message = condense_argument_error(str(err))
        moved = moved_key_hint(str(err))
        message += f" ({moved})" if moved else ""
    else:
        message = " ".join(str(err).split()) or type(err).__name__
    print(f"ecglm {name}: {message}", file=sys.stderr)
    if hint and not debug:
        print("  (--debug shows where it was raised)", file=sys.stderr)
    return USER_ERROR
