"""HF safetensors ⇄ Orbax converter for NemotronH: `python -m tools.convert_hf to-jax|to-hf ...`.

Library entry points: `tools.convert_hf.to_jax.convert_to_jax`, `tools.convert_hf.to_hf.convert_to_hf`.
(Not imported here, so `__main__` can configure JAX's CPU devices before JAX starts.)
"""
