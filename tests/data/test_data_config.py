"""Config values are checked when the dataclass is built, also by OmegaConf: one line naming the field."""

from __future__ import annotations

import pytest
from datatest_utils import TOKENIZER, write_jsonl
from omegaconf import OmegaConf

from cascade_jax.data import DataConfig, PromptConfig, SFTData, SourceConfig

GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


@pytest.mark.parametrize("field, value, expected", [
    ("max_len", -1, "data.max_len: expected an integer > 0, got -1"),
    ("max_len", 0, "data.max_len: expected an integer > 0, got 0"),
    ("batch_size", 0, "data.batch_size: expected an integer > 0, got 0"),
    ("batch_size", 2.5, "data.batch_size: expected an integer > 0, got 2.5"),
    ("num_epochs", 0, "data.num_epochs: expected a number > 0, or null to repeat forever, got 0"),
    ("num_epochs", -1.5, "data.num_epochs: expected a number > 0, or null to repeat forever, got -1.5"),
    ("worker_count", -1, "data.worker_count: expected an integer >= 0, got -1"),
    ("worker_buffer_size", 0, "data.worker_buffer_size: expected an integer > 0, got 0"),
    ("num_packing_bins", 0, "data.num_packing_bins: expected an integer > 0, got 0"),
    ("tokenize_chunk", 0, "data.tokenize_chunk: expected an integer > 0, got 0"),
    ("max_docs_per_row", 0, "data.max_docs_per_row: expected an integer > 0 or null, got 0"),
    ("log_first", -1, "data.log_first: expected an integer >= 0, got -1"),
    ("too_long", "chop", "data.too_long: expected one of 'drop', 'truncate', got 'chop'"),
    ("packing", "next_fit", "data.packing: expected one of 'first_fit', 'best_fit', got 'next_fit'"),
    ("loss_on", "all", "data.loss_on: expected one of 'all_assistant', 'last_assistant', got 'all'"),
    ("shuffle", "yes", "data.shuffle: expected true or false, got 'yes'"),
    ("tokenizer", "", "data.tokenizer: expected a non-empty path, got ''"),
    ("sources", [], "data.sources: expected at least one source, got []"),
])
def test_bad_data_values_name_the_field(field, value, expected):
    with pytest.raises(ValueError) as e:
        DataConfig(**{field: value})
    assert str(e.value) == expected


def test_sources_are_checked_with_their_index():
    with pytest.raises(ValueError, match=r"^data\.sources\[1\]\.weight: expected a number >= 0 .*got -1$"):
        DataConfig(sources=[SourceConfig(paths=["a.jsonl"]), SourceConfig(paths=["b.jsonl"], weight=-1)])
    with pytest.raises(ValueError, match=r"^data\.sources\[0\]\.paths: expected a list of one or more files"):
        DataConfig(sources=[SourceConfig(paths=[])])
    with pytest.raises(ValueError, match=r"^data\.sources: expected at least one source with weight > 0"):
        DataConfig(sources=[SourceConfig(paths=["a.jsonl"], weight=0)])
    with pytest.raises(ValueError, match=r"^prompts\.sources\[0\]\.weight"):
        PromptConfig(sources=[SourceConfig(paths=["a.jsonl"], weight=-0.5)])


@pytest.mark.parametrize("field, value, expected", [
    ("prompts_per_step", 0, "prompts.prompts_per_step: expected an integer > 0, got 0"),
    ("group_size", -2, "prompts.group_size: expected an integer > 0, got -2"),
    ("max_prompt_len", 0, "prompts.max_prompt_len: expected an integer > 0, got 0"),
    ("num_epochs", 0, "prompts.num_epochs: expected a number > 0, or null to repeat forever, got 0"),
])
def test_bad_prompt_values_name_the_field(field, value, expected):
    with pytest.raises(ValueError) as e:
        PromptConfig(**{field: value})
    assert str(e.value) == expected


def test_shards_come_in_pairs():
    with pytest.raises(ValueError, match=r"^data\.shard_index, data\.shard_count: expected both or neither"):
        DataConfig(shard_index=0)
    with pytest.raises(ValueError, match=r"^data\.shard_index: expected an integer in \[0, shard_count=2\), got 2"):
        DataConfig(shard_index=2, shard_count=2)


def test_omegaconf_builds_and_checks_the_dataclass():
    """The YAML path: OmegaConf.to_object constructs the dataclass, so __post_init__ checks it."""
    def build(cls, **values):
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))

    cfg = build(DataConfig, max_len=512, sources=[{"paths": ["a.jsonl"], "weight": 2}])
    assert isinstance(cfg, DataConfig) and cfg.sources[0].name == "a.jsonl" and cfg.sources[0].weight == 2.0
    with pytest.raises(ValueError, match=r"^data\.max_len: expected an integer > 0, got -1$"):
        build(DataConfig, max_len=-1)
    with pytest.raises(ValueError, match=r"^data\.num_epochs: expected a number > 0"):
        build(DataConfig, num_epochs=0)
    with pytest.raises(ValueError, match=r"^data\.sources\[1\]\.weight: expected a number >= 0"):
        build(DataConfig, sources=[{"paths": ["a.jsonl"]}, {"paths": ["b.jsonl"], "weight": -1}])
    with pytest.raises(ValueError, match=r"^prompts\.group_size: expected an integer > 0, got 0$"):
        build(PromptConfig, group_size=0)


def test_weight_zero_switches_a_source_off(tmp_path):
    path = write_jsonl(str(tmp_path / "a.jsonl"), [GOOD] * 3)
    cfg = DataConfig(sources=[SourceConfig(paths=[path]), SourceConfig(paths=[str(tmp_path / "gone.jsonl")], weight=0)],
                     max_len=64, num_epochs=1.0, drop_remainder=False, shard_index=0, shard_count=1)
    data = SFTData(cfg, tokenizer=TOKENIZER)  # the switched-off source's file is not even opened
    assert data.num_records == 3 and sum(int(r["segment_ids"].max()) for r in data) == 3
