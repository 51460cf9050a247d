"""cascade-generate --ckpt PATH --prompt "text" | --prompts-file IN.jsonl --out OUT.jsonl

Chat generation from any checkpoint `load_pretrained` reads. The helpers here (model + tokenizer
loading, chat prompts, stop ids, incremental decoding) are shared with `cascade-serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

BUNDLED_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "assets", "tiny_tokenizer")
LINE_KEYS = {"prompt", "messages", "n", "max_new_tokens"}


class UsageError(ValueError):
    """A one-line user-facing error (bad input, not a bug)."""


# ---------------------------------------------------------------------------------------- shared helpers
def find_tokenizer(ckpt: str, explicit: str | None) -> str:
    """--tokenizer, else a tokenizer.json in the checkpoint (HF dirs), else the `data.tokenizer` of the run
    whose config.yaml sits at or above the checkpoint (cascade-sft run dirs and their steps), else bundled."""
    if explicit:
        return explicit
    if os.path.isfile(os.path.join(ckpt, "tokenizer.json")):
        return ckpt
    here = os.path.abspath(ckpt)
    for _ in range(4):   # RUN, RUN/checkpoints, RUN/checkpoints/<step>, .../state
        run_config = os.path.join(here, "config.yaml")
        if os.path.isfile(run_config):
            import yaml

            with open(run_config) as f:
                tokenizer = ((yaml.safe_load(f) or {}).get("data") or {}).get("tokenizer")
            if isinstance(tokenizer, str):
                from cascade_jax.data.config import ASSETS

                tokenizer = tokenizer.replace("${bundled:", ASSETS + "/").rstrip("}") \
                    if tokenizer.startswith("${bundled:") else tokenizer
                return tokenizer if os.path.isabs(tokenizer) else os.path.join(os.path.dirname(here), tokenizer)
        here = os.path.dirname(here)
    return BUNDLED_TOKENIZER


def load_model_and_tokenizer(ckpt: str, tokenizer_path: str | None):
    """(model, ChatTokenizer); a tokenizer whose ids do not fit the model's vocabulary is refused."""
    import cascade_jax as cj
    from cascade_jax.data.tokenize import ChatTokenizer

    model = cj.load_pretrained(ckpt)
    path = find_tokenizer(ckpt, tokenizer_path)
    tokenizer = ChatTokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(f"tokenizer {path} has {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                         f"({model.config.vocab_size}); pass --tokenizer")
    return model, tokenizer


def stop_ids(model, tokenizer) -> tuple[int, ...]:
    """The chat template's end token (`<|im_end|>`, the tokenizer's eos) plus the model config's eos ids."""
    eos = model.config.eos_token_id
    ids = [tokenizer.eos_id, *(eos if isinstance(eos, (tuple, list)) else [eos])]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None and 0 <= int(i) < model.config.vocab_size))


def chat_prompt(tokenizer, messages, *, thinking: bool) -> list[int]:
    """Token ids of `messages` rendered with an open assistant turn (as the SFT accuracy evaluation does)."""
    from cascade_jax.data.records import normalize_messages

    return [int(t) for t in tokenizer.encode_prompt(normalize_messages(messages), enable_thinking=thinking)]


class TextStream:
    """Decoded text of a growing list of ids, released only up to complete characters: a multi-byte
    character split over tokens decodes to U+FFFD until its last byte arrives, so that tail is held."""

    def __init__(self, tokenizer, skip_ids=()):
        self.tokenizer, self.skip = tokenizer, set(skip_ids)
        self.ids: list[int] = []
        self.sent = 0

    def push(self, ids) -> str:
        self.ids += [i for i in ids if i not in self.skip]
        text = self.tokenizer.decode(self.ids)
        ready = len(text.rstrip("\ufffd"))
        out, self.sent = text[self.sent:ready], max(self.sent, ready)
        return out

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        out, self.sent = text[self.sent:], len(text)
        return out

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


def fail(prog: str, error: BaseException | str) -> int:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------------- the command
def read_prompts_file(path: str) -> list[dict]:
    """Every line checked before anything is generated; the first bad one is reported as FILE:LINE."""
    jobs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
                raise UsageError(f"{where}: expected an object with exactly one of \"prompt\" or \"messages\"")
            if unknown := sorted(set(record) - LINE_KEYS):
                raise UsageError(f"{where}: unknown field(s) {unknown}, expected {sorted(LINE_KEYS)}")
            if "prompt" in record and not (isinstance(record["prompt"], str) and record["prompt"]):
                raise UsageError(f"{where}: \"prompt\" must be a non-empty string")
            for key in ("n", "max_new_tokens"):
                value = record.get(key, 1)
                if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                    raise UsageError(f"{where}: \"{key}\" must be an int >= 1, got {value!r}")
            jobs.append({"line": number, "where": where, **record})
    if not jobs:
        raise UsageError(f"{path}: no prompts")
    return jobs


