"""`harvest info STORE`: what a store holds, for people (a table) and for scripts (--json)."""
from __future__ import annotations

from . import fs
from .identity import content_digest
from .reader import open_store
from .urls import scrub, scrub_tree


def store_info(path: str, allow_partial: bool = False) -> dict:
    """Summary of the store at `path` (credentials scrubbed), with every root attribute under "attrs"."""
    store = open_store(path, allow_partial=allow_partial)
    attrs = store.attrs
    model = attrs.get("model") or {}
    dataset = attrs.get("dataset") or {}
    size = fs.du(path)
    # the store's held-out sequences (stores/split.py): recorded by the harvest, derived for older stores
    split = {**store.split.to_attrs(), "held_out_seqs": store.split.n_held_out(store.n_seqs),
             "description": store.split.describe(store.n_seqs, store.ctx_len)}
    return scrub_tree({
        "store": scrub(path), "format_version": attrs.get("format_version"), "complete": store.complete,
        "model": model.get("name"), "revision": model.get("revision"), "dataset": dataset.get("name"),
        "sites": {s: {"d": store.width(s), "encoding": store.encoding(s)} for s in store.sites},
        "grads": store.has_grads, "rows": store.n_rows, "seqs": store.n_seqs, "ctx_len": store.ctx_len,
        "bytes": size, "bytes_per_row": size / store.n_rows if store.n_rows else None,
        "split": split,   # a partial store's digest is not its data's
        "content_digest": content_digest(store) if store.complete else None, "attrs": dict(attrs),
    })


def print_store_info(info: dict, console) -> None:
    """A two-column table; every value printed literally (no rich markup)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"store {info['store']}"), show_header=False)
    rows = [
        ("model", info["model"] + (f" @ {info['revision']}" if info.get("revision") else "")
         if info["model"] else "-"),
        ("dataset", info["dataset"] or "-"),
        ("sites", ", ".join(f"{s} (d={v['d']}, {v['encoding']})" for s, v in info["sites"].items())),
        ("gradients", "yes" if info["grads"] else "no"),
        ("rows (tokens)", f"{info['rows']:,} in {info['seqs']:,} sequences of {info['ctx_len']}"),
        ("on disk", f"{info['bytes'] / 2**20:,.1f} MiB"
         + (f" ({info['bytes_per_row']:,.0f} bytes/row)" if info["bytes_per_row"] else "")),
        ("complete", "yes" if info["complete"] else "no (only the finished windows are counted)"),
    ]
    if info.get("split") is not None:
        rows.append(("held out", info["split"]["description"]))
    if info.get("content_digest"):   # the records' claim; `harvest verify` checks the bytes against them
        rows.append(("content", f"{info['content_digest'][:16]} (same data, same digest)"))
    for name, value in rows:
        table.add_row(Text(name), Text(str(value)))
    console.print(table)

