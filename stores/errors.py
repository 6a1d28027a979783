"""The one user-error base class. Every layer raises a subclass; every CLI catches UserError and
prints str(err) as one `error:` line (exit 2), so no layer re-raises another layer's errors."""


class UserError(Exception):
    """A problem the user can act on; str() is one line, whatever the message held."""

    def __str__(self) -> str:
        from .urls import scrub_text   # a message may quote a URL; its credentials never print
        return " ".join(scrub_text(super().__str__()).split())


class StoreError(UserError):
    """A problem with a store (missing, incomplete, corrupt, another version)."""
