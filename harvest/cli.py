"""`harvest` command line: a thin click layer over harvest.run; options come from HarvestConfig."""
from __future__ import annotations


import click

from sae_harvest.stores.cli import CONTEXT, Group, config_options, console, entry as _entry, fail
from sae_harvest.stores.artifacts import artifact_json

from .run import HarvestConfig


def entry() -> None:
    _entry(main)


@click.group(cls=Group, context_settings=CONTEXT)
def main():
    """Harvest activations (and loss gradients) from a HF causal LM into a Zarr v3 store."""


@main.command("run")
@config_options(HarvestConfig)
@click.option("--resume", is_flag=True, help="Continue an interrupted harvest at --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary table (JSON summary only).")
def run_cmd(resume, overwrite, quiet, **fields):
    """Stream text through a model and write a shuffled activation store."""
    from .run import harvest

    if resume and overwrite:
        fail("--resume and --overwrite exclude each other")
    try:
        summary = harvest(HarvestConfig(**fields), resume=resume, overwrite=overwrite,
                          progress=not quiet, console=console)
    except KeyboardInterrupt:
        fail("interrupted: the store is incomplete; run again with --resume to finish it")
    if quiet and summary is not None:     # under torchrun only rank 0 reports
        click.echo(artifact_json(summary, indent=None, allow_nan=True))


@main.command("info")
@click.argument("store")
@click.option("--partial", is_flag=True, help="Also open an incomplete store.")
def info_cmd(store, partial):
    """Print a store's metadata as JSON."""
    from sae_harvest.stores import open_store

    click.echo(artifact_json(open_store(store, allow_partial=partial).attrs, allow_nan=True))


@main.command("verify")
@click.argument("store")
@click.option("--quick", is_flag=True, help="Check shard presence and sizes only (no checksums).")
def verify_cmd(store, quick):
    """Check a store against its window records; one line per problem, exit 0 only when sound."""
    from sae_harvest.stores.verify import verify_store

    problems = verify_store(store, quick=quick)
    for line in problems:
        click.echo(line)
    if problems:
        raise SystemExit(1)
    click.echo(f"ok: {store} ({'sizes' if quick else 'sizes and checksums'} of every recorded shard)")


if __name__ == "__main__":
    entry()
