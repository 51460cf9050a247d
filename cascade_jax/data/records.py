"""One chat sample: parse, validate and normalize it, or say exactly why it is unusable.

Common input format (one JSON object per JSONL line / Parquet row / ArrayRecord record)::

    {"messages": [{"role": "system|user|assistant|tool", "content": str,
                   "reasoning_content": str?, "tool_calls": [...]?}, ...],
     "tools": [...]?, "domain": str?, "source": str?, ...any other field kept as metadata}

Normalized messages have string ``content``, ``reasoning_content`` (str or None) and, for assistant
turns, ``tool_calls`` as ``[{"name": str, "arguments": dict}]``. An assistant ``content`` that starts
with ``<think>…</think>`` and has no ``reasoning_content`` is split into the two.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")

# Reasons a sample is skipped; they key the skip counters.
MALFORMED = "malformed_json"
NOT_OBJECT = "not_an_object"
NO_MESSAGES = "no_messages"
UNKNOWN_ROLE = "unknown_role"
BAD_MESSAGE = "bad_message"
NO_ASSISTANT = "no_assistant_turn"
NO_USER = "no_user_turn"
EMPTY_FILE = "empty_file"
TOO_LONG = "too_long"
NOTHING_TO_TRAIN = "nothing_to_train"


class BadSample(ValueError):
    """A sample that cannot be used; ``reason`` is one of the constants above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DataError(ValueError):
    """Unusable data, in one line: the file and line (or row) of a bad sample in strict mode, a missing
    or empty source, or a pass over all the records that found nothing usable."""


