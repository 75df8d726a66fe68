"""Atomic file writing: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from gpt2.errors import GPT2Error


class WriteFailed(GPT2Error, OSError):
    """Writing a file failed: a one-line GPT2Error that names the file, and still an
    OSError, whose `strerror` a caller may put in its own words ("saving the checkpoint
    failed (No space left on device)")."""

    def __init__(self, message: str, cause: OSError | None = None) -> None:
        super().__init__(message)  # (args: the message alone, so that it pickles)
        if cause is not None:
            self.errno, self.strerror = cause.errno, cause.strerror or str(cause)

    def __str__(self) -> str:
        return self.args[0]


class Busy(GPT2Error):
    """Another process is writing the same output now (`exclusive`): the command stops
    before it writes anything, and tidies nothing (what is there is the other's)."""


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike, busy: str, *, where: str | None = None) -> Iterator[None]:
    """Hold the lock file `lock` (created, and removed at the end) while the block runs;
    where another process holds it, raise Busy(busy) at once. Advisory (flock): it keeps
    two of our commands from writing one output together, not other programs. Where
    there is no flock (Windows) or the file system has no locks, the block runs
    unlocked. `where`: what a failure to create the lock names (default: the lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, default_mode())
        except OSError as e:
            raise GPT2Error(f"{where or lock}: cannot write here ({e.strerror}); choose "
                            "another folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(busy) from None
        except OSError:  # (ENOLCK, EOPNOTSUPP: a file system without locks)
            break
        try:  # its holder may have removed it between our open and our lock: lock anew
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # (before the lock is let go: no one can take a removed file)
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On an exception the temporary file is removed and `path` is left untouched. A `path`
    that is a symbolic link keeps being one: the file it points to is replaced (as an
    editor saving through a link does), and a file that exists keeps its mode. A device
    or a pipe (/dev/stdout, a FIFO) is written in place: there is no file to replace.
    Failing to create, write or rename the file raises `WriteFailed`, naming `path`
    (errors of the caller's own code inside the block pass through as they are).
    """
    shown = path
    path = Path(os.path.realpath(path))
    try:
        st = os.stat(path)
    except OSError:  # (a new file)
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise GPT2Error(f"{shown}: is a folder; give the name of a file to write")
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            f = open(path, mode)  # noqa: SIM115 -- closed below
        except OSError as e:
            raise WriteFailed(f"{shown}: cannot write ({e.strerror or e})", e) from None
        try:
            yield f
            try:
                f.close()  # (flushes: a full device fails here)
            except OSError as e:
                raise WriteFailed(f"{shown}: writing failed ({e.strerror or e})", e) from None
        finally:
            with contextlib.suppress(OSError):  # (what the caller's error left unwritten)
                f.close()
        return
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, default_mode() if st is None else stat.S_IMODE(st.st_mode))
    except OSError as e:  # (mkstemp creates 0600: the mode a new file would have, or the old)
        raise WriteFailed(f"{shown}: cannot write here ({e.strerror or e})", e) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            try:
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(tmp, path)
            except OSError as e:
                raise WriteFailed(f"{shown}: writing failed ({e.strerror or e}); nothing was "
                                  "changed", e) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _write_all(path, data, "wb")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _write_all(path, text, "w")


def _write_all(path: str | os.PathLike, data: bytes | str, mode: str) -> None:
    with atomic_open(path, mode) as f:
        try:
            f.write(data)
        except OSError as e:  # (a full device written in place)
            raise WriteFailed(f"{path}: writing failed ({e.strerror or e})", e) from None


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a hidden temporary name beside `folder`; on success fsync its
    files and rename it into place, replacing an existing `folder` only if `overwrite`.

    On any error the temporary folder is removed and `folder` is left as it was; an
    OSError becomes a one-line GPT2Error.
    """
    shown = folder
    # "." or "out/..": a parent to make the temporary folder in (Path(".").parent is ".");
    # a symbolic link to a folder stays one: the folder it points to is replaced
    folder = Path(os.path.realpath(folder))
    if folder.exists() and not folder.is_dir():
        raise GPT2Error(f"{shown}: exists and is not a folder")
    refuse_the_folder_you_are_in(folder, shown)
    above = next((p for p in folder.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise GPT2Error(f"{folder}: {above} is a file, not a folder; choose another path")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise GPT2Error(f"{folder}: folder exists and is not empty; choose another, or "
                        "replace it (--force; overwrite=True in Python)")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        os.chmod(tmp, default_mode(folder=True))  # mkdtemp creates 0700
    except OSError as e:
        raise GPT2Error(f"{folder}: cannot write here ({e.strerror})") from None
    try:
        yield tmp
        for f in tmp.iterdir():
            os.chmod(f, default_mode())  # writers such as safetensors create 0600
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if not overwrite:
            try:  # (onto an empty folder at most: one filled meanwhile makes it fail)
                os.rename(tmp, folder)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise GPT2Error(f"{folder}: folder exists and is not empty (written while "
                                "this ran); nothing was changed: choose another, or replace "
                                "it (--force; overwrite=True in Python)") from None
        elif folder.exists():  # moved aside, not deleted, until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            try:
                os.replace(folder, old)
            except BaseException:
                os.rmdir(old)
                raise
            try:
                os.replace(tmp, folder)
            except BaseException:
                os.replace(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        fsync_dir(folder.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GPT2Error(f"{folder}: writing failed ({e.strerror or e}); nothing was changed") \
            from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_the_folder_you_are_in(folder: Path, shown: object) -> None:
    """GPT2Error where replacing `folder` (a real path) would pull the working folder
    away from under the shell: it is that folder, or holds it."""
    try:
        here = Path(os.getcwd())
    except OSError:  # (the working folder was deleted: nothing to protect)
        return
    if folder.is_dir() and (folder == here or folder in here.parents):
        raise GPT2Error(f"{shown}: is the folder you are in, or holds it; write to "
                        "another folder")


def decode_utf8(data: bytes, where: object, *, offset: int = 0) -> str:
    """bytes -> str, or a one-line GPT2Error naming `where` and the first bad byte
    (`offset`: where `data` starts in the file, for text read in chunks)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        source = ("utf-16" if offset == 0 and data[:2] in (b"\xff\xfe", b"\xfe\xff")
                  else "latin1")  # UTF-16's byte-order mark, else a common guess
        raise GPT2Error(
            f"{where}: not UTF-8 text (bad byte at offset {offset + e.start}); convert it "
            f"to UTF-8 first (e.g. iconv -f {source} -t utf-8)"
        ) from None


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def default_mode(*, folder: bool = False) -> int:
    """The mode an ordinary open() or mkdir() would give: 0666 (0777) less the umask. Files
    made through temporary names (mkstemp: 0600, mkdtemp: 0700) get it before they are
    renamed into place, so other users (other nodes' processes, a shared cache) read them."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask
