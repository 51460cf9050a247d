"""cascade-serve --ckpt PATH --port N: an OpenAI-compatible HTTP server over the inference Engine.

The Engine is not thread-safe, so one thread (`EngineThread`) owns it: it loops `engine.step()` while
anything is running and takes submissions and cancellations from a thread-safe queue. Tokens go back
to each HTTP request's asyncio queue through `loop.call_soon_threadsafe`. Stop strings are matched on
the decoded text (the request is cancelled and the text cut); streamed text is held back while it could
still be the start of a stop string, so a stream concatenates to exactly the non-streamed answer.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import secrets
import sys
import threading
import time
import uuid

from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, StreamingResponse

from cascade_jax.cli.generate import UsageError, chat_prompt, fail, load_model_and_tokenizer, stop_ids

log = logging.getLogger("cascade_jax.serve")


class BadRequest(ValueError):
    """Answered 400 with an OpenAI-style error body."""


# ---------------------------------------------------------------------------------------- engine thread
class EngineThread:
    """The one thread that calls the Engine; everything else talks to it through `inbox`."""

    def __init__(self, engine):
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.sinks: dict = {}   # Request -> post(event...) into its HTTP request's asyncio queue
        self.cancelled = 0      # requests cancelled so far (clients gone, stop strings)
        self.stats = {"running": 0, "waiting": 0, "cancelled": 0}
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="cascade-engine", daemon=True)

    def start(self) -> EngineThread:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.inbox.put(None)
        self.thread.join(timeout=30)

    async def submit(self, prompt, params, seed):
        """(requests, asyncio.Queue of events); a ValueError from Engine.submit (e.g. too long) is raised here."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def post(*event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        future = concurrent.futures.Future()
        self.inbox.put(("submit", (prompt, params, seed, post), future))
        return await asyncio.wrap_future(future), events

    def cancel(self, requests) -> None:
        self.inbox.put(("cancel", list(requests), None))

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._drain(block=not self.engine.busy)
            self._update_stats()
            if self.engine.busy:
                try:
                    finished = self.engine.step()
                except Exception as e:   # report to every waiting client; keep serving
                    log.exception("engine step failed")
                    for request, post in list(self.sinks.items()):
                        self.engine.cancel(request)
                        post("error", request, f"engine error: {e}")
                    self.sinks.clear()
                    finished = []
                for request in finished:
                    if (post := self.sinks.pop(request, None)) is not None:
                        post("done", request)
            self._update_stats()

    def _update_stats(self) -> None:
        self.stats = {"running": sum(o is not None for o in self.engine.owners),
                      "waiting": sum(len(g) for g in self.engine.waiting), "cancelled": self.cancelled}

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            kind, payload, future = item
            if kind == "submit":
                prompt, params, seed, post = payload
                try:
                    requests = list(self.engine.submit(prompt, params, seed=seed, on_tokens=_on_tokens(post)))
                except ValueError as e:
                    future.set_exception(BadRequest(str(e)))
                else:
                    self.sinks.update((r, post) for r in requests)
                    future.set_result(requests)
            else:
                for request in payload:
                    self.sinks.pop(request, None)
                    self.cancelled += not request.done
                    self.engine.cancel(request)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None


def _on_tokens(post):
    def on_tokens(request, new):
        post("tokens", request, list(new), request.model_logprobs[-len(new):])
    return on_tokens


# ---------------------------------------------------------------------------------------- one answer
class Choice:
    """One sample's text as it grows: a stop string ends it and cuts the text; `release` gives the next
    part safe to stream (nothing that could begin a stop string or is half a character)."""

    def __init__(self, index, tokenizer, skip_ids, stops):
        self.index, self.tokenizer, self.skip, self.stops = index, tokenizer, set(skip_ids), stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids, self.logprobs, self.text, self.sent, self.finish_reason = [], [], "", 0, None

    def add(self, ids, logprobs) -> None:
        self.ids += ids
        self.logprobs += logprobs
        self.text = self.tokenizer.decode([i for i in self.ids if i not in self.skip])
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.finish_reason = self.text[:max(min(cuts), self.sent)], "stop"

    def release(self) -> str:
        end = len(self.text) if self.finish_reason else len(self.text.rstrip("\ufffd")) - self.hold
        out = self.text[self.sent:max(end, self.sent)]
        self.sent += len(out)
        return out


