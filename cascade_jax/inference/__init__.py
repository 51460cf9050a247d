"""Inference: cached, continuously batched generation from a NemotronH model."""

from cascade_jax.inference.engine import Completion, Engine, Request, generate
from cascade_jax.inference.sampling import SamplingParams

__all__ = ["Completion", "Engine", "Request", "SamplingParams", "generate"]
