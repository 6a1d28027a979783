"""sae-harvest: activation stores, offline SAE training and evaluation for interpretability labs.

The handy imports (each loaded on first use, so `import sae_harvest.stores` stays free of torch):

    from sae_harvest import load_sae, open_store, __version__

    sae = load_sae("saes/topk/topk_k32")          # an SAE module; sae.site, sae.hook_name, sae.provenance
    store = open_store("store.zarr")               # a Store; store.acts(site, rows), store.batches(...)

The code lives in four subpackages: `sae_harvest.stores` (the Zarr format), `sae_harvest.harvest`
(models, sites, the harvester), `sae_harvest.train` (SAEs, trainers, checkpoints) and
`sae_harvest.evaluate` (splicing, metrics, analyses); docs/python-api.md shows them in use.
This file is the repo's api/__init__.py, installed as sae_harvest/__init__.py (pyproject.toml).
"""
from __future__ import annotations

__all__ = ["__version__", "load_sae", "open_store", "save_sae", "Store", "SAE"]

_LAZY = {
    "load_sae": "sae_harvest.train.sae_io",
    "save_sae": "sae_harvest.train.sae_io",
    "SAE": "sae_harvest.train.sae",
    "open_store": "sae_harvest.stores.reader",
    "Store": "sae_harvest.stores.reader",
}


def _version() -> str:
    """The installed distribution's version; from a source tree on PYTHONPATH, pyproject.toml's."""
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if here.exists():   # a checkout (editable install or PYTHONPATH): its own pyproject, not another install's
        try:
            import tomllib   # Python >= 3.11; 3.10 falls through to the installed metadata

            return tomllib.loads(here.read_text())["project"]["version"]
        except (ImportError, OSError, ValueError, KeyError):
            pass
    try:
        return version("sae-harvest")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _version()


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sae_harvest' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
