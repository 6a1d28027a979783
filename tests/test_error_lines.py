"""Error lines (issue 16, items 12 and 16): every command's error path prints one line, with every
credential of the command line masked (real URL-embedded credentials against the loopback S3
server), and prints user text literally, never as rich markup (`[/x]`, `[bold]`, a gloo message)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sae_harvest.evaluate.cli import main as evaluate_cli
from sae_harvest.harvest.cli import main as harvest_cli
from sae_harvest.train.cli import main as train_cli
from tests.test_security import one_error_line, tree_hash
from tests.test_train_loop import make_store

REPO = Path(__file__).resolve().parents[1]
KEY, SECRET = "AKIAH2EXAMPLEKEY", "wJalrH2SuperS3cretKey"


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}


# ---- item 16: user text is printed literally --------------------------------------------------
@pytest.mark.parametrize("name", ["a[/x]b", "a[bold]b[/bold]", "a[red]b", ":thumbs_up:x"])
def test_paths_with_markup_are_printed_literally(tmp_path, name):
    path = tmp_path / name / "s.zarr"
    for cli, args in ((harvest_cli, ["info", str(path)]), (harvest_cli, ["verify", str(path)]),
                      (train_cli, ["fit", "--store", str(path), "--out", str(tmp_path / "o"), "--device", "cpu"])):
        line = one_error_line(CliRunner().invoke(cli, args))
        assert str(path) in line, line
    assert not (tmp_path / "o").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_WORKER = """
import os, sys
from sae_harvest.train import distributed
real = distributed.Reducer.average_gradients
calls = []
def average_gradients(self, module):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        os._exit(17)          # rank 1 dies: rank 0's next collective fails with gloo's [/...] message
    return real(self, module)
