"""Inference: generation from a NemotronH model."""
