"""Issue 16, the store side: every hole an adversarial pass found, one regression test each.
Refusals are one line, exit 2, and every byte under the test's folder unchanged (hashed)."""
import hashlib
import json
import os
import shutil

import google_crc32c
import numpy as np
import pytest
from click.testing import CliRunner

from sae_harvest.harvest import outpath
from sae_harvest.harvest.cli import main as harvest_cli
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.stores import StoreError, StoreWriter, fs, open_store
from sae_harvest.stores.verify import verify_store
from tests.test_store_v2 import _Killed, _arrays, _assert_same, _expire_lease, _one_error_line
from tests.tiny_models import make_tiny_model, write_corpus

SITE = "blocks.0.resid_pre"


@pytest.fixture(scope="module")
def assets(safety_assets):
    return safety_assets


def make_assets(tmp_path_factory) -> dict:
    """A tiny GPT-2 and corpus (tests/conftest.py `safety_assets` shares one across files)."""
    root = tmp_path_factory.mktemp("safety_assets")
    corpus = write_corpus(root / "docs.jsonl", n_docs=200, max_words=80)
    return {"gpt2": make_tiny_model("gpt2", root / "gpt2"), "corpus": str(corpus)}


def _cfg(assets, out, **kw):
    base = dict(out=str(out), model=assets["gpt2"], dataset=assets["corpus"], sites=SITE, grads=True,
                tokens=1536, ctx_len=32, batch_size=8, shuffle_window=512, device="cpu")
    return HarvestConfig(**{**base, **kw})


def _args(assets, out, *extra):
    return ["run", "--model", assets["gpt2"], "--dataset", assets["corpus"], "--tokens", "1536", "--ctx-len", "32",
            "--sites", SITE, "--grads", "--batch-size", "8", "--shuffle-window", "512", "--device", "cpu",
            "--out", str(out), "--quiet", *extra]


