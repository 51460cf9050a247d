"""Cascade recipes: every bundled one validates stage by stage; the paper's recipe has the paper's order and
values; recipe mistakes are one line naming the stage and key."""

from pathlib import Path

import pytest

from cascade_jax.rl.cascade import Cascade
from cascade_jax.rl.cascade_config import is_cascade_recipe, load_cascade_config
from cascade_jax.train.config import RunConfigError

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "cascade").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_every_stage(path):
    cascade = Cascade(load_cascade_config(str(path)))
    assert len(cascade.stage_cfgs) == len(cascade.cfg.stages) >= 5
    assert is_cascade_recipe(str(path)) and not is_cascade_recipe("configs/rl/tiny.yaml")
    for spec, cfg in zip(cascade.cfg.stages, cascade.stage_cfgs):
        assert cfg.algorithm == spec.kind and cfg.run_dir.endswith(spec.name)


def _stages(cascade):
    return {spec.name: cfg for spec, cfg in zip(cascade.cfg.stages, cascade.stage_cfgs)}


def test_the_paper_recipe_has_the_papers_order_and_values():
    cascade = Cascade(load_cascade_config("configs/cascade/nano-30b-a3b.yaml"))
    main_line = [s.name for s in cascade.cfg.stages if not s.side_branch]
    assert main_line == ["if_rl", "multi_domain", "mopd", "rlhf", "long_context", "code_rl", "swe_agentless"]
    s = _stages(cascade)
    assert all(c.prompts.group_size == 16 and c.prompts.prompts_per_step == 128 for n, c in s.items() if n != "mopd")
    assert s["if_rl"].train.steps == 180 and s["if_rl"].grpo.dynamic_filter and s["if_rl"].grpo.overlong == "penalty"
    assert s["multi_domain"].grpo.overlong == "filter" and s["multi_domain"].train.steps == 70
    mopd = s["mopd"]
    assert mopd.algorithm == "mopd" and mopd.prompts.group_size == 4 and mopd.train.steps == 52
    assert (mopd.grpo.importance_weights, mopd.grpo.importance_low, mopd.grpo.importance_high) == ("icepop", 0.5, 2.0)
    assert mopd.optimizer.lr == 2e-6 and mopd.optimizer.warmup_steps == 30 and mopd.grpo.kl_coef == 0
    assert mopd.model.from_pretrained.endswith("01-multi_domain")      # the side branch is not the main line
    assert mopd.mopd.teachers["math"] == cascade.start                   # math teacher: the SFT checkpoint
    assert mopd.mopd.teachers["rlhf"].endswith("02-rlhf_teacher")
    assert s["rlhf_teacher"].model.from_pretrained == cascade.start
    assert s["rlhf"].grpo.kl_coef == 0.03 and s["rlhf"].grpo.kl_kind == "k3"
    assert s["rlhf"].reward.kind == "pairwise_judge" and s["rlhf"].reward.judge.pairs == "all"
    assert s["code_rl"].rollout.top_p == 0.95 and s["code_rl"].train.steps == 22
    assert s["swe_agentless"].grpo.group_max_mask == 0.5 and s["swe_agentless"].reward.kind == "judge"
    assert all(c.optimizer.b2 == 0.95 and c.moe.bias_update_rate == 0 for c in s.values())


def test_the_tiny_recipe_is_the_demo_order():
    cascade = Cascade(load_cascade_config("configs/cascade/tiny.yaml"))
    assert [s.name for s in cascade.cfg.stages] == ["if_rl", "multi_domain", "mopd", "rlhf", "code_rl"]
    s = _stages(cascade)
    assert cascade.start == "runs/sft-tiny" and s["rlhf"].reward.judge.serve == "runs/sft-tiny"
    assert s["mopd"].mopd.teachers["instruct"].endswith("00-if_rl")


@pytest.mark.parametrize("override, message", [
    (["stages.1.name=if_rl"], "stages[1].name: 'if_rl' is used twice"),
    (["stages.0.start=stage:code_rl"], "stages[0].start: stage:code_rl names no earlier stage"),
    (["stages.2.settings.mopd.teachers.math=stage:rlhf"], "stage:rlhf names no earlier stage"),
    (["stages.0.kind=ppo"], "stages[0].kind"),
    (["start=runs/x"], "give exactly one of start"),
    (["stages.0.settings.optimizer.lr=-1"], "stages[0] (if_rl): optimizer.lr"),
    (["stages.0.settings.nonsense=1"], "stages[0] (if_rl): settings: nonsense: Key 'nonsense' not in"),
    (["stages=[]"], "stages: a cascade needs at least one stage"),
])
def test_recipe_mistakes_name_the_stage_and_key(override, message):
    with pytest.raises((RunConfigError, ValueError), match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        Cascade(load_cascade_config("configs/cascade/tiny.yaml", override))
