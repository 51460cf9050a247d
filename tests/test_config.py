import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import cascade_jax as cj
from cascade_jax.config import NANO_30B_PATTERN, ConfigError, ModelConfig

# Verbatim architecture fields of nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B config.json (model.md §1).
NANO_HF_CONFIG = {
    "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "vocab_size": 131072,
    "hidden_size": 2688, "num_hidden_layers": 52, "hybrid_override_pattern": NANO_30B_PATTERN,
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "attention_bias": False,
    "max_position_embeddings": 262144, "rope_theta": 10000, "mamba_num_heads": 64, "mamba_head_dim": 64,
    "expand": 2, "n_groups": 8, "ssm_state_size": 128, "conv_kernel": 4, "chunk_size": 128,
    "mamba_hidden_act": "silu", "use_conv_bias": True, "use_bias": False, "mamba_proj_bias": False,
    "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4, "n_routed_experts": 128,
    "num_experts_per_tok": 6, "moe_intermediate_size": 1856, "moe_shared_expert_intermediate_size": 3712,
    "n_shared_experts": 1, "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1,
    "norm_topk_prob": True, "intermediate_size": 1856, "mlp_hidden_act": "relu2", "mlp_bias": False,
    "layer_norm_epsilon": 1e-5, "norm_eps": 1e-5, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "residual_in_fp32": False,
}


def test_nano_param_counts():
    config = ModelConfig.preset("nano-30b-a3b")
    assert config.num_params() == 31_577_937_344
    assert config.layer_pattern.count("M") == 23 and config.layer_pattern.count("E") == 23
    assert config.layer_pattern.count("*") == 6 and config.num_layers == 52
    # model.md: ≈2.88B non-embedding active, ≈3.23B with lm_head, ≈3.58B with embeddings.
    with_head = config.num_active_params()
    assert round((with_head - config.vocab_size * config.hidden_size) / 1e9, 2) == 2.88
    assert round(with_head / 1e9, 2) == 3.23
    assert round(config.num_active_params(include_input_embedding=True) / 1e9, 2) == 3.58
    assert config.mamba_conv_dim == 6144 and config.mamba_in_proj_dim == 10304


def test_nano_builds_abstractly_with_the_exact_parameter_count():
    config = ModelConfig.preset("nano-30b-a3b")
    model = nnx.eval_shape(lambda: cj.NemotronH(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    params = nnx.state(model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == 31_577_937_344
    biases = nnx.state(model, cj.model.layers.ExpertBias)
    assert sum(x.size for x in jax.tree.leaves(biases)) == 23 * 128


def test_real_nano_config_json_gives_the_preset():
    assert ModelConfig.from_hf(NANO_HF_CONFIG) == ModelConfig.preset("nano-30b-a3b")


def test_layers_block_type_and_legacy_names():
    hf = {k: v for k, v in NANO_HF_CONFIG.items() if k not in ("hybrid_override_pattern", "n_groups", "conv_kernel")}
    letters = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
    hf["layers_block_type"] = [letters[c] for c in NANO_30B_PATTERN]   # NVIDIA remote-code spelling
    hf.update(mamba_n_groups=8, mamba_d_conv=4, time_step_limit=[0.0, {"__float__": "Infinity"}])
    assert ModelConfig.from_hf(hf) == ModelConfig.preset("nano-30b-a3b")
    current = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
    hf["layers_block_type"] = [current[c] for c in "M*E-"]
    assert ModelConfig.from_hf(hf).layer_pattern == "M*E-"


def test_to_hf_round_trips(tmp_path):
    config = ModelConfig.preset("tiny").replace(layer_pattern="M-*E", n_group=2, topk_group=1)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    assert ModelConfig.from_hf(tmp_path) == config
    assert config.to_hf()["hybrid_override_pattern"] == "M-*E"
    assert config.to_hf()["model_type"] == "nemotron_h"


@pytest.mark.parametrize("changes, message", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads .6. must be divisible"),
    (dict(layer_pattern="MEX"), "unknown block letter"),
    (dict(mamba_num_heads=6, n_groups=4), "mamba_num_heads .6. must be divisible by n_groups"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok .9. exceeds n_routed_experts"),
    (dict(hidden_size=0), "hidden_size: must be positive"),
    (dict(n_group=3), "must be divisible by n_group"),
])
def test_validation_errors_are_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as info:
        ModelConfig.preset("tiny").replace(**changes)
    assert "\n" not in str(info.value)


def test_from_hf_rejects_other_models_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="model_type: expected 'nemotron_h'"):
        ModelConfig.from_hf({"model_type": "llama"})
    with pytest.raises(ConfigError, match="layers_block_type: unknown layer type"):
        ModelConfig.from_hf({"layers_block_type": ["mamba", "conv"]})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("huge")
