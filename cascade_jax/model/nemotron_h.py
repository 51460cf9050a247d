"""NemotronH: embeddings → pre-norm residual blocks (one mixer each, chosen by pattern letter) → norm_f → lm_head."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from cascade_jax.config import ModelConfig
from cascade_jax.model.attention import AttentionMixer
from cascade_jax.model.cache import HybridCache
from cascade_jax.model.context_parallel import SSD_BACKENDS
from cascade_jax.model.embedding import embed_lookup
from cascade_jax.model.expert_parallel import STRATEGIES
from cascade_jax.model.layers import Linear, RMSNorm
from cascade_jax.model.mamba2 import Mamba2Mixer
from cascade_jax.model.mlp import MLP
from cascade_jax.model.moe import MoEMixer
from cascade_jax.ops.attention import BACKEND_NAMES as ATTENTION_BACKENDS
from cascade_jax.parallel.rules import constrain


@dataclasses.dataclass(frozen=True)
class Backends:
    """Kernel choices for the ops behind the mixers; the math does not change with them."""

    attention: str = "auto"                     # ops.attention: tokamax's flash kernels on GPU, xla elsewhere
    grouped_matmul: str = "auto"                # ops.grouped_matmul: tokamax.ragged_dot on GPU, xla elsewhere
    moe_dispatch: str = "local"                 # local | allgather | all_to_all | ragged_all_to_all
    moe_capacity_factor: float | None = None    # all_to_all only; None = dropless buffer
    ssd: str = "xla"                            # xla | pallas (ops.ssd_pallas; not yet measured on a GPU)

    def __post_init__(self):
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention {self.attention!r}: expected one of {list(ATTENTION_BACKENDS)}")
        if self.ssd not in SSD_BACKENDS:
            raise ValueError(f"ssd {self.ssd!r}: expected one of {list(SSD_BACKENDS)}")
        if self.moe_dispatch not in STRATEGIES:
            raise ValueError(f"moe_dispatch {self.moe_dispatch!r}: expected one of {list(STRATEGIES)}")


ACTIVATION_AXES = ("batch", "length", "act_embed")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    logits: Float[Array, "B T V"] | None
    hidden_states: Float[Array, "B T D"]   # after norm_f: the input of lm_head
    expert_load: Int[Array, "L_moe E"]     # tokens routed to each expert, per MoE layer
    dropped_tokens: Int[Array, ""] | None = None   # (token, expert) pairs past a dispatch capacity, all layers
    cache: HybridCache | None = None               # the updated cache, when one was passed in


class Block(nnx.Module):
    """h + mixer(RMSNorm(h)); the mixer is picked by the layer's pattern letter."""

    def __init__(self, config: ModelConfig, letter: str, *, rngs: nnx.Rngs, dtype, param_dtype, backends: Backends):
        self.letter = letter
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon, param_dtype=param_dtype,
                            axes=("embed",))
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if letter == "M":
            self.mixer = Mamba2Mixer(config, ssd_backend=backends.ssd, **kw)
        elif letter == "E":
            self.mixer = MoEMixer(config, backend=backends.grouped_matmul, dispatch=backends.moe_dispatch,
                                  capacity_factor=backends.moe_capacity_factor, **kw)
        elif letter == "*":
            self.mixer = AttentionMixer(config, backend=backends.attention, **kw)
        else:
            self.mixer = MLP(config, config.intermediate_size, **kw)

    def __call__(self, h, segment_ids, token_mask, cache=None, lengths=None):
        """(h + mixer(norm(h)), MoE stats or None, the layer's new cache or None)."""
        # Pinned (under a mesh) so GSPMD gathers FSDP weights instead of resharding tokens by hidden size.
        u = constrain(self.norm(constrain(h, ACTIVATION_AXES)), ACTIVATION_AXES)
        stats = None   # MoE only: (tokens per expert, dropped assignments)
        if self.letter == "M":
            out = self.mixer(u, segment_ids) if cache is None else self.mixer(u, segment_ids, cache)
        elif self.letter == "E":
            out, *stats = self.mixer.forward_with_stats(u, token_mask)
        elif self.letter == "*":
            out = self.mixer(u, segment_ids) if cache is None else self.mixer(u, segment_ids, cache, lengths)
        else:
            out = self.mixer(u)
        if isinstance(out, tuple):
            out, cache = out
        return h + constrain(out.astype(h.dtype), ACTIVATION_AXES), stats, cache


