"""Typed errors raised by core code; `glm_cli.app` turns them into one line on stderr and an exit code.

Core code never prints or exits: it raises one of these, with the place (file:line) in the message when
there is one, and the CLI boundary decides how to show it.
"""


class GlmError(Exception):
    """A failure the user can act on (bad data, a missing file). Exit status 1."""

    exit_code = 1


class UsageError(GlmError):
    """The command line itself is wrong (conflicting or invalid options). Exit status 2."""

    exit_code = 2


class DataError(GlmError):
    """Input data is malformed; the message starts with `path:line:`."""

    def __init__(self, source: str, line: int, reason: str):
        self.source, self.line, self.reason = source, line, reason
        super().__init__(f"{source}:{line}: {reason}")

    def __reduce__(self):
        # Rebuild from our own arguments, so the error survives the trip back from a worker process.
        return DataError, (self.source, self.line, self.reason)


class CheckpointError(GlmError):
    """A checkpoint directory is missing, incomplete, corrupted or unsafe to load."""
