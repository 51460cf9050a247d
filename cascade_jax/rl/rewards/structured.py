"""Structured-output reward: the final answer parsed as JSON and validated against a JSON Schema.

The answer may be bare JSON or wrapped in a fenced block (```json … ```); with several fenced blocks the last
one counts, as for code. The validator class follows the schema's ``$schema`` (Draft 2020-12 when absent).
A schema that is itself invalid is a data mistake, not a wrong answer, so it raises (the pool counts it).
"""

from __future__ import annotations

import json
import re

import jsonschema

from cascade_jax.data.tasks.answers import final_answer

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|Json)?[ \t]*\n(.*?)```", re.DOTALL)
_REASON_CHARS = 300


def extract_json_text(response: str) -> str:
    """The JSON text of the final answer: the last fenced block's body, else the whole answer."""
    answer = final_answer(response)
    blocks = _FENCE.findall(answer)
    return (blocks[-1] if blocks else answer).strip()


def json_schema_reward(response: str, metadata: dict) -> tuple[float, dict]:
    """1.0 if the final answer is JSON that ``verifier["schema"]`` accepts, else 0.0 (details say why)."""
    schema = metadata["verifier"]["schema"]
    if isinstance(schema, str):  # schemas stored as JSON text in a record
        schema = json.loads(schema)
    validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator_cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"json_schema verifier: invalid schema: {e.message[:_REASON_CHARS]}") from None
    text = extract_json_text(response)
    try:
        value = json.loads(text)
    except ValueError as e:
        return 0.0, {"reason": f"not JSON: {e}"[:_REASON_CHARS]}
    error = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return 0.0, {"reason": f"schema violation at {where}: {error.message}"[:_REASON_CHARS]}
    return 1.0, {"reason": "valid"}
