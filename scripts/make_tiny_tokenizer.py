"""Trains the bundled tiny tokenizer: a byte-level BPE on the tiny demo data plus the chat special tokens.

    python scripts/make_tiny_tokenizer.py [--data cascade_jax/data/assets/tiny] \
        [--out cascade_jax/data/assets/tiny_tokenizer] [--vocab-size 4096]

Writes a Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json`` whose
``chat_template`` is ``cascade_jax/data/assets/chat_template.jinja``), loadable with
``tokenizers.Tokenizer.from_file`` or ``transformers.AutoTokenizer.from_pretrained``. Run
``scripts/make_tiny_data.py`` first. Needs only the ``tokenizers`` package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cascade_jax.data import chat_template as ct  # noqa: E402
from cascade_jax.data.records import chat_sample  # noqa: E402

ASSETS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "cascade_jax", "data", "assets"))


TRAIN_FILES = ("eval.jsonl", "rl.jsonl", "sft.jsonl")  # not sft_eval.jsonl: held out


def corpus(data_dir: str):
    for path in (os.path.join(data_dir, f) for f in TRAIN_FILES if os.path.exists(os.path.join(data_dir, f))):
        with open(path) as f:
            for line in f:
                s = chat_sample(line, need_assistant=False)
                yield ct.render_text(s["messages"], s["tools"])


def train(texts, vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
                for t in ct.SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(ASSETS, "tiny"))
    ap.add_argument("--out", default=os.path.join(ASSETS, "tiny_tokenizer"))
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
    texts = list(corpus(args.data))
    if not texts:
        raise SystemExit(f"{args.data}: no *.jsonl files; run scripts/make_tiny_data.py first")
    tok = train(texts, args.vocab_size)
    with open(os.path.join(ASSETS, "chat_template.jinja")) as f:
        template = f.read()
    os.makedirs(args.out, exist_ok=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in ct.SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": ct.IM_END,
        "pad_token": ct.PAD,
        "unk_token": None,
        "model_max_length": 262144,
        "clean_up_tokenization_spaces": False,
        "chat_template": template,
    }
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
    print(f"{args.out}: vocab {tok.get_vocab_size()}, {len(texts)} texts -> {n_tokens} tokens "
          f"({sum(map(len, texts)) / n_tokens:.2f} chars/token)")


if __name__ == "__main__":
    main()
