"""`harvest` command line: a thin click layer over harvest.run; options come from HarvestConfig."""
from __future__ import annotations


import click

from sae_harvest.stores.cli import (CONTEXT, EXIT_PROBLEMS, EXIT_SIGINT, Group, config_options, console,
                                    entry as _entry, fail)
from sae_harvest.stores.urls import scrub, scrub_text, scrub_tree
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
        fail("interrupted: the store is incomplete; run again with --resume to finish it", EXIT_SIGINT)
    if quiet and summary is not None:     # under torchrun only rank 0 reports
        click.echo(artifact_json(summary, indent=None, allow_nan=True))


@main.command("info")
@click.argument("store")
@click.option("--partial", is_flag=True, help="Also open an incomplete store.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary and every root attribute as JSON.")
def info_cmd(store, partial, as_json):
    """Summarise a store: model, sites, rows, size on disk, complete, split."""
    from rich.console import Console

    from sae_harvest.stores.info import print_store_info, store_info

    info = store_info(store, allow_partial=partial)
    if as_json:
        click.echo(artifact_json(info, allow_nan=True))
    else:
        print_store_info(info, Console(highlight=False))


@main.command("verify")
@click.argument("store")
@click.option("--quick", is_flag=True, help="Check shard presence and sizes only (no checksums).")
def verify_cmd(store, quick):
    """Check a store against its window records; one line per problem, exit 0 only when sound."""
    from sae_harvest.stores.verify import held_out_line, verify_store

    problems = verify_store(store, quick=quick)
    for line in problems:
        click.echo(scrub_text(line))
    if problems:
        raise SystemExit(EXIT_PROBLEMS)
    click.echo(f"ok: {scrub(store)} ({'sizes' if quick else 'sizes and checksums'} of every recorded shard)")
    from sae_harvest.stores.verify import legacy_shards
    if not quick and legacy_shards(store):   # records of the constant crc32c: say what was not checked
        click.echo(f"note: {legacy_shards(store)} shard(s) carry the old constant crc32c record: their chunks' "
                   f"own crc32c were checked, but a swap between shards cannot be seen (docs/store-format.md)")
    from sae_harvest.stores.verify import unbound
    older = unbound(store) if not quick else []
    if older:   # records from before they named their store
        click.echo(f"note: {len(older)} window record(s) name no store (written before records carried the "
                   f"creation_id): a window copied in from another store cannot be told there")
    click.echo(f"held out: {held_out_line(store)}")
    if not quick:   # the bytes now match the records, so the digest of the records is the data's
        from sae_harvest.stores import open_store
        from sae_harvest.stores.identity import content_digest
        digest = content_digest(open_store(store))
        if digest:
            click.echo(f"content: {digest} (same data, same digest)")


if __name__ == "__main__":
    entry()
