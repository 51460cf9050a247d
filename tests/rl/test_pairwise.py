"""Pairwise-judge (GenRM-style) RLHF rewards: the reply parser, the pairings, the §2.5 aggregation against
hand-computed values, PairwiseJudge against a fake OpenAI-compatible judge, and the JudgeServer lifecycle (a stub
server for the fast checks, a real tiny checkpoint under cascade-serve for the slow one)."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cascade_jax.rl.judge_server import JudgeServer, JudgeServerError
from cascade_jax.rl.rewards.judge import OUTCOMES, JudgeConfig
from cascade_jax.rl.rewards.pairwise import (
    PREFER_1,
    PREFER_2,
    PairwiseCoefficients,
    PairwiseJudge,
    aggregate_group,
    comparison_pairs,
    length_weights,
    parse_comparison,
    render_comparison,
    response_lengths,
    split_response,
)

NO_LENGTH = PairwiseCoefficients(reasoning_bonus=0, answer_bonus=0, reasoning_length_coef=0, answer_length_coef=0)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def counts_of(**nonzero) -> dict:
    return {key: nonzero.get(key, 0) for key in OUTCOMES}


# ---------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,expected", [
    ("Response 1 is better.\nSCORE_1: 4\nSCORE_2: 2\nRANKING: 2", (4.0, 2.0, 2.0)),
    ("SCORE_1: 1\nSCORE_2: 1\nRANKING: 6\nOn reflection:\nSCORE_1: 3\nSCORE_2: 5\nRANKING: 5", (3.0, 5.0, 5.0)),
    ("**SCORE_1:** 5\n**Score_2**: 3.5\n**ranking:** 1", (5.0, 3.5, 1.0)),
    ('Verdict: {"score_1": 2, "score_2": 4, "ranking": 4}', (2.0, 4.0, 4.0)),
    ("SCORE_1: 9\nSCORE_2: 0\nRANKING: 7", (5.0, 1.0, 6.0)),                 # clamped
    ("SCORE_1: 3\nSCORE_2: 3\nRANKING: -1", (3.0, 3.0, 1.0)),
    ("I prefer the first one. \\boxed{1}", PREFER_1),
    ("\\boxed{A}", PREFER_1), ("\\boxed{ b }", PREFER_2), ("\\boxed{2}", PREFER_2),
    ("First \\boxed{1}, no wait: \\boxed{Response B}", PREFER_2),
    ("SCORE_1: 4\nSCORE_2: 2\nno ranking, but \\boxed{2}", PREFER_2),       # incomplete lines: the fallback
])
def test_parse_comparison(text, expected):
    assert parse_comparison(text) == expected


@pytest.mark.parametrize("text", [
    "", None, "Both are fine.", "SCORE_1: 4\nSCORE_2: 2", "SCORE_10: 4\nSCORE_2: 2\nRANKING: 3",
    "SCORE_1: high\nSCORE_2: low\nRANKING: 2", "\\boxed{3}", "\\boxed{C}", "SCORE: 0.8",
])
def test_parse_comparison_malformed(text):
    assert parse_comparison(text) is None


def test_the_prompt_holds_both_responses_and_the_format():
    text = render_comparison("What is {2+3}?", "five", "5")
    assert text.index("What is {2+3}?") < text.index("[RESPONSE 1]\nfive\n[END RESPONSE 1]") \
        < text.index("[RESPONSE 2]\n5\n[END RESPONSE 2]")
    for line in ("SCORE_1: <", "SCORE_2: <", "RANKING: <"):
        assert line in text
    # the judge's own reply to this prompt, in the asked format, parses
    assert parse_comparison(text + "\nSCORE_1: 3\nSCORE_2: 4\nRANKING: 4") == (3.0, 4.0, 4.0)


def test_split_response_and_lengths():
    assert split_response("<think>\nlet me see</think>\nIt is 5.<|im_end|>") == ("\nlet me see", "\nIt is 5.")
    assert split_response("a</think>b</think> c <|im_end|><pad>") == ("a</think>b", " c ")
    assert split_response("no reasoning here<|im_end|>") == ("", "no reasoning here")
    assert response_lengths("<think> abc </think>  defg \n<|im_end|>") == (3, 4)
    assert response_lengths("truncated reasoning that never closed") == (0, 37)


# ---------------------------------------------------------------------------------------- pairings
@pytest.mark.parametrize("size", [2, 3, 4, 7, 16])
def test_pair_counts(size):
    assert len(comparison_pairs(size, "all")) == size * (size - 1) // 2
    assert len(comparison_pairs(size, "circular")) == size
    assert len(comparison_pairs(size, "all", swap=True)) == size * (size - 1)
    assert all(i < j for i, j in comparison_pairs(size, "all"))


def test_pairs_themselves():
    assert comparison_pairs(4, "circular") == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert comparison_pairs(3, "all", swap=True) == [(0, 1), (0, 2), (1, 2), (1, 0), (2, 0), (2, 1)]
    assert comparison_pairs(1) == [] and comparison_pairs(0, "circular") == []
    with pytest.raises(ValueError, match="pairs"):
        comparison_pairs(3, "round_robin")


# ---------------------------------------------------------------------------------------- aggregation
THREE = [(0, 1, (4, 2, 2)), (0, 2, (3, 3, 5)), (1, 2, (2, 5, 6))]   # the (0, 2) tie: d = 3.5 - 5 = -1.5
THREE_BASE = [(4 + 1.5) / 2, (2 + 2) / 2, (4.5 + 5) / 2]             # 2.75, 2, 4.75


def test_tie_break_and_mean_over_comparisons():
    out = aggregate_group(THREE, [1, 2, 3], [4, 5, 6], coefficients=NO_LENGTH)
    np.testing.assert_allclose(out, THREE_BASE)
    tie_for_1 = aggregate_group([(0, 1, (3, 3, 1))], [0, 0], [0, 0], coefficients=NO_LENGTH)
    np.testing.assert_allclose(tie_for_1, [3 + 2.5, 3 - 2.5])


def test_default_coefficients_by_hand():
    reasoning, answer = [10, 5, 20], [30, 40, 50]
    out = aggregate_group(THREE, reasoning, answer, coefficients=PairwiseCoefficients())
    # top max(1, floor(3 * 0.2)) = 1 scorer: response 2 gets both bonuses (0.5 + 0.5).
    # reasoning: raw 1 - (L - 5) / 15 = [2/3, 1, 0], mean 5/9 -> w = [1/9, 4/9, -5/9]
    # answer:    raw [1, 1/2, 0], mean 1/2                   -> w = [1/2, 0, -1/2]
    expected = [2.75 + 0.3 / 9 + 0.35 / 2, 2 + 0.3 * 4 / 9, 4.75 + 1.0 - 0.3 * 5 / 9 - 0.35 / 2]
    np.testing.assert_allclose(out, expected)


def test_bonuses_go_to_the_shortest_among_the_top():
    # base scores [5, 1, 4, 2]; top 0.5 of 4 = the two best, {0, 2}
    comparisons = [(0, 1, (5, 1, 1)), (2, 3, (4, 2, 2))]
    coefficients = PairwiseCoefficients(reasoning_bonus=0.5, answer_bonus=0.25, top_percentile=0.5,
                                        reasoning_length_coef=0, answer_length_coef=0)
    # the shortest reasoning of the group (1) is not a top scorer: the bonus goes to 2 (50 < 100);
    # response 2's answer is empty, so the answer bonus goes to 0 (5), not to the empty one
    out = aggregate_group(comparisons, [100, 1, 50, 3], [5, 7, 0, 9], coefficients=coefficients)
    np.testing.assert_allclose(out, [5.25, 1, 4.5, 2])
    # ties with the last eligible score are eligible too: base [5, 4, 4, 1], top 2 -> {0, 1, 2}
    tied = [(0, 3, (5, 1, 1)), (1, 2, (4, 4, 3.5))]
    out = aggregate_group(tied, [9, 8, 1, 1], [9, 9, 9, 1], coefficients=coefficients)
    np.testing.assert_allclose(out, [5.25, 4, 4.5, 1])     # answer: 0, 1, 2 all 9 -> the first, 0


def test_length_terms_are_zero_centred():
    rng = np.random.default_rng(0)
    comparisons = [(i, j, (3, 3, 3.5)) for i, j in comparison_pairs(6)]    # every base score 3, no tie shift
    no_bonus = PairwiseCoefficients(reasoning_bonus=0, answer_bonus=0)
    for _ in range(5):
        reasoning, answer = rng.integers(0, 500, 6), rng.integers(1, 500, 6)
        out = aggregate_group(comparisons, reasoning, answer, coefficients=no_bonus)
        assert abs(out.sum() - 6 * 3) < 1e-9
        assert abs(length_weights(reasoning).sum()) < 1e-12
        assert np.argmax(out - 3) == np.argmax(0.3 * length_weights(reasoning) + 0.35 * length_weights(answer))
    np.testing.assert_allclose(length_weights([1, 2, 3]), [0.5, 0, -0.5])


def test_equal_lengths_give_no_length_term():
    no_bonus = PairwiseCoefficients(reasoning_bonus=0, answer_bonus=0)
    out = aggregate_group(THREE, [7, 7, 7], [0, 0, 0], coefficients=no_bonus)
    np.testing.assert_array_equal(out, THREE_BASE)
    assert length_weights([4, 4]).tolist() == [0, 0]


def test_failed_comparisons_are_left_out():
    out = aggregate_group([(0, 1, (5, 1, 1)), (0, 2, None), (1, 2, (2, 4, 5))], [0] * 3, [0] * 3,
                          coefficients=NO_LENGTH)
    np.testing.assert_allclose(out, [5, 1.5, 4])
    # response 0 has no successful comparison: it gets the mean of the others' base scores
    out = aggregate_group([(0, 1, None), (0, 2, None), (1, 2, (4, 2, 2))], [0] * 3, [0] * 3,
                          coefficients=NO_LENGTH)
    np.testing.assert_allclose(out, [3, 4, 2])
    # nothing succeeded: no signal at all, not even from the lengths
    out = aggregate_group([(0, 1, None), (1, 2, None), (2, 0, None)], [1, 50, 9], [3, 4, 100])
    np.testing.assert_array_equal(out, [0, 0, 0])


def test_aggregate_checks_its_inputs():
    with pytest.raises(ValueError, match="pair"):
        aggregate_group([(0, 3, (1, 2, 3))], [0] * 3, [0] * 3)
    with pytest.raises(ValueError, match="pair"):
        aggregate_group([(1, 1, (1, 2, 3))], [0] * 3, [0] * 3)
    with pytest.raises(ValueError, match="length"):
        aggregate_group([], [0] * 3, [0] * 2)
    with pytest.raises(ValueError, match="top_percentile"):
        PairwiseCoefficients(top_percentile=0)
    with pytest.raises(ValueError, match="answer_bonus"):
        PairwiseCoefficients(answer_bonus=-1)


# ---------------------------------------------------------------------------------------- a fake judge
_SHOWN = re.compile(r"\[RESPONSE ([12])\]\n(.*?)\n\[END RESPONSE \1\]", re.DOTALL)


class FakeJudge:
    """Prefers the longer answer (4 vs 2, ranking 2 or 5); equal lengths tie 3-3 with ranking 3.5 (no shift).
    An answer containing GARBAGE gets a reply without a verdict; ERR400 gets HTTP 400."""

    def __init__(self):
        self.messages = []
        self.lock = threading.Lock()
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)

    async def chat(self, request: Request):
        content = (await request.json())["messages"][-1]["content"]
        with self.lock:
            self.messages.append(content)
        shown = dict(_SHOWN.findall(content))
        one, two = shown["1"], shown["2"]
        if "ERR400" in one + two:
            return JSONResponse({"error": {"message": "bad"}}, status_code=400)
        if "GARBAGE" in one + two:
            verdict = "Both responses have merit; I cannot decide."
        elif len(one) == len(two):
            verdict = "SCORE_1: 3\nSCORE_2: 3\nRANKING: 3.5"
        else:
            verdict = "SCORE_1: 4\nSCORE_2: 2\nRANKING: 2" if len(one) > len(two) else \
                "**SCORE_1:** 2\n**SCORE_2:** 4\n**RANKING:** 5"
        return {"id": "x", "object": "chat.completion", "model": "fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Thinking...\n" + verdict},
                             "finish_reason": "stop"}]}


@contextlib.contextmanager
def serve_app(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "the fake judge did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def fake():
    judge = FakeJudge()
    with serve_app(judge.app) as base_url:
        judge.base_url = base_url
        yield judge


def make_judge(fake, **kwargs) -> PairwiseJudge:
    config = JudgeConfig(base_url=fake.base_url, model="fake", timeout_s=5, max_retries=0, backoff_s=0.01)
    return PairwiseJudge(config, **kwargs)


def rollout(answer: str, reasoning: str = "hmm") -> str:
    return f"{reasoning}</think>{answer}<|im_end|>"


def test_rewards_follow_the_judge(fake):
    answers = ["ab", "abcdef", "a", "abcd"]
    responses = [rollout(a, reasoning=f"SECRET reasoning {k}") for k, a in enumerate(answers)] + \
                [rollout(a) for a in ["xyz", "xy", "xyz", "x"]]
    prompts = ["Say something long."] * 4 + ["Say three letters."] * 4
    rewards, counts = make_judge(fake).group_rewards(prompts, responses, group_size=4)
    assert counts == counts_of(ok=12)
    assert len(rewards) == 8
    assert np.argsort(rewards[:4]).tolist() == [2, 0, 3, 1]   # longer wins every comparison, by 2 points
    expected = aggregate_group(
        [(i, j, (4, 2, 2) if len(answers[i]) > len(answers[j]) else (2, 4, 5)) for i, j in comparison_pairs(4)],
        [response_lengths(r)[0] for r in responses[:4]], [len(a) for a in answers])
    np.testing.assert_allclose(rewards[:4], expected)
    # 0 and 2 tie at the top with equal lengths: both bonuses go to the first of them
    assert rewards[4] == pytest.approx(rewards[6] + 1.0)
    assert rewards[4] > rewards[6] > rewards[5] > rewards[7]
    # the judge saw the prompt and the answers, never the reasoning
    seen = [m for m in fake.messages if "Say something long." in m]
    assert len(seen) == 6 and not any("SECRET" in m for m in seen)
    assert any("[RESPONSE 1]\nabcdef\n[END RESPONSE 1]" in m for m in seen)


def test_one_prompt_per_group_circular_and_swap(fake):
    responses = [rollout("a"), rollout("abc"), rollout("ab")]
    judge = make_judge(fake, pairs="circular")
    rewards, counts = judge.group_rewards(["Q?"], responses, group_size=3)
    assert counts == counts_of(ok=3) and np.argsort(rewards).tolist() == [0, 2, 1]
    rewards_swapped, counts = make_judge(fake, swap=True).group_rewards(["Q?"], responses, group_size=3)
    assert counts == counts_of(ok=6)
    np.testing.assert_allclose(rewards_swapped, rewards)   # an unbiased judge: both orders agree


def test_garbage_and_errors_are_counted_not_raised(fake):
    rewards, counts = make_judge(fake).group_rewards(["Q?"] * 3, [rollout("GARBAGE") for _ in range(3)], 3)
    assert counts == counts_of(malformed=3) and rewards == [0.0, 0.0, 0.0]
    # one bad response spoils only its own comparisons; it gets the group mean of the others' base scores
    responses = [rollout("abcd"), rollout("ERR400"), rollout("ab"), rollout("GARBAGE x")]
    rewards, counts = make_judge(fake, coefficients=NO_LENGTH).group_rewards(["Q?"] * 4, responses, 4)
    assert counts == counts_of(ok=1, http_error=3, malformed=2)
    np.testing.assert_allclose(rewards, [4, 3, 2, 3])


def test_unreachable_judge():
    with socket.socket() as sock:   # bound but not listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        config = JudgeConfig(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", model="m", max_retries=0)
        rewards, counts = PairwiseJudge(config).group_rewards(["Q?"] * 2, [rollout("a"), rollout("b")], 2)
    assert rewards == [0.0, 0.0] and counts == counts_of(connection_error=1)


def test_group_rewards_checks_its_inputs(fake):
    judge = make_judge(fake)
    with pytest.raises(ValueError, match="group_size"):
        judge.group_rewards(["Q?"] * 3, ["a"] * 3, 2)
    with pytest.raises(ValueError, match="group_size"):
        judge.group_rewards(["Q?"], ["a"], 0)
    with pytest.raises(ValueError, match="prompts"):
        judge.group_rewards(["Q?"] * 3, ["a"] * 4, 2)
    with pytest.raises(ValueError, match="pairs"):
        make_judge(fake, pairs="random")
    assert judge.group_rewards([], [], 4) == ([], counts_of())


# ---------------------------------------------------------------------------------------- JudgeServer, stubbed
STUB = '''
import argparse, json, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

def main(argv):
    parser = argparse.ArgumentParser()
    for flag in ("--ckpt", "--host", "--model-name", "--max-slots"):
        parser.add_argument(flag)
    parser.add_argument("--port", type=int)
    args, _ = parser.parse_known_args(argv)
    if args.ckpt == "FAIL":
        print("loading...\\nerror: no checkpoint at FAIL", file=sys.stderr)
        return 2
    if args.ckpt == "HANG":
        time.sleep(600)
    name = args.model_name or "stub"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": name, "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    print(f"stub serving {argv}", flush=True)
    HTTPServer((args.host, args.port), Handler).serve_forever()
'''


@pytest.fixture
def stub(tmp_path):
    (tmp_path / "stub_serve.py").write_text(STUB)
    return dict(serve_module="stub_serve", env={"PYTHONPATH": str(tmp_path)}, startup_timeout_s=60)


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout_s: float = 15) -> bool:
    deadline = time.monotonic() + timeout_s
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return gone(pid)


def test_stub_server_starts_answers_and_stops(stub, tmp_path):
    log = tmp_path / "judge.log"
    with JudgeServer("some/ckpt", model_name="genrm", max_slots=3, log_path=log, **stub) as server:
        pid = server.process.pid
        assert server.model == "genrm"
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", server.base_url)
        assert httpx.get(server.base_url + "/models").json()["data"][0]["id"] == "genrm"
    assert server.process is None and wait_gone(pid, 5)
    text = log.read_text()
    assert "stub serving" in text and "'--max-slots', '3'" in text and "'--ckpt', 'some/ckpt'" in text
    server.close()   # idempotent


def test_startup_failure_is_one_line_with_the_log(stub):
    with pytest.raises(JudgeServerError) as error:
        JudgeServer("FAIL", **stub).start()
    message = str(error.value)
    assert "\n" not in message and "exited with code 2" in message and "no checkpoint at FAIL" in message


def test_startup_timeout_stops_the_server(stub):
    server = JudgeServer("HANG", **{**stub, "startup_timeout_s": 1.0})
    start = time.monotonic()
    with pytest.raises(JudgeServerError, match="did not answer"):
        server.start()
    assert time.monotonic() - start < 10 and server.process is None


def test_a_port_in_use_is_refused(stub):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(JudgeServerError, match="already in use"):
            JudgeServer("x", port=sock.getsockname()[1], **stub).start()


TRAINER = '''
import sys, threading, time
from cascade_jax.rl.judge_server import JudgeServer
servers = []
start = lambda: servers.append(JudgeServer("x", serve_module="stub_serve", env={{"PYTHONPATH": {path!r}}}).start())
if {in_thread}:
    thread = threading.Thread(target=start)
    thread.start()
    thread.join()     # the starting thread is gone: the server must stay up
else:
    start()
print(servers[0].process.pid, servers[0].base_url, flush=True)
time.sleep(600)
'''


@pytest.mark.parametrize("in_thread", [False, True])
def test_the_server_dies_with_a_killed_trainer(stub, tmp_path, in_thread):
    script = TRAINER.format(path=str(tmp_path), in_thread=in_thread)
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    pid = None
    try:
        pid, base_url = trainer.stdout.readline().split()
        pid = int(pid)
        time.sleep(0.5)
        assert httpx.get(base_url + "/models").status_code == 200 and not gone(pid)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        assert wait_gone(pid), "the judge server outlived its trainer"
    finally:
        trainer.kill()
        trainer.wait()
        if pid is not None and not gone(pid):   # a failed check leaves no orphan behind
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------- JudgeServer, real
def test_judge_server_over_a_real_checkpoint(tmp_path):
    """cascade-serve over a random tiny checkpoint as the pairwise judge (~10 s on 2 CPU cores: the subprocess
    imports JAX, loads and compiles the tiny model): its reply has no verdict, so the one comparison is counted
    malformed, with rewards 0 and no exception; the server is gone after the `with`."""
    from tests.cli.test_generate import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt")
    with JudgeServer(ckpt, max_slots=2, max_len=1024, log_path=tmp_path / "serve.log",
                     startup_timeout_s=300) as server:
        pid = server.process.pid
        assert server.model == "ckpt"
        judge = PairwiseJudge(JudgeConfig(base_url=server.base_url, model=server.model, max_tokens=16,
                                          timeout_s=300, max_retries=0))
        rewards, counts = judge.group_rewards(["What is 2+3?"] * 2, [rollout("5"), rollout("It is 5.")], 2)
    assert counts == counts_of(malformed=1), textwrap.shorten((tmp_path / "serve.log").read_text(), 500)
    assert rewards == [0.0, 0.0]
    assert wait_gone(pid, 30)
