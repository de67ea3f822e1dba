"""The one user-facing error type.

A user mistake (a missing file, a bad value, an impossible combination) is raised as ``UserError``
with what is wrong and how to fix it. The command-line entry points turn it into one line on stderr
and exit code 2 (see ``run_cli``). A traceback therefore always means a bug of ours.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, NoReturn


class UserError(Exception):
    """A problem the user can fix. ``str(err)`` is the whole message, ``fix`` the advice."""

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message + (f" Fix: {fix}" if fix else ""))


def fail(message: str, fix: str | None = None) -> NoReturn:
    raise UserError(message, fix)


NAME_MAX = 255      # bytes of one file or folder name on Linux, macOS and Windows file systems


def check_name_lengths(what: str, path: str | os.PathLike, fix: str) -> None:
    """Refuse a path with a name longer than file systems allow (os.stat would fail with 'File name too long')."""
    for part in os.fspath(path).replace("\\", "/").split("/"):
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise UserError(f"{what}: the name {part[:24]}... is {len(part)} characters long; a file or folder name "
                            f"can have at most {NAME_MAX} bytes.", fix)


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


class _Deferred:
    """Ctrl+C noted while a file is being written (see ``interrupt_deferred``)."""
    active = False
    pending = False
    what = ""


def _note_interrupt(signum, frame) -> None:
    if not _Deferred.pending:
        try:     # os.write: a print() here could land inside another write to stderr (a reentrant call)
            os.write(2, f"\nCtrl+C: finishing {_Deferred.what} first\n".encode())
        except OSError:
            pass
    _Deferred.pending = True


@contextlib.contextmanager
def interrupt_deferred(reraise: bool = True, what: str = "the file being written") -> Iterator[None]:
    """Hold Ctrl+C (SIGINT) back until the block is done, so a checkpoint is never cut off half-written.

    A Ctrl+C that came meanwhile is raised as KeyboardInterrupt when the block ends (``reraise``), or
    dropped (``reraise=False``: the block is already the save that Ctrl+C asked for). ``what`` names the
    block in the notice a Ctrl+C prints. Nested uses join the outermost one. Off the main thread, or where SIGINT has a handler that is not Python's
    default one, nothing changes.
    """
    if (_Deferred.active or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    _Deferred.active, _Deferred.pending, _Deferred.what = True, False, what
    signal.signal(signal.SIGINT, _note_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _Deferred.active = False
    if _Deferred.pending and reraise:
        _Deferred.pending = False
        raise KeyboardInterrupt
    _Deferred.pending = False
