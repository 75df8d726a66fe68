"""The `gpt2` command line: parse, call one function, print.

Subcommands live in `gpt2.commands`, one module each; this file only finds
them, builds the parser, turns `GPT2Error` into a one-line message and a
non-zero exit status, and prints warnings as one line each.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import pkgutil
import signal
import sys
import threading
import warnings

from gpt2 import commands
from gpt2.errors import GPT2Error

# The order commands appear in `gpt2 --help`; modules not listed come last.
ORDER = [
    "generate", "score", "tokenize", "download", "convert", "validate",
    "prepare", "train", "eval", "demo", "inspect",
]


def _command_modules() -> list:
    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return [importlib.import_module(f"gpt2.commands.{n}") for n in names]


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with its errors on one line (argparse prints the whole usage
    first); subcommands' parsers are made of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gpt2",
        description="GPT-2 from scratch: tokenize, generate, score, convert and train.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        _name_positionals(p)
    return parser


def _name_positionals(parser: argparse.ArgumentParser) -> None:
    """Record, for messages, how each positional argument is written in the usage line
    (its metavar, FILE), here and in nested subcommands (gpt2 inspect attention ...)."""
    names = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for inner in action.choices.values():
                _name_positionals(inner)
        elif not action.option_strings:
            names[action.dest] = action.metavar or action.dest.upper()
    parser.set_defaults(_positionals=names)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line: one line each, without Python's source excerpt."""
    print(f"gpt2: warning: {message}", file=sys.stderr)


def _error(message: str) -> None:
    """Print the one-line error; on a terminal, over a progress line left unfinished
    (prepare's MB/s, train's step line) instead of after it."""
    clear = "\r\x1b[K" if sys.stderr.isatty() else ""
    print(f"{clear}{message}", file=sys.stderr)


def _open_fd(stream) -> bool:
    """False where stream's file descriptor is closed; True for one that is open or for
    a stream with no descriptor (a test's capture)."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        return True
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _check_utf8(args: argparse.Namespace) -> None:
    """Arguments that were not UTF-8 bytes (Python keeps such bytes as lone surrogates)
    would reach the tokenizer as U+FFFD: refuse them, as files that are not UTF-8 are."""
    positionals = getattr(args, "_positionals", {})
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and any("\ud800" <= c <= "\udfff" for c in text):
                where = positionals.get(name) or "--" + name.replace("_", "-")
                raise GPT2Error(f"{where} is not UTF-8 text ({text!r}); pass UTF-8 (e.g. "
                                "convert it with iconv -f latin1 -t utf-8)")


# The arguments that name a file or folder: an empty one would quietly mean "."
_PATH_ARGUMENTS = ("model", "src", "dst", "out", "data", "vocab", "dir", "init", "file", "files")


def _check_paths(args: argparse.Namespace) -> None:
    positionals = getattr(args, "_positionals", {})
    for name in _PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if "" in (value if isinstance(value, list) else [value]):
            where = positionals.get(name) or "--" + name
            what = "a size (124M) or a path" if name == "model" else "a path"
            raise GPT2Error(f"{where} is empty; give {what} (. for the current folder)")


_OUT_OF_MEMORY = ("out of memory; ask for less at once (fewer samples, a smaller batch, "
                  "shorter texts, a smaller model) or use a machine with more memory")


_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class Terminated(BaseException):
    """SIGTERM (`kill`, `timeout`, `docker stop`) raised as an exception, so that a stopped
    command removes what it was writing, as it does for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _peer_failed(e: RuntimeError) -> bool:
    """A collective of a multi-process run (torchrun) failed because another process
    went away: gloo's "Connection closed by peer", NCCL's errors."""
    text = str(e)
    world = os.environ.get("WORLD_SIZE", "1")
    return world.isdigit() and int(world) > 1 and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer",
                            "gloo", "NCCL", "ProcessGroup"))


def _first_line(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= 200 else line[:200] + "..."


def _unicode_out() -> None:
    """Output is UTF-8 whatever the locale says (a pipe under LANG=C, Windows' cp1252):
    texts, tokens and JSON hold any character, and an ASCII stdout raised
    UnicodeEncodeError half-way through a table. Messages on stderr keep the locale's
    encoding, with what it cannot show escaped (\\u2423)."""
    for stream, change in ((sys.stdout, {"encoding": "utf-8"}),
                           (sys.stderr, {"errors": "backslashreplace"})):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            with contextlib.suppress(ValueError, OSError):  # (a stream already written to)
                stream.reconfigure(**change)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C at once: no traceback
        print(file=sys.stderr)
        return 130
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    # the command as typed, for messages: "gpt2 generate", "gpt2 inspect attention"
    name = " ".join(["gpt2", args.command, *([args.what] if hasattr(args, "what") else [])])
    previous = None
    under_torchrun = "WORLD_SIZE" in os.environ
    if (args.command != "train" or not under_torchrun) \
            and threading.current_thread() is threading.main_thread():
        # not for train under torchrun: it stops its workers with SIGTERM, and a worker
        # unwinding in the middle of a collective could wait on the others (a killed
        # run's half-written checkpoint is removed by its next save instead)
        previous = signal.signal(signal.SIGTERM, _terminate)
    # a closed stdin reads as empty, a closed stdout takes the output away, as for print()
    # (Python sets both to None, and commands reading or writing them raised)
    if sys.stdin is None:
        sys.stdin = open(os.devnull)  # noqa: SIM115 -- for the rest of the process
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    if sys.stderr is None or not _open_fd(sys.stderr):
        # closed (2>&-): progress, notes and errors have nowhere to go, which is no failure
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    _unicode_out()
    try:
        _check_utf8(args)
        _check_paths(args)
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            code = int(args._run(args) or 0)
            sys.stdout.flush()  # (a full disk or device shows here, not at exit)
            return code
    except GPT2Error as e:
        _error(f"{name}: error: {e}")
        return 1
    except MemoryError:
        _error(f"{name}: error: {_OUT_OF_MEMORY}")
        return 1
    except RuntimeError as e:  # torch's allocators raise RuntimeErrors, not MemoryError
        if _peer_failed(e):
            _error(f"{name}: error: another process of this run stopped (its own message "
                   f"says why); this one stopped too ({_first_line(e)})")
            return 1
        if type(e).__name__ != "OutOfMemoryError" and "tried to allocate" not in str(e):
            raise
        _error(f"{name}: error: {_OUT_OF_MEMORY}")
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Terminated:
        _error(f"{name}: terminated")
        return 143
    except BrokenPipeError:
        # `gpt2 ... | head`: the reader went away; that is not an error of ours.
        sys.stderr.close()
        return 0
    except OSError as e:  # writing the output (a full disk, /dev/full), reading input
        if getattr(e, "filename", None):
            where = f" ({e.filename})"
        else:  # (these arise only from writes: stdout or a file, it does not say which)
            where = " (writing the output)" if e.errno in _FULL else ""
        _error(f"{name}: error: {e.strerror or e}{where}")
        with contextlib.suppress(OSError, ValueError):  # what stdout still holds goes
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
