"""Errors that the command line turns into exit codes.

An :class:`InputError` is the user's to fix (a missing file, an unknown label, a malformed
TOML file): the CLI prints its message on one line and exits with code 2, no traceback.
Anything else that escapes a run is a bug in mcaudit or a plugin and exits with code 3.
"""


from enum import IntEnum


class ExitCode(IntEnum):
    """What ``mcaudit``'s exit status means, everywhere it is set."""

    OK = 0  # passed, or not gated
    FAILED = 1  # the gate failed, a check errored, or compare found a regression
    USAGE = 2  # bad usage or input: one line naming the file, row or option
    INTERNAL = 3  # a bug in mcaudit or a plugin: with a traceback
    INTERRUPTED = 130  # Ctrl-C


class InputError(Exception):
    """Bad usage or bad input; the message names the file, row or option at fault."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str):
        # Multi-line messages would break the one-line contract of the CLI.
        super().__init__(" ".join(str(message).split()))


class PluginError(InputError):
    """A plugin could not be loaded or declares hooks that do not exist."""
