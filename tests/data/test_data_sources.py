"""Sources (JSONL / Parquet / ArrayRecord, globs, line numbers), mixture weights, multi-worker loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datatest_utils import TOKENIZER, check_rows_and_collect, write_jsonl

from cascade_jax.data import DataConfig, SFTData, SourceConfig
from cascade_jax.data.mixture import RecordIndex
from cascade_jax.data.records import chat_sample
from cascade_jax.data.sources import ArrayRecordSource, JsonlSource, ParquetSource, open_source


def _rows(n, tag="x"):
    return [{"messages": [{"role": "user", "content": f"{tag}{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "domain": tag} for i in range(n)]


def test_jsonl_line_numbers_and_globs(tmp_path):
    (tmp_path / "d").mkdir()
    write_jsonl(str(tmp_path / "d" / "a.jsonl"), [json.dumps(_rows(1)[0]), "", "  ", json.dumps(_rows(2)[1])])
    write_jsonl(str(tmp_path / "d" / "b.jsonl"), [json.dumps(r) for r in _rows(2, "y")])
    src = open_source(str(tmp_path / "d" / "*.jsonl"))
    assert isinstance(src, JsonlSource) and len(src) == 4
    assert [r["loc"].rsplit("/", 1)[1] for r in (src[i] for i in range(4))] == ["a.jsonl:1", "a.jsonl:4",
                                                                                "b.jsonl:1", "b.jsonl:2"]
    assert chat_sample(src[1]["raw"])["messages"][0]["content"] == "x1"


def test_parquet_and_array_record_sources(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = _rows(5)
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "p.parquet"), row_group_size=2)
    src = open_source(str(tmp_path / "p.parquet"))
    assert isinstance(src, ParquetSource) and len(src) == 5
    assert [chat_sample(src[i]["raw"])["messages"][0]["content"] for i in (4, 0, 3)] == ["x4", "x0", "x3"]
    assert src[3]["loc"].endswith("p.parquet:4")

    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "r.array_record")
    w = ArrayRecordWriter(path, "group_size:1")
    for r in rows:
        w.write(json.dumps(r).encode())
    w.close()
    src = open_source(path)
    assert isinstance(src, ArrayRecordSource) and len(src) == 5
    assert chat_sample(src[2]["raw"])["messages"][1]["content"] == "a2" and src[2]["loc"].endswith(":3")

    data = SFTData(DataConfig(sources=[SourceConfig(paths=[str(tmp_path / "p.parquet")]), SourceConfig(paths=[path])],
                              max_len=128, num_epochs=1.0, drop_remainder=False, shard_index=0, shard_count=1),
                   tokenizer=TOKENIZER)
    assert sum(check_rows_and_collect(list(data), 128).values()) == 10


def test_mixture_weights_and_epochs():
    ix = RecordIndex([100, 1000], [3.0, 1.0], seed=0, num_epochs=None, block=400)
    src, rec = ix.lookup(np.arange(4000))
    assert np.bincount(src).tolist() == [3000, 1000]  # exact per block
    first = rec[src == 0]
    for e in range(30):  # each epoch of source 0 is a permutation, reshuffled every epoch
        assert sorted(first[e * 100:(e + 1) * 100].tolist()) == list(range(100))
    assert (first[:100] != first[100:200]).any()
    rare = RecordIndex([10, 10], [1.0, 1e-4], seed=0, num_epochs=None)
    assert np.bincount(rare.lookup(np.arange(rare.block))[0]).tolist()[1] >= 2  # never starved
    one = RecordIndex([7], [1.0], seed=1, num_epochs=1.5, shuffle=False)
    assert one.length == 10 and one.lookup(np.arange(10))[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]


@pytest.mark.slow
def test_multiworker_matches_and_resumes(tmp_path):
    path = write_jsonl(str(tmp_path / "c.jsonl"), [json.dumps(r) for r in _rows(200)])

    def cfg(workers):
        return DataConfig(sources=[SourceConfig(paths=[path])], max_len=512, num_packing_bins=2, num_epochs=1.0,
                          drop_remainder=False, worker_count=workers, shard_index=0, shard_count=1)

    single = check_rows_and_collect(list(SFTData(cfg(0), tokenizer=TOKENIZER)), 512)
    data = SFTData(cfg(2), tokenizer=TOKENIZER)
    it = iter(data)
    head = [next(it) for _ in range(3)]
    state = it.get_state()
    tail = list(it)
    it.close()
    assert check_rows_and_collect(head + tail, 512) == single  # same documents, split over two workers
    it2 = iter(SFTData(cfg(2), tokenizer=TOKENIZER))
    it2.set_state(state)
    tail2 = list(it2)
    it2.close()
    assert len(tail2) == len(tail) and all((a[k] == b[k]).all() for a, b in zip(tail, tail2) for k in a)
