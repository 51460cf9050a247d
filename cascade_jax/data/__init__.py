"""Data pipelines: chat SFT samples packed into long rows, and RL prompt groups.

- ``SFTData(DataConfig(...))``: JSONL / Parquet / ArrayRecord chat samples → Cascade-2 chat template
  with the assistant loss mask → packed rows of ``max_len`` tokens → batches of int32 [B, T]
  ``tokens, targets, loss_mask, segment_ids, positions``; deterministic, sharded per JAX process,
  resumable through the iterator's ``get_state`` / ``set_state``.
- ``RLPrompts(PromptConfig(...))``: prompt groups (P prompts × G rollouts) with verifier metadata.
- ``ChatTokenizer``: any HF tokenizer directory; ``chat_template`` renders the conversations.
- ``tasks``: procedurally generated verifiable tasks and their verifiers (used as RL rewards).

This package imports nothing from ``model``, ``train`` or ``cli``.
"""

from cascade_jax.data.config import TINY_DATA, TINY_TOKENIZER, DataConfig, PromptConfig, SourceConfig
from cascade_jax.data.packing import FIELDS
from cascade_jax.data.pipeline import SFTData
from cascade_jax.data.prompts import RLPrompts
from cascade_jax.data.records import BadSample, DataError
from cascade_jax.data.tokenize import ChatTokenizer

__all__ = ["BadSample", "ChatTokenizer", "DataConfig", "DataError", "FIELDS", "PromptConfig", "RLPrompts",
           "SFTData", "SourceConfig", "TINY_DATA", "TINY_TOKENIZER"]
