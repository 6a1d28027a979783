"""Zarr v3 activation stores: format, writer and reader. Knows nothing of models."""
from .errors import StoreError
from .layout import FORMAT_VERSION
from .reader import Store, open_store
from .writer import StoreWriter

__all__ = ["FORMAT_VERSION", "Store", "StoreError", "StoreWriter", "open_store"]
