"""The LLM-judge reward client against a local fault-injecting server (tests/rl/fault_server.py) and against
cascade-serve in-process: scores, retries, timeouts, malformed replies, concurrency, and failure counting."""

import asyncio
import socket
import threading
import time
import uuid

import pytest
import uvicorn

from cascade_jax.rl.rewards.judge import (
    DEFAULT_RUBRIC,
    OUTCOMES,
    JudgeClient,
    JudgeConfig,
    JudgeItem,
    judge_reward,
    parse_score,
    render_prompt,
)
from tests.rl.fault_server import GOOD_TEXT, run_fault_server

FAST = dict(timeout_s=0.5, max_retries=1, backoff_s=0.05)


@pytest.fixture(scope="module")
def fault():
    with run_fault_server() as server:
        yield server


def make_client(fault, **overrides) -> JudgeClient:
    return JudgeClient(JudgeConfig(base_url=fault.base_url, model="judge", **{**FAST, **overrides}))


def item(response: str, **kwargs) -> JudgeItem:
    """A judged item whose text is unique to this call (the server's FLAKY memory is keyed by the message)."""
    return JudgeItem(prompt=f"What is 2+3? ({uuid.uuid4().hex})", response=response, **kwargs)


def counts_of(**nonzero) -> dict:
    return {key: nonzero.get(key, 0) for key in OUTCOMES}


def test_good_items_score_and_count_ok(fault):
    rewards, details, counts = make_client(fault).score([item("5"), item("It is 5."), item("five")])
    assert rewards == [0.75, 0.75, 0.75]
    assert counts == counts_of(ok=3)
    for d in details:
        assert d == {"outcome": "ok", "score_text": GOOD_TEXT, "attempts": 1, "status": 200, "error": None}


def test_request_carries_the_item_the_settings_and_the_key(fault, monkeypatch):
    monkeypatch.setenv("CASCADE_JUDGE_API_KEY", "sk-from-env")
    judged = item("The answer is 5.", reference="5", rubric="Exact arithmetic only.")
    make_client(fault, temperature=0.3, max_tokens=64).score([judged])
    [(headers, body)] = fault.requests_containing(judged.prompt)
    assert headers["authorization"] == "Bearer sk-from-env"
    assert body["model"] == "judge" and body["temperature"] == 0.3 and body["max_tokens"] == 64
    assert "stream" not in body or body["stream"] is False
    [message] = body["messages"]
    assert message["role"] == "user" and message["content"] == render_prompt(judged)
    for part in (judged.prompt, judged.response, "[REFERENCE ANSWER]\n5\n", "Exact arithmetic only.", "SCORE:"):
        assert part in message["content"]
    assert DEFAULT_RUBRIC not in message["content"]

    plain = item("5")
    make_client(fault, api_key="sk-given").score([plain])
    [(headers, body)] = fault.requests_containing(plain.prompt)
    assert headers["authorization"] == "Bearer sk-given"
    assert "[REFERENCE ANSWER]" not in body["messages"][0]["content"]
    assert DEFAULT_RUBRIC in body["messages"][0]["content"]


def test_no_key_sends_no_authorization(fault, monkeypatch):
    monkeypatch.delenv("CASCADE_JUDGE_API_KEY", raising=False)
    plain = item("5")
    make_client(fault).score([plain])
    [(headers, _)] = fault.requests_containing(plain.prompt)
    assert "authorization" not in headers


@pytest.mark.parametrize("marker,outcome,attempts,status", [
    ("HANG", "timeout", 2, None),
    ("ERR500", "http_error", 2, 500),
    ("ERR429", "http_error", 2, 429),
    ("ERR400", "http_error", 1, 400),
    ("BADJSON", "malformed", 1, 200),
    ("NOCHOICES", "malformed", 1, 200),
    ("NOCONTENT", "malformed", 1, 200),
    ("NOSCORE", "malformed", 1, 200),
])
def test_fault_gives_zero_and_its_counter(fault, marker, outcome, attempts, status):
    judged = item(f"answer {marker}")
    rewards, [d], counts = make_client(fault).score([judged])
    assert rewards == [0.0]
    assert counts == counts_of(**{outcome: 1})
    assert d["outcome"] == outcome and d["attempts"] == attempts and d["status"] == status
    assert isinstance(d["error"], str) and d["error"] and "\n" not in d["error"]
    if marker != "HANG":   # a hung request may not have reached the handler's record before it was cut
        assert len(fault.requests_containing(judged.prompt)) == attempts
    if marker == "NOSCORE":
        assert d["score_text"] == "The response is fine, I think."


