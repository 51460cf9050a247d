"""Verifiable rewards, in process: every kind with right and wrong answers, and the generated tasks' references."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random

import pytest

from cascade_jax.data.chat_template import render_tool_calls
from cascade_jax.data.tasks import TASKS
from cascade_jax.rl.rewards import REWARDS, compute_reward, strip_end_tokens

ASSETS = pathlib.Path(__file__).parents[2] / "cascade_jax" / "data" / "assets" / "tiny"
HAS_SANDBOX = importlib.util.find_spec("cascade_jax.rl.sandbox") is not None
needs_sandbox = pytest.mark.skipif(not HAS_SANDBOX, reason="cascade_jax.rl.sandbox is not written yet")


def meta(**verifier) -> dict:
    return {"verifier": verifier, "domain": "test"}


def reward(response: str, **verifier) -> float:
    value, details = compute_reward(response, meta(**verifier))
    json.dumps(details)  # details are JSON-friendly
    return value


# ---------------------------------------------------------------------------- math
@pytest.mark.parametrize("response,answer", [
    ("<think>half</think>The answer is \\boxed{\\frac{1}{2}}.", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("<think>8 = 4 * 2</think>\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{(x+1)^2}", "x^2+2x+1"),
    ("\\boxed{1,234}", "1234"),
    ("\\boxed{18.}", "18"),  # math-verify does not parse "18."; the exact numeric comparison does
])
def test_math_equivalent_forms(response, answer):
    assert reward(response, kind="math", answer=answer) == 1.0


@pytest.mark.parametrize("response,answer", [
    ("\\boxed{0.51}", "0.5"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{8}"),
    ("<think>so it is \\boxed{3}</think>I am not sure.", "3"),  # only inside the reasoning
    ("The answer is 3.", "3"),
    ("\\boxed{}", "3"),
])
def test_math_wrong_or_missing(response, answer):
    assert reward(response, kind="math", answer=answer) == 0.0


def test_boxed_number():
    assert reward("<think>4 * 5 = 20</think>\\boxed{20}", kind="boxed_number", answer="20") == 1.0
    assert reward("\\boxed{-7/2}", kind="boxed_number", answer="-3.5") == 1.0
    assert reward("\\boxed{21}", kind="boxed_number", answer="20") == 0.0
    assert reward("<think>\\boxed{20}</think>", kind="boxed_number", answer="20") == 0.0


# ---------------------------------------------------------------------------- multiple choice
@pytest.mark.parametrize("response,expected", [
    ("<think>B is wrong</think>\\boxed{C}", 1.0),
    ("\\boxed{(C)}", 1.0),
    ("\\boxed{\\text{C}}", 1.0),
    ("After checking, the answer is C.", 1.0),
    ("Answer: C", 1.0),
    ("\\boxed{B}", 0.0),
    ("<think>\\boxed{C}</think>no idea", 0.0),
    ("\\boxed{42}", 0.0),
])
def test_mcq(response, expected):
    assert reward(response, kind="mcq", answer="C") == expected


def test_mcq_beyond_four_options():
    assert reward("\\boxed{H}", kind="mcq", answer="h") == 1.0


# ---------------------------------------------------------------------------- JSON schema
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}


def test_json_schema_valid():
    assert reward('<think>{"x": 1}</think>{"name": "Ada", "age": 36}', kind="json_schema", schema=SCHEMA) == 1.0
    fenced = 'Here it is:\n```json\n{"name": "Ada", "age": 36}\n```'
    assert reward(fenced, kind="json_schema", schema=SCHEMA) == 1.0
    assert reward('{"name": "Ada", "age": 36}', kind="json_schema", schema=json.dumps(SCHEMA)) == 1.0


@pytest.mark.parametrize("response,why", [
    ('{"name": "Ada", "age": -1}', "schema violation at age"),
    ('{"name": "Ada"}', "'age' is a required property"),
    ('{"name": "Ada", "age": 36, "extra": 1}', "schema violation"),
    ('{"name": "Ada", "age": 36', "not JSON"),
    ("Ada is 36.", "not JSON"),
])
def test_json_schema_invalid(response, why):
    value, details = compute_reward(response, meta(kind="json_schema", schema=SCHEMA))
    assert value == 0.0 and why in details["reason"]


def test_json_schema_bad_schema_raises():
    with pytest.raises(ValueError, match="invalid schema"):
        compute_reward("{}", meta(kind="json_schema", schema={"type": "no-such-type"}))


# ---------------------------------------------------------------------------- tool calls
CALLS = [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
         {"name": "book", "arguments": {"guests": ["Ada", "Bob"], "vip": True, "note": "window seat"}}]


def test_tool_call_chat_template_form():
    response = "<think>I need the weather.</think>Let me check." + render_tool_calls(CALLS, after_content=True)
    assert reward(response, kind="tool_call", calls=CALLS) == 1.0


def test_tool_call_json_form():
    body = "".join(f"<tool_call>{json.dumps(c)}</tool_call>\n" for c in CALLS)
    assert reward(body, kind="tool_call", calls=CALLS) == 1.0
    openai = [{"function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in CALLS]
    assert reward(body, kind="tool_call", calls=openai) == 1.0


def test_tool_call_mismatch():
    wrong_arg = [CALLS[0] | {"arguments": {"city": "Lyon", "days": 3}}, CALLS[1]]
    wrong_name = [CALLS[0] | {"name": "get_forecast"}, CALLS[1]]
    for calls in (wrong_arg, wrong_name, CALLS[:1], CALLS[::-1]):
        assert reward(render_tool_calls(calls, after_content=False), kind="tool_call", calls=CALLS) == 0.0
    assert reward("I would call get_weather.", kind="tool_call", calls=CALLS) == 0.0
    # Calls made only inside the reasoning do not count.
    assert reward("<think>" + render_tool_calls(CALLS, False) + "</think>done", kind="tool_call", calls=CALLS) == 0.0


def test_tool_call_unordered():
    swapped = render_tool_calls(CALLS[::-1], after_content=False)
    assert reward(swapped, kind="tool_call", calls=CALLS, ordered=False) == 1.0
    twice = render_tool_calls([CALLS[0], CALLS[0]], after_content=False)
    assert reward(twice, kind="tool_call", calls=CALLS, ordered=False) == 0.0


@pytest.mark.parametrize("response", [
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>",  # unclosed
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # bad JSON
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    "<tool_call>\nget_weather(city='Paris')\n</tool_call>",
])
def test_tool_call_malformed(response):
    value, details = compute_reward(response, meta(kind="tool_call", calls=CALLS[:1]))
    assert value == 0.0 and details["reason"].startswith("malformed tool call")


def test_tool_call_string_or_number_parameter():
    # The template writes "3" and 3 identically, so either reference matches.
    response = render_tool_calls([{"name": "f", "arguments": {"n": 3}}], after_content=False)
    assert reward(response, kind="tool_call", calls=[{"name": "f", "arguments": {"n": "3"}}]) == 1.0
    assert reward(response, kind="tool_call", calls=[{"name": "f", "arguments": {"n": 4}}]) == 0.0


# ---------------------------------------------------------------------------- instruction following
# (constraint, answer that satisfies it, answer that does not)
IFEVAL_CASES = [
    ({"type": "keyword_frequency", "word": "tea", "n": 2, "relation": "at least"}, "Tea, then more tea.", "Tea."),
    ({"type": "keyword_frequency", "word": "tea", "n": 2, "relation": "less than"}, "Tea.", "Tea and tea."),
    ({"type": "forbidden_words", "words": ["owl", "bee"]}, "Bees and owls.", "An owl saw a bee."),
    ({"type": "letter_frequency", "letter": "z", "n": 3, "relation": "at least"}, "Zebras zig zag.", "Zebras."),
    ({"type": "paragraphs", "n": 3}, "One.\n***\nTwo.\n***\nThree.", "One.\n***\n***\nTwo."),
    ({"type": "sections", "n": 2, "splitter": "Section"}, "Section 1\nIntro.\nSection 2\nBody.", "Section 1\nAll."),
    ({"type": "highlights", "n": 2}, "Use *this* and *that*.", "Only *one* here."),
    ({"type": "title"}, "<<A Poem>>\nRoses are red.", "A Poem\nRoses are red."),
    ({"type": "postscript", "marker": "P.S."}, "Hello.\n\nP.S. See you.", "Hello. See you."),
    ({"type": "postscript", "marker": "P.P.S"}, "Hi.\nP.P.S more", "Hi.\nP.S. more"),
    ({"type": "placeholders", "n": 2}, "Dear [name], at [address].", "Dear [name]."),
    ({"type": "no_comma"}, "No commas here.", "Well, yes."),
    ({"type": "quotation"}, '"All of it is quoted."', 'Not "quoted" at all.'),
    ({"type": "json"}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ({"type": "end_with", "phrase": "Is there anything else?"}, "Done. Is there anything else?", "Done."),
    ({"type": "start_with", "phrase": "Dear"}, "Dear Sir, hi.", "Hi."),
    ({"type": "min_sentences", "n": 3}, "One. Two! Three?", "One. Two."),
    ({"type": "max_sentences", "n": 2}, "One. Two.", "One. Two. Three."),
    ({"type": "capital_words", "n": 2, "relation": "at least"}, "VERY IMPORTANT news.", "Very IMPORTANT news."),
    ({"type": "capital_words", "n": 2, "relation": "less than"}, "Only ONE.", "TWO CAPS."),
    ({"type": "two_responses"}, "First answer.\n******\nSecond answer.", "Same.\n******\nSame."),
    ({"type": "repeat_prompt", "text": "Write about owls."}, "Write about owls. Owls hoot.", "Owls hoot."),
    ({"type": "lowercase"}, "all lowercase here.", "Not all lowercase."),
    ({"type": "uppercase"}, "ALL CAPS HERE.", "NOT all caps."),
]


@pytest.mark.parametrize("constraint,good,bad", IFEVAL_CASES, ids=[c[0]["type"] for c in IFEVAL_CASES])
def test_ifeval_checker(constraint, good, bad):
    assert reward("<think>plan</think>" + good, kind="ifeval", constraints=[constraint]) == 1.0
    assert reward("<think>plan</think>" + bad, kind="ifeval", constraints=[constraint]) == 0.0


def test_ifeval_strict_and_fraction():
    constraints = [{"type": "no_comma"}, {"type": "lowercase"}, {"type": "min_words", "n": 3},
                   {"type": "title"}]
    answer = "<think>Draft, check.</think>three small words"
    value, details = compute_reward(answer, meta(kind="ifeval", constraints=constraints))
    assert value == 0.0 and details["failed"] == ["title"]
    assert reward(answer, kind="ifeval", constraints=constraints, mode="fraction") == 0.75


def test_ifeval_only_the_final_answer_is_checked():
    assert reward("<think>no, commas</think>none here", kind="ifeval", constraints=[{"type": "no_comma"}]) == 1.0


def test_ifeval_errors():
    with pytest.raises(ValueError, match="unknown ifeval constraint type 'language'"):
        compute_reward("x", meta(kind="ifeval", constraints=[{"type": "language", "lang": "de"}]))
    with pytest.raises(ValueError, match="lacks field 'n'"):
        compute_reward("x", meta(kind="ifeval", constraints=[{"type": "paragraphs"}]))
    with pytest.raises(ValueError, match="unknown relation 'about'"):
        compute_reward("x", meta(kind="ifeval", constraints=[{"type": "keyword_frequency", "word": "x", "n": 1,
                                                               "relation": "about"}]))
    with pytest.raises(ValueError, match="unknown mode"):
        compute_reward("x", meta(kind="ifeval", constraints=[{"type": "no_comma"}], mode="loose"))


# ---------------------------------------------------------------------------- dispatch
def test_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown verifier kind 'nope'; known: .*boxed_number") as e:
        compute_reward("x", meta(kind="nope"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no 'verifier'"):
        compute_reward("x", {"domain": "math"})


def test_end_of_turn_tokens_are_not_part_of_the_answer():
    # Rollouts are decoded with special tokens kept (</think> is one), so they end in <|im_end|> (and pads).
    assert strip_end_tokens("a <|im_end|><pad><pad>\n") == "a " and strip_end_tokens("a\n") == "a\n"
    tail = "<|im_end|><pad>"
    assert reward('<think>x</think>{"name": "Ada", "age": 1}' + tail, kind="json_schema", schema=SCHEMA) == 1.0
    assert reward("<think>x</think>Bye. P.S. hi" + tail, kind="ifeval",
                  constraints=[{"type": "end_with", "phrase": "hi"}]) == 1.0


def test_required_kinds_are_registered():
    assert {"boxed_number", "math", "mcq", "json_schema", "tool_call", "ifeval", "python_tests"} <= set(REWARDS)


# ---------------------------------------------------------------------------- code
def test_code_without_a_block_needs_no_sandbox():
    assert reward("<think>```python\nx = 1\n```</think>no code", kind="python_tests", tests=["assert True"]) == 0.0


@needs_sandbox
def test_code_right_and_wrong():
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    right = "<think>easy</think>```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    assert reward(right, kind="python_tests", tests=tests, timeout_s=5) == 1.0
    assert reward(wrong, kind="python_tests", tests=tests, timeout_s=5) < 1.0
    assert reward("```python\nwhile True:\n    pass\n```", kind="python_tests", tests=tests, timeout_s=1) == 0.0


# ---------------------------------------------------------------------------- the shipped data
def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (ASSETS / name).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["rl.jsonl", "eval.jsonl"])
def test_tiny_records_have_known_kinds(name):
    # These records carry prompts only (no reference responses); their references are checked below from
    # the task generators that wrote them. A response with no answer scores without raising (0 unless a
    # constraint set happens to accept it).
    for record in _records(name):
        assert record["verifier"]["kind"] in REWARDS
        value, _ = compute_reward("<think>hmm</think>I do not know.", record)
        assert value == 0.0 or record["verifier"]["kind"] == "ifeval"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generated_references_score_one(task):
    module = TASKS[task]
    if module.KIND == "python_tests" and not HAS_SANDBOX:
        pytest.skip("cascade_jax.rl.sandbox is not written yet")
    for i in range(4 if module.KIND == "python_tests" else 40):
        sample = module.generate(random.Random(i))
        response = f"<think>\n{sample['reasoning']}\n</think>\n{sample['response']}"
        value, details = compute_reward(response, {"verifier": sample["verifier"], "domain": task})
        assert value == 1.0, (i, sample["verifier"], details)


def test_generated_math_references_under_the_math_kind():
    for i in range(20):
        sample = TASKS["math"].generate(random.Random(i))
        verifier = {**sample["verifier"], "kind": "math"}
        assert compute_reward(sample["response"], {"verifier": verifier})[0] == 1.0