def _cli(*args):
    result = CliRunner().invoke(harvest_cli, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def stores(safety_stores):
    return safety_stores


def make_stores(assets, tmp_path_factory) -> dict:
    """Uninterrupted stores: `ref` (seed 0) and `other` (seed 5, another row order and values)."""
    root = tmp_path_factory.mktemp("safety_ref")
    harvest(_cfg(assets, root / "ref.zarr"), progress=False)
    harvest(_cfg(assets, root / "other.zarr", seed=5), progress=False)
    return {"ref": root / "ref.zarr", "other": root / "other.zarr"}


def snapshot(root, skip=()) -> dict:
    """Every file's sha256 and every folder under root (links as their targets' text)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel + "/"] = "dir"
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            if name in skip:
                continue
            out[os.path.join(rel, name)] = ("link:" + os.readlink(p)) if os.path.islink(p) else \
                hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _user_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.txt").write_text("years of work")
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "results.csv").write_text("1,2,3")


# ---- item 1: --out that names the working directory, the root, nothing -----------------------
@pytest.mark.parametrize("out", ["", "/", "//", ".", "./", "file://", "file:///", "file://.", "<cwd>", "<parent>"])
def test_out_naming_cwd_root_or_nothing_is_refused(assets, tmp_path, monkeypatch, out):
    work = tmp_path / "work"
    _user_files(work)
    monkeypatch.chdir(work)
    out = {"<cwd>": str(work), "<parent>": str(tmp_path)}.get(out, out)
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"], ["--resume"]):
        code, text = _cli(*_args(assets, out, *extra))
        _one_error_line(code, text, "")
        assert snapshot(tmp_path) == before, (out, extra)


def test_removal_and_creation_never_touch_what_is_not_proven(tmp_path, monkeypatch):
    _user_files(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    before = snapshot(tmp_path)
    for path in ("", ".", "/", "file://", str(tmp_path), os.path.expanduser("~")):
        with pytest.raises(StoreError, match="refusing"):
            fs.remove(path)
        with pytest.raises(StoreError, match="refusing"):
            fs.clear_except(path, "lease.json")
    # creating a store never clears what is there (zarr's mode "w" did)
    with pytest.raises(StoreError, match="already holds"):
        StoreWriter.create(str(tmp_path / "work"), meta={}, sites={SITE: {"d": 4, "encoding": "float16"}},
                           grads=None, ctx_len=4, n_seqs=8, window_seqs=8)
    assert snapshot(tmp_path) == before


def test_file_url_out_is_the_local_path(assets, stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text = _cli(*_args(assets, f"file://{tmp_path}/f.zarr"))
    assert code == 0, text
    assert sorted(os.listdir(tmp_path)) == ["f.zarr"]       # not a folder named "file:"
    _assert_same(stores["ref"], tmp_path / "f.zarr")


# ---- item 2: two fresh writers to one new --out -----------------------------------------------
def test_second_fresh_writer_is_refused_whatever_the_timing(assets, stores, tmp_path, monkeypatch):
    out, late = tmp_path / "s.zarr", tmp_path / "late.zarr"
    planned_early = outpath.plan_target(str(late), resume=False, overwrite=False)
    real_create = StoreWriter.create.__func__
    calls = []

    def create(cls, path, **kw):
        calls.append(path)
        if path == str(out) and len(calls) == 1:
            # writer B starts while A creates its store (A holds the lease; no root attributes yet)
            before = snapshot(tmp_path, skip=("lease.json",))
            code, text = _cli(*_args(assets, out))
            _one_error_line(code, text, "being written by")
            assert snapshot(tmp_path, skip=("lease.json",)) == before
        if path == str(late):
            # writer B planned before A took the lease: its lease, taken before it creates, is refused
            with pytest.raises(StoreError, match="being written by"):
                planned_early.take_lease()
        return real_create(cls, path, **kw)

    monkeypatch.setattr(StoreWriter, "create", classmethod(create))
    harvest(_cfg(assets, out), progress=False)
    planned_early = outpath.plan_target(str(late), resume=False, overwrite=False)
    harvest(_cfg(assets, late), progress=False)
    monkeypatch.undo()
    _assert_same(stores["ref"], out)
    _assert_same(stores["ref"], late)
    # writer B planned, then A finished: B's lease is taken, its create refused, its lease removed
    before = snapshot(tmp_path)
    lease = planned_early.take_lease()
    with pytest.raises(StoreError, match="already holds"):
        StoreWriter.create(planned_early.build, meta={}, sites={SITE: {"d": 4, "encoding": "float16"}},
                           grads=None, ctx_len=4, n_seqs=8, window_seqs=8)
    lease.release()
    assert snapshot(tmp_path) == before


# ---- items 3 and 4: the build beside --out, the user's own siblings ---------------------------
def test_second_overwrite_is_refused_while_a_build_is_live(assets, stores, tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    shutil.copytree(stores["other"], out)
    real = fs.write_atomic
    refused = []

    def write(path, key, data):
        if key == "windows/00000001.json" and not refused:
            before = snapshot(tmp_path, skip=("lease.json",))
            code, text = _cli(*_args(assets, out, "--overwrite"))
            _one_error_line(code, text, "being written by")
            refused.append(text)
            assert snapshot(tmp_path, skip=("lease.json",)) == before
        return real(path, key, data)

    monkeypatch.setattr(fs, "write_atomic", write)
    harvest(_cfg(assets, out), overwrite=True, progress=False)
    monkeypatch.undo()
    assert refused
    _assert_same(stores["ref"], out)
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]


def test_overwrite_never_touches_the_users_old_and_new(assets, stores, tmp_path):
    out = tmp_path / "x.zarr"
    shutil.copytree(stores["other"], out)
    _user_files(tmp_path / "x.zarr.old")                   # a backup of the user's
    shutil.copytree(stores["other"], tmp_path / "x.zarr.new")   # a complete store of the user's
    (tmp_path / "x.zarr.new" / "keep.txt").write_text("mine")
    siblings = {name: snapshot(tmp_path / name) for name in ("x.zarr.old", "x.zarr.new")}
    code, text = _cli(*_args(assets, out, "--overwrite"))
    assert code == 0, text
    _assert_same(stores["ref"], out)
    assert {name: snapshot(tmp_path / name) for name in siblings} == siblings
    assert sorted(os.listdir(tmp_path)) == ["x.zarr", "x.zarr.new", "x.zarr.old"]
    # a folder of the user's at the build name is refused, not emptied
    _user_files(tmp_path / ("x.zarr" + outpath.BUILD_SUFFIX))
    before = snapshot(tmp_path)
    code, text = _cli(*_args(assets, out, "--overwrite"))
    _one_error_line(code, text, "not a build of this tool")
    assert snapshot(tmp_path) == before


# ---- item 5: a checksum that depends on the data ----------------------------------------------
def _crc_keeping_xor(data: bytes, start: int, length: int) -> bytes:
    """A pattern to XOR into bytes [start, start + length) that keeps crc32c(those bytes) (any
    crc32c over them, since crc32c is linear): random first bytes, the last 4 solved over GF(2)."""
    lin = lambda e: google_crc32c.value(e) ^ google_crc32c.value(bytes(len(e)))   # noqa: E731
    rng = np.random.default_rng(0)
    base = bytearray(length)
    base[:8] = rng.integers(1, 255, 8, dtype=np.uint8).tobytes()
    target = lin(bytes(base))
    basis = []
    for bit in range(32):
        e = bytearray(length)
        e[length - 4 + bit // 8] = 1 << (bit % 8)
        basis.append((lin(bytes(e)), 1 << bit))
    rows = []   # Gaussian elimination: (crc value, which bits)
    for value, bits in basis:
        for rv, rb in rows:
            if value ^ rv < value:
                value, bits = value ^ rv, bits ^ rb
        if value:
            rows.append((value, bits))
            rows.sort(reverse=True)
    value, bits = target, 0
    for rv, rb in rows:
        if value ^ rv < value:
            value, bits = value ^ rv, bits ^ rb
    assert value == 0
    pattern = bytearray(base)
    for bit in range(32):
        if bits >> bit & 1:
            pattern[length - 4 + bit // 8] ^= 1 << (bit % 8)
    out = bytearray(data)
    for i, b in enumerate(pattern):
        out[start + i] ^= b
    assert google_crc32c.value(bytes(out[start:start + length])) == google_crc32c.value(data[start:start + length])
    return bytes(out)


@pytest.mark.parametrize("damage", ["swap", "transplant", "crc_keeping_xor"])
def test_swapped_transplanted_or_crc_keeping_damage_is_caught(stores, tmp_path, damage):
    import zarr
    path = tmp_path / "s.zarr"
    shutil.copytree(stores["ref"], path)
    name = "acts/" + SITE
    keys = sorted(str(p.relative_to(path)) for p in (path / name / "c").rglob("*") if p.is_file())
    if damage == "swap":
        a, b = (path / keys[0]).read_bytes(), (path / keys[1]).read_bytes()
        (path / keys[0]).write_bytes(b)
        (path / keys[1]).write_bytes(a)
    elif damage == "transplant":
        shutil.rmtree(path / "acts")
        shutil.copytree(stores["other"] / "acts", path / "acts")
    else:
        data = (path / keys[1]).read_bytes()
        plain = open_store(str(path))._shard_reader(name).layout
        (path / keys[1]).write_bytes(_crc_keeping_xor(data, 0, plain.chunk_bytes))
    # every chunk still passes its own crc32c: zarr-python reads the damaged array without complaint
    zarr.open_group(str(path), mode="r")[name][:]
    problems = verify_store(str(path))
    assert problems and all("checksum mismatch" in p and name in p for p in problems), problems
    code, text = _cli("verify", str(path))
    assert code == 1 and "checksum mismatch" in text
    with pytest.raises(StoreError, match="checksum differs from its window record"):
        open_store(str(path)).acts(SITE, slice(None))


def test_records_checksum_is_xxh3_of_the_shard_and_legacy_crc32c_records_still_verify(stores, tmp_path):
    import xxhash
    path = tmp_path / "s.zarr"
    shutil.copytree(stores["ref"], path)
    digests = set()
    for rec_path in sorted((path / "windows").iterdir()):
        record = json.loads(rec_path.read_text())
        for entries in record["shards"].values():
            for entry in entries:
                data = (path / entry[0]).read_bytes()
                assert entry[2] == "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()
                digests.add(entry[2])
                # what the first records held: the crc32c of the whole shard, the CRC residue
                assert "crc32c:%08x" % google_crc32c.value(data) == "crc32c:7059f117"
                entry[2] = "crc32c:7059f117"
        rec_path.write_text(json.dumps(record))
    assert len(digests) > 10            # one per shard, not a constant
    assert verify_store(str(path)) == []
    code, text = _cli("verify", str(path))
    assert code == 0 and text.startswith("ok:") and "old constant crc32c record" in text, text
    shard = path / "rows" / "pos" / "c" / "1"
    data = bytearray(shard.read_bytes())
    data[5] ^= 1                         # legacy records: each chunk's own crc32c is checked instead
    shard.write_bytes(bytes(data))
    assert verify_store(str(path)) == ["array rows/pos window 1: shard rows/pos/c/1 checksum mismatch"]


# ---- item 9: a reader whose store is replaced underneath -------------------------------------
def test_reader_fails_when_its_store_is_replaced(assets, stores, tmp_path):
    out = tmp_path / "s.zarr"
    shutil.copytree(stores["other"], out)
    store = open_store(str(out))
    first = store.acts(SITE, slice(0, 256))
    batches = store.batches(SITE, 64, seed=0, epochs=1)
    next(iter(batches))
    harvest(_cfg(assets, out), overwrite=True, progress=False)
    for read in (lambda: store.acts(SITE, slice(0, 256)), lambda: store.rows_pos[0:64],
                 lambda: store.acts(SITE, [3, 1]), lambda: list(batches)):
        with pytest.raises(StoreError, match="replaced or removed while this reader had it open"):
            read()
    assert not np.array_equal(open_store(str(out)).acts(SITE, slice(0, 256)), first)
    # a store made before creation ids reads as before
    meta = json.loads((out / "zarr.json").read_text())
    del meta["attributes"]["sae_store"]["creation_id"]
    (out / "zarr.json").write_text(json.dumps(meta))
    np.testing.assert_array_equal(open_store(str(out)).acts(SITE, slice(None)), _arrays(stores["ref"])["acts/" + SITE])


# ---- item 10: killed between finish and the swap, or between the two renames ------------------
@pytest.mark.parametrize("where", ["before_swap", "between_renames"])
def test_resume_finishes_a_half_done_swap(assets, stores, tmp_path, monkeypatch, where):
    out = tmp_path / "s.zarr"
    shutil.copytree(stores["other"], out)
    real_rename, calls = fs.rename, []

    def rename(src, dst):
        calls.append(dst)
        if where == "before_swap" or len(calls) == 2:
            raise _Killed()
        return real_rename(src, dst)

    monkeypatch.setattr(fs, "rename", rename)
    with pytest.raises(_Killed):
        harvest(_cfg(assets, out), overwrite=True, progress=False)
    monkeypatch.undo()
    build = str(out) + outpath.BUILD_SUFFIX
    assert open_store(build).complete
    _expire_lease(build)              # the "killed" writer is this very process
    code, text = _cli(*_args(assets, out, "--resume"))
    assert code == 0, text
    _assert_same(stores["ref"], out)
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]
    assert verify_store(str(out)) == []


# ---- item 11: --out as a symlink ------------------------------------------------------------
def test_out_symlink_builds_at_its_target(assets, stores, tmp_path):
    target, link = tmp_path / "disk" / "real.zarr", tmp_path / "link.zarr"
    (tmp_path / "disk").mkdir()
    os.symlink(target, link)
    code, text = _cli(*_args(assets, link, "--seed", "5"))
    assert code == 0, text
    assert os.path.islink(link) and os.path.isdir(target)
    code, text = _cli(*_args(assets, link, "--overwrite"))
    assert code == 0, text
    assert os.path.islink(link) and os.readlink(link) == str(target)
    _assert_same(stores["ref"], link)
    assert sorted(os.listdir(tmp_path)) == ["disk", "link.zarr"] and os.listdir(tmp_path / "disk") == ["real.zarr"]


# ---- item 13: verify never reads outside the store ------------------------------------------
def test_verify_confines_keys_and_refuses_links_out(stores, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(stores["ref"], path)
    rec_path = path / "windows" / "00000000.json"
    good = rec_path.read_text()
    record = json.loads(good)
    record["shards"]["acts/" + SITE][0][0] = "../../../../../../dev/zero"
    rec_path.write_text(json.dumps(record))
    problems = verify_store(str(path))
    assert len(problems) == 1 and "window record windows/00000000.json" in problems[0], problems
    with pytest.raises(StoreError, match="shard list"):
        open_store(str(path))
    rec_path.write_text(good)
    shard = path / "acts" / SITE / "c" / "1" / "0"
    shard.unlink()
    os.symlink("/dev/zero", shard)
    for quick in (False, True):
        assert verify_store(str(path), quick=quick) == \
            [f"array acts/{SITE} window 1: shard acts/{SITE}/c/1/0 is a link that leaves the store (not read)"]
    with pytest.raises(StoreError, match="window 1"):
        open_store(str(path)).acts(SITE, slice(None))


# ---- items 14 and 15: damaged metadata is one line; verify checks attributes against arrays ----
@pytest.mark.parametrize("final", ['{"windows": 3, "seq', "", "{}", '{"windows": "3", "seqs": 48, "rows": 1536}'])
def test_damaged_final_record_is_one_line(assets, stores, tmp_path, final):
    path = tmp_path / "s.zarr"
    shutil.copytree(stores["ref"], path)
    (path / "final.json").write_text(final)
    before = snapshot(tmp_path)
    code, text = _cli("verify", str(path))
    assert code == 1 and text.strip().count("\n") == 0 and "final.json is damaged" in text, text
    for args in (("info", str(path)), _args(assets, path, "--resume")):
        code, text = _cli(*args)
        _one_error_line(code, text, "final.json is damaged")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("edit", ["window_type", "short_entry", "not_object"])
def test_malformed_window_record_is_one_line(assets, stores, tmp_path, edit):
    path = tmp_path / "s.zarr"
    shutil.copytree(stores["ref"], path)
    rec_path = path / "windows" / "00000001.json"
    record = json.loads(rec_path.read_text())
    if edit == "window_type":
        record["window"] = "1"
    elif edit == "short_entry":
        record["shards"]["tokens"][0] = record["shards"]["tokens"][0][:2]
    else:
        record = [record]
    rec_path.write_text(json.dumps(record))
    before = snapshot(tmp_path)
    for args in (("info", str(path)), _args(assets, path, "--resume")):
        code, text = _cli(*args)
        _one_error_line(code, text, "window record windows/00000001.json")
    code, text = _cli("verify", str(path))
    assert code == 1 and len(text.strip().splitlines()) == 1 and "windows/00000001.json" in text, text
    assert snapshot(tmp_path) == before


def test_missing_array_metadata_on_resume_is_one_line(assets, stores, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(stores["ref"], path)
    (path / "final.json").unlink()
    (path / "grads" / SITE / "zarr.json").unlink()
    before = snapshot(tmp_path)
    code, text = _cli(*_args(assets, path, "--resume"))
    _one_error_line(code, text, f"array grads/{SITE}: missing")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("edit", ["d", "huge_d", "encoding_root", "encoding_both"])
def test_attributes_that_disagree_with_the_arrays(stores, tmp_path, edit):
    path = tmp_path / "s.zarr"
    shutil.copytree(stores["ref"], path)
    meta = json.loads((path / "zarr.json").read_text())
    site = meta["attributes"]["sae_store"]["sites"][SITE]
    if edit in ("d", "huge_d"):
        site["d"] = site["d"] + 8 if edit == "d" else 2 ** 40
    else:
        site["encoding"] = "bfloat16"
        if edit == "encoding_both":
            arr = json.loads((path / "acts" / SITE / "zarr.json").read_text())
            arr["attributes"]["encoding"] = "bfloat16"
            (path / "acts" / SITE / "zarr.json").write_text(json.dumps(arr))
    (path / "zarr.json").write_text(json.dumps(meta))
    before = snapshot(tmp_path)
    if edit == "huge_d":     # refused with the root attributes, before any array is looked at
        with pytest.raises(StoreError, match="2\\^31"):
            verify_store(str(path))
    else:
        problems = verify_store(str(path))
        assert problems and all(f"s/{SITE}:" in p for p in problems) and f"array acts/{SITE}" in problems[0], problems
    with pytest.raises(StoreError):
        open_store(str(path))
    code, text = _cli("info", str(path))
    _one_error_line(code, text, "")
    assert snapshot(tmp_path) == before


# ---- the same on object storage (moto on loopback) --------------------------------------------
@pytest.fixture(scope="module")
def bucket(safety_bucket):
    return safety_bucket


def test_s3_lease_before_create_checksums_and_replaced_reader(assets, stores, bucket, monkeypatch):
    from tests.test_object_storage import _objects
    url, late = f"{bucket}/s.zarr", f"{bucket}/late.zarr"
    no_lease = lambda objs: {k: v for k, v in objs.items() if not k.endswith("lease.json")}   # noqa: E731
    planned_early = outpath.plan_target(late, resume=False, overwrite=False)
    real_create = StoreWriter.create.__func__

    def create(cls, path, **kw):
        if path == url:       # a second writer while the first creates: refused, no object changed
            before = no_lease(_objects(bucket))
            code, text = _cli(*_args(assets, url))
            _one_error_line(code, text, "being written by")
            assert no_lease(_objects(bucket)) == before
            held = outpath.plan_target(late, resume=False, overwrite=False).take_lease()
            with pytest.raises(StoreError, match="being written by"):    # planned before, leased after
                planned_early.take_lease()
            held.release()
        return real_create(cls, path, **kw)

    monkeypatch.setattr(StoreWriter, "create", classmethod(create))
    harvest(_cfg(assets, url, seed=5), progress=False)
    monkeypatch.undo()
    _assert_same(stores["other"], url)
    # a reader of the old store fails once --overwrite replaced it (objects deleted, then rewritten)
    store = open_store(url)
    store.acts(SITE, slice(0, 64))
    harvest(_cfg(assets, url), overwrite=True, progress=False)
    with pytest.raises(StoreError, match="replaced or removed"):
        store.acts(SITE, slice(0, 64))
    _assert_same(stores["ref"], url)
    assert verify_store(url) == []
    # two shards swapped: every chunk crc32c still holds; verify and a full read catch it
    name = "acts/" + SITE
    keys = sorted(k for k in fs.list_keys(url, name + "/c"))
    a, b = fs.read_bytes(url, keys[0]), fs.read_bytes(url, keys[1])
    fs.write_atomic(url, keys[0], b)
    fs.write_atomic(url, keys[1], a)
    problems = verify_store(url)
    assert len(problems) == 2 and all("checksum mismatch" in p for p in problems), problems
    with pytest.raises(StoreError, match="checksum differs from its window record"):
        open_store(url).acts(SITE, slice(None))


def test_s3_overwrite_of_a_store_left_with_a_stale_lease(assets, stores, bucket):
    """A writer killed on object storage leaves its lease in the store; --overwrite (which replaces
    the store in place there) takes that stale lease over instead of refusing."""
    url = f"{bucket}/stale.zarr"
    harvest(_cfg(assets, url, seed=5), progress=False)
    fs.write_atomic(url, "lease.json", json.dumps({"owner": "dead", "host": "elsewhere", "pid": 1,
                                                   "heartbeat": 0.0}).encode())
    code, text = _cli(*_args(assets, url, "--overwrite"))
    assert code == 0, text
    _assert_same(stores["ref"], url)
    assert fs.read_bytes(url, "lease.json") is None