def test_flaky_succeeds_on_the_retry(fault):
    judged = item("answer FLAKY")
    rewards, [d], counts = make_client(fault).score([judged])
    assert rewards == [0.75] and counts == counts_of(ok=1)
    assert d["attempts"] == 2 and d["status"] == 200 and d["error"] is None
    assert len(fault.requests_containing(judged.prompt)) == 2


def test_no_retries_means_one_attempt(fault):
    rewards, [d], counts = make_client(fault, max_retries=0).score([item("answer FLAKY")])
    assert rewards == [0.0] and counts == counts_of(http_error=1) and d["attempts"] == 1


@pytest.mark.parametrize("said,expected", [
    ("SCORE: 0.25", 0.25), ("**Score:** 1", 1.0), ("score=0.5", 0.5), ("SCORE: 7", 1.0), ("SCORE: -2", 0.0),
])
def test_score_is_parsed_and_clamped_end_to_end(fault, said, expected):
    rewards, [d], counts = make_client(fault).score([item(f"SAY:{said}")])
    assert rewards == [expected] and counts == counts_of(ok=1) and d["score_text"] == said


def test_parse_score():
    assert parse_score("Good.\nSCORE: 0.9") == 0.9
    assert parse_score("I first thought SCORE: 0.1 but no.\nSCORE: 0.8") == 0.8      # the last one counts
    assert parse_score("**SCORE:** .5") == 0.5
    assert parse_score("Score : 1.0\n") == 1.0
    assert parse_score("SCORE: 2.5e-1") == 0.25
    assert parse_score("SCORE: 1e9") == 1.0 and parse_score("SCORE: -0.3") == 0.0
    assert parse_score("no score here") is None and parse_score("SCORE: high") is None
    assert parse_score("") is None and parse_score(None) is None


def test_mixed_batch_keeps_order_and_finishes_in_time(fault):
    markers = ["ok", "HANG", "ERR500", "FLAKY", "BADJSON", "ok", "NOSCORE", "NOCHOICES", "ERR400", "ok"]
    expected = {"ok": (0.75, "ok"), "HANG": (0.0, "timeout"), "ERR500": (0.0, "http_error"),
                "FLAKY": (0.75, "ok"), "BADJSON": (0.0, "malformed"), "NOSCORE": (0.0, "malformed"),
                "NOCHOICES": (0.0, "malformed"), "ERR400": (0.0, "http_error")}
    items = [item(f"response {i} {m}") for i, m in enumerate(markers)]
    start = time.monotonic()
    rewards, details, counts = make_client(fault).score(items)
    elapsed = time.monotonic() - start
    assert rewards == [expected[m][0] for m in markers]
    assert [d["outcome"] for d in details] == [expected[m][1] for m in markers]
    assert counts == counts_of(ok=4, timeout=1, http_error=2, malformed=3)
    assert sum(counts.values()) == len(items)
    assert elapsed < 2.5, f"the batch took {elapsed:.2f} s"   # one HANG: 2 x 0.5 s + back-off, all concurrent


def test_hangs_run_concurrently(fault):
    start = time.monotonic()
    rewards, details, counts = make_client(fault, max_concurrency=8).score([item(f"HANG {i}") for i in range(8)])
    elapsed = time.monotonic() - start
    assert rewards == [0.0] * 8 and counts == counts_of(timeout=8)
    assert all(d["attempts"] == 2 for d in details)
    assert 0.9 < elapsed < 2.0, f"8 hung requests took {elapsed:.2f} s"   # serial would be 8 s


