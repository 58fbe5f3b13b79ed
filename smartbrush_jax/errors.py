"""Errors a user can fix, and the one way every command reports them.

`InputError` is the base of every error the package raises for bad input: a config value
(`ConfigError`), data (`DataError`), weights (`WeightsError`), a run's checkpoints
(`CheckpointError`), an export (`ExportError`), metrics inputs (`MetricsError`), a
command-line argument (`InputError` itself). A command prints it as one line,
`error: <message>`, and exits with code 2 (`run_command`). Every other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class InputError(Exception):
    """Bad input a user can fix; the message says what and where."""


class Failure(Exception):
    """The work failed for a reason that is not the input (a worker process killed, a disk
    that filled), and what was finished is kept; the message says what and what to do."""


def run_command(fn: Callable[[], int | None]) -> int:
    """`fn()`'s exit code (None: 0); an InputError becomes `error: ...` on stderr and 2, a
    Failure `error: ...` and 1 (a traceback would bury the one line that matters)."""
    try:
        return fn() or 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def warn(message: str) -> None:
    """What a command says about input it could use after a change (`warning: ...` on stderr)."""
    print(f"warning: {message}", file=sys.stderr)
