"""The one JSON writer for artifacts (results.json, the analyses' JSON, cfg.json, state.json,
summary.json, metrics lines, printed summaries): every string in the document goes through the
credential scrubber first, so no caller can forget it (a store URL such as
s3://key:secret@bucket/x.zarr is in most configs)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from sae_harvest.stores.urls import scrub_tree


def artifact_json(doc, *, indent: int | None = 2, allow_nan: bool = False) -> str:
    """The JSON text of `doc` with every credential scrubbed. allow_nan=False (the default) makes a
    NaN or infinity an error rather than a token other JSON readers refuse."""
    return json.dumps(scrub_tree(doc), indent=indent, allow_nan=allow_nan)


def write_artifact(path, doc, *, indent: int | None = 2, allow_nan: bool = False) -> None:
    """artifact_json(doc) and a newline to the local file `path`, written to a temporary and
    renamed (a crash never leaves half a file); parent folders are made."""
    text = artifact_json(doc, indent=indent, allow_nan=allow_nan) + "\n"   # fail before touching any file
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
