"""Shared helpers for the data tests: random conversations (hypothesis), corpora on disk, row checks."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
from hypothesis import strategies as st

from cascade_jax.data import TINY_TOKENIZER, ChatTokenizer
from cascade_jax.data.records import chat_sample

TOKENIZER = ChatTokenizer(TINY_TOKENIZER)

# Text with the characters that matter to BPE and the template: spaces, newlines, braces, unicode,
# and fragments of the special tokens.
_ALPHABET = st.sampled_from(list("ab xyz019\n{}<>|/_-.é中") + ["<think>", "</think>", "the ", "value ",
                                                                "\\boxed{", "<tool_call>", "im_end"])
text = st.lists(_ALPHABET, min_size=0, max_size=12).map("".join)
nonempty = st.lists(_ALPHABET, min_size=1, max_size=12).map("".join)


@st.composite
def tool_call(draw):
    keys = draw(st.lists(st.sampled_from(["x", "expression", "path", "n"]), max_size=2, unique=True))
    args = {k: draw(st.one_of(text, st.integers(-5, 5), st.lists(st.integers(0, 3), max_size=2))) for k in keys}
    return {"name": draw(st.sampled_from(["calculator", "read_file"])), "arguments": args}


@st.composite
def conversation(draw, with_tools: bool = True):
    """A raw sample in the common format with at least one assistant turn."""
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(text)})
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(nonempty)})
        for _ in range(draw(st.integers(1, 2))):
            a = {"role": "assistant", "content": draw(text)}
            if draw(st.booleans()):
                a["reasoning_content"] = draw(nonempty)
            if with_tools and draw(st.integers(0, 3)) == 0:
                a["tool_calls"] = draw(st.lists(tool_call(), min_size=1, max_size=2))
                msgs.append(a)
                msgs.extend({"role": "tool", "content": draw(text)} for _ in range(draw(st.integers(1, 2))))
                continue
            msgs.append(a)
    if msgs[-1]["role"] != "assistant":
        msgs.append({"role": "assistant", "content": draw(nonempty)})
    sample = {"messages": msgs, "domain": "test"}
    if with_tools and draw(st.booleans()):
        sample["tools"] = [{"type": "function", "function": {
            "name": "calculator", "description": draw(text),
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                           "required": ["expression"]}}}]
    return sample


def write_jsonl(path: str, rows: list) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def expected_documents(rows: list[dict], loss_on: str = "all_assistant", max_len: int | None = None,
                       too_long: str = "drop") -> Counter:
    """Multiset of (tokens, targets, loss_mask) byte strings each sample must become."""
    out = Counter()
    for r in rows:
        s = chat_sample(r)
        ids, mask = TOKENIZER.encode_chat(s["messages"], s["tools"], loss_on=loss_on)
        if max_len is not None and len(ids) - 1 > max_len:
            if too_long == "drop":
                continue
            ids, mask = ids[: max_len + 1], mask[: max_len + 1]
        if not mask[1:].any():
            continue
        out[_key(ids[:-1], ids[1:], mask[1:].astype(np.int32))] += 1
    return out


def _key(tokens, targets, mask) -> tuple[bytes, bytes, bytes]:
    return (np.asarray(tokens, np.int32).tobytes(), np.asarray(targets, np.int32).tobytes(),
            np.asarray(mask, np.int32).tobytes())


def check_rows_and_collect(batches: list[dict], max_len: int, max_docs: int | None = None) -> Counter:
    """Asserts the packed-row invariants and returns the multiset of documents found in the rows."""
    found = Counter()
    for b in batches:
        assert set(b) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
        for k, v in b.items():
            assert v.dtype == np.int32 and v.ndim == 2 and v.shape[1] == max_len, (k, v.shape, v.dtype)
        for r in range(b["tokens"].shape[0]):
            seg, pos = b["segment_ids"][r], b["positions"][r]
            used = int(np.count_nonzero(seg))
            assert used <= max_len and (seg[:used] > 0).all() and (seg[used:] == 0).all()
            pad = seg == 0
            for k in ("tokens", "targets", "loss_mask", "positions"):
                assert (b[k][r][pad] == 0).all(), f"{k} nonzero on padding"
            assert set(np.unique(b["loss_mask"][r])) <= {0, 1}
            ids = seg[:used]
            assert ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
            if max_docs is not None:
                assert ids[-1] <= max_docs
            for s in range(1, int(ids[-1]) + 1):
                where = np.flatnonzero(seg == s)
                assert (pos[where] == np.arange(len(where))).all(), "positions must restart at 0"
                found[_key(b["tokens"][r][where], b["targets"][r][where], b["loss_mask"][r][where])] += 1
    return found
