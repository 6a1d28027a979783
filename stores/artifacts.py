"""The one JSON writer for artifacts (results.json, the analyses' JSON, cfg.json, state.json,
summary.json, metrics lines, printed summaries): every string in the document goes through the
credential scrubber first, so no caller can forget it (a store URL such as
s3://key:secret@bucket/x.zarr is in most configs).

Reports (`evaluate ... --json`, the demo's results.json and timing.json) go where the user says,
where anything may already be: write_report replaces a file only when this tool provably wrote
it, its config carrying `written_by: "sae_harvest ..."` (in config rather than beside it, so the
documents keep their documented keys and read back with Result.from_dict), and never writes into a
Zarr store or under an SAE folder's own file names. Re-running a command replaces its own report."""
from __future__ import annotations

import json
import os
import re
import stat
import uuid
from pathlib import Path

from sae_harvest.stores.errors import UserError
from sae_harvest.stores.urls import scrub_tree

REPORT_MARK = "sae_harvest"     # config.written_by of every report starts with it ("sae_harvest evaluate splice")
# what an SAE folder of train/ holds: a report never takes one of these names there
SAE_FILES = frozenset({"cfg.json", "sae_weights.safetensors", "state.json", "summary.json", "metrics.jsonl"})
# a report begins {"config": {"written_by": "sae_harvest ...": a foreign file is told apart from its
# first bytes, without reading a large one whole
_REPORT_HEAD = re.compile(r'\s*\{\s*"config"\s*:\s*\{\s*"written_by"\s*:\s*"' + REPORT_MARK + r'[ "]')


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
    # a name no one else has ("x": created here or not at all), so removing it on failure removes only ours
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    f = open(tmp, "x")
    try:
        with f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:     # e.g. path is a folder: no temporary left behind
        tmp.unlink(missing_ok=True)
        raise


# --- reports -----------------------------------------------------------------------------------
def mark_report(doc: dict, writer: str) -> dict:
    """doc with config.written_by = "sae_harvest <writer>" first in its config (a document without a
    config gets one holding only that)."""
    config = {k: v for k, v in (doc.get("config") or {}).items() if k != "written_by"}
    rest = {k: v for k, v in doc.items() if k != "config"}
    return {"config": {"written_by": f"{REPORT_MARK} {writer}", **config}, **rest}


def is_own_report(path) -> bool:
    """path is a JSON report this tool wrote (mark_report): judged from its first bytes, then parsed."""
    try:
        with open(path, "rb") as f:
            if not _REPORT_HEAD.match(f.read(4096).decode("utf-8", "replace")):
                return False
            f.seek(0)
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return False
    config = doc.get("config") if isinstance(doc, dict) else None
    mark = config.get("written_by") if isinstance(config, dict) else None
    return isinstance(mark, str) and mark.split(" ")[0] == REPORT_MARK


def enclosing_store(path) -> Path | None:
    """The outermost Zarr hierarchy (v3 zarr.json, v2 .zgroup) that `path` is or lies in, symlinks
    resolved; None when it lies in none. Whatever is written there becomes part of the store, and
    `harvest run --overwrite` of the store refuses (or would lose) it."""
    p = Path(path).resolve()
    found = None
    for folder in (p, *p.parents):
        if (folder / "zarr.json").is_file() or (folder / ".zgroup").is_file():
            found = folder
    return found


def check_report_folder(path) -> None:
    """One UserError line when `path` lies inside a Zarr store (a report there would become part of it)."""
    store = enclosing_store(Path(path).parent)
    if store is not None:
        raise UserError(f"{path} is inside the Zarr store {store}; a report there would become part of "
                        f"the store (give a path outside it)")


def check_report_path(path, is_own=is_own_report) -> None:
    """Raise one UserError line naming `path` unless a report may be written there: nothing there, or
    a regular file is_own(path) proves this tool wrote. Never inside a Zarr store (a report would
    become part of the store), never an SAE folder's own file name (cfg.json, ...)."""
    check_report_folder(path)
    p = Path(path)
    if p.name in SAE_FILES and (p.parent / "cfg.json").is_file():
        raise UserError(f"{path} is a file of the SAE folder {p.parent}; refusing to write a report there "
                        f"(give another path)")
    try:
        st = os.stat(p)
    except OSError:      # nothing there (or no way to it: the write says so, one line)
        return
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path} is a folder; give the path of a file for the report")
    if not stat.S_ISREG(st.st_mode) or not is_own(p):
        raise UserError(f"{path} exists and is not a report of this tool's (reports carry a written_by mark "
                        f"since 2026-12: an older one has none); refusing to replace it (give another path, "
                        f"or remove it first)")


def write_report(path, doc: dict, *, writer: str, indent: int | None = 2) -> None:
    """write_artifact of mark_report(doc, writer) to a path the user chose: refused (check_report_path)
    when something there is not a report of this tool's."""
    check_report_path(path)
    write_artifact(path, mark_report(doc, writer), indent=indent)
