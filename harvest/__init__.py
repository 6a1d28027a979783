"""Harvest activations and loss gradients from HF causal LMs into Zarr v3 stores."""
__version__ = "0.1.0"
