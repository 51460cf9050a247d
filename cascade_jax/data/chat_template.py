"""The Cascade-2 / Nemotron-3 chat format, rendered in Python as pieces tagged by assistant turn.

This is the single source of truth for the conversation → text mapping. The same rules are written as
a Jinja template in ``assets/chat_template.jinja`` (shipped inside the tiny tokenizer's
``tokenizer_config.json``); a test checks that both give identical tokens.

Rules (training.md §1.1):
- ChatML turns ``<|im_start|>ROLE\\n…<|im_end|>\\n``. A system turn always comes first (empty if the
  conversation has none); tool declarations go inside it, in a ``<tools>…</tools>`` block of XML
  ``<function>`` entries.
- Assistant turns after the last user message keep their reasoning: ``<think>\\nREASONING\\n</think>\\n``
  followed by the answer (thinking mode). Every other assistant turn, and any turn without reasoning,
  gets an empty ``<think></think>`` before the answer (non-thinking mode / history keeps only the
  final answer).
- Tool calls are ``<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n</function>\\n
  </tool_call>`` (Qwen3-Coder style). There is no ``tool`` role in the rendering: consecutive tool
  messages become one user turn of ``<tool_response>`` blocks.
- The trained part of an assistant turn is everything from its ``<think>`` through its ``<|im_end|>``;
  the ``<|im_start|>assistant\\n`` header and the newline after ``<|im_end|>`` are not trained. Both
  ends of that span sit on special tokens, so tokenizing the pieces separately equals tokenizing the
  whole text (see ``tokenize.py``).

Messages here are already normalized by ``records.normalize_messages`` (string content, optional
``reasoning_content`` string, ``tool_calls`` as ``[{"name": str, "arguments": dict}]``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
PAD = "<pad>"

# Tokens that must be single added (special) tokens of the tokenizer for piecewise encoding to be exact.
BOUNDARY_TOKENS = (IM_START, IM_END, THINK_OPEN, THINK_CLOSE)
SPECIAL_TOKENS = (
    PAD, IM_START, IM_END, THINK_OPEN, THINK_CLOSE,
    TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE,
)

TOOLS_HEADER = "# Tools\n\nYou have access to the following functions:\n\n<tools>"
TOOLS_FOOTER = (
    "\n</tools>\n\nIf you choose to call a function, reply in the following format:\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n"
    "</parameter>\n</function>\n</tool_call>"
)

# A piece is (text, turn): turn is the index of the assistant turn (0, 1, …) whose trained span the
# text belongs to, or -1 for context that is never trained.
Piece = tuple[str, int]


def tojson(value: Any) -> str:
    """Same as the ``tojson`` filter that transformers installs in chat templates."""
    return json.dumps(value, ensure_ascii=False)


def render_tools(tools: Sequence[dict]) -> str:
    out = [TOOLS_HEADER]
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else tool
        out.append("\n<function>\n<name>" + str(fn["name"]) + "</name>")
        if fn.get("description"):
            out.append("\n<description>" + str(fn["description"]) + "</description>")
        out.append("\n<parameters>")
        params = fn.get("parameters") or {}
        for pname, pspec in (params.get("properties") or {}).items():
            out.append("\n<parameter>\n<name>" + str(pname) + "</name>")
            if pspec.get("type"):
                out.append("\n<type>" + str(pspec["type"]) + "</type>")
            if pspec.get("description"):
                out.append("\n<description>" + str(pspec["description"]) + "</description>")
            out.append("\n</parameter>")
        out.append("\n</parameters>")
        if params.get("required"):
            out.append("\n<required>" + tojson(params["required"]) + "</required>")
        out.append("\n</function>")
    out.append(TOOLS_FOOTER)
    return "".join(out)


def render_tool_calls(tool_calls: Sequence[dict], after_content: bool) -> str:
    out = []
    for j, call in enumerate(tool_calls):
        if after_content or j > 0:
            out.append("\n")
        out.append(TOOL_CALL_OPEN + "\n<function=" + str(call["name"]) + ">\n")
        for key, value in call["arguments"].items():
            text = value if isinstance(value, str) else tojson(value)
            out.append("<parameter=" + str(key) + ">\n" + text + "\n</parameter>\n")
        out.append("</function>\n" + TOOL_CALL_CLOSE)
    return "".join(out)


def assistant_body(message: dict, keep_reasoning: bool) -> str:
    """The trained text of one assistant turn, from ``<think>`` through ``<|im_end|>``."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if keep_reasoning and reasoning:
        body = THINK_OPEN + "\n" + reasoning + "\n" + THINK_CLOSE + "\n" + content
    else:
        body = THINK_OPEN + THINK_CLOSE + content
    if message.get("tool_calls"):
        body += render_tool_calls(message["tool_calls"], after_content=bool(content))
    return body + IM_END


def render_pieces(
    messages: Sequence[dict],
    tools: Sequence[dict] | None = None,
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
) -> list[Piece]:
    """Renders a normalized conversation into pieces; ``"".join`` of the texts is the chat text."""
    pieces: list[Piece] = []
    ctx: list[str] = []

    def flush() -> None:
        if ctx:
            pieces.append(("".join(ctx), -1))
            ctx.clear()

    rest = list(messages)
    system = ""
    if rest and rest[0]["role"] == "system":
        system = rest.pop(0).get("content") or ""
    ctx.append(IM_START + "system\n" + system)
    if tools:
        ctx.append(("\n\n" if system else "") + render_tools(tools))
    ctx.append(IM_END + "\n")

    last_user = max((i for i, m in enumerate(rest) if m["role"] == "user"), default=-1)
    turn = 0
    for i, m in enumerate(rest):
        role = m["role"]
        if role in ("user", "system"):
            ctx.append(IM_START + role + "\n" + (m.get("content") or "") + IM_END + "\n")
        elif role == "tool":
            if i == 0 or rest[i - 1]["role"] != "tool":
                ctx.append(IM_START + "user")
            ctx.append("\n" + TOOL_RESPONSE_OPEN + "\n" + (m.get("content") or "") + "\n" + TOOL_RESPONSE_CLOSE)
            if i == len(rest) - 1 or rest[i + 1]["role"] != "tool":
                ctx.append(IM_END + "\n")
        elif role == "assistant":
            ctx.append(IM_START + "assistant\n")
            flush()
            pieces.append((assistant_body(m, keep_reasoning=i > last_user), turn))
            turn += 1
            ctx.append("\n")
        else:
            raise ValueError(f"unknown role {role!r}")
    if add_generation_prompt:
        ctx.append(IM_START + "assistant\n" + (THINK_OPEN + "\n" if enable_thinking else THINK_OPEN + THINK_CLOSE))
    flush()
    return pieces


def render_text(messages: Sequence[dict], tools: Sequence[dict] | None = None, **kwargs) -> str:
    return "".join(text for text, _ in render_pieces(messages, tools, **kwargs))
