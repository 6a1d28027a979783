"""SAE training: architectures (train.sae registry), checkpoints. Kept light: torch + safetensors only."""
from train.sae import ARCHITECTURES, SAE, LossOutput, SAEConfig, make_sae
from train.checkpoint import CheckpointError, load_sae, save_sae

__all__ = ["ARCHITECTURES", "SAE", "LossOutput", "SAEConfig", "make_sae", "CheckpointError", "load_sae", "save_sae"]
