"""Reads of a damaged, edited, relabelled or mixed store raise; they never return zeros or garbage.

Regression tests for the store items of the stop-16 safety review: every read path of the arrays a
Store hands out is checked (10), format-1 stores refuse a missing shard (11), edited codecs fail
verify and open (8), credentials holding a '/' never print (12), a window copied in from a
sibling store fails verify and open (13).
"""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from sae_harvest.harvest.cli import main as harvest_cli
from sae_harvest.stores import StoreError, StoreWriter, open_store
from sae_harvest.stores.urls import redact, scrub, scrub_text, secrets_in
from sae_harvest.stores.verify import unbound, verify_store
from tests.test_train_loop import make_store

SITE = "blocks.0.resid_pre"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two harvests of the same shape with other data (another seed), and one killed before its
    last window."""
    root = tmp_path_factory.mktemp("reads")
    for name, kw in (("s", {}), ("sibling", {"seed": 1}), ("partial", {"complete": False})):
        make_store(root / f"{name}.zarr", **kw)
    return root


def _copy(stores, tmp_path, name="s"):
    return shutil.copytree(stores / f"{name}.zarr", tmp_path / f"{name}.zarr")


def _shard_of(name: str, arr, row: int) -> str:
    """The relative path of the shard holding `row` of store array `name`."""
    return f"{name}/c/{row // arr.shards[0]}" + "/0" * (arr.ndim - 1)


# ---- 10: every read path of store.tokens / rows_seq / rows_pos is checked ------------------------
def test_every_array_read_path_refuses_a_missing_shard(stores, tmp_path):
    path = _copy(stores, tmp_path)
    store = open_store(path)
    tokens, pos = store.tokens, store.rows_pos
    seq, row = 33, 1100                    # inside window 2
    (path / _shard_of("tokens", tokens, seq)).unlink()
    (path / _shard_of("rows/pos", pos, row)).unlink()
    mask = np.zeros(store.n_rows, dtype=bool)
    mask[row] = True
    reads = {
        "tokens[a:b]": lambda: tokens[32:48], "tokens[i]": lambda: tokens[seq],
        "tokens[-i]": lambda: tokens[seq - store.n_seqs],
        "tokens.oindex": lambda: tokens.oindex[32:48], "tokens.oindex[ints]": lambda: tokens.oindex[[seq]],
        "tokens.vindex": lambda: tokens.vindex[[seq], [0]],
        "tokens.get_basic_selection": lambda: tokens.get_basic_selection(slice(32, 48)),
        "tokens.get_orthogonal_selection": lambda: tokens.get_orthogonal_selection(([seq], slice(None))),
        "tokens.get_coordinate_selection": lambda: tokens.get_coordinate_selection(([seq], [0])),
        "tokens[ints]": lambda: tokens[np.array([seq])], "tokens[ellipsis]": lambda: tokens[..., 0],
        "np.asarray(tokens)": lambda: np.asarray(tokens),
        "rows_pos[mask]": lambda: pos[mask], "rows_pos.oindex[mask]": lambda: pos.oindex[mask],
        "rows_pos.vindex[mask]": lambda: pos.vindex[mask],
        "rows_pos.get_mask_selection": lambda: pos.get_mask_selection(mask),
        "rows_pos[ints]": lambda: pos[[row]], "rows_pos[a:b:2]": lambda: pos[1024:1536:2],
    }
    for what, read in reads.items():
        with pytest.raises(StoreError, match="is missing"):
            read()
            pytest.fail(f"{what} returned rows of a missing shard")
    for unchecked in ("blocks", "get_block_selection", "set_basic_selection", "resize", "store"):
        with pytest.raises(AttributeError, match=r"oindex"):
            getattr(tokens, unchecked)
    # metadata still there; rows elsewhere still read
    assert tokens.dtype == np.int32 and tokens.shape == (64, 32) and tokens.chunks and tokens.attrs is not None
    np.testing.assert_array_equal(tokens.oindex[[1, 2]], tokens[1:3])


def test_a_boolean_mask_is_checked_by_the_rows_it_selects(stores, tmp_path):
    partial = open_store(stores / "partial.zarr", allow_partial=True)
    pos = partial.rows_pos
    held = partial.n_rows
    # a mask over the planned rows would select unwritten (zero) rows: refused, not read
    with pytest.raises(IndexError, match=r"shape \(1536,\), not bool \(2048,\)"):
        pos[np.ones(4 * 16 * 32, dtype=bool)]
    assert held == 3 * 16 * 32 and len(pos) == held and pos.shape == (held,)
    np.testing.assert_array_equal(pos[np.ones(held, dtype=bool)], pos[0:held])
    with pytest.raises(IndexError):
        pos[held]                           # an unwritten row
    with pytest.raises(IndexError):
        pos.oindex[[0, held]]


def test_negative_indices_count_from_the_end_and_bad_ones_are_index_errors(stores):
    store = open_store(stores / "s.zarr")
    pos, n = store.rows_pos, store.n_rows
    last = pos[n - 1]
    assert pos[-1] == last
    np.testing.assert_array_equal(pos[np.array([-1])], [last])
    np.testing.assert_array_equal(pos.oindex[[-1, 0]], pos.oindex[[n - 1, 0]])
    np.testing.assert_array_equal(store.tokens[-1], store.tokens[len(store.tokens) - 1])
    for bad in (lambda: pos[np.array([n])], lambda: pos[np.array([-n - 1])], lambda: store.tokens[0, 99]):
        with pytest.raises(IndexError):     # the caller's mistake, not damage to the store
            bad()


# ---- 11: a format-1 store (no window records) refuses a missing shard -----------------------------
def _as_format_1(path):
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["sae_store"].update(format_version=1, windows_done=4)
    (path / "zarr.json").write_text(json.dumps(meta))
    (path / "final.json").unlink()
    shutil.rmtree(path / "windows")


def test_format_1_store_refuses_a_missing_shard(stores, tmp_path):
    path = _copy(stores, tmp_path)
    _as_format_1(path)
    store = open_store(path)
    assert store.records is None
    whole = open_store(stores / "s.zarr").acts(SITE, slice(None))
    np.testing.assert_array_equal(store.acts(SITE, slice(None)), whole)   # an intact one reads as before
    store = open_store(path)
    (path / _shard_of(f"acts/{SITE}", store._array(f"acts/{SITE}"), 1100)).unlink()
    for read in (lambda: store.acts(SITE, slice(1024, 1536)), lambda: store.acts(SITE, [1100, 3]),
                 lambda: list(store.batches(SITE, 64, epochs=1))):
        with pytest.raises(StoreError, match="is missing .*format-1"):
            read()


# ---- 8: array metadata edited away from what the writer writes -----------------------------------
def _edit(path, array, change):
    meta_file = path / array / "zarr.json"
    meta = json.loads(meta_file.read_text())
    change(meta["codecs"][0]["configuration"])
    meta_file.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, words", [
    (lambda c: c["codecs"][0]["configuration"].update(endian="big"), "little-endian"),
    (lambda c: c["index_codecs"][0]["configuration"].update(endian="big"), "shard index"),
    (lambda c: c["codecs"].pop(), "crc32c"),
    (lambda c: c["codecs"].insert(1, {"name": "transpose", "configuration": {"order": [1, 0]}}), "codecs"),
])
def test_edited_codecs_fail_verify_and_open(stores, tmp_path, edit, words):
    path = _copy(stores, tmp_path)
    _edit(path, f"acts/{SITE}", edit)
    problems = verify_store(path, quick=True)
    assert any(f"acts/{SITE}" in p and words in p for p in problems), problems
    with pytest.raises(StoreError, match=f"damaged: array acts/{SITE}"):
        open_store(path)


def test_edited_chunk_shape_fails_verify(stores, tmp_path):
    path = _copy(stores, tmp_path)
    # half the rows per chunk: still a layout this tool could write, but not these shards' layout
    _edit(path, f"acts/{SITE}", lambda c: c.update(chunk_shape=[c["chunk_shape"][0] // 2, c["chunk_shape"][1]]))
    problems = verify_store(path)
    assert problems and all(f"acts/{SITE}" in p and "index" in p for p in problems), problems
    with pytest.raises(StoreError):
        open_store(path).acts(SITE, slice(0, 64))


# ---- 12: a credential holding '/' -----------------------------------------------------------------
KEY, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PIECES = [KEY, *SECRET.split("/")]


def _no_piece(text: str):
    for piece in PIECES:
        assert piece not in text, f"{piece} leaked: {text}"


def test_credentials_holding_a_slash_are_scrubbed():
    url = f"s3://{KEY}:{SECRET}@bucket/x.zarr"
    assert scrub(url) == "s3://***@bucket/x.zarr"
    _no_piece(scrub_text(f"error: no store at '{url}'."))
    assert set(PIECES) <= secrets_in(f"info {url}")
    # what botocore quotes: the netloc up to the first '/', no scheme
    _no_piece(redact(f'Invalid bucket name "{KEY}:{SECRET.split("/")[0]}"', secrets_in(f"info {url}")))
    # an '@' in a path is not user info: the URL recorded for a resume must stay the same (and
    # scrubbing twice must not move it to another bucket); ordinary URLs are as before
    for path in ("gs://bucket/run@v2.zarr", "s3://lab-bucket/team@lab/x.zarr", "https://host:8080/a@b/x"):
        assert scrub(path) == path and scrub(scrub(path)) == path and secrets_in(path) == set()
    assert scrub("s3://user:pa@ss/word@bucket/x.zarr") == "s3://***@bucket/x.zarr"
    assert scrub("s3://KEY:SECRET@bucket/x.zarr") == "s3://bucket/x.zarr"


@pytest.mark.parametrize("command", ["info", "verify", "train fit"])
def test_cli_lines_never_hold_a_credential_with_a_slash(command, tmp_path, monkeypatch):
    from sae_harvest.train.cli import main as train_cli
    for var, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "x"), ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(var, value)
    url = f"s3://{KEY}:{SECRET}@bucket/x.zarr"
    cli, args = (train_cli, ["fit", "--store", url, "--out", str(tmp_path / "o"), "--device", "cpu"]) \
        if command == "train fit" else (harvest_cli, [command, url])
    r = CliRunner().invoke(cli, args)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "credentials" in lines[0], r.output
    _no_piece(r.output)


# ---- 13: a window copied in from a sibling store --------------------------------------------------
def _transplant(src, dst, window: int):
    key = f"windows/{window:08d}.json"
    record = json.loads((src / key).read_text())
    for entries in record["shards"].values():
        for shard, _, _ in entries:
            shutil.copyfile(src / shard, dst / shard)
    shutil.copyfile(src / key, dst / key)


def test_a_window_copied_in_from_a_sibling_store_fails_verify_open_and_resume(stores, tmp_path):
    path = _copy(stores, tmp_path)
    _transplant(stores / "sibling.zarr", path, 2)
    with pytest.raises(StoreError, match="window 2: .* copied in from another store"):
        open_store(path)
    sibling = open_store(stores / "sibling.zarr").creation_id
    assert verify_store(path) == [f"window 2: its record was written for store {sibling!r}, not this one "
                                  f"({open_store(stores / 's.zarr').creation_id!r}): copied in from another store"]
    with pytest.raises(StoreError, match="copied in from another store"):
        StoreWriter.open(str(path))


def test_windows_of_older_stores_are_reported_as_unbound(stores, tmp_path):
    path = _copy(stores, tmp_path)
    assert unbound(path) == []
    for key in sorted((path / "windows").iterdir()):
        record = json.loads(key.read_text())
        del record["creation_id"]                # as written before records carried it
        key.write_text(json.dumps(record))
    _transplant(stores / "sibling.zarr", path, 1)
    record = json.loads((path / "windows/00000001.json").read_text())
    del record["creation_id"]
    (path / "windows/00000001.json").write_text(json.dumps(record))
    # such a transplant cannot be seen: verify passes and says which windows it could not judge
    assert verify_store(path) == [] and unbound(path) == [0, 1, 2, 3]
    from click.testing import CliRunner
    from sae_harvest.harvest.cli import main as harvest_cli
    said = CliRunner().invoke(harvest_cli, ["verify", str(path)])
    assert said.exit_code == 0 and "note: 4 window record(s) name no store" in said.output


def test_a_relabelled_store_opens_but_fails_verify(stores, tmp_path):
    path = _copy(stores, tmp_path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["sae_store"]["creation_id"] = "b" * 32     # every window now names another store
    (path / "zarr.json").write_text(json.dumps(meta))
    problems = verify_store(path)
    assert len(problems) == 4 and all("no window names this store" in p for p in problems), problems
    open_store(path).acts(SITE, slice(0, 8))    # not a window copied in: readers read it (identity tells it apart)


def test_a_lease_from_another_pid_namespace_is_not_stale_by_its_pid(monkeypatch):
    """Containers may share a host name without sharing pids: a fresh lease whose pid is not alive
    here is another namespace's live writer unless it was written in this one."""
    import socket
    import time

    from sae_harvest.stores import lease

    monkeypatch.setattr(lease, "_pid_alive", lambda pid: False)   # the pid means nothing here
    fresh = {"owner": "a", "host": socket.gethostname(), "pid": 12345, "heartbeat": time.time()}
    monkeypatch.setattr(lease, "_pid_namespace", lambda: "pid:[1]")
    assert lease.is_stale({**fresh, "pid_ns": "pid:[1]"})          # our namespace, pid gone: stale
    assert not lease.is_stale({**fresh, "pid_ns": "pid:[2]"})      # another container's live writer
    assert lease.is_stale(fresh)                                   # an old lease without pid_ns: as before
    assert lease.is_stale({**fresh, "pid_ns": "pid:[2]", "heartbeat": time.time() - 2 * lease.STALE_S})
    assert json.loads(lease.Lease("/nowhere")._record())["pid_ns"] == "pid:[1]"
