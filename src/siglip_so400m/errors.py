"""The one error base: every refusal the library makes is a SiglipError, and its exit status is
decided here, once. A usage error (something the user typed: a flag, a path, a folder of another
run) exits 2; any other failure exits 1. The CLI prints the message as one line, never a traceback."""

from __future__ import annotations


class SiglipError(Exception):
    """A failure the user can act on; the message says what to change. Exit status 1."""

    exit_code = 1


class UsageError(SiglipError):
    """Bad input on the command line (a flag, a path that does not exist, a file where a folder
    belongs): found before anything is written. Exit status 2."""

    exit_code = 2


class RecordMismatch(UsageError):
    """A stored output (an embed folder, an index, a fine-tuning run, a label cache) was computed
    with other settings than the ones given now: reading it as if it were not would give a silently
    wrong answer. The message names the field and both values."""
