"""Deprecated: the ``ecglm`` command moved to :mod:`ecglm.commands` in 0.2.0 (one module per command,
one table of commands, one place that turns errors into exit codes). The names below keep working,
with a DeprecationWarning naming their new place, until 0.3.0."""

from ecglm._deprecation import moved_names

_LIGHTNING = "ecglm.commands.lightning"
__getattr__ = moved_names(
    __name__,
    {
        "main": "ecglm.commands:main",
        "ECGLMCLI": f"{_LIGHTNING}:ECGLMCLI",
        "MLflowSaveConfig": f"{_LIGHTNING}:MLflowSaveConfig",
        "TRAINER_DEFAULTS": f"{_LIGHTNING}:TRAINER_DEFAULTS",
        "PARSER_MODE": f"{_LIGHTNING}:PARSER_MODE",
        "SUBCOMMANDS": f"{_LIGHTNING}:SUBCOMMANDS",
        "run_cli": f"{_LIGHTNING}:run_cli",
        "run_evaluate": f"{_LIGHTNING}:run_evaluate",
        "run_export": f"{_LIGHTNING}:run_export",
        "run_shard": "ecglm.commands.shard:run_shard",
        "shard_parser": "ecglm.commands.shard:shard_parser",
    },
)
