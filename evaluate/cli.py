"""`evaluate` command line: a thin click layer over evaluate.splice; options come from EvalConfig."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from sae_harvest.stores.cli import CONTEXT, EXIT_SIGINT, Group, config_options, console, entry as _entry, fail

from .config import EvalConfig
from .features import FeaturesConfig
from .geometry import GeometryConfig
from .meta import MetaConfig
from .stitch import StitchConfig


def entry() -> None:
    _entry(main)


@click.group(cls=Group, context_settings=CONTEXT)
def main():
    """Evaluate sparse autoencoders against the live model."""


@main.command("splice")
@click.option("--sae", "saes", multiple=True, required=True,
              help="SAE checkpoint folder (from `train fit`), a sweep folder (every SAE in it) or a quoted "
                   "glob ('saes/*/topk_k*'); repeat for several.")
@config_options(EvalConfig)
@click.option("--json", "json_path", default=None, help="Write every metric (and this config) to this JSON file.")
@click.option("--plot", "plot_path", default=None, help="Write Pareto-front plots to this PNG.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def splice_cmd(saes, json_path, plot_path, quiet, **fields):
    """Splice each SAE's reconstruction into the model; report CE increase, KL, loss recovered,
    downstream MSE, L0, alive latents and reconstruction metrics."""
    from .replace import evaluate_all
    from .report import print_table, write_json, write_plot
    from .sweeps import expand_saes, name_rows

    cfg = EvalConfig(saes=expand_saes(saes), **fields)
    _check_outputs(json_path, [plot_path] if plot_path else [])   # before the evaluation, not after it
    try:
        results = name_rows(evaluate_all(cfg, progress=not quiet, console=console))
    except KeyboardInterrupt:
        fail("interrupted", EXIT_SIGINT)
    # A pipe or file gets the whole table rather than rich's 80-column default.
    print_table(results, Console(width=None if sys.stdout.isatty() else 160))
    try:
        if json_path:
            write_json(results, json_path, config=cfg.to_dict(), writer="evaluate splice")
            console.print(f"wrote {json_path}", highlight=False, markup=False)
        if plot_path:
            for written in write_plot(results, plot_path):
                console.print(f"wrote {written}", highlight=False, markup=False)
    except OSError as e:
        fail(f"cannot write output: {e}")


@main.command("demo")
@click.option("--out", default="demo-out", show_default=True, help="Folder for every output of the demo.")
@click.option("--tokens", default=250_000, show_default=True, type=int, help="Tokens to harvest.")
def demo_cmd(out, tokens):
    """Whole pipeline on the offline default model and corpus: harvest, train every SAE family,
    evaluate them spliced into the model, write a table, JSON and Pareto plot."""
    from .demo import run_demo

    try:
        run_demo(out, tokens=tokens, console=console)
    except KeyboardInterrupt:
        fail("interrupted: run the same command again to continue", EXIT_SIGINT)



def _wide_console() -> Console:
    # A pipe or file gets the whole table rather than rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 160)


def _check_outputs(json_path, plot_paths) -> None:
    """Refuse (one line) before any work an output path holding what this tool did not write, or
    one file named twice; checked again when written."""
    from sae_harvest.stores.artifacts import check_report_path

    from .report import check_plot_path

    paths = ([json_path] if json_path else []) + list(plot_paths)
    if len({str(Path(p).absolute()) for p in paths}) < len(paths):
        fail(f"--json and --plot name the same file ({', '.join(map(str, paths))}); give each its own")
    if json_path:
        check_report_path(json_path)
    for p in plot_paths:
        check_plot_path(p)


def _write_outputs(result, json_path, writer, plot_fn=None, plot_path=None) -> None:
    """An analysis's result (evaluate/results.py) as JSON (its to_dict()) and plots; only files this
    tool wrote are replaced (stores.artifacts.write_report, report.save_plots)."""
    from sae_harvest.stores.artifacts import write_report

    from .report import save_plots

    try:
        if json_path:
            write_report(json_path, result.to_dict(), writer=writer, indent=1)
            console.print(f"wrote {json_path}", highlight=False, markup=False)
        if plot_path:
            for written in save_plots(lambda p: plot_fn(result, p), plot_path):
                console.print(f"wrote {written}", highlight=False, markup=False)
    except OSError as e:
        fail(f"cannot write output: {e}")


@main.command("stitch")
@config_options(StitchConfig)
@click.option("--json", "json_path", default=None, help="Write the latent classes, groups and path to this JSON file.")
@click.option("--plot", "plot_path", default=None, help="Write the cosine, per-latent and path plots to this PNG.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def stitch_cmd(json_path, plot_path, quiet, **fields):
    """SAE stitching: novel vs reconstruction latents, and the path from a small SAE to a large one.

    Classifies the larger SAE's latents by decoder cosine (meta-SAE paper, section 4) and walks
    the path from the small SAE to the large one (add novel latents, then swap groups), with MSE,
    L0 and CE increase along it."""
    from .analysis_report import draw_stitch, print_stitch
    from .stitch import run_stitch

    _check_outputs(json_path, [plot_path] if plot_path else [])
    try:
        doc = run_stitch(StitchConfig(**fields), progress=not quiet, console=console).scrubbed()   # printed too: no credential on screen
    except KeyboardInterrupt:
        fail("interrupted", EXIT_SIGINT)
    print_stitch(doc, _wide_console())
    _write_outputs(doc, json_path, "evaluate stitch", draw_stitch, plot_path)



@main.command("meta")
@config_options(MetaConfig)
@click.option("--json", "json_path", default=None, help="Write the report to this JSON file.")
@click.option("--quiet", is_flag=True, help="No progress bar (meta shows none: accepted like every evaluate command).")
def meta_cmd(json_path, quiet, **fields):
    """Meta-SAE report: meta-L0, explained variance, sample latents' decompositions.

    For an SAE and a meta-SAE trained on its decoder rows (meta-SAE paper, section 5): meta-L0,
    explained variance of the unit decoder rows, and sample latents' meta-latent decompositions
    with the latents sharing them."""
    from .analysis_report import print_meta
    from .meta import run_meta

    _check_outputs(json_path, [])
    doc = run_meta(MetaConfig(**fields)).scrubbed()   # printed too: no credential on screen
    print_meta(doc, _wide_console())
    _write_outputs(doc, json_path, "evaluate meta")



@main.command("geometry")
@click.option("--sae", "saes", multiple=True, required=True,
              help="SAE checkpoint folder, sweep folder or quoted glob; repeat for several.")
@config_options(GeometryConfig)
@click.option("--json", "json_path", default=None, help="Write every distribution to this JSON file.")
@click.option("--plot", "plot_prefix", default=None,
              help="Write PREFIX-nn.png, PREFIX-cross.png (2+ SAEs) and PREFIX-freq.png (with --store).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def geometry_cmd(saes, json_path, plot_prefix, quiet, **fields):
    """Dictionary geometry: decoder cosines within and between SAEs, latent frequencies.

    Nearest-neighbour decoder cosine within each SAE, max cosine between every two SAEs (e2e
    paper, section 3.3), and with --store the CDF of latent activation frequency on held-out rows
    (g-SAE paper, sections 4.3-4.4)."""
    from .analysis_report import draw_geometry, print_geometry
    from .geometry import run_geometry

    from .sweeps import expand_saes

    cfg = GeometryConfig(saes=expand_saes(saes), **fields)
    # the PNGs draw_geometry writes: -cross with 2+ SAEs, -freq with a store
    kinds = ["nn"] + ["cross"] * (len(cfg.saes) > 1) + ["freq"] * bool(cfg.store)
    _check_outputs(json_path, [f"{plot_prefix}-{kind}.png" for kind in kinds] if plot_prefix else [])
    doc = run_geometry(cfg, progress=not quiet, console=console).scrubbed()   # printed too: no credential on screen
    print_geometry(doc, _wide_console())
    _write_outputs(doc, json_path, "evaluate geometry", draw_geometry, plot_prefix)


@main.command("features")
@click.option("--sae", "saes", multiple=True, required=True, help="SAE checkpoint folder; repeat for several.")
@config_options(FeaturesConfig)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def features_cmd(saes, quiet, **fields):
    """Feature browser from the store alone (no model forward): density, histogram, top and banded
    contexts with per-token activations, logit effects, neighbours; an offline page or a
    Neuronpedia export (docs/features.md)."""
    from .features import run_features
    from .features_out import latent_url, print_summary

    cfg = FeaturesConfig(saes=tuple(saes), **fields)
    try:
        summary = run_features(cfg, progress=not quiet, console=console)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_SIGINT)
    if summary is not None:
        print_summary(summary, cfg.out,
                      lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
        page = latent_url(cfg.out, 0, cfg.latent) if cfg.latent is not None else \
            latent_url(cfg.out, 0, 0).split("#")[0]
        click.echo(page if cfg.format == "html" else str(Path(cfg.out).absolute() / "neuronpedia"))


if __name__ == "__main__":
    entry()
