"""Tool-call reward: the calls in the final answer against the reference calls, by name and arguments.

A call is a ``<tool_call>…</tool_call>`` block whose body is either the project's chat-template form
(Qwen3-Coder XML, see ``data/chat_template.py``)::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

or a JSON object ``{"name": ..., "arguments": {...}}`` (``arguments`` may be a JSON string, as in OpenAI
messages). The template writes a string parameter as is and anything else as JSON, so an XML parameter
value is read as JSON when it parses and as the raw string otherwise; reference string values are read the
same way before comparing, since the format cannot tell the string ``"3"`` from the number ``3``.
"""

from __future__ import annotations

import json
import re

from cascade_jax.data.chat_template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from cascade_jax.data.tasks.answers import final_answer

_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


class MalformedCall(ValueError):
    """A ``<tool_call>`` block that is neither the XML nor the JSON form."""


def _xml_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_xml(body: str) -> dict:
    m = _FUNCTION.fullmatch(body)
    if m is None:
        raise MalformedCall("expected <function=NAME>…</function>")
    params = _PARAMETER.findall(m.group(2))
    if _PARAMETER.sub("", m.group(2)).strip():
        raise MalformedCall("text outside <parameter=…> blocks")
    args = {key.strip(): _xml_value(value) for key, value in params}
    if len(args) != len(params):
        raise MalformedCall("repeated parameter")
    return {"name": m.group(1).strip(), "arguments": args, "xml": True}


def _normalize(call, where: str) -> dict:
    """``{"name", "arguments"}`` from a call dict (OpenAI ``{"function": {...}}`` wrapping allowed)."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = call["function"]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise MalformedCall(f"{where}: expected an object with a string 'name'")
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise MalformedCall(f"{where}: 'arguments' is a string that is not JSON") from None
    if not isinstance(args, dict):
        raise MalformedCall(f"{where}: 'arguments' must be an object")
    return {"name": call["name"], "arguments": args, "xml": False}


def parse_tool_calls(text: str) -> list[dict]:
    """Every ``<tool_call>`` block of ``text`` as ``{"name", "arguments", "xml"}``; MalformedCall if one is bad."""
    calls = []
    for i, body in enumerate(_BLOCK.findall(text)):
        if body.strip().startswith("{"):
            try:
                calls.append(_normalize(json.loads(body), f"call {i}"))
            except ValueError as e:
                raise MalformedCall(f"call {i}: {e}") from None
        else:
            try:
                calls.append(_parse_xml(body))
            except MalformedCall as e:
                raise MalformedCall(f"call {i}: {e}") from None
    if text.count(TOOL_CALL_OPEN) != len(calls):
        raise MalformedCall(f"{text.count(TOOL_CALL_OPEN)} {TOOL_CALL_OPEN} but {len(calls)} closed blocks")
    return calls


def _key(name: str, args: dict) -> str:
    return json.dumps([name, args], sort_keys=True, ensure_ascii=False)


def _matches(pred: dict, ref: dict) -> bool:
    """Same name and arguments; against an XML prediction the reference's strings are read as XML values are."""
    ref_args = ref["arguments"]
    if pred["xml"]:
        ref_args = {k: _xml_value(v) if isinstance(v, str) else v for k, v in ref_args.items()}
    return _key(pred["name"], pred["arguments"]) == _key(ref["name"], ref_args)


def tool_call_reward(response: str, metadata: dict) -> tuple[float, dict]:
    """1.0 if the final answer's tool calls equal ``verifier["calls"]`` (in order unless ``ordered`` is False)."""
    verifier = metadata["verifier"]
    refs = [_normalize(c, f"verifier calls[{i}]") for i, c in enumerate(verifier["calls"])]
    try:
        preds = parse_tool_calls(final_answer(response))
    except MalformedCall as e:
        return 0.0, {"extracted": None, "reason": f"malformed tool call: {e}"[:300]}
    names = [p["name"] for p in preds]
    if len(preds) != len(refs):
        return 0.0, {"extracted": names, "reason": f"{len(preds)} calls, expected {len(refs)}"}
    if verifier.get("ordered", True):
        wrong = [i for i, (p, r) in enumerate(zip(preds, refs)) if not _matches(p, r)]
        if wrong:
            return 0.0, {"extracted": names, "reason": f"call {wrong[0]} differs from the reference"}
        return 1.0, {"extracted": names, "reason": "match"}
    # Unordered: each reference call must be matched by a distinct predicted call.
    unmatched = list(preds)
    for r in refs:
        hit = next((p for p in unmatched if _matches(p, r)), None)
        if hit is None:
            return 0.0, {"extracted": names, "reason": f"no predicted call matches reference {r['name']!r}"}
        unmatched.remove(hit)
    return 1.0, {"extracted": names, "reason": "match (any order)"}
