"""The base class of errors in what a user gave ecglm: a file, a folder, a recipe key, a name.

Every command prints such an error as one line (``ecglm <command>: <message>``) and exits with 2;
``--debug`` (or ``ECGLM_DEBUG=1``) shows the traceback as well. A message names the file, record or
key at fault and says what to do. Errors of ecglm's own making (bugs) are not of this class and are
shown with their traceback.
"""

from __future__ import annotations


class EcglmError(Exception):
    """Bad input or configuration, explained in the message; ecglm's error classes derive from it."""
