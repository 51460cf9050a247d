"""Chat tokenization with the assistant loss mask, over any Hugging Face tokenizer directory.

``ChatTokenizer(path)`` loads ``tokenizer.json`` (and ``tokenizer_config.json`` for the special
tokens) with the ``tokenizers`` library; ``transformers`` is not needed. A conversation is rendered by
``chat_template.render_pieces``; the ids are those of the whole text — the same ids
``tokenizer.apply_chat_template`` gives with the shipped template (tested). The loss mask comes from
where the pieces meet: every trained span runs from a ``<think>`` to an ``<|im_end|>``, both added
special tokens, which split the text before the BPE model runs. Modes:

- ``scan`` (default when those tokens are special): encode whole texts, then find each span's
  boundary tokens by counting them (as fast as plain tokenization);
- ``pieces``: encode each piece separately and concatenate (exact for the same reason);
- ``offsets`` (default for a tokenizer without those special tokens): encode the whole text and
  map the trained character spans to tokens through the offsets.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence

import numpy as np

from cascade_jax.data import chat_template as ct

LOSS_ON = ("all_assistant", "last_assistant")


class ChatTokenizer:
    """Renders + tokenizes conversations; returns int32 ids and a bool mask of trained tokens."""

    def __init__(self, path: str, *, mode: str = "auto"):
        from tokenizers import Tokenizer

        self.path = path
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no tokenizer.json (expected a Hugging Face tokenizer directory)")
        self._tok = Tokenizer.from_file(file)
        self.config: dict = {}
        cfg_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                self.config = json.load(f)
        added = {t.content: t for t in self._tok.get_added_tokens_decoder().values()}
        special = all(t in added and not added[t].lstrip and not added[t].rstrip and not added[t].normalized
                      for t in ct.BOUNDARY_TOKENS)
        if mode not in ("auto", "scan", "pieces", "offsets"):
            raise ValueError(f"mode={mode!r}, expected auto, scan, pieces or offsets")
        if mode in ("scan", "pieces") and not special:
            raise ValueError(f"{path}: mode={mode!r} needs {ct.BOUNDARY_TOKENS} as added special tokens")
        self.mode = ("scan" if special else "offsets") if mode == "auto" else mode
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = self.token_id(self._special("eos_token", ct.IM_END))
        if self.mode == "scan" and self.eos_id != self.token_id(ct.IM_END):
            self.mode = "pieces"  # the scan locates span ends by the <|im_end|> id
        self._think_id = self.token_id(ct.THINK_OPEN) if self.mode != "offsets" else None
        pad = self._special("pad_token", None)
        self.pad_id = self.token_id(pad) if pad is not None else 0

    def _special(self, key: str, default: str | None) -> str | None:
        value = self.config.get(key, default)
        if isinstance(value, dict):
            value = value.get("content")
        return value if value is not None else default

    def __getstate__(self):  # tokenizers.Tokenizer pickles through its JSON form
        state = self.__dict__.copy()
        state["_tok"] = self._tok.to_str()
        return state

    def __setstate__(self, state):
        from tokenizers import Tokenizer

        state["_tok"] = Tokenizer.from_str(state["_tok"])
        self.__dict__.update(state)

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.path}: token {token!r} is not in the vocabulary")
        return i

    def encode_text(self, text: str) -> list[int]:
        """Plain tokenization (special tokens in the text are recognised, nothing is added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_chat(
        self,
        messages: Sequence[dict],
        tools: Sequence[dict] | None = None,
        *,
        loss_on: str = "all_assistant",
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [n], mask bool [n]); mask is True on the trained assistant tokens."""
        return self.encode_rendered([ct.render_pieces(messages, tools)], loss_on=loss_on)[0]

    def encode_rendered(
        self, rendered: Sequence[Sequence[ct.Piece]], *, loss_on: str = "all_assistant"
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tokenizes many rendered conversations at once (one parallel tokenizer call)."""
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={loss_on!r}, expected one of {LOSS_ON}")
        flags = []
        for pieces in rendered:
            last = max(t for _, t in pieces)
            flags.append(np.asarray([t >= 0 and (loss_on == "all_assistant" or t == last) for _, t in pieces]))
        if self.mode == "offsets":
            return [self._encode_offsets(pieces, f) for pieces, f in zip(rendered, flags)]
        if self.mode == "pieces":
            return self._encode_pieces(rendered, flags)
        return self._encode_scan(rendered, flags)

    def _encode_scan(self, rendered, flags) -> list[tuple[np.ndarray, np.ndarray]]:
        """Whole-text encoding; trained spans located by counting their boundary special tokens.

        A trained piece starts with ``<think>`` and ends with ``<|im_end|>``, both single added
        tokens, so the span starts at the (a+1)-th ``<think>`` id and ends at the (b+1)-th
        ``<|im_end|>`` id, where a and b count those strings in the text before it. A document whose
        token counts disagree with the string counts (possible only with unusual added tokens) is
        re-encoded piecewise.
        """
        texts, spans, totals = [], [], []
        for pieces, f in zip(rendered, flags):
            n_think = n_end = 0
            doc_spans = []
            for (p, _), train in zip(pieces, f):
                c_think, c_end = p.count(ct.THINK_OPEN), p.count(ct.IM_END)
                if train:
                    if not (p.startswith(ct.THINK_OPEN) and p.endswith(ct.IM_END)):
                        raise AssertionError("trained piece must run from <think> to <|im_end|>")
                    doc_spans.append((n_think, n_end + c_end - 1))
                n_think, n_end = n_think + c_think, n_end + c_end
            texts.append("".join(p for p, _ in pieces))
            spans.append(doc_spans)
            totals.append((n_think, n_end))
        out = []
        for i, enc in enumerate(self._tok.encode_batch_fast(texts, add_special_tokens=False)):
            lst = enc.ids
            ids = np.fromiter(lst, np.int32, len(lst))
            think_at = np.flatnonzero(ids == self._think_id)
            end_at = np.flatnonzero(ids == self.eos_id)
            if (len(think_at), len(end_at)) != totals[i]:
                out.append(self._encode_pieces([rendered[i]], [flags[i]])[0])
                continue
            mask = np.zeros(len(ids), bool)
            for a, b in spans[i]:
                mask[think_at[a]: end_at[b] + 1] = True
            out.append((ids, mask))
        return out

    def _encode_pieces(self, rendered, flags) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each piece encoded on its own; exact because every piece boundary is on a special token."""
        flat = [p for pieces in rendered for p, _ in pieces]
        encs = self._tok.encode_batch_fast(flat, add_special_tokens=False)
        lists = [e.ids for e in encs]
        piece_len = np.fromiter(map(len, lists), np.int64, len(lists))
        ids = np.fromiter(itertools.chain.from_iterable(lists), np.int32, int(piece_len.sum()))
        mask = np.repeat(np.concatenate(flags), piece_len)
        # Document boundaries in the flat arrays: cumulative piece lengths at each document's last piece.
        ends = np.cumsum(piece_len)[np.cumsum([len(p) for p in rendered]) - 1].tolist()
        starts = [0] + ends[:-1]
        return [(ids[a:b], mask[a:b]) for a, b in zip(starts, ends)]

    def _encode_offsets(self, pieces: Sequence[ct.Piece], train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        text = "".join(p for p, _ in pieces)
        enc = self._tok.encode(text, add_special_tokens=False)
        bounds = np.cumsum([0] + [len(p) for p, _ in pieces])
        starts = np.asarray([s for s, _ in enc.offsets], np.int64).reshape(-1)
        piece_of = np.clip(np.searchsorted(bounds, starts, side="right") - 1, 0, len(pieces) - 1)
        return np.asarray(enc.ids, np.int32), train[piece_of]

    def encode_prompt(
        self, messages: Sequence[dict], tools: Sequence[dict] | None = None, *, enable_thinking: bool = True
    ) -> np.ndarray:
        """Prompt ids ending in the generation prompt ``<|im_start|>assistant\\n<think>…``."""
        text = ct.render_text(messages, tools, add_generation_prompt=True, enable_thinking=enable_thinking)
        return np.asarray(self.encode_text(text), np.int32)
