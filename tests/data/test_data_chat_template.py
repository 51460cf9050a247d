"""The Python renderer + piecewise tokenizer give exactly the tokenizer's own apply_chat_template."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datatest_utils import TOKENIZER, conversation
from hypothesis import HealthCheck, given, settings

from cascade_jax.data import TINY_DATA, TINY_TOKENIZER, ChatTokenizer
from cascade_jax.data import chat_template as ct
from cascade_jax.data.records import chat_sample

OFFSETS = ChatTokenizer(TINY_TOKENIZER, mode="offsets")
PIECES = ChatTokenizer(TINY_TOKENIZER, mode="pieces")


def _hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def test_conventions_by_example():
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "A1", "reasoning_content": "old thought"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "", "reasoning_content": "think",
             "tool_calls": [{"name": "calc", "arguments": {"expression": "1+1", "n": 2}}]},
            {"role": "tool", "content": "2"}, {"role": "tool", "content": "ok"},
            {"role": "assistant", "content": "done"}]
    text = ct.render_text(msgs)
    assert text == (
        "<|im_start|>system\n<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>A1<|im_end|>\n"  # history keeps only the final answer
        "<|im_start|>user\nagain<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nthink\n</think>\n<tool_call>\n<function=calc>\n"
        "<parameter=expression>\n1+1\n</parameter>\n<parameter=n>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n2\n</tool_response>\n<tool_response>\nok\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think></think>done<|im_end|>\n")
    assert ct.render_text(msgs[:1], add_generation_prompt=True).endswith("<|im_start|>assistant\n<think>\n")
    assert ct.render_text(msgs[:1], add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think></think>")
    ids, mask = TOKENIZER.encode_chat(msgs)
    trained = TOKENIZER.decode(ids[mask])
    assert trained == ("<think></think>A1<|im_end|><think>\nthink\n</think>\n<tool_call>\n<function=calc>\n"
                       "<parameter=expression>\n1+1\n</parameter>\n<parameter=n>\n2\n</parameter>\n</function>\n"
                       "</tool_call><|im_end|><think></think>done<|im_end|>")
    ids_last, mask_last = TOKENIZER.encode_chat(msgs, loss_on="last_assistant")
    assert (ids_last == ids).all() and TOKENIZER.decode(ids[mask_last]) == "<think></think>done<|im_end|>"


def test_bundled_data_matches_hf_apply_chat_template():
    hf = _hf()
    for split in ("sft", "rl", "eval"):
        with open(f"{TINY_DATA}/{split}.jsonl") as f:
            for line in list(f)[:300]:
                s = chat_sample(line, need_assistant=False)
                ref = hf.apply_chat_template(s["messages"], tools=s["tools"], tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=split == "sft")
                if split == "sft":
                    ids, mask = TOKENIZER.encode_chat(s["messages"], s["tools"])
                    assert list(ids) == list(ref["input_ids"])
                    assert list(mask.astype(int)) == list(ref["assistant_masks"])
                else:
                    ids = TOKENIZER.encode_prompt(s["messages"], s["tools"])
                    gen = hf.apply_chat_template(s["messages"], tools=s["tools"], tokenize=True,
                                                 return_dict=True, add_generation_prompt=True)
                    assert list(ids) == list(gen["input_ids"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation())
def test_random_conversations_match_hf_and_whole_text(sample):
    s = chat_sample(json.loads(json.dumps(sample)))
    ids, mask = TOKENIZER.encode_chat(s["messages"], s["tools"])
    whole = TOKENIZER.encode_text(ct.render_text(s["messages"], s["tools"]))
    assert list(ids) == whole  # piecewise encoding is exact
    assert TOKENIZER.mode == "scan"
    for other in (OFFSETS, PIECES):  # the three ways of locating the trained spans agree
        ids2, mask2 = other.encode_chat(s["messages"], s["tools"])
        assert (ids2 == ids).all() and (mask2 == mask).all(), other.mode
    if _HF is None:
        return
    ref = _HF.apply_chat_template(s["messages"], tools=s["tools"], tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert list(ids) == list(ref["input_ids"])
    assert list(np.asarray(mask, int)) == list(ref["assistant_masks"])


try:
    import transformers as _transformers

    _HF = _transformers.AutoTokenizer.from_pretrained(TINY_TOKENIZER)
except ImportError:
    _HF = None


def test_scan_falls_back_to_pieces_when_token_counts_disagree():
    tok = ChatTokenizer(TINY_TOKENIZER)
    tok._think_id = tok.pad_id  # never in the text: the counts disagree, so every document falls back
    with open(f"{TINY_DATA}/sft.jsonl") as f:
        samples = [chat_sample(line) for line in list(f)[:20]]
    for s in samples:
        got, want = tok.encode_chat(s["messages"], s["tools"]), PIECES.encode_chat(s["messages"], s["tools"])
        assert (got[0] == want[0]).all() and (got[1] == want[1]).all()
