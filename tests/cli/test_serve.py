"""cascade-serve in-process (uvicorn in a background thread) on a random tiny checkpoint, driven by the
official `openai` client: every answer goes through HTTP, SSE and the engine thread."""

import concurrent.futures
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from cascade_jax.cli.serve import build_server, create_app
from tests.cli.test_generate import make_checkpoint

MESSAGES = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt")
    app = create_app(build_server(ckpt, None, max_slots=4, max_len=512))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="none", timeout=120, max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["ckpt"]


def test_chat_streamed_equals_non_streamed(client):
    settings = dict(model="ckpt", messages=MESSAGES, max_tokens=20, temperature=0, seed=7)
    full = client.chat.completions.create(**settings, logprobs=True)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert full.usage.completion_tokens == len(choice.logprobs.content) >= 1
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert all(entry.logprob <= 0 for entry in choice.logprobs.content)
    chunks = list(client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stop_string_cuts_the_text(client):
    settings = dict(model="ckpt", messages=MESSAGES, max_tokens=20, temperature=0, seed=7)
    text = client.chat.completions.create(**settings).choices[0].message.content
    if len(text) < 4:
        pytest.skip("the random model's answer is too short to cut")
    stop = text[2:4]
    cut = client.chat.completions.create(**settings, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == text[:text.find(stop)]
    streamed = client.chat.completions.create(**settings, stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.message.content


def test_completions_with_logprobs_and_n(client):
    out = client.completions.create(model="ckpt", prompt="Once upon a time", max_tokens=6, temperature=1.0,
                                    seed=3, n=2, logprobs=1)
    assert len(out.choices) == 2 and sorted(c.index for c in out.choices) == [0, 1]
    for c in out.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) <= 6
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices)
    streamed = client.completions.create(model="ckpt", prompt="Once upon a time", max_tokens=6, temperature=1.0,
                                         seed=3, n=2, stream=True)
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in out.choices}


def test_sixteen_concurrent_requests_are_all_answered(client):
    def ask(seed):
        return client.chat.completions.create(model="ckpt", messages=MESSAGES, max_tokens=6, seed=seed)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
    assert all(1 <= a.usage.completion_tokens <= 6 for a in answers)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(n=0), dict(max_tokens=0),
                                 dict(extra_body={"bogus": 1}), dict(stop=[1]),
                                 dict(messages=[{"role": "nobody", "content": "x"}]),
                                 dict(messages=[{"role": "user", "content": "word " * 600}])])
def test_bad_request_is_400_while_another_completes(client, bad):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        good = pool.submit(client.chat.completions.create, model="ckpt", messages=MESSAGES, max_tokens=24, seed=1)
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(**{"model": "ckpt", "messages": MESSAGES, "max_tokens": 4, **bad})
        assert good.result().choices[0].finish_reason in ("stop", "length")
    body = error.value.body
    assert body["type"] == "invalid_request_error" and "\n" not in body["message"]


def test_malformed_json_is_400(base_url):
    response = httpx.post(base_url + "/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(base_url + "/health").json() == {"status": "ok"}


def test_dropped_stream_frees_its_slot(client, base_url):
    settings = dict(model="ckpt", messages=MESSAGES, max_tokens=400, temperature=0, seed=0)
    before = httpx.get(base_url + "/v1/engine").json()
    stream = client.chat.completions.create(**settings, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        stats = httpx.get(base_url + "/v1/engine").json()
        if stats["cancelled"] > before["cancelled"] and not stats["running"] and not stats["waiting"]:
            break
        time.sleep(0.1)
    assert stats["cancelled"] == before["cancelled"] + 1, "the request was not cancelled"
    assert stats["running"] == 0 and stats["waiting"] == 0
    full = client.chat.completions.create(**settings).choices[0]   # undropped, the same request runs long
    assert full.finish_reason == "length"
