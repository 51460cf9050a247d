"""Every bundled SFT recipe parses and validates."""

from pathlib import Path

import pytest

from cascade_jax.train.config import load_sft_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "sft").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads(path):
    config = load_sft_config(str(path))
    assert config.train.steps > 0
    assert config.data.batch_size * config.train.micro_batches > 0


def test_nano_recipe_is_the_planned_mesh():
    config = load_sft_config(str(RECIPES[0].parent / "nano-30b-a3b.yaml"))
    assert config.mesh.context == 8 and config.model.backends.attention == "flash"
