"""Fixtures shared by several test files (a file's own fixtures stay in that file)."""
import pytest
import torch

# Tiny test models are dominated by per-op overhead; extra threads only contend on 2-core CI.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The planted-dictionary store of tests/test_train_loop.make_store (two sites, gradients)."""
    from tests.test_train_loop import make_store

    path = tmp_path_factory.mktemp("store") / "s.zarr"
    make_store(path)
    return path


@pytest.fixture(scope="module")
def e2e_assets(tmp_path_factory):
    """A tiny GPT-2 and a store of its blocks.1.resid_pre with 32-token sequences (test_e2e.CTX):
    what e2e training needs (tests/test_e2e.py, test_distributed.py, test_sweep_parallel.py)."""
    from sae_harvest.harvest.models import load_model
    from sae_harvest.harvest.run import HarvestConfig, harvest
    from tests.tiny_models import make_tiny_model, write_corpus

    root = tmp_path_factory.mktemp("e2e")
    corpus = write_corpus(root / "docs.jsonl", n_docs=300, max_words=60)
    model_path = make_tiny_model("gpt2", root / "gpt2")
    store = root / "s.zarr"
    harvest(HarvestConfig(out=str(store), model=model_path, dataset=str(corpus), sites="blocks.1.resid_pre",
                          tokens=4096, ctx_len=32, batch_size=16, shuffle_window=1024, device="cpu"),
            progress=False)
    model, _ = load_model(model_path)
    return {"model_path": model_path, "store": str(store), "model": model, "root": root}


@pytest.fixture(scope="module")
def harvest_assets(tmp_path_factory):
    """A tiny GPT-2 and two corpora to harvest (tests/test_store_v2.py, test_object_storage.py)."""
    from tests.tiny_models import make_tiny_model, write_corpus

    root = tmp_path_factory.mktemp("v2_assets")
    corpus = write_corpus(root / "docs.jsonl", n_docs=300, max_words=80)
    small = write_corpus(root / "small.jsonl", n_docs=40, max_words=60)
    return {"gpt2": make_tiny_model("gpt2", root / "gpt2"), "corpus": str(corpus), "small": str(small),
            "root": root}


# Shared by test_store_safety.py and test_kill_sweep.py (each aliases them as assets / stores / bucket).
@pytest.fixture(scope="session")
def safety_assets(tmp_path_factory):
    from tests.test_store_safety import make_assets
    return make_assets(tmp_path_factory)


@pytest.fixture(scope="session")
def safety_stores(safety_assets, tmp_path_factory):
    from tests.test_store_safety import make_stores
    return make_stores(safety_assets, tmp_path_factory)


@pytest.fixture(scope="session")
def safety_bucket():
    pytest.importorskip("moto.server")
    from tests.s3server import s3_server
    with s3_server("safety-bucket") as url:
        yield url


# Shared by test_features.py and test_features_page.py (aliased as crafted / built).
@pytest.fixture(scope="session")
def features_crafted(tmp_path_factory):
    from tests.test_features import make_crafted
    return make_crafted(tmp_path_factory)


@pytest.fixture(scope="session")
def features_built(features_crafted, tmp_path_factory):
    from tests.test_features import make_built
    return make_built(features_crafted, tmp_path_factory)
