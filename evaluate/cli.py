"""`evaluate` command line: a thin click layer over evaluate.splice.evaluate_saes."""
from __future__ import annotations

import sys

import click
from rich.console import Console

console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def entry() -> None:
    """Console-script entry point: usage errors are one line too."""
    from stores.cli_util import run_cli

    run_cli(main, fail)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Evaluate sparse autoencoders against the live model."""


@main.command("splice")
@click.option("--model", default=None,
              help="HF model id or local directory; 'stdlib-gpt2' = the offline default. "
                   "Default with --store: the store's model.")
@click.option("--revision", default=None, help="Model revision (branch, tag or commit).")
@click.option("--sae", "saes", multiple=True, required=True,
              help="SAE checkpoint folder (from `train fit`); repeat for several.")
@click.option("--store", default=None, help="Evaluate on this store's held-out (last) sequences.")
@click.option("--dataset", default=None,
              help="Or evaluate on text: local jsonl/txt/parquet file or folder, or a hub id.")
@click.option("--split", default="train", show_default=True, help="Dataset split.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--tokens", default=65536, show_default=True, type=int,
              help="Evaluation tokens (rounded up to whole sequences).")
@click.option("--ctx-len", default=None, type=int,
              help="Tokens per sequence for --dataset (default 128; with --store: the store's).")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Sequences per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]), help="Model compute dtype.")
@click.option("--json", "json_path", default=None, help="Write every metric to this JSON file.")
@click.option("--plot", "plot_path", default=None, help="Write Pareto-front plots to this PNG.")
@click.option("--no-grad-select", is_flag=True,
              help="gtopk SAEs: plain TopK selection instead of gradient-aware selection.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def splice_cmd(model, revision, saes, store, dataset, split, text_column, tokens, ctx_len, batch_size,
               device, dtype, json_path, plot_path, no_grad_select, quiet):
    """Splice each SAE's reconstruction into the model; report CE increase, KL, loss recovered,
    downstream MSE, L0, alive latents and reconstruction metrics."""
    from evaluate.report import print_table, write_json, write_plot
    from evaluate.splice import EvaluateError, evaluate_saes

    try:
        results = evaluate_saes(model, list(saes), store=store, dataset=dataset, text_column=text_column,
                                split=split, tokens=tokens, ctx_len=ctx_len, batch_size=batch_size,
                                device=device, dtype=dtype, grad_select=not no_grad_select,
                                progress=not quiet, console=console, revision=revision)
    except EvaluateError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted")
    # A pipe or file gets the whole table rather than rich's 80-column default.
    print_table(results, Console(width=None if sys.stdout.isatty() else 160))
    try:
        if json_path:
            write_json(results, json_path)
            console.print(f"wrote {json_path}", highlight=False)
        if plot_path:
            write_plot(results, plot_path)
            console.print(f"wrote {plot_path}", highlight=False)
    except OSError as e:
        fail(f"cannot write output: {e}")


@main.command("demo")
@click.option("--out", default="demo-out", show_default=True, help="Folder for every output of the demo.")
@click.option("--tokens", default=250_000, show_default=True, type=int, help="Tokens to harvest.")
def demo_cmd(out, tokens):
    """Whole pipeline on the offline default model and corpus: harvest, train six SAE families,
    evaluate them spliced into the model, write a table, JSON and Pareto plot."""
    from harvest.errors import HarvestError
    from train.errors import TrainError

    from evaluate.demo import run_demo
    from evaluate.splice import EvaluateError

    try:
        run_demo(out, tokens=tokens, console=console)
    except (HarvestError, TrainError, EvaluateError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted: run the same command again to continue")


if __name__ == "__main__":
    main()
