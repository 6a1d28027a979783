"""User-facing errors.

A HarvestError is something the user can fix (a bad site name, a model that cannot be found).
The CLI prints str(err) -- one line -- and exits non-zero without a traceback, so messages must
say what was wrong and, where possible, what is allowed instead.
"""


class HarvestError(Exception):
    """A user-facing problem; str() is one clear line."""

    def __str__(self) -> str:
        # Keep it to one line even if a caller passed a multi-line message (e.g. a wrapped
        # library error): the CLI prints exactly this.
        text = super().__str__()
        return " ".join(text.split())