def test_max_concurrency_is_respected(fault):
    deadline = time.monotonic() + 5
    while fault.in_flight and time.monotonic() < deadline:   # hung handlers of earlier tests notice and leave
        time.sleep(0.02)
    fault.reset()
    rewards, _, counts = make_client(fault, max_concurrency=3, timeout_s=5).score([item(f"SLOW {i}")
                                                                                   for i in range(12)])
    assert rewards == [0.75] * 12 and counts == counts_of(ok=12)
    assert fault.peak == 3


def test_connection_refused():
    with socket.socket() as sock:   # bound but not listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        client = JudgeClient(JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="judge", **FAST))
        rewards, [d], counts = client.score([item("5")])
    assert rewards == [0.0] and counts == counts_of(connection_error=1)
    assert d["attempts"] == 2 and d["status"] is None and "\n" not in d["error"]


def test_empty_batch(fault):
    assert make_client(fault).score([]) == ([], [], counts_of())


def test_called_from_inside_an_event_loop(fault):
    async def inside():
        return make_client(fault).score([item("5")])

    rewards, _, counts = asyncio.run(inside())
    assert rewards == [0.75] and counts == counts_of(ok=1)


def test_judge_reward_reads_the_metadata(fault):
    client = make_client(fault)
    prompt = f"Name the capital of France. ({uuid.uuid4().hex})"
    metadata = {"prompt_text": prompt, "reference_response": "Paris",
                "verifier": {"type": "judge", "rubric": "The city must be Paris."}}
    reward, details = judge_reward("Paris.", metadata, client)
    assert reward == 0.75 and details["outcome"] == "ok"
    [(_, body)] = fault.requests_containing(prompt)
    content = body["messages"][0]["content"]
    assert "Paris." in content and "[REFERENCE ANSWER]\nParis\n" in content and "The city must be Paris." in content

    reward, details = judge_reward("ERR400", {"prompt_text": "x"}, client)
    assert reward == 0.0 and details["outcome"] == "http_error"
    with pytest.raises(ValueError, match="prompt_text"):
        judge_reward("Paris.", {"reference_response": "Paris"}, client)


@pytest.mark.parametrize("bad", [
    dict(base_url="127.0.0.1:8000/v1"), dict(base_url=""), dict(model=""), dict(timeout_s=0),
    dict(timeout_s=float("inf")), dict(timeout_s=float("nan")), dict(max_retries=-1), dict(max_retries=1.5),
    dict(backoff_s=-0.1), dict(max_concurrency=0), dict(max_concurrency=True), dict(temperature=-1),
    dict(max_tokens=0), dict(api_key=3),
])
def test_bad_config_is_a_one_line_value_error(bad):
    with pytest.raises(ValueError) as error:
        JudgeConfig(**{"base_url": "http://127.0.0.1:8000/v1", "model": "judge", **bad})
    assert "\n" not in str(error.value) and "JudgeConfig." in str(error.value)


def test_config_repr_hides_the_key():
    assert "sk-secret" not in repr(JudgeConfig(base_url="http://x/v1", model="m", api_key="sk-secret"))


@pytest.mark.slow   # ~35 s on 2 CPU cores: building and compiling the tiny model
def test_against_cascade_serve(tmp_path):
    """Our own server as the judge: the random tiny model writes no SCORE line, so the reply is parsed (HTTP 200)
    and counted malformed, with reward 0 and no exception."""
    from cascade_jax.cli.serve import build_server, create_app
    from tests.cli.test_generate import make_checkpoint

    app = create_app(build_server(make_checkpoint(tmp_path / "ckpt"), None, max_slots=2, max_len=1024))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started, "cascade-serve did not start"
        client = JudgeClient(JudgeConfig(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", model="ckpt",
                                         max_tokens=16, timeout_s=300, max_retries=0))
        rewards, [d], counts = client.score([JudgeItem("What is 2+3?", "5", reference="5")])
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert rewards == [0.0] and counts == counts_of(malformed=1), d
    assert d["status"] == 200 and d["attempts"] == 1 and "SCORE" in d["error"]
