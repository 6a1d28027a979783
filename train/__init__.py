"""SAE training: architectures (train.registry), checkpoints (train.sae_io), trainers (train.fit)."""
from sae_harvest.train.registry import ARCH_NAMES, ARCHITECTURES, SAEConfig, make_sae
from sae_harvest.train.sae import SAE, LossOutput
from sae_harvest.train.sae_io import CheckpointError, load_sae, save_sae

__all__ = ["ARCH_NAMES", "ARCHITECTURES", "SAE", "LossOutput", "SAEConfig", "make_sae", "CheckpointError",
           "load_sae", "save_sae"]