distributed.Reducer.average_gradients = average_gradients
from sae_harvest.train.cli import entry
sys.argv = ["train", "fit", *sys.argv[1:]]
entry()
"""


GLOO = ("training stopped at step 2 (RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/"
        "pair.cc:537] Read error [127.0.0.1]:15748: Connection reset by peer. GLHF! :beach:)")


def test_fail_prints_a_gloo_message_literally(capsys):
    from sae_harvest.stores.cli import fail
    with pytest.raises(SystemExit) as e:
        fail(GLOO)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: {GLOO}\n", err


@pytest.mark.slow   # two processes training: ~30 s on the shared 2-core box
def test_gloo_message_under_ddp_training_is_printed_literally(tmp_path):
    """Rank 1 dies mid-training; rank 0's gloo error (`[/.../gloo/...] Connection closed by peer`)
    reaches its error printer, which must print it rather than crash on it as markup."""
    store = tmp_path / "s.zarr"
    make_store(store)
    port = _free_port()
    args = [sys.executable, "-c", DDP_WORKER, "--store", str(store), "--out", str(tmp_path / "out"), "--site",
            "blocks.0.resid_pre", "--d-sae", "32", "--k", "4", "--batch-size", "256", "--device", "cpu",
            "--dist-timeout", "60", "--quiet"]
    procs = []
    for rank in (0, 1):
        env = {**_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    assert procs[1].returncode == 17
    text = outs[0][0] + outs[0][1]
    # the short-run warning (a 7-step run) is its own `warning:` line, not the line under test
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("warning:")]
    assert procs[0].returncode == 2, text
    assert "Traceback" not in text and "MarkupError" not in text, text
    assert len(lines) == 1 and lines[0].startswith("error: training stopped at step 2"), text
    assert "RuntimeError: [/" in lines[0] and "/gloo/" in lines[0], text   # gloo's source path, as gloo wrote it


# ---- item 12: credentials in URLs never print -------------------------------------------------
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    pytest.importorskip("moto.server")
    from tests.s3server import s3_server

    with s3_server() as bucket:
        root = tmp_path_factory.mktemp("s3cred")
        store_url = f"{bucket}/lab/s.zarr"
        make_store(store_url)
        import torch

        from sae_harvest.train.registry import SAEConfig, make_sae
        from sae_harvest.train.sae_io import save_sae
        torch.manual_seed(0)
        save_sae(make_sae(SAEConfig(arch="topk", d_in=16, d_sae=32, k=4)), root / "sae",
                 extra_cfg={"hook_name": "blocks.0.resid_pre"})
        yield {"bucket": bucket, "store": store_url, "root": root}


def _objects(bucket: str) -> dict:
    import s3fs
    fs = s3fs.S3FileSystem(use_listings_cache=False)
    return {p: fs.info(p)["ETag"] for p in fs.find(bucket.removeprefix("s3://"))}


def _with_credentials(url: str) -> str:
    return url.replace("s3://", f"s3://{KEY}:{SECRET}@", 1)


@pytest.mark.parametrize("command", ["harvest run", "harvest verify", "harvest info", "train fit",
                                     "evaluate splice"])
def test_url_credentials_give_one_scrubbed_line(s3, tmp_path, command):
    existing = _with_credentials(s3["store"])
    new = _with_credentials(f"{s3['bucket']}/lab/new.zarr")
    cli, args = {
        "harvest run": (harvest_cli, ["run", "--model", "stdlib-gpt2", "--dataset", "stdlib-py", "--tokens", "256",
                                      "--ctx-len", "32", "--device", "cpu", "--out", new]),
        "harvest verify": (harvest_cli, ["verify", existing]),
        "harvest info": (harvest_cli, ["info", existing]),
        "train fit": (train_cli, ["fit", "--store", existing, "--out", str(tmp_path / "o"), "--device", "cpu"]),
        "evaluate splice": (evaluate_cli, ["splice", "--store", existing, "--sae", str(s3["root"] / "sae"),
                                           "--tokens", "64", "--device", "cpu", "--quiet"]),
    }[command]
    before = _objects(s3["bucket"])
    local_before = tree_hash(s3["root"])
    r = CliRunner().invoke(cli, args)
    line = one_error_line(r, "credentials")
    assert SECRET not in r.output and KEY not in r.output, r.output
    assert s3["bucket"].removeprefix("s3://") in line
    assert _objects(s3["bucket"]) == before and tree_hash(s3["root"]) == local_before
    assert not (tmp_path / "o").exists()


CATCH_ALL = """
import sys
from sae_harvest.stores import fs
fs._refuse_url_credentials = lambda url: None     # let the URL reach botocore, as before the check
from sae_harvest.harvest.cli import entry
sys.argv = ["harvest", *sys.argv[1:]]
entry()
"""


def test_unforeseen_library_error_is_one_line_without_the_secret(s3):
    """Without the up-front refusal the request reaches botocore, whose error quotes the netloc
    (`Invalid bucket name "KEY:SECRET@bucket"`, no scheme, so scrub_text cannot see a URL): the
    entry point's catch-all still prints one line, with the command line's credentials masked."""
    url = _with_credentials(s3["store"])
    r = subprocess.run([sys.executable, "-c", CATCH_ALL, "info", url], capture_output=True, text=True,
                       env={**_env(), **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")}}, timeout=120)
    text = r.stdout + r.stderr
    lines = [line for line in text.splitlines() if line.strip()]
    assert r.returncode == 70 and len(lines) == 1 and lines[0].startswith("error:"), text
    assert SECRET not in text and KEY not in text and "Traceback" not in text, text
    assert "***@lab-bucket" in lines[0], text


@pytest.mark.slow   # another subprocess: ~13 s on the shared box
def test_traceback_on_request_is_masked_too(s3):
    url = _with_credentials(s3["store"])
    r = subprocess.run([sys.executable, "-c", CATCH_ALL, "info", url], capture_output=True, text=True,
                       env={**_env(), "SAE_HARVEST_TRACEBACK": "1"}, timeout=120)
    assert "Traceback" in r.stderr and "ParamValidationError" in r.stderr, r.stderr
    assert SECRET not in r.stderr and KEY not in r.stderr, r.stderr


def test_secrets_in_and_redact():
    from sae_harvest.stores.urls import redact, secrets_in
    argv = f"info s3://{KEY}:{SECRET}@b/x.zarr https://h/x?X-Amz-Signature=SIG123&a=1 abfs://c@acct/x"
    found = secrets_in(argv)
    assert {KEY, SECRET, f"{KEY}:{SECRET}", "SIG123"} <= found and "c" not in found and "1" not in found
    text = f'bad bucket "{KEY}:{SECRET}@b" sig SIG123 and s3://{KEY}:{SECRET}@b/y'
    out = redact(text, found)
    assert KEY not in out and SECRET not in out and "SIG123" not in out and "s3://b/y" in out


def test_verify_lines_are_scrubbed():
    url = "memory://alice:PW0RDH2@bkt/h2-verify.zarr"     # fsspec's memory store keeps the netloc as a path
    make_store(url)
    r = CliRunner().invoke(harvest_cli, ["verify", url])
    assert r.exit_code == 0 and r.output.startswith("ok: memory://bkt/h2-verify.zarr"), r.output
    assert "PW0RD" not in r.output and "alice" not in r.output
