"""cascade_jax: NemotronH (Nemotron-3-Nano-30B-A3B) and the Nemotron-Cascade 2 recipe in JAX/Flax."""

from cascade_jax.config import ConfigError, ModelConfig
from cascade_jax.model.nemotron_h import Backends, ModelOutput, NemotronH
from cascade_jax.weights.load import load_pretrained
from cascade_jax.weights.safetensors_dir import CheckpointError

__all__ = ["Backends", "CheckpointError", "ConfigError", "ModelConfig", "ModelOutput", "NemotronH",
           "load_pretrained"]
