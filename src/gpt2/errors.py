"""The one exception type users see.

Anything that goes wrong because of the user's input (a missing file, a corrupt
checkpoint, a bad flag value) raises `GPT2Error` with a one-line message that
says what was wrong, where, and what to do. The CLI prints it and exits 1;
everything else is a bug and keeps its traceback.
"""


class GPT2Error(Exception):
    """A user-facing error with a one-line, actionable message."""
