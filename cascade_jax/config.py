"""ModelConfig: every NemotronH architecture field, presets, HF config.json conversion, parameter counts."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

BLOCK_LETTERS = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}

# HF layer-type names, current (transformers 5) and legacy (NVIDIA remote code), to our pattern letters.
_HF_BLOCK_TYPE_TO_LETTER = {
    "linear_attention": "M", "mamba": "M",
    "moe": "E",
    "full_attention": "*", "attention": "*",
    "mlp": "-",
}
_LETTER_TO_HF_BLOCK_TYPE = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}

# Legacy config.json spellings (NVIDIA remote code) accepted by from_hf.
_LEGACY_FIELD_NAMES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts",
}

NANO_30B_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


class ConfigError(ValueError):
    """A bad ModelConfig value; the message is one line naming the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 131072
    hidden_size: int = 2688
    layer_pattern: str = NANO_30B_PATTERN
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    # attention ('*')
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    attention_bias: bool = False
    max_position_embeddings: int = 262144
    # Mamba-2 ('M')
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    n_groups: int = 8
    ssm_state_size: int = 128
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    mamba_proj_bias: bool = False
    expand: int = 2
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    mamba_ssm_cache_dtype: str = "float32"
    # MoE ('E')
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    n_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    # dense MLP ('-')
    intermediate_size: int = 1856
    mlp_bias: bool = False
    # tokens and init
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int | tuple[int, ...] = 2
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    residual_in_fp32: bool = False

    def __post_init__(self):
        if isinstance(self.time_step_limit, list):
            object.__setattr__(self, "time_step_limit", tuple(self.time_step_limit))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    # ---------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        presets = {"nano-30b-a3b": {}, "tiny": _TINY}
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(presets)}")
        return cls(**presets[name])

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)

        bad = sorted(set(self.layer_pattern) - set(BLOCK_LETTERS))
        need(not bad, f"layer_pattern: unknown block letter(s) {bad}; expected letters from 'ME*-'")
        need(len(self.layer_pattern) > 0, "layer_pattern: must have at least one layer")
        for field in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                      "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel",
                      "chunk_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "intermediate_size", "n_group", "topk_group"):
            need(getattr(self, field) > 0, f"{field}: must be positive, got {getattr(self, field)}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.mamba_num_heads % self.n_groups == 0,
             f"mamba_num_heads ({self.mamba_num_heads}) must be divisible by n_groups ({self.n_groups})")
        need(self.num_experts_per_tok <= self.n_routed_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})")
        need(self.n_routed_experts % self.n_group == 0,
             f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
        need(self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        if self.n_group > 1:
            need(self.n_routed_experts // self.n_group >= 2,
                 "group-limited routing scores each group by its two best experts: need >= 2 experts per group")
            need(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                 f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in the kept groups")
        need(self.n_shared_experts in (0, 1), f"n_shared_experts: only 0 or 1 supported, got {self.n_shared_experts}")
        need(self.time_step_limit[0] <= self.time_step_limit[1],
             f"time_step_limit: lower bound exceeds upper bound {self.time_step_limit}")

    # ---------------------------------------------------------- derived sizes
    @property
    def num_layers(self) -> int:
        return len(self.layer_pattern)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_dim(self) -> int:
        return self.mamba_d_inner + self.mamba_conv_dim + self.mamba_num_heads

    # ------------------------------------------------------------ param count
    def block_num_params(self, letter: str, active: bool = False) -> int:
        """Parameters of one layer (its pre-norm included); `active` counts only top-k routed experts."""
        d = self.hidden_size
        if letter == "M":
            inner, conv = self.mamba_d_inner, self.mamba_conv_dim
            mixer = (d * self.mamba_in_proj_dim + conv * self.conv_kernel + conv * self.use_conv_bias
                     + 3 * self.mamba_num_heads + inner + inner * d
                     + self.mamba_proj_bias * (self.mamba_in_proj_dim + d))
        elif letter == "E":
            experts = self.num_experts_per_tok if active else self.n_routed_experts
            mixer = (experts * 2 * d * self.moe_intermediate_size + self.n_routed_experts * d
                     + self.n_shared_experts * 2 * d * self.moe_shared_expert_intermediate_size)
        elif letter == "*":
            q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
            mixer = 2 * d * q + 2 * d * kv + self.attention_bias * (q + 2 * kv + d)
        else:
            mixer = 2 * d * self.intermediate_size + self.mlp_bias * (self.intermediate_size + d)
        return d + mixer

    def num_params(self) -> int:
        """Total trainable parameters (the MoE e_score_correction_bias buffers are not counted)."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.hidden_size + sum(self.block_num_params(c) for c in self.layer_pattern)

    def num_active_params(self, include_input_embedding: bool = False) -> int:
        """Parameters used per token: top-k routed experts, lm_head; input embedding only if asked."""
        blocks = sum(self.block_num_params(c, active=True) for c in self.layer_pattern)
        lm_head = self.vocab_size * self.hidden_size
        embedding = lm_head if include_input_embedding and not self.tie_word_embeddings else 0
        return blocks + self.hidden_size + lm_head + embedding

    # ------------------------------------------------------------- HF config
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> ModelConfig:
        """From an HF directory, a config.json path, or its dict (current or legacy NemotronH field names)."""
        hf = _read_hf_dict(source)
        if hf.get("model_type", "nemotron_h") != "nemotron_h":
            raise ConfigError(f"model_type: expected 'nemotron_h', got {hf['model_type']!r}")
        hf = {_LEGACY_FIELD_NAMES.get(k, k): _decode_special_floats(v) for k, v in hf.items()}
        hf["layer_pattern"] = _pattern_from_hf(hf)
        if "use_bias" in hf and "mamba_proj_bias" not in hf:
            hf["mamba_proj_bias"] = hf["use_bias"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names and v is not None})

    def to_hf(self) -> dict:
        """config.json dict in the original NemotronH layout (hybrid_override_pattern, model_type nemotron_h)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del out["layer_pattern"]
        out["time_step_limit"] = list(self.time_step_limit)
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        out.update(
            architectures=["NemotronHForCausalLM"], model_type="nemotron_h",
            hybrid_override_pattern=self.layer_pattern, num_hidden_layers=self.num_layers,
            use_bias=self.mamba_proj_bias, mlp_hidden_act="relu2", mamba_hidden_act="silu",
            torch_dtype="bfloat16",
        )
        return dict(sorted(out.items()))


def _read_hf_dict(source: str | os.PathLike | dict) -> dict:
    if isinstance(source, dict):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


_FLOAT_TAGS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def hf_json_text(hf: dict) -> str:
    """A config.json dict (e.g. `ModelConfig.to_hf()`) as transformers' `PretrainedConfig.to_json_string`
    writes it: strict JSON (inf/nan as {"__float__": "Infinity" | "-Infinity" | "NaN"}), 2-space indent,
    sorted keys, a final newline. `from_hf` reads this and the bare `Infinity` of Python's json alike."""
    return json.dumps(_encode_special_floats(hf), indent=2, sort_keys=True, allow_nan=False) + "\n"


def _encode_special_floats(value):
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"}
    if isinstance(value, dict):
        return {k: _encode_special_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_special_floats(v) for v in value]
    return value


def _decode_special_floats(value):
    """transformers writes inf/nan as {"__float__": "Infinity"} in config.json (`hf_json_text`)."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in _FLOAT_TAGS:
            return _FLOAT_TAGS[value["__float__"]]
        return {k: _decode_special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_special_floats(v) for v in value]
    return value


def _pattern_from_hf(hf: dict) -> str:
    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types is not None:
        unknown = sorted({t for t in types if t not in _HF_BLOCK_TYPE_TO_LETTER})
        if unknown:
            raise ConfigError(f"layers_block_type: unknown layer type(s) {unknown}; "
                              f"expected {sorted(_HF_BLOCK_TYPE_TO_LETTER)}")
        return "".join(_HF_BLOCK_TYPE_TO_LETTER[t] for t in types)
    if "hybrid_override_pattern" in hf:
        return hf["hybrid_override_pattern"]
    raise ConfigError("config.json: neither hybrid_override_pattern nor layers_block_type is present")


_TINY = dict(
    vocab_size=4096, hidden_size=128, layer_pattern="MEM*EME",
    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=32,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
    moe_shared_expert_intermediate_size=128, intermediate_size=128,
    max_position_embeddings=4096,
)