class Generation:
    """The n samples of one HTTP request, fed by the engine thread's events."""

    def __init__(self, server, prompt, params, seed, stops):
        self.server, self.prompt, self.params, self.seed = server, prompt, params, seed
        self.choices = [Choice(i, server.tokenizer, server.stop_ids, stops) for i in range(params.n)]
        self.requests, self.events = [], None

    async def start(self) -> Generation:
        self.requests, self.events = await self.server.worker.submit(self.prompt, self.params, self.seed)
        return self

    async def updates(self, http_request=None):
        """Yields (choice, new token ids, their logprobs) as tokens arrive and as choices finish."""
        while not all(c.finish_reason for c in self.choices):
            try:
                kind, request, *rest = await asyncio.wait_for(self.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if http_request is not None and await http_request.is_disconnected():
                    return
                continue
            choice = self.choices[request.sample_index]
            if kind == "error":
                raise RuntimeError(rest[0])
            if choice.finish_reason:
                continue
            if kind == "tokens":
                choice.add(*rest)
                if choice.finish_reason:
                    self.server.worker.cancel([request])
                yield choice, rest[0], rest[1]
            else:
                choice.finish_reason = "length" if request.finish_reason == "length" else "stop"
                yield choice, [], []

    def close(self) -> None:
        """Cancel whatever still runs (a dropped client, an error): its slot is free at once."""
        if left := [r for r in self.requests if not self.choices[r.sample_index].finish_reason]:
            self.server.worker.cancel(left)

    def usage(self) -> dict:
        completion = sum(len(c.ids) for c in self.choices)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": completion,
                "total_tokens": len(self.prompt) + completion}


# ---------------------------------------------------------------------------------------- validation
def _check(body, key, ok, expected, default=None):
    value = body.get(key, default)
    if value is None:
        return default
    if not ok(value):
        raise BadRequest(f"'{key}': expected {expected}, got {value!r}")
    return value


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


COMMON = {"model", "n", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
          "user", "frequency_penalty", "presence_penalty", "logprobs"}
CHAT = COMMON | {"messages", "top_logprobs", "max_completion_tokens", "chat_template_kwargs"}
COMPLETIONS = COMMON | {"prompt", "echo", "suffix", "best_of"}


