"""Every write into a user's folder goes through here: all of a file or none of it, and one line when it fails.

    with atomic_write(path, need=nbytes) as f:   # a temporary beside ``path``, fsync'd, then renamed over it
        f.write(...)
    append_text(path, text)                      # loss.csv rows: appended whole, or the file left as it was
    sweep_temps(folder)                          # temporaries left by a process that was killed
    lock = hold_folder(folder, "OUTPUT")         # one run per OUTPUT at a time

A full disk (or a quota, or a file-size limit) is told as one line naming the folder, what the write needed and
what is free (``write_error``); the previous file is intact and no temporary is left behind. A Ctrl+C during a
write lets it finish first (``interrupt_deferred``). Temporaries are named ``.NAME.PID.RANDOM.tmp``, so a later
start can tell the ones whose process is gone (``sweep_temps``) from those of a process still writing.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import IO, Iterator

from .errors import UserError, interrupt_deferred

NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def human(n: float) -> str:
    """A byte count for people: 512 B, 3.4 MB, 1.20 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{int(n)} B"


def free_bytes(folder: Path) -> int | None:
    """Free space for this user in ``folder`` (or the nearest folder above it that exists)."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def write_error(err: OSError, path: Path, need: int | None = None) -> UserError:
    """The one-line error for a write of ``path`` that failed with ``err``."""
    path = Path(path)
    folder = path.parent
    if err.errno in NO_ROOM:
        free = free_bytes(folder)
        if err.errno == errno.EFBIG:
            why = "a file-size limit (ulimit -f) stopped it"
        elif err.errno == errno.EDQUOT:
            why = "the disk quota is used up"
        else:
            why = "the disk is full"
        room = f"; {human(free)} free there" if free is not None else ""
        needs = f", which needs about {human(need)}" if need else ""
        return UserError(f"cannot write {path.name} in {folder}/: {why}{needs}{room}. The previous files are intact.",
                         "free some space on that disk (or choose a folder on another disk) and run it again")
    if err.errno in (errno.EROFS,):
        return UserError(f"cannot write {path} : {folder}/ is on a read-only file system.",
                         "choose a folder you can write to")
    if err.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {path}: permission denied in {folder}/.",
                         f"choose a folder you can write to, or fix its permissions (chmod u+w {folder})")
    if err.errno in (errno.ENOTDIR, errno.EEXIST) or (folder.exists() and not folder.is_dir()):
        bad = next((q for q in [folder, *folder.parents] if q.exists() and not q.is_dir()), folder)
        return UserError(f"cannot write {path}: {bad} is a file, not a folder.",
                         f"choose another folder, or move the file {bad} away")
    if err.errno == errno.EISDIR:
        return UserError(f"cannot write {path}: it is a folder.", "choose another name, or move that folder away")
    return UserError(f"cannot write {path} ({err.strerror or err}).", "check the folder, its free space and "
                     "its permissions")


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError that ``err`` is or was raised over (torch.save wraps the file's error in a RuntimeError)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def make_folder(folder: Path, what: str = "") -> Path:
    """``mkdir -p`` with its failures as one line (``what`` names the setting, e.g. "OUTPUT")."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        label = f"{what}: " if what else ""
        bad = next((q for q in (folder, *folder.parents) if q.exists() and not q.is_dir()), None)
        if bad is not None:
            raise UserError(f"{label}cannot make the folder {folder}: {bad} is a file, not a folder.",
                            f"choose another {what or 'folder'}, or move the file {bad} away") from None
        raise UserError(f"{label}cannot make the folder {folder} ({err.strerror or err}).",
                        write_error(err, folder / ".", None).fix) from None
    return folder


def temp_path(path: Path) -> Path:
    """A fresh temporary beside ``path``: ``.NAME.PID.RANDOM.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # it exists (another user's, EPERM)
        return True
    return True


def sweep_temps(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` (not below) whose process is gone; returns what was removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
    return removed


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode(p: Path) -> int:
    """The mode of the file being replaced, else what a plain open() would create (0666 & ~umask)."""
    try:
        return p.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path, need: int | None = None) -> Iterator[IO]:
    """Write ``path`` through a temporary beside it, fsync, rename over ``path``.

    Afterwards either the old file or the whole new one is there, never a part; on any error the temporary is
    removed, and an OSError becomes ``write_error`` (``need``: the bytes the write needs, for that message).
    Ctrl+C meanwhile lets the write finish and is raised afterwards."""
    p = Path(path)
    make_folder(p.parent)
    if p.is_dir():
        raise write_error(OSError(errno.EISDIR, "is a folder"), p)
    with interrupt_deferred():
        tmp = temp_path(p)
        try:
            with open(tmp, "wb") as f:
                os.chmod(tmp, _file_mode(p))
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
            tmp = None
            fsync_dir(p.parent)
        except (OSError, RuntimeError) as err:
            cause = os_error_in(err)       # torch.save raises RuntimeError("... unexpected pos") over it
            if cause is None:
                raise
            raise write_error(cause, p, need) from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def write_bytes(path, data: bytes | str) -> None:
    """The whole of ``data`` as ``path``, atomically (see ``atomic_write``)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_write(path, need=len(raw)) as f:
        f.write(raw)


def copy_file(src, dst) -> Path:
    """Copy ``src`` to ``dst`` atomically (an upload into data/, say)."""
    src = Path(src)
    try:
        size = src.stat().st_size
        fh = open(src, "rb")
    except OSError as err:
        raise UserError(f"cannot read {src} ({err.strerror or err}).", "check the file") from None
    with fh, atomic_write(dst, need=size) as out:
        shutil.copyfileobj(fh, out, 1 << 20)
    return Path(dst)


def append_text(path, text: str) -> None:
    """Append ``text`` to ``path`` whole: on a failure (a full disk) the file is cut back to its old length, so
    no half row stays. Ctrl+C meanwhile waits."""
    p = Path(path)
    raw = text.encode("utf-8")
    with interrupt_deferred():
        try:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as err:
            raise write_error(err, p, len(raw)) from None
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(raw)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise write_error(err, p, len(raw)) from None
        finally:
            os.close(fd)


class FolderLock:
    """An exclusive lock on a folder (``.lock`` inside it), held while a run writes there."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def hold_folder(folder: Path, what: str = "OUTPUT") -> FolderLock:
    """Lock ``folder`` for this process; a second run into the same folder is refused with one line."""
    try:
        import fcntl
    except ImportError:                      # not on Linux/WSL: no lock, as before
        return FolderLock(None)
    folder = make_folder(folder, what)
    path = folder / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise write_error(err, path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = ""
        with contextlib.suppress(OSError, ValueError):
            other = f" (process {int(os.pread(fd, 32, 0).decode().strip())})"
        os.close(fd)
        raise UserError(f"{what} {folder} is in use by another training run{other}.",
                        f"wait for it to finish (or stop it), or set {what} to another folder") from None
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    return FolderLock(fd)
