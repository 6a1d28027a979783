"""`train` command line: a thin click layer over train.loop.fit."""
from __future__ import annotations

import sys

import click
from rich.console import Console

console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _comma_list(cast, kind: str):
    """A click callback parsing "1,2,4" into a tuple (a sweep)."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(cast(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected a comma list of {kind}, got {value!r}") from None
    return parse


_floats = _comma_list(float, "numbers")
_ints = _comma_list(int, "integers")


def entry() -> None:
    """Console-script entry point: usage errors are one line too."""
    from stores.cli_util import run_cli

    run_cli(main, fail)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Train sparse autoencoders offline from an activation store."""


@main.command("fit")
@click.option("--store", help="Store path or fsspec URL (from `harvest run`).")
@click.option("--site", help="Site to train on (required when the store has several).")
@click.option("--arch", default="topk", show_default=True, help="relu, gated, topk, batchtopk or gtopk.")
@click.option("--d-sae", type=int, help="Dictionary size (default: --expansion x d_in).")
@click.option("--expansion", default=16, show_default=True, type=int)
@click.option("--l1", default="1", show_default=True, callback=_floats,
              help="Sparsity coefficient lambda (relu: phi = lambda/d_in; gated: lambda). Comma list = sweep.")
@click.option("--k", default="32", show_default=True, callback=_ints,
              help="Active latents for topk/batchtopk/gtopk. Comma list = sweep.")
@click.option("--beta", type=float, help="gtopk gradient weight (default: calibrated so beta*|W_dec^T grad| ~ 2.4, the paper's operating point).")
@click.option("--lr", type=float, help="Default 5e-4 (relu, gated), 2e-4/sqrt(d_sae/2^14) (TopK family).")
@click.option("--batch-size", default=4096, show_default=True, type=int, help="Tokens per step.")
@click.option("--tokens", type=int, help="Training tokens (default: one pass; more than the store = epochs).")
@click.option("--out", required=True, help="Output folder: one sub-folder per swept SAE.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--include-bos", is_flag=True, help="Train on position-0 rows too (excluded by default).")
@click.option("--holdout-fraction", default=0.02, show_default=True, type=float,
              help="Last blocks of the store held out for the final report.")
@click.option("--checkpoint-every", default=1000, show_default=True, type=int, help="Steps between checkpoints.")
@click.option("--decoder-of", help="Meta-SAE: train a BatchTopK SAE on this SAE checkpoint's decoder rows.")
@click.option("--epochs", type=int, help="Passes over the data when --tokens is not given (meta-SAE).")
@click.option("--loss", default="local", show_default=True, type=click.Choice(["local", "e2e", "e2e+ds"]),
              help="local: reconstruction; e2e / e2e+ds: through the live frozen --model.")
@click.option("--model", help="Live model for --loss e2e / e2e+ds (default: the store's model).")
@click.option("--kl-coeff", type=float, help="e2e KL weight (default 1, 0.5 for e2e+ds).")
@click.option("--downstream-coeff", type=float, help="e2e+ds downstream MSE weight beta (default 2.5).")
@click.option("--init", help="Start from this SAE checkpoint (e.g. a local SAE before e2e).")
@click.option("--wandb", help="Log to this Weights & Biases project (needs wandb installed).")
@click.option("--resume", is_flag=True, help="Continue from --out's checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--quiet", is_flag=True, help="No progress bar; print the summary as JSON.")
def fit_cmd(resume, overwrite, quiet, **kwargs):
    """Train one SAE per swept value (--l1 or --k lists), reading the store once."""
    import json

    from train.config import TrainConfig
    from train.errors import TrainError
    from train.loop import TrainInterrupted, fit

    from train.sae import ARCH_NAMES

    if kwargs["arch"] not in ARCH_NAMES:
        fail(f"unknown --arch {kwargs['arch']!r}; choose one of {', '.join(ARCH_NAMES)}")
    if kwargs["decoder_of"] and click.get_current_context().get_parameter_source("arch").name == "DEFAULT":
        kwargs["arch"] = "batchtopk"   # the meta-SAE paper's choice
    try:
        cfg = TrainConfig(**kwargs)
        summaries = fit(cfg, resume=resume, overwrite=overwrite, progress=not quiet, console=console)
    except TrainError as e:
        fail(str(e))
    except TrainInterrupted as e:
        fail(str(e), code=130)
    except ValueError as e:   # config validation (e.g. k > d_sae)
        fail(str(e).splitlines()[0])
    if quiet:
        click.echo(json.dumps(summaries))


if __name__ == "__main__":
    main()
