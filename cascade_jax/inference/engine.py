"""A slot pool that generates for many requests at once (continuous batching) over one HybridCache.

Every request owns a slot (a row of the cache) while it decodes. Decoding runs `sync_every` steps per
jitted call (a `lax.scan`, no Python per token); between calls the host collects the new tokens, frees
the slots of finished requests and prefills waiting prompts into them while the other slots keep their
state. The `n` samples of one prompt share one prefill, copied into n slots.

A prompt is prefilled without its last token, left-padded to a bucket width with segment 0 (padding
carries no state and is never attended); the first decode step feeds that last token. So every sampled
token, the first included, comes from the same decode step, and the state a slot decodes from is exactly
that of the unpadded prompt. Each request samples with its own key: `fold_in(fold_in(key(seed), sample
index), tokens generated so far)`, so what it draws does not depend on its slot or on the other requests.

Shapes are fixed by (max_slots, max_len, sync_every) plus the prefill buckets, so an engine compiles once
per bucket and then serves any number of requests; `set_model` swaps in new parameters of the same shapes
(an RL step) without recompiling.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.inference.sampling import SamplingParams, sample
from cascade_jax.model.cache import HybridCache
from cascade_jax.model.nemotron_h import NemotronH

MIN_PREFILL_WIDTH = 16
COMPILATIONS = collections.Counter()   # traces of the jitted functions (each is one compilation), for tests


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]          # under the distribution sampled from (temperature, top-k, top-p applied)
    model_logprobs: list[float]    # under the unmodified model (T = 1)
    finish_reason: str             # "stop" (a stop token, included in tokens) | "length" | "cancelled"
    prompt_index: int = 0
    sample_index: int = 0


@dataclasses.dataclass(eq=False)
class Request:
    """One sample of one prompt; `on_tokens(request, new_tokens)` is called as tokens arrive."""

    prompt: tuple[int, ...]
    params: SamplingParams
    seed: int
    sample_index: int = 0
    prompt_index: int = 0
    on_tokens: Callable[[Request, list[int]], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    model_logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    slot: int | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def completion(self) -> Completion:
        return Completion(list(self.tokens), list(self.logprobs), list(self.model_logprobs), self.finish_reason,
                          self.prompt_index, self.sample_index)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """Per-slot decoding state, on device."""

    last_token: jax.Array     # int32 [S]: the token the next step feeds
    running: jax.Array        # bool [S]
    stopped: jax.Array        # bool [S]: finished on a stop token (else on length)
    generated: jax.Array      # int32 [S]
    max_new: jax.Array        # int32 [S]
    temperature: jax.Array    # f32 [S]
    top_k: jax.Array          # int32 [S]
    top_p: jax.Array          # f32 [S]
    stop_ids: jax.Array       # int32 [S, max_stop_ids], -1 = none
    key: jax.Array            # PRNG keys [S]

    @classmethod
    def empty(cls, slots: int, max_stop_ids: int) -> Slots:
        def zeros(dtype=jnp.int32):   # a buffer per field: the decode call donates them
            return jnp.zeros((slots,), dtype)

        return cls(zeros(), zeros(bool), zeros(bool), zeros(), zeros(), jnp.ones((slots,), jnp.float32), zeros(),
                   jnp.ones((slots,), jnp.float32),
                   jnp.full((slots, max_stop_ids), -1, jnp.int32), jax.random.split(jax.random.key(0), slots))


class Engine:
    def __init__(self, model: NemotronH, *, max_slots: int = 16, max_len: int = 1024, sync_every: int = 8,
                 max_stop_ids: int = 8):
        if max_slots < 1 or max_len < 2 or sync_every < 1:
            raise ValueError(f"Engine: expected max_slots >= 1, max_len >= 2, sync_every >= 1, got "
                             f"{max_slots}, {max_len}, {sync_every}")
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.dtype = model.dtype
        self.max_slots, self.max_len, self.sync_every, self.max_stop_ids = max_slots, max_len, sync_every, max_stop_ids
        self.cache = HybridCache.init(self.config, max_slots, max_len, self.dtype)
        self.slots = Slots.empty(max_slots, max_stop_ids)
        self.owners: list[Request | None] = [None] * max_slots
        self.waiting: collections.deque[list[Request]] = collections.deque()   # groups sharing one prompt
        self._prompt_counter = itertools.count()

    # ------------------------------------------------------------------ requests
    def set_model(self, model: NemotronH) -> None:
        """New parameters (same shapes and dtypes): the compiled functions are reused."""
        graphdef, state = nnx.split(model)
        if graphdef != self.graphdef:
            raise ValueError("Engine.set_model: the model's structure differs from the engine's")
        self.state = state


    def submit(self, prompt: Sequence[int], params: SamplingParams, *, seed: int = 0,
               on_tokens: Callable[[Request, list[int]], None] | None = None) -> list[Request]:
        """Queue `params.n` samples of `prompt` (token ids); returns their requests."""
        prompt = tuple(int(t) for t in prompt)
        if not prompt:
            raise ValueError("prompt: expected at least one token")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise ValueError(f"prompt: token ids must be in [0, {self.config.vocab_size})")
        if len(params.stop_token_ids) > self.max_stop_ids:
            raise ValueError(f"stop_token_ids: at most {self.max_stop_ids}, got {len(params.stop_token_ids)}")
        need = prompt_width(len(prompt)) + params.max_new_tokens
        if need > self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} needs "
                             f"{need} cache entries; this engine holds {self.max_len} per sequence")
        index = next(self._prompt_counter)
        group = [Request(prompt, params, seed, i, index, on_tokens) for i in range(params.n)]
        self.waiting.append(group)
        return list(group)   # the queued group empties as its requests get slots

    def cancel(self, request: Request) -> None:
        """Stop a request now (e.g. its client went away); its slot is free for the next prompt."""
        if request.done:
            return
        for group in self.waiting:
            if request in group:
                group.remove(request)
        request.finish_reason = "cancelled"
        if request.slot is not None:
            self.slots = _release(self.slots, request.slot)
            self.owners[request.slot] = None
            request.slot = None

    @property
    def busy(self) -> bool:
        return any(self.owners) or any(self.waiting)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[Request]:
        """Fill free slots, decode `sync_every` tokens in every running slot; returns requests that finished."""
        self._fill_free_slots()
        if not any(self.owners):
            return []
        self.cache, self.slots, out = _decode_chunk(self.state, self.cache, self.slots, graphdef=self.graphdef,
                                                    steps=self.sync_every)
        tokens, logprobs, model_logprobs, emitted = jax.device_get(out)
        running, stopped = jax.device_get((self.slots.running, self.slots.stopped))
        finished = []
        for slot, request in enumerate(self.owners):
            if request is None:
                continue
            new = [int(t) for t in tokens[emitted[:, slot], slot]]
            request.tokens += new
            request.logprobs += logprobs[emitted[:, slot], slot].tolist()
            request.model_logprobs += model_logprobs[emitted[:, slot], slot].tolist()
            if not running[slot]:
                request.finish_reason = "stop" if stopped[slot] else "length"
                request.slot, self.owners[slot] = None, None
                finished.append(request)
            if new and request.on_tokens is not None:
                request.on_tokens(request, new)
        return finished

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.busy:
            self.step()

    def _fill_free_slots(self) -> None:
        free = [s for s, owner in enumerate(self.owners) if owner is None]
        if not free or not self.waiting:
            return
        taken: list[tuple[list[Request], list[Request]]] = []   # (group, the requests placed now)
        while free and self.waiting:
            group = self.waiting[0]
            placed = group[:len(free)]
            del group[:len(placed)]
            if not group:
                self.waiting.popleft()
            if not placed:
                continue
            for request in placed:
                request.slot = free.pop(0)
                self.owners[request.slot] = request
            taken.append((group, placed))
        by_width = collections.defaultdict(list)
        for _, placed in taken:
            by_width[prompt_width(len(placed[0].prompt))].append(placed)
        for width, groups in by_width.items():
            self._prefill(width, groups)

    def _prefill(self, width: int, groups: list[list[Request]]) -> None:
        rows = _power_of_two(len(groups))
        tokens = np.zeros((rows, width), np.int32)
        segments = np.zeros((rows, width), np.int32)
        for row, placed in enumerate(groups):
            body = placed[0].prompt[:-1]
            if body:
                tokens[row, width - len(body):] = body
                segments[row, width - len(body):] = 1
        slot_index = np.full((self.max_slots,), self.max_slots, np.int32)   # past the pool: dropped
        source_row = np.zeros((self.max_slots,), np.int32)
        fill = {name: np.zeros((self.max_slots,), dtype) for name, dtype in (
            ("last_token", np.int32), ("max_new", np.int32), ("temperature", np.float32), ("top_k", np.int32),
            ("top_p", np.float32))}
        stop_ids = np.full((self.max_slots, self.max_stop_ids), -1, np.int32)
        keys = []
        i = 0
        for row, placed in enumerate(groups):
            for request in placed:
                p = request.params
                slot_index[i], source_row[i] = request.slot, row
                fill["last_token"][i], fill["max_new"][i] = request.prompt[-1], p.max_new_tokens
                fill["temperature"][i], fill["top_k"][i], fill["top_p"][i] = p.temperature, p.top_k, p.top_p
                stop_ids[i, :len(p.stop_token_ids)] = p.stop_token_ids
                keys.append(jax.random.fold_in(jax.random.key(request.seed), request.sample_index))
                i += 1
        keys += [jax.random.key(0)] * (self.max_slots - len(keys))
        self.cache, self.slots = _prefill_into_slots(
            self.state, self.cache, self.slots, jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(slot_index),
            jnp.asarray(source_row), {k: jnp.asarray(v) for k, v in fill.items()}, jnp.asarray(stop_ids),
            jnp.stack(keys), graphdef=self.graphdef)


def prompt_width(prompt_length: int) -> int:
    """Cache entries a prompt occupies before decoding: its tokens but the last, rounded up to a power of two."""
    return max(MIN_PREFILL_WIDTH, _power_of_two(prompt_length - 1))


def _power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@partial(jax.jit, static_argnames=("graphdef",), donate_argnums=(1, 2))
def _prefill_into_slots(state, cache, slots, tokens, segments, slot_index, source_row, fill, stop_ids, keys, *,
                        graphdef):
    COMPILATIONS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    fresh = HybridCache.init(model.config, tokens.shape[0], cache.max_len, cache.dtype)
    prefilled = model(tokens, segments, compute_logits=False, cache=fresh).cache
    cache = cache.with_rows(slot_index, prefilled.rows(source_row)).constrained()
    put = lambda a, v: a.at[slot_index].set(v, mode="drop")  # noqa: E731
    slots = Slots(last_token=put(slots.last_token, fill["last_token"]),
                  running=put(slots.running, jnp.ones_like(slot_index, bool)),
                  stopped=put(slots.stopped, jnp.zeros_like(slot_index, bool)),
                  generated=put(slots.generated, jnp.zeros_like(slot_index)),
                  max_new=put(slots.max_new, fill["max_new"]),
                  temperature=put(slots.temperature, fill["temperature"]),
                  top_k=put(slots.top_k, fill["top_k"]), top_p=put(slots.top_p, fill["top_p"]),
                  stop_ids=put(slots.stop_ids, stop_ids), key=put(slots.key, keys))
    return cache, slots


@partial(jax.jit, static_argnames=("graphdef", "steps"), donate_argnums=(1, 2))
def _decode_chunk(state, cache, slots, *, graphdef, steps):
    COMPILATIONS["decode"] += 1
    model = nnx.merge(graphdef, state)

    def one_token(carry, _):
        cache, slots = carry
        out = model(slots.last_token[:, None], slots.running[:, None].astype(jnp.int32), cache=cache)
        keys = jax.vmap(jax.random.fold_in)(slots.key, slots.generated)
        token, logprob, model_logprob = sample(keys, out.logits[:, 0].astype(jnp.float32), slots.temperature,
                                               slots.top_k, slots.top_p)
        emitted = slots.running
        generated = slots.generated + emitted
        hit_stop = jnp.any(token[:, None] == slots.stop_ids, axis=1)
        finished = emitted & (hit_stop | (generated >= slots.max_new))
        slots = dataclasses.replace(slots, last_token=jnp.where(emitted, token, slots.last_token),
                                    running=slots.running & ~finished,
                                    stopped=slots.stopped | (finished & hit_stop), generated=generated)
        return (out.cache.constrained(), slots), (token, logprob, model_logprob, emitted)

    (cache, slots), out = jax.lax.scan(one_token, (cache, slots), None, length=steps)
    return cache, slots, out


@jax.jit
def _release(slots: Slots, slot: int) -> Slots:
    return dataclasses.replace(slots, running=slots.running.at[slot].set(False))


def generate(model: NemotronH, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             *, seed: int = 0, max_slots: int | None = None, engine: Engine | None = None) -> list[Completion]:
    """Completions of every prompt (token ids), `n` per prompt, in prompt order then sample order.

    `params` is one SamplingParams for all prompts or one per prompt. Prompt i samples with seed
    `seed + i`. Pass an `engine` to reuse its compilations (e.g. one per RL run, `engine.set_model`
    after each update); otherwise one is made to fit these prompts."""
    per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"params: expected one SamplingParams or {len(prompts)}, got {len(per_prompt)}")
    if engine is None:
        need = max((prompt_width(len(p)) + q.max_new_tokens for p, q in zip(prompts, per_prompt)), default=2)
        samples = sum(q.n for q in per_prompt)
        engine = Engine(model, max_slots=max_slots or min(max(samples, 1), 64), max_len=need)
    else:
        engine.set_model(model)
    requests = [r for i, (p, q) in enumerate(zip(prompts, per_prompt)) for r in engine.submit(p, q, seed=seed + i)]
    engine.run()
    return [r.completion() for r in requests]
