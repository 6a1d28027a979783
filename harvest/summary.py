"""What `harvest run` reports when it ends: the store's rows, sites, size and speed, as a dict
(printed as JSON with --quiet) and as a table on the console."""
from __future__ import annotations

from sae_harvest.stores import fs, open_store
from sae_harvest.stores.urls import scrub


def summarize(path: str, *, seconds: float, tokens_this_run: int, console=None, quiet=False,
              waits: dict | None = None) -> dict:
    """The finished store at `path` described, with this run's speed and where it stood waiting."""
    store = open_store(path)
    size = fs.du(path)
    summary = {
        "store": scrub(path), "rows": store.n_rows, "seqs": store.n_seqs, "ctx_len": store.ctx_len,
        "sites": store.sites, "grads": store.has_grads, "bytes": size,
        "bytes_per_token": size / max(store.n_rows, 1), "seconds": seconds,
        "split": {**store.split.to_attrs(), "held_out_seqs": store.split.n_held_out(store.n_seqs)},
        "tokens_per_s": tokens_this_run / seconds if seconds > 0 else None,
        "waited": waits or {},
    }
    if not quiet and console is not None:
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(f"store {scrub(path)}"), show_header=False)   # a path is text, not markup
        table.add_row("rows (tokens)", f"{store.n_rows:,} in {store.n_seqs:,} sequences of {store.ctx_len}")
        table.add_row("sites", ", ".join(f"{s} (d={store.width(s)})" for s in store.sites))
        table.add_row("gradients", "yes" if store.has_grads else "no")
        table.add_row("held out", store.split.describe(store.n_seqs, store.ctx_len))
        table.add_row("on disk", f"{size / 2**20:,.1f} MiB ({summary['bytes_per_token']:,.0f} bytes/token)")
        if summary["tokens_per_s"]:
            table.add_row("speed", f"{summary['tokens_per_s']:,.0f} tokens/s over {seconds:,.1f} s")
        if waits:
            table.add_row("stood waiting", f"{waits['data_s']:,.1f} s for text, {waits['writer_s']:,.1f} s for the "
                                           f"store writes")
        console.print(table)
    return summary
