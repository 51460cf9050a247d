"""LLM-as-judge rewards through any OpenAI-compatible chat endpoint.

What it is for: the rewards that no rule can compute — RLHF helpfulness, long-context answers graded against a
reference, agentless-SWE patches graded against a rubric — come from a judge model served behind
`POST {base_url}/chat/completions` (vLLM, SGLang, a hosted API, or our own `cascade-serve`). The client speaks
plain HTTP through `httpx` (not the `openai` package) so that timeouts, retries and failure counting are exactly
what this page says.

Score format: the judge is asked to explain briefly and to end its reply with a line `SCORE: <number between 0
and 1>`. The parser (`parse_score`) takes the LAST `SCORE:` number in the reply (case-insensitive; markdown such
as `**SCORE:** 0.8` is accepted) and clamps it to [0, 1]; a reply without one is malformed.

Failure policy: `JudgeClient.score` never raises for a per-item failure; only a bad `JudgeConfig` raises
(ValueError, one line). Each attempt is bounded as a whole (connect + write + read) by `timeout_s`. Connection
errors, timeouts, HTTP 429 and 5xx are retried up to `max_retries` times with capped exponential back-off and
jitter (a numeric `Retry-After` is honoured, within the cap); other 4xx are not retried; a 200 whose body is not
JSON, lacks choices/message/content, or has no parsable score is not retried either (the judge runs at
temperature 0 by default). A failed item gets reward 0.0. Every item lands in exactly one of the counters
"ok", "timeout", "http_error", "malformed", "connection_error", and its details say
`{"outcome", "score_text" (last 200 chars of the judge's text), "attempts", "status" (last HTTP status or None),
"error" (one line, None when ok)}`.

    client = JudgeClient(JudgeConfig(base_url="http://127.0.0.1:8000/v1", model="judge"))
    rewards, details, counts = client.score([JudgeItem(prompt, response, reference, rubric)])

Other judge formats reuse the same machinery through `JudgeClient.complete(messages)`, which sends already
rendered user messages and hands back the reply texts unparsed (the pairwise GenRM judge, `pairwise.py`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import math
import os
import random
import re
from typing import Any

import httpx

API_KEY_ENV = "CASCADE_JUDGE_API_KEY"
OUTCOMES = ("ok", "timeout", "http_error", "malformed", "connection_error")
SCORE_TEXT_CHARS = 200

DEFAULT_RUBRIC = ("Is the response correct, complete, helpful and honest, and does it follow the prompt's "
                  "instructions? A response that contradicts the reference answer (when one is given) is wrong.")

TEMPLATE = """You are an impartial grader. Read the prompt, the response{reference_clause} and the grading \
criteria, then judge how well the response satisfies the criteria.

[PROMPT]
{prompt}
[END PROMPT]

[RESPONSE]
{response}
[END RESPONSE]
{reference_block}
[CRITERIA]
{rubric}
[END CRITERIA]

