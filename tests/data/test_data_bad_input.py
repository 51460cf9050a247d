"""Bad input: skipped and counted with file:line logged, or one clear error naming file:line (strict)."""

from __future__ import annotations

import json
import logging

import pytest
from datatest_utils import TOKENIZER, write_jsonl

from cascade_jax.data import DataConfig, DataError, PromptConfig, RLPrompts, SFTData, SourceConfig

GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "\\boxed{4}"}]}
BAD_LINES = {
    2: ('{"messages": [', "malformed_json"),
    3: (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no_assistant_turn"),
    4: (json.dumps({"messages": [{"role": "wizard", "content": "hi"}, GOOD["messages"][1]]}), "unknown_role"),
    6: ("[1, 2]", "not_an_object"),
    8: (json.dumps({**GOOD, "tools": [{"name": "f", "parameters": {"properties": {"x": "int"}}}]}), "bad_message"),
    9: (json.dumps({"messages": [{"role": "user", "content": {"oops": 1}}, GOOD["messages"][1]]}), "bad_message"),
}


def _corpus(tmp_path):
    lines = [json.dumps(GOOD)] * 9
    for n, (line, _) in BAD_LINES.items():
        lines[n - 1] = line
    lines[4] = ""  # line 5: blank, not a record
    main = write_jsonl(str(tmp_path / "main.jsonl"), lines)
    empty = str(tmp_path / "empty.jsonl")
    open(empty, "w").close()
    return main, empty


def _cfg(paths, **kw):
    return DataConfig(sources=[SourceConfig(paths=paths)], max_len=256, num_epochs=1.0, drop_remainder=False,
                      shard_index=0, shard_count=1, shuffle=False, **kw)


def test_bad_samples_are_skipped_counted_and_located(tmp_path, caplog):
    main, empty = _corpus(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cascade_jax.data"):
        data = SFTData(_cfg([main, empty], log_first=10), tokenizer=TOKENIZER)
        it = iter(data)
        rows = list(it)
    stats = data.stats(it)
    for n, (_, reason) in BAD_LINES.items():
        assert stats[reason] == sum(r == reason for _, r in BAD_LINES.values()), reason
        assert f"{main}:{n}: {reason}" in caplog.text
    assert stats["empty_file"] == 1 and f"{empty}:0: empty_file" in caplog.text
    assert sum(int(r["segment_ids"].max()) for r in rows) == 2  # lines 1 and 7 are the good ones


def test_log_only_first_few(tmp_path, caplog):
    path = write_jsonl(str(tmp_path / "bad.jsonl"), ["{oops"] * 20 + [json.dumps(GOOD)])
    with caplog.at_level(logging.WARNING, logger="cascade_jax.data"):
        data = SFTData(_cfg([path], log_first=3), tokenizer=TOKENIZER)
        it = iter(data)
        list(it)
    assert data.stats(it)["malformed_json"] == 20
    assert caplog.text.count("skipped SFT sample") == 3


@pytest.mark.parametrize("line", sorted(BAD_LINES))
def test_strict_raises_naming_file_and_line(tmp_path, line):
    rows = [json.dumps(GOOD)] * 3 + [BAD_LINES[line][0]]
    path = write_jsonl(str(tmp_path / "s.jsonl"), rows)
    with pytest.raises(DataError, match=rf"s\.jsonl:4: {BAD_LINES[line][1]}"):
        list(SFTData(_cfg([path], strict=True), tokenizer=TOKENIZER))


def test_strict_empty_file_and_missing_path(tmp_path):
    main, empty = _corpus(tmp_path)
    with pytest.raises(DataError, match=r"empty\.jsonl:0: empty_file"):
        SFTData(_cfg([empty, main], strict=True), tokenizer=TOKENIZER)
    with pytest.raises(DataError, match=r"nope\*\.jsonl: no such file"):
        SFTData(_cfg([str(tmp_path / "nope*.jsonl")]), tokenizer=TOKENIZER)


def test_rl_prompts_skip_bad_records(tmp_path):
    rows = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}], "domain": "math",
                        "verifier": {"kind": "boxed_number", "answer": str(i)}}) for i in range(4)]
    rows.insert(1, "not json")
    rows.insert(2, json.dumps({"messages": [{"role": "assistant", "content": "no question"}]}))
    path = write_jsonl(str(tmp_path / "rl.jsonl"), rows)
    data = RLPrompts(PromptConfig(sources=[SourceConfig(paths=[path])], prompts_per_step=2, group_size=3,
                                  num_epochs=1.0, shuffle=False, shard_index=0, shard_count=1), tokenizer=TOKENIZER)
    it = iter(data)
    steps = list(it)
    assert len(steps) == 2 and [m["verifier"]["answer"] for m in steps[0]["meta"]] == ["0"] * 3 + ["1"] * 3
    assert steps[0]["group_ids"].tolist() == [0, 0, 0, 1, 1, 1]
    stats = data.stats(it)
    assert stats["malformed_json"] == 1 and stats["no_user_turn"] == 1