def write_atomically(path: str, text: str) -> None:
    """Temp file in the same folder, fsynced, then renamed: a crash leaves the old file (or none), never half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run_file(args, model, tokenizer, jobs) -> None:
    from tqdm import tqdm

    from cascade_jax.inference import Engine, SamplingParams
    from cascade_jax.inference.engine import prompt_width

    stops = stop_ids(model, tokenizer)
    prepared = []
    for job in jobs:   # every prompt encoded and checked before the first token is generated
        messages = job["messages"] if "messages" in job else [{"role": "user", "content": job["prompt"]}]
        try:
            ids = chat_prompt(tokenizer, messages, thinking=args.thinking)
            params = sampling(args, SamplingParams, stops, n=job.get("n", 1),
                              max_new_tokens=job.get("max_new_tokens", args.max_new_tokens))
        except ValueError as e:
            raise UsageError(f"{job['where']}: {str(e).splitlines()[0]}") from None
        prepared.append((job, ids, params))
    max_len = max(prompt_width(len(ids)) + p.max_new_tokens for _, ids, p in prepared)
    engine = Engine(model, max_slots=args.max_slots, max_len=max_len)
    groups = [list(engine.submit(ids, p, seed=args.seed + i)) for i, (_, ids, p) in enumerate(prepared)]
    with tqdm(total=sum(len(g) for g in groups), desc="requests", unit="req", file=sys.stderr) as bar:
        while engine.busy:
            bar.update(len(engine.step()))
    out = []
    for (job, _, _), group in zip(prepared, groups):
        record = {k: v for k, v in job.items() if k != "where"}
        record["outputs"] = [{"text": tokenizer.decode([t for t in r.tokens if t not in stops]), "token_ids": r.tokens,
                              "logprobs": r.logprobs, "model_logprobs": r.model_logprobs,
                              "finish_reason": r.finish_reason} for r in group]
        out.append(record)
    write_atomically(args.out, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in out))
    print(f"cascade-generate: wrote {len(out)} lines to {args.out}", file=sys.stderr)


def run_prompt(args, model, tokenizer) -> None:
    from cascade_jax.inference import Engine, SamplingParams
    from cascade_jax.inference.engine import prompt_width

    stops = stop_ids(model, tokenizer)
    ids = chat_prompt(tokenizer, [{"role": "user", "content": args.prompt}], thinking=args.thinking)
    params = sampling(args, SamplingParams, stops)
    engine = Engine(model, max_slots=1, max_len=prompt_width(len(ids)) + params.max_new_tokens)
    stream = TextStream(tokenizer, stops)

    def on_tokens(request, new):
        sys.stdout.write(stream.push(new))
        sys.stdout.flush()

    start = time.perf_counter()
    [request] = engine.submit(ids, params, seed=args.seed, on_tokens=on_tokens)
    engine.run()
    seconds = time.perf_counter() - start
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    print(f"cascade-generate: {len(request.tokens)} tokens, finish_reason={request.finish_reason}, "
          f"{len(request.tokens) / max(seconds, 1e-9):.1f} tok/s ({seconds:.1f} s, compilation included)",
          file=sys.stderr)


def sampling(args, SamplingParams, stops, **overrides):
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, stop_token_ids=stops)
    return SamplingParams(**{**settings, **overrides})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cascade-generate", description="Chat generation from a checkpoint.",
                                     epilog='example: cascade-generate --ckpt runs/sft-tiny --prompt "What is 2+3?"')
    parser.add_argument("--ckpt", required=True, help="HF dir, converted checkpoint, run dir or one of its steps")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one user message; the answer streams to stdout")
    source.add_argument("--prompts-file", help='JSONL, each line {"prompt": str} or {"messages": [...]}, '
                                               'optional "n", "max_new_tokens"; needs --out')
    parser.add_argument("--out", help="JSONL written (atomically) in --prompts-file mode")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the checkpoint's, its run's, else bundled)")
    parser.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True,
                        help="open the assistant turn with <think> (default) or an empty <think></think>")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-slots", type=int, default=16, help="requests decoded at once (file mode)")
    args = parser.parse_args(argv)
    if args.prompts_file and not args.out:
        parser.error("--prompts-file needs --out")
    if args.out and not args.prompts_file:
        parser.error("--out goes with --prompts-file")

    from cascade_jax.weights.safetensors_dir import CheckpointError

    try:
        jobs = None
        if args.prompts_file:
            if os.path.exists(args.out) and os.path.samefile(args.out, args.prompts_file):
                raise UsageError(f"--out {args.out} is the input file; choose another path")
            jobs = read_prompts_file(args.prompts_file)
        model, tokenizer = load_model_and_tokenizer(args.ckpt, args.tokenizer)
        if jobs is not None:
            run_file(args, model, tokenizer, jobs)
        else:
            run_prompt(args, model, tokenizer)
    except (CheckpointError, UsageError, ValueError, OSError) as e:
        return fail("cascade-generate", e)
    except KeyboardInterrupt:
        return fail("cascade-generate", "interrupted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
