"""cascade-generate as a user runs it: a subprocess on a real (random-weight) checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.join(os.path.dirname(__file__), "..", "..")


def make_checkpoint(path, model=None) -> str:
    """`model` (default: a random tiny one) saved in the converted-checkpoint layout; the tiny vocabulary fits
    the bundled tokenizer, which the CLIs then pick by default (no tokenizer is saved beside it)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    import cascade_jax as cj
    from cascade_jax.model.nemotron_h import NemotronH
    from cascade_jax.weights.orbax_params import PARAMS_DIR, default_generation_config, write_config

    if model is None:
        model = NemotronH(cj.ModelConfig.preset("tiny").replace(layer_pattern="M*E"), rngs=nnx.Rngs(0))
    os.makedirs(path, exist_ok=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(os.path.abspath(path), PARAMS_DIR), nnx.to_pure_dict(nnx.state(model)))
    write_config(path, model.config, np.float32, default_generation_config(model.config))
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("generate") / "ckpt")


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cascade_jax.cli.generate", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_prompt_streams_text_and_a_summary(ckpt):
    result = cli("--ckpt", ckpt, "--prompt", "What is 2+3?", "--max-new-tokens", 12, "--temperature", 0,
                 "--no-thinking")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no text printed"
    summary = result.stderr.strip().splitlines()[-1]
    assert "tokens" in summary and "finish_reason=" in summary and "tok/s" in summary


def test_prompts_file_gives_one_line_per_input(ckpt, tmp_path):
    prompts = tmp_path / "in.jsonl"
    lines = [{"prompt": "hello", "n": 2, "max_new_tokens": 5},
             {"messages": [{"role": "user", "content": "2+2?"}]}]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    result = cli("--ckpt", ckpt, "--prompts-file", prompts, "--out", out, "--max-new-tokens", 7, "--seed", 3)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2]
    assert records[0]["prompt"] == "hello" and records[1]["messages"] == lines[1]["messages"]
    assert [len(r["outputs"]) for r in records] == [2, 1]
    for record, limit in zip(records, (5, 7)):
        for o in record["outputs"]:
            assert 1 <= len(o["token_ids"]) <= limit and len(o["logprobs"]) == len(o["token_ids"])
            assert o["finish_reason"] in ("stop", "length") and isinstance(o["text"], str)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")], "temporary file left behind"


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "fine"}\n{"prompt": 3}\n', "in.jsonl:2:"),
    ('{"prompt": "fine"}\nnot json\n', "in.jsonl:2: not JSON"),
    ('{"prompt": "a", "n": 0}\n', "in.jsonl:1:"),
    ('{"prompt": "a", "temperature": 1}\n', "in.jsonl:1: unknown field"),
])
def test_bad_line_is_one_line_error_and_nothing_is_written(tmp_path, bad, message):
    (tmp_path / "in.jsonl").write_text(bad)
    out = tmp_path / "out.jsonl"
    result = cli("--ckpt", tmp_path / "no-such-ckpt", "--prompts-file", tmp_path / "in.jsonl", "--out", out)
    assert result.returncode == 1
    assert result.stderr.startswith("cascade-generate: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_out_equal_to_input_is_refused(tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    result = cli("--ckpt", tmp_path, "--prompts-file", prompts, "--out", tmp_path / "." / "in.jsonl")
    assert result.returncode == 1 and "input file" in result.stderr
    assert prompts.read_text() == '{"prompt": "a"}\n'


def test_bad_ckpt_is_one_line_error(tmp_path):
    result = cli("--ckpt", tmp_path / "missing", "--prompt", "hi")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"cascade-generate: error: {tmp_path / 'missing'}: no such directory"]


def test_text_stream_never_splits_a_character():
    from cascade_jax.cli.generate import BUNDLED_TOKENIZER, TextStream
    from cascade_jax.data.tokenize import ChatTokenizer

    tokenizer = ChatTokenizer(BUNDLED_TOKENIZER)
    text = "héllo 日本語 — ok"
    ids = tokenizer.encode_text(text) + [tokenizer.eos_id]
    stream = TextStream(tokenizer, [tokenizer.eos_id])
    pieces = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids[:-1]) and not any("\ufffd" in p for p in pieces)