def parse_common(body: dict, allowed: set) -> dict:
    if unknown := sorted(set(body) - allowed):
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    for key in ("frequency_penalty", "presence_penalty"):
        _check(body, key, lambda v: v == 0, "0 (penalties are not supported)")
    stop = _check(body, "stop", lambda v: isinstance(v, str) or (isinstance(v, list) and len(v) <= 4 and all(
        isinstance(s, str) and s for s in v)), "a string or a list of at most 4 non-empty strings", [])
    options = _check(body, "stream_options", lambda v: isinstance(v, dict) and set(v) <= {"include_usage"},
                     'an object {"include_usage": bool}', {})
    return dict(
        n=_check(body, "n", lambda v: _is_int(v) and 1 <= v <= 64, "an int in [1, 64]", 1),
        max_tokens=_check(body, "max_tokens", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
        temperature=_check(body, "temperature", lambda v: _is_num(v) and 0 <= v <= 2, "a number in [0, 2]", 1.0),
        top_p=_check(body, "top_p", lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]", 1.0),
        top_k=_check(body, "top_k", lambda v: _is_int(v) and v >= 0, "an int >= 0", 0),
        seed=_check(body, "seed", _is_int, "an int"),
        stop=[stop] if isinstance(stop, str) else stop,
        stream=_check(body, "stream", lambda v: isinstance(v, bool), "a boolean", False),
        include_usage=bool(options.get("include_usage")))


# ---------------------------------------------------------------------------------------- the app
class Server:
    def __init__(self, engine, tokenizer, stops, *, model_name: str, thinking: bool = True):
        from cascade_jax.inference.engine import prompt_width

        self.worker = EngineThread(engine)
        self.tokenizer, self.stop_ids, self.model_name, self.thinking = tokenizer, stops, model_name, thinking
        self.max_len, self.prompt_width = engine.max_len, prompt_width

    def sampling(self, prompt, settings):
        from cascade_jax.inference import SamplingParams

        room = self.max_len - self.prompt_width(len(prompt))
        if room < 1:
            raise BadRequest(f"the prompt has {len(prompt)} tokens; it does not fit the cache of {self.max_len}")
        try:
            return SamplingParams(max_new_tokens=settings["max_tokens"] or room, temperature=settings["temperature"],
                                  top_p=settings["top_p"], top_k=settings["top_k"], stop_token_ids=self.stop_ids,
                                  n=settings["n"])
        except ValueError as e:
            raise BadRequest(str(e)) from None

    async def generation(self, prompt, settings) -> Generation:
        seed = settings["seed"] if settings["seed"] is not None else secrets.randbits(31)
        return await Generation(self, prompt, self.sampling(prompt, settings), seed, settings["stop"]).start()

    def token_entry(self, token_id, logprob):
        text = self.tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def create_app(server: Server):
    @contextlib.asynccontextmanager
    async def lifespan(_):
        server.worker.start()
        yield
        server.worker.stop()

    app = FastAPI(title="cascade-serve", lifespan=lifespan)

    @app.exception_handler(BadRequest)
    async def bad_request(_, error: BadRequest):
        message = str(error).strip().splitlines()[0] if str(error).strip() else "bad request"
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=400)

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/engine")
    async def engine_stats():
        return dict(server.worker.stats)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "cascade_jax"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        settings = parse_common(body, CHAT)
        if "max_completion_tokens" in body:
            settings["max_tokens"] = _check(body, "max_completion_tokens", lambda v: _is_int(v) and v >= 1,
                                            "an int >= 1")
        want_logprobs = _check(body, "logprobs", lambda v: isinstance(v, bool), "a boolean", False)
        top = _check(body, "top_logprobs", lambda v: _is_int(v) and 0 <= v <= 20, "an int in [0, 20]", 0)
        kwargs = _check(body, "chat_template_kwargs", lambda v: isinstance(v, dict) and set(v) <= {"enable_thinking"},
                        'an object {"enable_thinking": bool}', {})
        try:
            prompt = chat_prompt(server.tokenizer, body.get("messages"),
                                 thinking=bool(kwargs.get("enable_thinking", server.thinking)))
        except ValueError as e:
            raise BadRequest(f"'messages': {e}") from None
        generation = await server.generation(prompt, settings)
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def logprobs(ids, lps):
            if not want_logprobs:
                return None
            return {"content": [{**server.token_entry(t, lp), "top_logprobs": [server.token_entry(t, lp)][:top]}
                                for t, lp in zip(ids, lps)]}

        def chunk(choices, usage=None):
            out = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
                   "choices": choices}
            return f"data: {json.dumps({**out, **({'usage': usage} if usage else {})})}\n\n"

        if settings["stream"]:
            async def events():
                try:
                    for c in generation.choices:
                        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                    async for c, ids, lps in generation.updates():
                        text = c.release()
                        if text or ids:
                            yield chunk([{"index": c.index, "delta": {"content": text}, "logprobs": logprobs(ids, lps),
                                          "finish_reason": None}])
                        if c.finish_reason:
                            yield chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                          "finish_reason": c.finish_reason}])
                    if settings["include_usage"]:
                        yield chunk([], generation.usage())
                    yield "data: [DONE]\n\n"
                finally:
                    generation.close()
            return StreamingResponse(events(), media_type="text/event-stream")

        try:
            async for _ in generation.updates(request):
                pass
        finally:
            generation.close()
        return {"id": ident, "object": "chat.completion", "created": created, "model": server.model_name,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": logprobs(c.ids, c.logprobs), "finish_reason": c.finish_reason}
                            for c in generation.choices],
                "usage": generation.usage()}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        settings = parse_common(body, COMPLETIONS)
        top = _check(body, "logprobs", lambda v: _is_int(v) and 0 <= v <= 5, "an int in [0, 5]")
        _check(body, "echo", lambda v: v is False, "false (echo is not supported)")
        _check(body, "suffix", lambda v: False, "null (suffix is not supported)")
        _check(body, "best_of", lambda v: v == 1, "1 (best_of is not supported)")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            prompt = server.tokenizer.encode_text(prompt)
        elif not (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
            raise BadRequest("'prompt': expected a non-empty string (or one string, or a list of token ids)")
        generation = await server.generation(prompt, settings)
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def logprobs(ids, lps):
            if top is None:
                return None
            tokens = [server.tokenizer.decode([t]) for t in ids]
            return {"tokens": tokens, "token_logprobs": lps,
                    "top_logprobs": [{s: lp} if top else {} for s, lp in zip(tokens, lps)],
                    "text_offset": [sum(len(s) for s in tokens[:i]) for i in range(len(tokens))]}

        def choice(c, text, ids, lps, finish):
            return {"index": c.index, "text": text, "logprobs": logprobs(ids, lps), "finish_reason": finish}

        def chunk(choices, usage=None):
            out = {"id": ident, "object": "text_completion", "created": created, "model": server.model_name,
                   "choices": choices}
            return f"data: {json.dumps({**out, **({'usage': usage} if usage else {})})}\n\n"

        if settings["stream"]:
            async def events():
                try:
                    async for c, ids, lps in generation.updates():
                        text = c.release()
                        if text or ids or c.finish_reason:
                            yield chunk([choice(c, text, ids, lps, c.finish_reason)])
                    if settings["include_usage"]:
                        yield chunk([], generation.usage())
                    yield "data: [DONE]\n\n"
                finally:
                    generation.close()
            return StreamingResponse(events(), media_type="text/event-stream")

        try:
            async for _ in generation.updates(request):
                pass
        finally:
            generation.close()
        return {"id": ident, "object": "text_completion", "created": created, "model": server.model_name,
                "choices": [choice(c, c.text, c.ids, c.logprobs, c.finish_reason) for c in generation.choices],
                "usage": generation.usage()}

    return app


def build_server(ckpt: str, tokenizer: str | None, *, max_slots: int, max_len: int, thinking: bool = True,
                 model_name: str | None = None, warmup: bool = True) -> Server:
    """Model, tokenizer and Engine; `warmup` compiles the decode step before the first client waits for it."""
    from cascade_jax.inference import Engine, SamplingParams

    model, tok = load_model_and_tokenizer(ckpt, tokenizer)
    engine = Engine(model, max_slots=max_slots, max_len=max_len)
    if warmup:
        engine.submit([tok.eos_id], SamplingParams(max_new_tokens=1))
        engine.run()
    name = model_name or os.path.basename(os.path.normpath(ckpt))
    return Server(engine, tok, stop_ids(model, tok), model_name=name, thinking=thinking)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cascade-serve", description="OpenAI-compatible server over a checkpoint.",
                                     epilog="example: cascade-serve --ckpt runs/sft-tiny --port 8000")
    parser.add_argument("--ckpt", required=True, help="HF dir, converted checkpoint, run dir or one of its steps")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the checkpoint's, its run's, else bundled)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-slots", type=int, default=16, help="requests decoded at once")
    parser.add_argument("--max-len", type=int, default=2048, help="cache entries per sequence (prompt + answer)")
    parser.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True,
                        help="chat prompts open with <think> (per request: chat_template_kwargs.enable_thinking)")
    parser.add_argument("--model-name", help="the id /v1/models reports (default: the checkpoint's folder name)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)

    import uvicorn

    from cascade_jax.weights.safetensors_dir import CheckpointError

    try:
        server = build_server(args.ckpt, args.tokenizer, max_slots=args.max_slots, max_len=args.max_len,
                              thinking=args.thinking, model_name=args.model_name)
    except (CheckpointError, UsageError, ValueError, OSError) as e:
        return fail("cascade-serve", e)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
