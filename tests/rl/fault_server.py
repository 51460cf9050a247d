"""A fake OpenAI-compatible judge on 127.0.0.1 whose behaviour per request is chosen by a marker in the request's
last message (the judged response is inside it):

    HANG       sleep `hang_s` (longer than any test's client timeout), or until the client goes away
    ERR500     HTTP 500, always            ERR429  HTTP 429, always            ERR400  HTTP 400, always
    FLAKY      HTTP 500 the first time this exact message is seen, then a good reply
    BADJSON    200 with a body that is not JSON
    NOCHOICES  200 with JSON that has no "choices"
    NOCONTENT  200 with a choice whose message content is null
    NOSCORE    200 with a reply that has no SCORE line
    SLOW       a good reply after `slow_s` (to see several requests in flight)
    SAY:<text> a reply whose content is <text> (to the end of its line)
    otherwise  a good reply ending with "SCORE: 0.75"

The server records every request (headers, JSON body), the number in flight and its peak.
"""

import asyncio
import collections
import contextlib
import re
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

GOOD_TEXT = "The response answers the prompt correctly.\nSCORE: 0.75"


def _reply(content):
    return {"id": "chatcmpl-fault", "object": "chat.completion", "created": 0, "model": "fault",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class FaultServer:
    def __init__(self, hang_s: float = 10.0, slow_s: float = 0.2):
        self.hang_s, self.slow_s = hang_s, slow_s
        self.lock = threading.Lock()
        self.base_url = None
        self.reset()
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)

    def reset(self):
        with self.lock:
            self.seen = collections.Counter()       # message content -> times seen
            self.requests = []                      # (headers, body) per request, in arrival order
            self.in_flight = 0
            self.peak = 0

    def requests_containing(self, text: str) -> list:
        with self.lock:
            return [(h, b) for h, b in self.requests if text in b["messages"][-1]["content"]]

    async def _chat(self, request: Request):
        body = await request.json()
        content = body["messages"][-1]["content"]
        with self.lock:
            self.seen[content] += 1
            times_seen = self.seen[content]
            self.requests.append((dict(request.headers), body))
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            return await self._behave(request, content, times_seen)
        finally:
            with self.lock:
                self.in_flight -= 1

    async def _behave(self, request: Request, content: str, times_seen: int):
        if "HANG" in content:
            deadline = time.monotonic() + self.hang_s
            while time.monotonic() < deadline and not await request.is_disconnected():
                await asyncio.sleep(0.02)
            return _reply(GOOD_TEXT)
        if "ERR500" in content or ("FLAKY" in content and times_seen == 1):
            return JSONResponse({"error": {"message": "internal error\nwith a second line"}}, status_code=500)
        if "ERR429" in content:
            return JSONResponse({"error": {"message": "rate limited"}}, status_code=429,
                                headers={"Retry-After": "0"})
        if "ERR400" in content:
            return JSONResponse({"error": {"message": "bad request"}}, status_code=400)
        if "BADJSON" in content:
            return PlainTextResponse("<html>this is not json</html>", media_type="application/json")
        if "NOCHOICES" in content:
            return {"id": "chatcmpl-fault", "object": "chat.completion", "model": "fault"}
        if "NOCONTENT" in content:
            reply = _reply(None)
            reply["choices"][0]["finish_reason"] = "length"
            return reply
        if "NOSCORE" in content:
            return _reply("The response is fine, I think.")
        if match := re.search(r"SAY:(.*)", content):
            return _reply(match.group(1))
        if "SLOW" in content:
            await asyncio.sleep(self.slow_s)
        return _reply(GOOD_TEXT)


@contextlib.contextmanager
def run_fault_server(**kwargs):
    """A started FaultServer (its `base_url` ends with /v1) in a background thread; shut down on exit."""
    fault = FaultServer(**kwargs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fault.app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "the fault server did not start"
    fault.base_url = f"http://127.0.0.1:{port}/v1"
    try:
        yield fault
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
