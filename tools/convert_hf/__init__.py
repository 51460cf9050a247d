"""HF safetensors ⇄ Orbax converter for NemotronH: `python -m tools.convert_hf to-jax|to-hf ...`.

Library entry points: `tools.convert_hf.to_jax.convert_to_jax`, `tools.convert_hf.to_hf.convert_to_hf`.
(Not imported here, so `__main__` can keep JAX on the CPU before JAX starts.)
"""
