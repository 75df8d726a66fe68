"""Leave no litter: a command that fails takes away what it wrote into its output folder.

`gpt2 prepare` and `gpt2 train` create their --out folder (and any missing parents)
and then write into it; if they fail half-way (text that is not UTF-8, a model
that cannot be built, Ctrl-C), the folder would be left holding an empty shell, a
vocabulary copy or the log of a run that never saved anything. Only what the failed
command added is removed, and only under the names it writes: a file someone else
put into the folder meanwhile stays (and so does the folder that holds it), and
nothing that was there before is touched. A command refused because another one is
writing the same folder (gpt2._io.Busy) removes nothing.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from gpt2._io import Busy


@contextlib.contextmanager
def undone_on_error(folder: Path, *, names: Collection[str],
                    keep: Callable[[], bool] = lambda: False,
                    enabled: bool = True) -> Iterator[Path]:
    """Run a block that creates `folder` and writes `names` (or glob patterns) into it.
    If the block raises (and `keep()` is false), remove the entries so named that were
    not there before the block, then `folder` and the parents made for it, each only if
    it is empty by then.

    >>> with undone_on_error(Path("runs/new"), names=["log.jsonl"]):  # doctest: +SKIP
    ...     Path("runs/new").mkdir(parents=True)
    ...     raise KeyboardInterrupt  # runs/new (and runs/, if it was made) are gone again
    """
    folder = Path(folder)
    missing = []  # the folder and its parents that do not exist yet, innermost first
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    try:
        yield folder
    except Busy:  # another process is writing the folder: what is new there is its
        raise
    except BaseException:
        if enabled and not _kept(keep):
            with contextlib.suppress(OSError):  # tidying must never hide the error itself
                now = set(os.listdir(folder)) if folder.is_dir() else set()
                ours = {n for n in now - before
                        if any(fnmatch.fnmatchcase(n, pattern) for pattern in names)}
                _remove_new(folder, ours, missing)
        raise


def _kept(keep: Callable[[], bool]) -> bool:
    try:
        return keep()
    except OSError:
        return True  # cannot tell what is there: leave it all


def _remove_new(folder: Path, names: set[str], missing: list[Path]) -> None:
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    for p in missing:
        try:
            p.rmdir()  # only when empty
        except OSError:
            break  # not empty (or gone): its parents stay too
