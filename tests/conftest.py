import os

# Sharding tests need fake devices; the flag must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture
def hf_dir(fixtures_dir, tmp_path) -> pathlib.Path:
    """A writable copy of a small HF fixture checkpoint (tmp_path/in/model)."""
    target = tmp_path / "in" / "model"
    shutil.copytree(fixtures_dir / "hf" / "dense_attn_mamba", target)
    return target


@pytest.fixture
def rewrite_checkpoint():
    """edit(tensors) applied to a directory's model.safetensors, to build bad checkpoints."""
    def rewrite(directory, edit):
        tensors = load_file(directory / "model.safetensors")
        edit(tensors)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return rewrite


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each compiled XLA:CPU program holds its own memory mappings; a whole suite's worth in one process passes
    the kernel's vm.max_map_count (65,530) and the next compilation crashes. Free them after every module."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
