"""`train` command line: a thin click layer over train.fit; options come from TrainConfig."""
from __future__ import annotations


import click

from sae_harvest.stores.cli import CONTEXT, Group, config_options, console, entry as _entry, fail
from sae_harvest.stores.artifacts import artifact_json

from . import registry
from .config import TrainConfig


def entry() -> None:
    _entry(main)


@click.group(cls=Group, context_settings=CONTEXT)
def main():
    """Train sparse autoencoders offline from an activation store."""


@main.command("fit")
@config_options(TrainConfig)
@click.option("--resume", is_flag=True, help="Continue from --out's checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--quiet", is_flag=True, help="No progress bar; print the summary as JSON.")
def fit_cmd(resume, overwrite, quiet, **fields):
    """Train one SAE per swept value (--l1 or --k lists), reading the store once."""
    from .driver import TrainInterrupted
    from .fit import fit

    if fields["arch"] not in registry.ARCH_NAMES:
        fail(f"unknown --arch {fields['arch']!r}; choose one of {', '.join(registry.ARCH_NAMES)}")
    if fields["decoder_of"] and click.get_current_context().get_parameter_source("arch").name == "DEFAULT":
        fields["arch"] = "batchtopk"   # the meta-SAE paper's choice
    try:
        cfg = TrainConfig(**fields)
        summaries = fit(cfg, resume=resume, overwrite=overwrite, progress=not quiet, console=console)
    except TrainInterrupted as e:
        fail(str(e), code=e.code)
    except ValueError as e:   # config validation (e.g. k > d_sae)
        fail(str(e).splitlines()[0])
    if quiet:
        click.echo(artifact_json(summaries, indent=None, allow_nan=True))


_OWN_PARAMS = len(fit_cmd.params) - len(config_options(TrainConfig)(lambda: None).__click_params__)


def _refresh_options() -> None:
    """Regenerate fit's options after an architecture is registered (TrainConfig's fields changed)."""
    generated = list(reversed(config_options(TrainConfig)(lambda: None).__click_params__))
    fit_cmd.params = generated + fit_cmd.params[len(fit_cmd.params) - _OWN_PARAMS:]


registry.on_register(_refresh_options)


if __name__ == "__main__":
    entry()
