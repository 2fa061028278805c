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


class OptionError(UsageError):
    """A setting of a core options object is wrong. Core names settings by field (`seq_len`); the command
    that filled the options renders the same message with its flag names (`--seq-len`) by `render`.

    `template` names each field it mentions in braces, and takes the values it shows as keywords:
    OptionError("{seq_len} {value} exceeds the model's context {context}", value=4096, context=2048).
    """

    def __init__(self, template: str, **values):
        self.template, self.values = template, values
        super().__init__(self.render(str))

    def render(self, name) -> str:
        """The message with every {field} replaced by `name(field)` (a flag, say)."""
        import string

        fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name} - set(self.values)
        return self.template.format(**{f: name(f) for f in fields}, **self.values)

    def __reduce__(self):
        return _option_error, (self.template, self.values)


def _option_error(template: str, values: dict) -> OptionError:
    return OptionError(template, **values)
