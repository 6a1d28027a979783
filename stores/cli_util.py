"""One-line errors for click usage mistakes (missing option, bad value), shared by the CLIs."""
from __future__ import annotations

import sys

import click


def run_cli(group: click.Group, fail) -> None:
    """Run a click group; usage errors become one `error:` line and exit status 2."""
    try:
        rv = group.main(standalone_mode=False)
    except click.exceptions.UsageError as e:
        hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
        fail(e.format_message() + hint)
    except click.exceptions.Abort:
        fail("aborted")
    else:
        sys.exit(rv if isinstance(rv, int) else 0)