class NemotronH(nnx.Module):
    """The hybrid Mamba-2 / attention / MoE language model of Nemotron-3-Nano.

    Parameters are stored in `param_dtype` and computed in `dtype`; the SSM scan, norms, router and
    softmax always run in fp32, and A_log, D and the router correction bias are always fp32.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 backends: Backends = Backends(), remat: str = "none"):
        """`remat` picks what each block keeps for the backward pass: none (everything), full, dots."""
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat {remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        c = config
        self.config, self.dtype, self.remat = c, dtype, remat
        self.embeddings = nnx.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                    embedding_init=nnx.initializers.normal(c.initializer_range), rngs=rngs)
        self.embeddings.embedding.set_metadata(logical_axes=("vocab", "embed"))
        self.layers = nnx.List([Block(c, letter, rngs=rngs, dtype=dtype, param_dtype=param_dtype, backends=backends)
                                for letter in c.layer_pattern])
        self.norm_f = RMSNorm(c.hidden_size, c.layer_norm_epsilon, param_dtype=param_dtype, axes=("embed",))
        self.lm_head = None if c.tie_word_embeddings else Linear(
            c.hidden_size, c.vocab_size, ("embed", "vocab"), rngs=rngs, std=c.initializer_range,
            dtype=dtype, param_dtype=param_dtype)

    def __call__(
        self,
        input_ids: Int[Array, "B T"],
        segment_ids: Int[Array, "B T"] | None = None,
        *,
        compute_logits: bool = True,
        cache: HybridCache | None = None,
    ) -> ModelOutput:
        """`segment_ids` marks the documents of a packed row (0 = padding): nothing crosses a boundary.

        With `compute_logits=False` only the final hidden states are returned, so a chunked loss can
        apply lm_head without ever building [tokens, vocab]. With `cache` (inference) the tokens continue
        each row of the cache at `cache.lengths` (a prefill, or one decoded token per row) and the
        output carries the updated cache; the math is that of the same tokens in one whole row.
        """
        h = constrain(embed_lookup(self.embeddings.embedding[...], input_ids, self.dtype), ACTIVATION_AXES)
        token_mask = None if segment_ids is None else segment_ids > 0
        loads, dropped, new_layers = [], jnp.zeros((), jnp.int32), []
        for i, block in enumerate(self.layers):
            if cache is not None:
                h, stats, layer_cache = block(h, segment_ids, token_mask, cache.layers[i], cache.lengths)
                new_layers.append(layer_cache)
            elif self.remat == "none":
                h, stats, _ = block(h, segment_ids, token_mask)
            else:
                h, stats, _ = _rematerialized(block, REMAT_POLICIES[self.remat], h, segment_ids, token_mask)
            h = constrain(h, ACTIVATION_AXES)   # residual stream: rows over the batch axes, whole on tensor ranks
            if stats is not None:
                loads.append(stats[0])
                dropped = dropped + stats[1]
        hidden = self.norm_f(h)
        expert_load = jnp.stack(loads) if loads else jnp.zeros((0, self.config.n_routed_experts), jnp.int32)
        new_cache = None if cache is None else HybridCache(tuple(new_layers), cache.lengths + input_ids.shape[1])
        return ModelOutput(self.logits(hidden) if compute_logits else None, hidden, expert_load, dropped, new_cache)

    def logits(self, hidden: Float[Array, "... D"]) -> Float[Array, "... V"]:
        flat = hidden.reshape(-1, hidden.shape[-1]).astype(self.dtype)
        logits = jnp.dot(flat, self.output_kernel().astype(self.dtype), preferred_element_type=jnp.float32)
        return logits.reshape(*hidden.shape[:-1], -1).astype(self.dtype)

    def output_kernel(self) -> Float[Array, "D V"]:
        """The lm_head matrix as [D, V] (the embedding's transpose when tied), for chunked losses."""
        if self.lm_head is None:
            return self.embeddings.embedding[...].T
        return self.lm_head.kernel[...]


def _rematerialized(block: Block, policy, *inputs):
    """Run a block under jax.checkpoint; blocks are stateless in the forward pass, so a pure split works."""
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda s, *x: nnx.merge(graphdef, s)(*x), policy=policy)(state, *inputs)
