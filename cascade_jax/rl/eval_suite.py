"""Held-out evaluation of a model, per domain: greedy accuracy, mean reward and pass@k.

A suite is a JSONL file of records `{"messages", "domain", "verifier"[, "source", "tools"]}`, named in
`SUITES` (bundled) or given by path. Each prompt is answered once greedily and `samples` times at
temperature 1; every answer is decoded without special tokens and scored by the task verifiers
(`cascade_jax.data.tasks.verify`), exactly as the trainer's held-out `TaskAccuracy` does. An answer is
solved when its reward is 1; the mean reward gives partial credit (e.g. IFEval constraints).

All prompts of all domains go through one engine in one pass (compiled once). Prompt `i` of the suite
file samples with seed `seed + i`, so a record's answers do not depend on which other records or
domains were selected.

Scoring (`score_texts`, `aggregate`, `pass_at_k`) is pure: records and decoded texts in, numbers out.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from cascade_jax.data.config import ASSETS
from cascade_jax.data.tasks import VERIFIERS, verify

SUITES: dict[str, dict] = {
    "tiny": {"path": "tiny/eval.jsonl", "domains": ("math", "instruction_following", "multiple_choice", "code"),
             "tokenizer": "tiny_tokenizer", "max_new_tokens": 64, "thinking": False},
}
CUSTOM_DEFAULTS = {"domains": None, "tokenizer": "tiny_tokenizer", "max_new_tokens": 64, "thinking": False}
MAX_SLOTS = 128   # rows decoded at once (tiny on CPU: 128 is ~15% faster than 64)


# ---------------------------------------------------------------------------------------- the suite
def resolve_suite(suite: str) -> dict:
    """The settings of a bundled suite (by name) or of a JSONL file of the same record format (by path),
    with `name` and an absolute `path`."""
    if suite in SUITES:
        spec = dict(SUITES[suite])
        return {**spec, "name": suite, "path": os.path.join(ASSETS, spec["path"])}
    if suite.endswith(".jsonl"):
        if not os.path.isfile(suite):
            raise ValueError(f"suite file {suite}: no such file")
        return {**CUSTOM_DEFAULTS, "name": suite, "path": os.path.abspath(suite)}
    raise ValueError(f"unknown suite {suite!r}: expected one of {sorted(SUITES)} or a path to a .jsonl file")


def read_suite(path: str) -> list[dict]:
    """Every record checked; the first bad line is reported as FILE:LINE. Each record gains `index`
    (its position in the file, which fixes its sampling seed)."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object with 'messages', 'domain' and 'verifier'")
            messages, domain, verifier = record.get("messages"), record.get("domain"), record.get("verifier")
            if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
                raise ValueError(f"{where}: 'messages' must be a non-empty list of message objects")
            if not (isinstance(domain, str) and domain):
                raise ValueError(f"{where}: 'domain' must be a non-empty string")
            if not (isinstance(verifier, dict) and verifier.get("kind") in VERIFIERS):
                raise ValueError(f"{where}: 'verifier' must be an object whose 'kind' is one of {sorted(VERIFIERS)}")
            records.append({**record, "index": len(records)})
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def select(records: Sequence[dict], domains: Sequence[str] | None = None,
           limit_per_domain: int | None = None, order: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Records by domain (the first `limit_per_domain` of each, in file order). Domains come in `domains`
    order if given (each must occur), else in `order`, then in order of first appearance."""
    if limit_per_domain is not None and not (isinstance(limit_per_domain, int) and limit_per_domain >= 1):
        raise ValueError(f"limit_per_domain: expected an int >= 1 or None, got {limit_per_domain!r}")
    by_domain: dict[str, list[dict]] = {}
    for record in records:
        by_domain.setdefault(record["domain"], []).append(record)
    if domains is not None:
        domains = list(dict.fromkeys(domains))
        if not domains:
            raise ValueError("domains: expected at least one domain")
        if missing := [d for d in domains if d not in by_domain]:
            raise ValueError(f"domain(s) {missing} not in the suite; it has {sorted(by_domain)}")
    else:
        domains = [d for d in (order or ()) if d in by_domain] + [d for d in by_domain if d not in (order or ())]
    return {d: by_domain[d][:limit_per_domain] for d in domains}


def prepare(suite: str = "tiny", *, domains: Sequence[str] | None = None,
            limit_per_domain: int | None = None) -> tuple[dict, dict[str, list[dict]]]:
    """(suite settings, selected records by domain): everything that can fail on the suite, before a model."""
    spec = resolve_suite(suite)
    selected = select(read_suite(spec["path"]), domains, limit_per_domain, spec.get("domains"))
    return spec, selected


# ---------------------------------------------------------------------------------------- pure scoring
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: expected 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_texts(records: Sequence[dict], texts: Sequence[str]) -> list[float]:
    """Verifier reward of each decoded answer against its record; an answer repeated for one record is
    scored once (code answers run unit tests in a subprocess)."""
    if len(records) != len(texts):
        raise ValueError(f"score_texts: {len(records)} records but {len(texts)} texts")
    seen: dict[tuple[int, str], float] = {}
    rewards = []
    for record, text in zip(records, texts):
        key = (id(record), text)
        if key not in seen:
            seen[key] = float(verify(text, record["verifier"]))
        rewards.append(seen[key])
    return rewards


def aggregate(greedy: Sequence[float], samples: Sequence[Sequence[float]], k: int) -> dict:
    """One domain's numbers from per-prompt rewards: the greedy reward of each prompt, and the rewards
    of its n >= k samples."""
    if len(greedy) != len(samples):
        raise ValueError(f"aggregate: {len(greedy)} greedy rewards but {len(samples)} sample lists")
    greedy = np.asarray(greedy, np.float64)
    passes = [pass_at_k(len(s), int(np.sum(np.asarray(s) >= 1.0)), k) for s in samples]
    count = len(greedy)
    return {"n": count,
            "greedy": float(np.mean(greedy >= 1.0)) if count else 0.0,
            "greedy_reward": float(np.mean(greedy)) if count else 0.0,
            f"pass@{k}": float(np.mean(passes)) if count else 0.0,
            # pass@1 from the n samples (c/n per prompt): the paper's avg@n, what RL at T = 1 optimises
            "pass@1": float(np.mean([np.mean(np.asarray(s) >= 1.0) for s in samples])) if count else 0.0,
            "sample_reward": float(np.mean([np.mean(s) for s in samples])) if count else 0.0}


def overall(domains: dict[str, dict], k: int) -> dict:
    """Prompt-weighted means over the domains."""
    total = sum(d["n"] for d in domains.values())
    keys = tuple(dict.fromkeys(("greedy", "greedy_reward", "pass@1", f"pass@{k}", "sample_reward")))
    return {"n": total, **{key: (sum(d[key] * d["n"] for d in domains.values()) / total if total else 0.0)
                           for key in keys}}


def score(selected: dict[str, list[dict]], greedy_texts: Sequence[str], sample_texts: Sequence[Sequence[str]],
          k: int) -> dict[str, dict]:
    """Per-domain results from decoded texts, in the flat order of `selected` (domain by domain)."""
    flat = [r for records in selected.values() for r in records]
    if not (len(flat) == len(greedy_texts) == len(sample_texts)):
        raise ValueError(f"score: {len(flat)} records, {len(greedy_texts)} greedy texts, "
                         f"{len(sample_texts)} sample lists")
    rewards = score_texts(flat + [r for r, s in zip(flat, sample_texts) for _ in s],   # one pass: repeats once
                          list(greedy_texts) + [t for s in sample_texts for t in s])
    greedy, sampled = rewards[:len(flat)], rewards[len(flat):]
    out, at, flat_at = {}, 0, 0
    for domain, records in selected.items():
        rows = []
        for i in range(len(records)):
            width = len(sample_texts[at + i])
            rows.append(sampled[flat_at:flat_at + width])
            flat_at += width
        out[domain] = aggregate(greedy[at:at + len(records)], rows, k)
        at += len(records)
    return out


# ---------------------------------------------------------------------------------------- generation
def _check_counts(pass_k, samples) -> int:
    if not (isinstance(pass_k, int) and not isinstance(pass_k, bool) and pass_k >= 1):
        raise ValueError(f"pass_k: expected an int >= 1, got {pass_k!r}")
    samples = pass_k if samples is None else samples
    if not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= pass_k):
        raise ValueError(f"samples: expected an int >= pass_k ({pass_k}), got {samples!r}")
    return samples


def _stop_ids(model, tokenizer) -> tuple[int, ...]:
    eos = model.config.eos_token_id
    ids = [tokenizer.eos_id, *(eos if isinstance(eos, (tuple, list)) else [eos])]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None and 0 <= int(i) < model.config.vocab_size))


def evaluate(model, tokenizer, suite: str = "tiny", *, limit_per_domain: int | None = None, pass_k: int = 4,
             samples: int | None = None, max_new_tokens: int | None = None, thinking: bool | None = None,
             seed: int = 0, domains: Sequence[str] | None = None, progress: bool = True,
             max_slots: int | None = None) -> dict:
    """Greedy accuracy, greedy mean reward and pass@k (from `samples` >= k answers at temperature 1) of
    `model` on each domain of `suite` (a name in SUITES or a .jsonl path). JSON-friendly result:
    `{"suite", "pass_k", "samples", ..., "domains": {d: {"n", "greedy", "greedy_reward", "pass@k",
    "sample_reward"}}, "overall": {...}, "seconds"}`."""
    from tqdm import tqdm

    from cascade_jax.inference import Engine, SamplingParams
    from cascade_jax.inference.engine import prompt_width

    start = time.perf_counter()
    n = _check_counts(pass_k, samples)
    spec, selected = prepare(suite, domains=domains, limit_per_domain=limit_per_domain)
    max_new = spec["max_new_tokens"] if max_new_tokens is None else max_new_tokens
    thinking = spec["thinking"] if thinking is None else thinking
    stops = _stop_ids(model, tokenizer)
    greedy_params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_token_ids=stops)
    sample_params = SamplingParams(max_new_tokens=max_new, temperature=1.0, top_p=1.0, stop_token_ids=stops, n=n)
    flat = [r for records in selected.values() for r in records]
    prompts = [tokenizer.encode_prompt(r["messages"], r.get("tools"), enable_thinking=thinking) for r in flat]

    width = max(prompt_width(len(p)) for p in prompts)
    engine = Engine(model, max_slots=min(len(prompts) * (1 + n), max_slots or MAX_SLOTS), max_len=width + max_new)
    groups = []
    for record, prompt in zip(flat, prompts):
        groups.append((engine.submit(prompt, greedy_params, seed=seed + record["index"]),
                       engine.submit(prompt, sample_params, seed=seed + record["index"])))
    total = len(prompts) * (1 + n)
    with tqdm(total=total, desc=f"eval {spec['name']}", unit="answer", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        while engine.busy:
            bar.update(len(engine.step()))

    def text(request) -> str:
        return tokenizer.decode(request.tokens, skip_special_tokens=True)

    greedy_texts = [text(g[0]) for g, _ in groups]
    sample_texts = [[text(r) for r in s] for _, s in groups]
    results = score(selected, greedy_texts, sample_texts, pass_k)
    return {"suite": spec["name"], "pass_k": pass_k, "samples": n, "max_new_tokens": max_new,
            "thinking": bool(thinking), "seed": seed, "limit_per_domain": limit_per_domain,
            "domains": results, "overall": overall(results, pass_k),
            "seconds": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------------------------------- presentation
def format_table(result: dict) -> str:
    """A fixed-width console table: one row per domain (and `all`), n, greedy, its mean reward, pass@1 (over the
    samples at T = 1) and pass@k."""
    k = result["pass_k"]
    rows = list(result["domains"].items())
    if len(rows) > 1 and "overall" in result:
        rows.append(("all", result["overall"]))
    name_width = max([len("domain"), *(len(d) for d, _ in rows)])
    key = f"pass@{k}"
    header = f"{'domain':<{name_width}}  {'n':>5}  {'greedy':>7}  {'reward':>7}  {'pass@1':>7}  {key:>7}"
    lines = [header, "-" * len(header)]
    for domain, d in rows:
        lines.append(f"{domain:<{name_width}}  {d['n']:>5d}  {d['greedy']:>7.3f}  {d['greedy_reward']:>7.3f}  "
                     f"{d.get('pass@1', float('nan')):>7.3f}  {d[key]:>7.3f}")
    samples = result.get("samples", k)
    lines.append(f"suite {result['suite']}, greedy + {samples} samples per prompt at T=1, "
                 f"{result.get('seconds', 0.0):.1f} s")
    return "\n".join(lines)


def load_model_and_tokenizer(ckpt: str, tokenizer: str | None = None, suite: str = "tiny"):
    """(model, ChatTokenizer): the model by `cascade_jax.load_pretrained` (run dir, one step, converted or HF
    dir); the tokenizer from `tokenizer`, else the checkpoint's own tokenizer.json, else the suite's bundled
    one. A tokenizer whose ids do not fit the model's vocabulary is refused."""
    import cascade_jax as cj
    from cascade_jax.data.tokenize import ChatTokenizer

    if tokenizer is None:
        if os.path.isfile(os.path.join(ckpt, "tokenizer.json")):
            tokenizer = ckpt
        else:
            name = SUITES[suite]["tokenizer"] if suite in SUITES else CUSTOM_DEFAULTS["tokenizer"]
            tokenizer = os.path.join(ASSETS, name)
    if not os.path.isdir(tokenizer):
        raise ValueError(f"tokenizer {tokenizer}: no such directory")
    model = cj.load_pretrained(ckpt)
    chat = ChatTokenizer(tokenizer)
    if chat.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {chat.vocab_size} tokens, more than the model's vocabulary "
                         f"({model.config.vocab_size}); pass another tokenizer")
    return model, chat
