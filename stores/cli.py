"""What every command line shares: one-line errors, the entry point, device choice, the progress
bar. It lives in the bottom package so harvest, train and evaluate all use one copy; nothing here
knows of models."""
from __future__ import annotations

import os
import sys

import click
from rich.console import Console
from rich.text import Text

from .errors import UserError
from .urls import redact, secrets_in

console = Console(stderr=True)

# One exit status per cause, the same in every command (docs/cli.md "Exit codes").
EXIT_OK = 0
EXIT_PROBLEMS = 1      # `harvest verify`: the store has problems (one line each)
EXIT_BAD_INPUT = 2     # bad input or a problem the user can act on: one `error:` line, nothing changed
EXIT_BUG = 70          # an unexpected error (a bug): one scrubbed line; SAE_HARVEST_TRACEBACK=1 adds the traceback
EXIT_SIGINT = 130      # Ctrl-C (128 + SIGINT); training saves a checkpoint first
EXIT_SIGTERM = 143     # SIGTERM (128 + SIGTERM), e.g. from Slurm; training saves a checkpoint first

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def one_line(message) -> str:
    """message as one line, with every URL scrubbed and every credential the command line carried
    masked (a library may quote a URL's netloc without its scheme, where scrub_text cannot see it)."""
    return " ".join(redact(str(message), secrets_in(" ".join(sys.argv[1:]))).split())


def fail(message: str, code: int = 2):
    """Print one `error:` line and exit (status 2 unless told otherwise). The message is printed
    literally: a path holding `[bold]` or a gloo message holding `[/__w/...]` is text, not markup."""
    line = Text("error:", style="red")
    line.append(" " + one_line(message))
    console.print(line, highlight=False, soft_wrap=True, markup=False, emoji=False)
    sys.exit(code)


class Group(click.Group):
    """A command group whose commands turn any UserError into one `error:` line (exit 2), also
    when invoked from click's test runner rather than through entry()."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            fail(str(e))


def entry(group: click.Group) -> None:
    """Run a click group as a console script: usage errors, UserErrors and Ctrl-C are one line."""
    try:
        rv = group.main(standalone_mode=False)
    except click.exceptions.UsageError as e:
        hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
        fail(e.format_message() + hint)
    except (click.exceptions.Abort, KeyboardInterrupt):   # click turns Ctrl-C into Abort
        fail("interrupted", EXIT_SIGINT)
    except UserError as e:
        fail(str(e))
    except Exception as e:   # not foreseen (a library's error on odd input, a bug): still one scrubbed line
        if os.environ.get("SAE_HARVEST_TRACEBACK"):
            import traceback
            sys.stderr.write(redact(traceback.format_exc(), secrets_in(" ".join(sys.argv[1:]))))
        text = " ".join(str(e).split())
        text = text if len(text) <= 300 else text[:300] + "..."
        fail(f"{type(e).__name__}: {text or 'no message'} (unexpected; SAE_HARVEST_TRACEBACK=1 prints the "
             f"traceback)", code=EXIT_BUG)
    else:
        sys.exit(rv if isinstance(rv, int) else 0)


def pick_device(name: str):
    """torch.device for --device: "auto" is CUDA when there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is available")
    return device


# ---- options generated from the frozen config dataclasses (one source of truth) ----------------
def opt(default, help: str, **click_kw):
    """A config field that is also a CLI option: `x: int = opt(3, "what x is")`. click_kw may hold
    `choices`, `flag` (another option name), `cli=False` (config only), `show_default`."""
    import dataclasses

    return dataclasses.field(default=default, metadata={"help": help, **click_kw})


def _comma_list(cast, kind: str):
    def parse(ctx, param, value):
        if value is None or isinstance(value, tuple):
            return value
        try:
            return tuple(cast(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected a comma list of {kind}, got {value!r}") from None
    return parse


_SCALARS = {"int": int, "float": float, "str": str}


def config_options(config_cls, *, skip: tuple[str, ...] = ()):
    """A decorator adding one click option per field of `config_cls` that has help metadata, in
    field order; defaults and help text come from the dataclass, so nothing is written twice."""
    import dataclasses

    def decorate(fn):
        for f in reversed(dataclasses.fields(config_cls)):
            meta = f.metadata
            if "help" not in meta or not meta.get("cli", True) or f.name in skip:
                continue
            name = meta.get("flag", "--" + f.name.replace("_", "-"))
            required = f.default is dataclasses.MISSING
            default = None if required else f.default
            kw = dict(help=meta["help"], required=required, show_default=meta.get("show_default", True))
            kind = str(f.type).replace(" ", "")
            base = kind.removesuffix("|None")
            if kind == "bool":
                decl = (name if not default else f"{name}/--no-{name[2:]}",)
                kw.update(is_flag=True, default=default, show_default=bool(default))
            elif base.startswith("tuple["):
                cast = _SCALARS[base[6:].split(",")[0]]
                kw.update(default=",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
                          if default is not None else None,
                          callback=_comma_list(cast, "integers" if cast is int else "numbers"),
                          multiple=False)
                if not default:   # an empty list means "see the help": never `[default: ""]`
                    kw["show_default"] = False
                decl = (name,)
            else:
                decl = (name,)
                if not required:   # click >= 8.3 takes an explicit default None as a value
                    kw["default"] = default
                if "choices" in meta:
                    kw["type"] = click.Choice(list(meta["choices"]))
                elif base in _SCALARS:
                    kw["type"] = _SCALARS[base]
                if default is None:
                    kw["show_default"] = False
            fn = click.option(*decl, f.name, **kw)(fn)
        return fn
    return decorate