def parse_json(raw: bytes | str | dict) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample(MALFORMED, str(e)) from None
    if not isinstance(obj, dict):
        raise BadSample(NOT_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
        try:
            return "".join(p["text"] if isinstance(p, dict) else str(p) for p in value)
        except KeyError:
            pass
    raise BadSample(BAD_MESSAGE, f"{where} must be a string, got {type(value).__name__}")


def _tool_call(call: Any, where: str) -> dict:
    if not isinstance(call, dict):
        raise BadSample(BAD_MESSAGE, f"{where} must be an object")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadSample(BAD_MESSAGE, f"{where} has no function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise BadSample(BAD_MESSAGE, f"{where}.arguments is not valid JSON") from None
    if not isinstance(args, dict):
        raise BadSample(BAD_MESSAGE, f"{where}.arguments must be an object")
    return {"name": fn["name"], "arguments": args}


def normalize_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadSample(NO_MESSAGES, "`messages` must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadSample(BAD_MESSAGE, f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise BadSample(UNKNOWN_ROLE, f"messages[{i}].role = {role!r}, expected one of {ROLES}")
        content = _text(m.get("content"), f"messages[{i}].content")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise BadSample(BAD_MESSAGE, f"messages[{i}].reasoning_content must be a string")
        msg: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            if reasoning is None and content.startswith("<think>") and "</think>" in content:
                head, content = content[len("<think>"):].split("</think>", 1)
                reasoning, msg["content"] = head.strip("\n"), content.lstrip("\n")
            msg["reasoning_content"] = reasoning or None
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise BadSample(BAD_MESSAGE, f"messages[{i}].tool_calls must be a list")
            msg["tool_calls"] = [_tool_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(msg)
    return out


def normalize_tools(tools: Any) -> list[dict] | None:
    if tools is None or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise BadSample(BAD_MESSAGE, "`tools` is not valid JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadSample(BAD_MESSAGE, "`tools` must be a list of objects")
    for i, t in enumerate(tools):
        fn = t.get("function", t)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadSample(BAD_MESSAGE, f"tools[{i}] has no function name")
        params = fn.get("parameters") or {}
        props = params.get("properties") if isinstance(params, dict) else None
        if not isinstance(params, dict) or not isinstance(props or {}, dict) or not all(
                isinstance(p, dict) for p in (props or {}).values()):
            raise BadSample(BAD_MESSAGE, f"tools[{i}].parameters must be a JSON schema object with object properties")
    return tools


def chat_sample(raw: bytes | str | dict, *, need_assistant: bool = True) -> dict:
    """Parses one record into ``{"messages", "tools", "meta"}``; raises ``BadSample``.

    With ``need_assistant`` (SFT) the conversation must contain an assistant turn; for RL prompts
    (``need_assistant=False``) it must contain a user turn instead.
    """
    obj = parse_json(raw)
    messages = normalize_messages(obj.get("messages"))
    roles = {m["role"] for m in messages}
    if need_assistant and "assistant" not in roles:
        raise BadSample(NO_ASSISTANT, "the conversation has no assistant turn to train on")
    if not need_assistant and "user" not in roles:
        raise BadSample(NO_USER, "the prompt has no user turn")
    meta = {k: v for k, v in obj.items() if k not in ("messages", "tools")}
    return {"messages": messages, "tools": normalize_tools(obj.get("tools")), "meta": meta}


REASONS = (MALFORMED, NOT_OBJECT, NO_MESSAGES, UNKNOWN_ROLE, BAD_MESSAGE, NO_ASSISTANT, NO_USER,
           EMPTY_FILE, TOO_LONG, NOTHING_TO_TRAIN)


class SkipLog:
    """Counts skipped samples by reason and logs the first ``log_first`` locations (``file:line``).

    With ``strict`` the first bad sample raises ``DataError("file:line: reason: detail")`` instead.
    Counts have a fixed set of keys so they can live in a checkpointed iterator state.
    """

    def __init__(self, *, strict: bool = False, log_first: int = 5, what: str = "sample"):
        self.strict = strict
        self.log_first = log_first
        self.what = what
        self.counts = {r: 0 for r in REASONS}
        self.logged = 0

    def skip(self, loc: str, reason: str, detail: str) -> None:
        if self.strict:
            raise DataError(f"{loc}: {reason}: {detail}")
        self.counts[reason] += 1
        if self.logged < self.log_first:
            self.logged += 1
            import logging

            more = " (further skips are only counted)" if self.logged == self.log_first else ""
            logging.getLogger("cascade_jax.data").warning("skipped %s at %s: %s: %s%s", self.what, loc,
                                                          reason, detail, more)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def sum_skip_counts(state: Any, out: dict[str, int]) -> None:
    """Adds every ``skip_counts`` dict found in a (nested) iterator state into ``out``."""
    if isinstance(state, dict):
        for k, v in state.items():
            if k == "skip_counts" and isinstance(v, dict):
                for reason, n in v.items():
                    out[reason] = out.get(reason, 0) + int(n)
            else:
                sum_skip_counts(v, out)
    elif isinstance(state, (list, tuple)):
        for v in state:
            sum_skip_counts(v, out)
    elif isinstance(state, (str, bytes)) and state[:1] in ("{", b"{"):
        try:  # multiprocessing workers may hand back their states as JSON strings
            sum_skip_counts(json.loads(state), out)
        except ValueError:
            pass


def _file_list(files: list[str], limit: int = 3) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f" and {len(files) - limit} more files" if len(files) > limit else "")


class PassGuard:
    """Stops an endless search: ``DataError`` once a whole pass over the records found nothing usable.

    ``info`` (from ``RecordIterDataset.pass_info``): ``records`` = draws of this slice that make one
    pass (every record of every source read once, for this process's / worker's share), ``total`` =
    records in the sources, ``files``, ``sliced``. Call ``used()`` for every record that gave a sample
    and ``skipped(reason)`` for every other one. From a fresh start one dry pass is an error; after a
    usable record or a restore, two (a pass that starts mid-epoch may miss a rare usable record).
    """

    def __init__(self, info: dict | None, *, fresh: bool = True, hint: str = "check the files or the chat format",
                 hints: dict[str, str] | None = None):
        self.info, self.hint, self.hints = info, hint, hints or {}
        self.reset(fresh)

    def reset(self, fresh: bool = False) -> None:
        self.dry = 0
        self.counts: dict[str, int] = {}
        self.passes = 1 if fresh else 2

    def used(self) -> None:
        if self.dry:
            self.dry, self.counts = 0, {}
        self.passes = 2

    def skipped(self, reason: str) -> None:
        if self.info is None:
            return
        self.dry += 1
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self.dry >= self.passes * self.info["records"]:
            raise DataError(self.message())

    def message(self) -> str:
        info = self.info
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        if info["sliced"]:
            reasons = f"this shard read {self.dry}: {reasons}"
        elif self.dry != info["total"]:
            reasons = f"{self.dry} read: {reasons}"
        hint = self.hint
        for reason, extra in self.hints.items():
            if self.counts.get(reason):
                hint = extra
        passes = "1 pass" if self.passes == 1 else f"{self.passes} passes"
        return (f"data: no usable record in {passes} over {info['total']} records of {_file_list(info['files'])} "
                f"({reasons}); {hint}")
