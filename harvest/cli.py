"""`harvest` command line: a thin click layer over harvest.run."""
from __future__ import annotations

import sys

import click
from rich.console import Console

from .data import DEFAULT_DATASET
from .errors import HarvestError

console = Console(stderr=True)


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    sys.exit(2)


def entry() -> None:
    """Console-script entry point: usage errors are one line too."""
    from stores.cli_util import run_cli

    run_cli(main, fail)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Harvest activations (and loss gradients) from a HF causal LM into a Zarr v3 store."""


@main.command("run")
@click.option("--model", default="gpt2", show_default=True,
              help="HF model id or local directory (GPT-2, Gemma 1/2/3); 'stdlib-gpt2' = the offline default.")
@click.option("--revision", default=None, help="Model revision (branch, tag or commit).")
@click.option("--dataset", default=DEFAULT_DATASET, show_default=True,
              help="HF dataset id (streamed), a local jsonl/parquet/txt file or folder, or a saved dataset; "
                   "'stdlib-py' = the offline default corpus.")
@click.option("--split", default="train", show_default=True)
@click.option("--text-column", default="text", show_default=True)
@click.option("--sites", default="blocks.6.resid_pre", show_default=True,
              help="Comma list / globs of blocks.<L>.<kind>; kinds: resid_pre, resid_mid, resid_post, attn_out, "
                   "attn_z, mlp_out, mlp_act.")
@click.option("--grads/--no-grads", default=False, show_default=True,
              help="Also store d(summed next-token CE)/d(activation) per token.")
@click.option("--tokens", default=1_000_000, show_default=True, type=int, help="Tokens to harvest.")
@click.option("--ctx-len", default=128, show_default=True, type=int, help="Tokens per sequence.")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Sequences per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Model compute dtype.")
@click.option("--out", required=True, help="Store path or fsspec URL (s3://bucket/x.zarr, gs://..., file://...).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the row shuffle.")
@click.option("--shuffle-window", default=1 << 20, show_default=True, type=int,
              help="Tokens shuffled together (bounds host memory: ~2 windows of rows are held).")
@click.option("--act-encoding", default="auto", show_default=True,
              type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
              help="auto: float16 for GPT-2, bfloat16 for Gemma (fp16 overflows there).")
@click.option("--grad-encoding", default="bfloat16", show_default=True,
              type=click.Choice(["bfloat16", "float32"]))
@click.option("--compressor", default="none", show_default=True, type=click.Choice(["none", "zstd"]))
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off by default).")
@click.option("--resume", is_flag=True, help="Continue an interrupted harvest at --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary table (JSON summary only).")
def run_cmd(resume, overwrite, quiet, **kwargs):
    """Stream text through a model and write a shuffled activation store."""
    from .run import config_from_kwargs, harvest

    if resume and overwrite:
        fail("--resume and --overwrite exclude each other")
    try:
        summary = harvest(config_from_kwargs(**kwargs), resume=resume, overwrite=overwrite,
                          progress=not quiet, console=console)
    except HarvestError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted: the store is incomplete; run again with --resume to finish it")
    if quiet:
        import json
        click.echo(json.dumps(summary))


@main.command("info")
@click.argument("store")
@click.option("--partial", is_flag=True, help="Also open an incomplete store.")
def info_cmd(store, partial):
    """Print a store's metadata as JSON."""
    import json

    from stores import StoreError, open_store

    try:
        s = open_store(store, allow_partial=partial)
    except StoreError as e:
        fail(str(e))
    click.echo(json.dumps(s.attrs, indent=2))


if __name__ == "__main__":
    main()
