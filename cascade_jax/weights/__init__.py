"""Checkpoint I/O: the HF ⇄ JAX name table, lazy safetensors reading, load_pretrained."""
