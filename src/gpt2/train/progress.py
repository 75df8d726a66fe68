"""One stderr status line, rewritten in place at most a few times a second.

Used by `gpt2 prepare` (MB/s) and `gpt2 train` (step, loss, lr, tokens/s). When
stderr is not a terminal (a log file, a test) only every `plain_every`-th
update and the final line are printed, each on a line of its own, so logs stay
readable instead of filling with carriage returns.
"""

from __future__ import annotations

import sys
import time


class StatusLine:
    """>>> bar = StatusLine("prepare"); bar.show("1.0 MB"); bar.close()  # doctest: +SKIP"""

    def __init__(self, name: str, *, min_interval_s: float = 0.25, enabled: bool = True) -> None:
        self.name = name
        self.enabled = enabled
        self.min_interval_s = min_interval_s
        self.tty = sys.stderr.isatty()
        self._shown_at = 0.0
        self._last = ""
        self._printed = ""  # the last line printed where stderr is not a terminal

    def show(self, text: str, *, force: bool = False) -> None:
        self._last = text
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._shown_at < (self.min_interval_s if self.tty else 5.0):
            return
        self._shown_at = now
        line = f"{self.name}: {text}"
        if self.tty:
            print(f"\r{line}\x1b[K", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
            self._printed = text  # close() need not print it again

    def note(self, text: str) -> None:
        """A message of its own that does not get overwritten by the status line."""
        if not self.enabled:
            return
        if self.tty and self._shown_at:
            print(file=sys.stderr)
            self._shown_at = 0.0
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self._last and (self.tty or self._last != self._printed):
            line = f"{self.name}: {self._last}"
            print(f"\r{line}\x1b[K" if self.tty else line, file=sys.stderr, flush=True)
        self._shown_at = 0.0
