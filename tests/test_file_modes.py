"""Files and folders we write are readable by others as the umask allows.

They are made under temporary names and renamed into place (atomic writes), and
the temporary-name helpers create private files (mkstemp: 0600, mkdtemp: 0700);
safetensors creates 0600 too. Every output must end with the mode an ordinary
open() or mkdir() would give, 0644 and 0755 under umask 022: the README's
multi-node training reads one folder from every node, and caches are shared.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gpt2._io import Busy, atomic_folder, atomic_write_bytes, atomic_write_text, exclusive
from gpt2.errors import GPT2Error


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def modes(folder: Path) -> dict[str, str]:
    """Every entry under folder (itself included) -> its permission bits in octal."""
    entries = [folder, *folder.rglob("*")]
    return {str(p.relative_to(folder)): oct(stat.S_IMODE(p.lstat().st_mode)) for p in entries
            if not p.is_symlink()}


def wrong_modes(folder: Path) -> dict[str, str]:
    want = {True: oct(0o755), False: oct(0o644)}
    return {name: mode for name, mode in modes(folder).items()
            if mode != want[(folder / name).is_dir()]}


def test_atomic_writes_take_the_umask_mode(tmp_path, umask_022):
    with atomic_folder(tmp_path / "f") as tmp:
        (tmp / "a.bin").write_bytes(b"x")
        os.chmod(tmp / "a.bin", 0o600)  # as safetensors leaves its files
    atomic_write_text(tmp_path / "f" / "b.txt", "y")
    assert wrong_modes(tmp_path / "f") == {}


def test_atomic_write_through_a_symlink_replaces_its_target_and_keeps_the_mode(tmp_path,
                                                                              umask_022):
    target = tmp_path / "real" / "out.txt"
    target.parent.mkdir()
    target.write_text("old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new" and oct(stat.S_IMODE(target.stat().st_mode)) == oct(0o640)
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]  # no temporary left
    dangling = tmp_path / "dangling.txt"
    dangling.symlink_to(tmp_path / "real" / "new.txt")
    atomic_write_text(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "real" / "new.txt").read_text() == "made"
    assert oct(stat.S_IMODE((tmp_path / "real" / "new.txt").stat().st_mode)) == oct(0o644)


def test_atomic_folder_through_a_symlink_replaces_its_target(tmp_path, umask_022):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with atomic_folder(tmp_path / "link", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # nothing left over


def test_atomic_write_to_a_pipe_writes_into_it_and_keeps_it(tmp_path):
    """A FIFO (or /dev/stdout) is written in place: renaming a file over it would take it
    away from its reader, who would get nothing."""
    import threading

    fifo = tmp_path / "out.png"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    atomic_write_bytes(fifo, b"picture" * 10000)
    reader.join(timeout=30)
    assert got == [b"picture" * 10000] and stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="making a device node needs root")
def test_atomic_write_to_a_full_device_fails_in_one_line_and_keeps_it(tmp_path):
    full = tmp_path / "full"
    os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # a private /dev/full
    link = tmp_path / "report.html"
    link.symlink_to(full)
    for target in (full, link):
        for size in (1, 100000):  # fails at the final flush, or as it writes
            with pytest.raises(GPT2Error, match=rf"{target.name}: writing failed \(No space"):
                atomic_write_bytes(target, b"x" * size)
    assert stat.S_ISCHR(full.stat().st_mode) and link.is_symlink()


def test_write_failed_is_a_gpt2_error_and_an_oserror_and_pickles():
    """Callers that catch OSError keep putting its strerror in their own words; the CLI
    prints the message, which names the file; an error crossing processes survives."""
    import errno
    import pickle

    from gpt2._io import WriteFailed

    e = WriteFailed("out.bin: writing failed (No space left on device)",
                    OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(e, GPT2Error) and isinstance(e, OSError)
    assert (e.errno, e.strerror) == (errno.ENOSPC, "No space left on device")
    assert str(e) == str(pickle.loads(pickle.dumps(e))) == \
        "out.bin: writing failed (No space left on device)"


def test_atomic_write_to_a_folder_or_nowhere_is_a_one_line_error(tmp_path):
    with pytest.raises(GPT2Error, match="is a folder; give the name of a file"):
        atomic_write_text(tmp_path, "x")
    with pytest.raises(GPT2Error, match="cannot write here"):
        atomic_write_text(tmp_path / "missing" / "x.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_convert_quantize_prepare_and_train_outputs_are_readable(tmp_path, umask_022, run_cli,
                                                                 hf_checkpoint):
    folder = hf_checkpoint().folder
    assert run_cli("convert", folder, tmp_path / "hf").code == 0
    assert run_cli("convert", folder, tmp_path / "q", "--quantize", "int8").code == 0
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    assert run_cli("prepare", text, "--out", tmp_path / "data", "--val-fraction", "0.1").code == 0
    r = run_cli("train", "--data", tmp_path / "data", "--out", tmp_path / "run", "--n-layer", "1",
                "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "2",
                "--max-steps", "2", "--eval-interval", "1", "--device", "cpu", "-q")
    assert r.code == 0, r.err
    run = tmp_path / "run"
    assert (run / "best").is_dir() and list(run.glob("ckpt-*"))  # both kinds were written
    for name in ("hf", "q", "data", "run"):
        assert wrong_modes(tmp_path / name) == {}, name


# --- two writers of one output ---------------------------------------------------------------


def test_atomic_folder_does_not_replace_a_folder_filled_while_it_ran(tmp_path):
    """Without overwrite (no --force), a folder another process filled after the check at
    the start is not replaced at the end: a one-line error, the other's files kept."""
    dst = tmp_path / "dst"
    with pytest.raises(GPT2Error, match="not empty \\(written while this ran\\)"), \
            atomic_folder(dst) as tmp:
        (tmp / "ours.txt").write_text("ours")
        dst.mkdir()  # the other `convert`, finishing first
        (dst / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in dst.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no temporary left
    # an empty folder made meanwhile is not anyone's output: it is replaced
    empty = tmp_path / "empty"
    with atomic_folder(empty) as tmp:
        (tmp / "ours.txt").write_text("ours")
        empty.mkdir()
    assert (empty / "ours.txt").read_text() == "ours"


def test_exclusive_refuses_a_second_holder_and_removes_its_lock(tmp_path):
    lock = tmp_path / ".lock"
    with exclusive(lock, "busy: the other one"):
        assert lock.exists()
        with pytest.raises(Busy, match="^busy: the other one$"), \
                exclusive(lock, "busy: the other one"):
            pass
        assert lock.exists()  # the refused one took nothing away
    assert not lock.exists()
    with exclusive(lock, "busy"):  # free again
        pass
    nowhere = tmp_path / "nowhere"
    with pytest.raises(GPT2Error, match=f"^{nowhere}: cannot write here"), \
            exclusive(nowhere / ".lock", "busy", where=str(nowhere)):
        pass


def test_exclusive_holds_across_processes(tmp_path):
    """flock's lock is seen from another process (what two commands are)."""
    import subprocess
    import sys

    lock = tmp_path / ".lock"
    code = ("import sys; from gpt2._io import exclusive, Busy\n"
            "try:\n    with exclusive(sys.argv[1], 'busy'): print('got it')\n"
            "except Busy as e: print(e)")
    with exclusive(lock, "busy"):
        held = subprocess.run([sys.executable, "-c", code, str(lock)], capture_output=True,
                              text=True, timeout=60)
    free = subprocess.run([sys.executable, "-c", code, str(lock)], capture_output=True,
                          text=True, timeout=60)
    assert (held.stdout, free.stdout) == ("busy\n", "got it\n"), (held.stderr, free.stderr)