Explain your judgement in a few sentences. Then end your reply with one final line of exactly this form:
SCORE: <a number between 0 and 1>
where 1 means the response fully satisfies the criteria and 0 means it does not satisfy them at all."""

REFERENCE_BLOCK = """
[REFERENCE ANSWER]
{reference}
[END REFERENCE ANSWER]
"""

_SCORE = re.compile(r"SCORE\s*\**\s*[:=]\s*\**\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Where the judge lives and how hard to try. `api_key=None` reads $CASCADE_JUDGE_API_KEY (none sent if
    unset). `max_retries` counts retries after the first attempt; the k-th retry waits
    min(backoff_max_s, backoff_s * 2**k) times a jitter factor in [0.5, 1]."""

    base_url: str
    model: str
    api_key: str | None = dataclasses.field(default=None, repr=False)
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    max_concurrency: int = 8
    temperature: float = 0.0
    max_tokens: int = 512

    def __post_init__(self):
        def check(field: str, ok: bool, expected: str):
            if not ok:
                raise ValueError(f"JudgeConfig.{field}: expected {expected}, got {getattr(self, field)!r}")

        check("base_url", isinstance(self.base_url, str) and self.base_url.startswith(("http://", "https://"))
              and len(self.base_url.rstrip("/")) > len("https://"), "an http:// or https:// URL")
        check("model", isinstance(self.model, str) and bool(self.model.strip()), "a non-empty model name")
        check("api_key", self.api_key is None or isinstance(self.api_key, str), "a string or None")
        check("timeout_s", _is_num(self.timeout_s) and self.timeout_s > 0 and math.isfinite(self.timeout_s),
              "a finite number > 0")
        check("max_retries", _is_int(self.max_retries) and self.max_retries >= 0, "an int >= 0")
        check("backoff_s", _is_num(self.backoff_s) and 0 <= self.backoff_s < math.inf, "a finite number >= 0")
        check("backoff_max_s", _is_num(self.backoff_max_s) and 0 <= self.backoff_max_s < math.inf,
              "a finite number >= 0")
        check("max_concurrency", _is_int(self.max_concurrency) and self.max_concurrency >= 1, "an int >= 1")
        check("temperature", _is_num(self.temperature) and 0 <= self.temperature < math.inf, "a finite number >= 0")
        check("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "an int >= 1")


@dataclasses.dataclass(frozen=True)
class JudgeItem:
    """One thing to grade. `rubric` replaces the default grading criteria; `reference` is shown to the judge as
    the reference answer when given."""

    prompt: str
    response: str
    reference: str | None = None
    rubric: str | None = None


def render_prompt(item: JudgeItem) -> str:
    """The user message sent to the judge for `item`."""
    has_reference = item.reference is not None and str(item.reference).strip() != ""
    return TEMPLATE.format(
        prompt=item.prompt, response=item.response,
        reference_clause=", the reference answer" if has_reference else "",
        reference_block=REFERENCE_BLOCK.format(reference=item.reference) if has_reference else "",
        rubric=item.rubric if item.rubric and str(item.rubric).strip() else DEFAULT_RUBRIC)


def parse_score(text: str) -> float | None:
    """The last `SCORE: <number>` in `text`, clamped to [0, 1]; None when there is none."""
    matches = _SCORE.findall(text or "")
    if not matches:
        return None
    value = float(matches[-1])
    return min(1.0, max(0.0, value)) if math.isfinite(value) else None


class JudgeClient:
    """Scores batches of `JudgeItem`s, one non-streaming `/chat/completions` request per item, at most
    `max_concurrency` in flight. Safe to call from a plain synchronous loop (it runs its own event loop; called
    from inside a running loop it uses a worker thread)."""

    def __init__(self, config: JudgeConfig):
        if not isinstance(config, JudgeConfig):
            raise ValueError(f"JudgeClient: expected a JudgeConfig, got {type(config).__name__}")
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        api_key = config.api_key if config.api_key is not None else os.environ.get(API_KEY_ENV)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def score(self, items: list[JudgeItem]) -> tuple[list[float], list[dict], dict[str, int]]:
        """(rewards in [0, 1], per-item details, counts by outcome), in the order of `items`."""
        results = self._run(self._score_one, list(items))
        return [reward for reward, _ in results], [details for _, details in results], _count(results)

    def complete(self, messages: list[str]) -> tuple[list[str | None], list[dict], dict[str, int]]:
        """Sends each user message as is (same requests, retries, timeouts and concurrency as `score`) and returns
        (the judge's reply text, or None when the request failed; per-message details; counts by outcome). An
        "ok" here only means a reply text came back: the caller parses it (and may recount it as malformed)."""
        results = self._run(self._complete_one, list(messages))
        return [text for text, _ in results], [details for _, details in results], _count(results)

    def _run(self, one, inputs: list) -> list[tuple[Any, dict]]:
        """`one(http, slots, x)` for every x of `inputs`, concurrently, from synchronous code."""
        if not inputs:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._gather(one, inputs))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:   # inside an event loop: ours runs in a thread
            return pool.submit(asyncio.run, self._gather(one, inputs)).result()

    async def _gather(self, one, inputs: list) -> list[tuple[Any, dict]]:
        n = self.config.max_concurrency
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.config.timeout_s), limits=limits,
                                     headers=self._headers) as http:
            slots = asyncio.Semaphore(n)
            return await asyncio.gather(*(one(http, slots, x) for x in inputs))

    async def _score_one(self, http: httpx.AsyncClient, slots: asyncio.Semaphore,
                         item: JudgeItem) -> tuple[float, dict]:
        details = _new_details()
        try:
            message = render_prompt(item)
        except Exception as e:
            return 0.0, _fail(details, "malformed", f"cannot build the request: {_one_line(e)}")
        content, finish_reason = await self._send(http, slots, message, details)
        if content is None:
            return 0.0, details
        value = parse_score(content)
        if value is None:
            return 0.0, _fail(details, "malformed", "no 'SCORE: <number>' line in the judge's reply "
                                                    f"(finish_reason {finish_reason!r})")
        return value, details

    async def _complete_one(self, http: httpx.AsyncClient, slots: asyncio.Semaphore,
                            message: str) -> tuple[str | None, dict]:
        details = _new_details()
        content, _ = await self._send(http, slots, message, details)
        return content, details

    async def _send(self, http: httpx.AsyncClient, slots: asyncio.Semaphore, message: str,
                    details: dict) -> tuple[str | None, Any]:
        """One user message to the judge, with retries: (reply content, finish_reason) with details["outcome"]
        "ok" and "score_text" set, or (None, None) with `details` failed."""
        cfg = self.config
        try:
            body = json.dumps({"model": cfg.model, "messages": [{"role": "user", "content": message}],
                               "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}).encode()
        except Exception as e:   # e.g. a message that does not serialize
            _fail(details, "malformed", f"cannot build the request: {_one_line(e)}")
            return None, None
        outcome, error, retry_after = "connection_error", "no attempt was made", None
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff(attempt - 1, retry_after))
            details["attempts"] = attempt + 1
            retry_after = None
            try:
                async with slots:
                    async with asyncio.timeout(cfg.timeout_s):
                        response = await http.post(self.url, content=body)
            except (TimeoutError, httpx.TimeoutException):
                outcome, error = "timeout", f"no complete reply within {cfg.timeout_s:g} s"
                continue
            except httpx.DecodingError as e:   # the body could not be decoded (bad content-encoding)
                _fail(details, "malformed", f"undecodable body: {_one_line(e)}")
                return None, None
            except httpx.TransportError as e:
                outcome, error = "connection_error", f"{type(e).__name__}: {_one_line(e)}"
                continue
            except Exception as e:   # never raise for one item
                _fail(details, "connection_error", f"{type(e).__name__}: {_one_line(e)}")
                return None, None
            details["status"] = response.status_code
            if response.status_code == 429 or response.status_code >= 500:
                outcome, error = "http_error", f"HTTP {response.status_code}: {_one_line(response.text)}"
                retry_after = _retry_after(response)
                continue
            if response.status_code != 200:
                _fail(details, "http_error", f"HTTP {response.status_code}: {_one_line(response.text)}")
                return None, None
            return self._reply_content(response, details)
        _fail(details, outcome, f"{error} (after {details['attempts']} attempts)")
        return None, None

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        cfg = self.config
        delay = min(cfg.backoff_max_s, cfg.backoff_s * 2.0 ** retry) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(cfg.backoff_max_s, retry_after))
        return delay

    @staticmethod
    def _reply_content(response: httpx.Response, details: dict) -> tuple[str | None, Any]:
        try:
            reply = response.json()
        except ValueError as e:
            _fail(details, "malformed", f"the body is not JSON ({_one_line(e)}): {_one_line(response.text)}")
            return None, None
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            _fail(details, "malformed", f"the reply has no choices: {_one_line(response.text)}")
            return None, None
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            _fail(details, "malformed", "the reply's first choice has no message content "
                                        f"(finish_reason {choices[0].get('finish_reason')!r})")
            return None, None
        details["score_text"] = content[-SCORE_TEXT_CHARS:]
        details["outcome"] = "ok"
        return content, choices[0].get("finish_reason")


def judge_reward(response: str, metadata: dict, client: JudgeClient) -> tuple[float, dict]:
    """One response graded by the judge: the prompt from metadata["prompt_text"], the reference from
    metadata.get("reference_response"), the rubric from metadata.get("verifier", {}).get("rubric")."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("prompt_text"), str):
        raise ValueError("judge_reward: metadata['prompt_text'] must be the prompt's text (a string)")
    verifier = metadata.get("verifier") or {}
    item = JudgeItem(prompt=metadata["prompt_text"], response=response,
                     reference=metadata.get("reference_response"),
                     rubric=verifier.get("rubric") if isinstance(verifier, dict) else None)
    rewards, details, _ = client.score([item])
    return rewards[0], details[0]


def _new_details() -> dict[str, Any]:
    return {"outcome": None, "score_text": "", "attempts": 0, "status": None, "error": None}


def _count(results: list[tuple[Any, dict]]) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    for _, details in results:
        counts[details["outcome"]] += 1
    return counts


def _fail(details: dict, outcome: str, error: str) -> dict:
    details["outcome"], details["error"] = outcome, _one_line(error)
    return details


def _one_line(value: Any, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _retry_after(response: httpx.Response) -> float | None:
    try:
        value = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
