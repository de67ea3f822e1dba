"""The one user-facing error type.

A user mistake (a missing file, a bad value, an impossible combination) is raised as ``UserError``
with what is wrong and how to fix it. The command-line entry points turn it into one line on stderr
and exit code 2 (see ``run_cli``). A traceback therefore always means a bug of ours.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A problem the user can fix. ``str(err)`` is the whole message, ``fix`` the advice."""

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message + (f" Fix: {fix}" if fix else ""))


def fail(message: str, fix: str | None = None) -> NoReturn:
    raise UserError(message, fix)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run an entry point: a UserError becomes one line and exit 2, Ctrl+C exit 130."""
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(code or 0))
