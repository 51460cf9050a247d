"""MOPD (training.md §3): teachers, routing, the distillation advantage and the REINFORCE step.

- a teacher equal to the student gives a zero gradient: a whole MOPD stage step leaves the weights unchanged;
- a teacher that prefers token a over b makes one step raise the student's log-prob of a;
- routing by domain with two teachers: every sequence is scored by its own teacher, each teacher only over
  the micro-batches that hold its sequences; a checkpoint named by two aliases is loaded once.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cascade_jax as cj
from cascade_jax.rl import losses
from cascade_jax.rl.config import MOPDSection, load_rl_config
from cascade_jax.rl.grpo import run_grpo
from cascade_jax.rl.logprobs import SamplingFilter, micro_batched_log_probs
from cascade_jax.rl.packing import micro_batches, pack_rollouts
from cascade_jax.rl.policy_loss import PolicyLoss
from cascade_jax.rl.teachers import Teachers
from cascade_jax.train.state import init_train_state, split_model
from cascade_jax.train.step import train_step
from tests.cli.test_generate import make_checkpoint


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("mopd") / "student")


def _teachers(student_path, teachers, routing, default=None, resident="all"):
    section = MOPDSection(teachers=teachers, routing=routing, default_teacher=default, resident=resident)
    return Teachers(section, dtype="float32", param_dtype="float32",
                    student_config=cj.load_pretrained(student_path).config)


def _batch(prompts, responses, rows_per_micro_batch=1, row_len=16):
    rows = pack_rollouts(prompts, responses, [[0.0] * len(r) for r in responses], row_len)
    return micro_batches(rows, rows_per_micro_batch)


def _self_distillation(student, tmp_path, *extra):
    """One MOPD step whose only teacher is the student itself; returns (last metrics row, run_dir)."""
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(4):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say hi {i}."}], "domain": "chat",
                                "verifier": {"kind": "ifeval", "mode": "fraction", "constraints": [
                                    {"type": "max_words", "n": n} for n in (1, 2, 3, 4, 5, 6)]}})
                    + "\n")
    run_dir = tmp_path / "mopd"
    cfg = load_rl_config("configs/rl/tiny.yaml", [
        "algorithm=mopd", f"prompts.sources=[{{paths: [{prompts}]}}]", f"run_dir={run_dir}",
        f"model.from_pretrained={student}", "prompts.prompts_per_step=2", "prompts.group_size=2",
        "rollout.max_new_tokens=6", "rollout.max_slots=4", "train.steps=1", "train.rows_per_micro_batch=2",
        "train.accuracy_eval_every=0", "checkpoint.every=1", "checkpoint.async_save=false", "reward.num_workers=1",
        "optimizer.lr=1e-2", "optimizer.weight_decay=0.0", "grpo.overlong=none", "grpo.dynamic_filter=false",
        f"mopd.teachers.self={student}", "mopd.default_teacher=self", *extra])
    assert run_grpo(cfg).reason == "complete"
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f][-1], run_dir


def test_teacher_equal_to_student_leaves_the_weights_unchanged(student, tmp_path):
    """A full MOPD stage step (rollouts, teacher pass, trainer pass, update): advantage 0 everywhere, so the
    gradient is exactly zero and AdamW (no weight decay) moves nothing."""
    metrics, run_dir = _self_distillation(student, tmp_path)
    assert metrics["mopd_advantage_mean"] == 0.0 and metrics["grad_norm"] == 0.0 and metrics["loss_tokens"] > 0
    before = jax.tree.leaves(nnx.state(cj.load_pretrained(student)))
    after = jax.tree.leaves(nnx.state(cj.load_pretrained(str(run_dir))))
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_outcome_weight_adds_the_grpo_advantage(student, tmp_path):
    """MiMo's variant: with mopd.outcome_weight the outcome advantage trains even when the teacher agrees."""
    metrics, _ = _self_distillation(student, tmp_path, "mopd.outcome_weight=1.0")
    assert metrics["mopd_advantage_mean"] == 0.0 and metrics["grad_norm"] > 0


def _context_hidden(model, prompt):
    out = model(jnp.asarray([prompt], jnp.int32), compute_logits=False)
    return np.asarray(out.hidden_states[0, -1])


def test_a_teacher_preferring_a_over_b_raises_the_students_log_prob_of_a(student, tmp_path):
    model = cj.load_pretrained(student)
    prompt, a, b = [5, 17, 99, 3], 1234, 2345
    # The teacher: the student with token a's logit raised by 8 after this prompt (the lm_head column moved
    # along the prompt's last hidden state), so it rates a far above b there.
    teacher = cj.load_pretrained(student)
    hidden = _context_hidden(teacher, prompt)
    assert teacher.lm_head is not None, "the tiny preset has an untied lm_head"
    kernel = teacher.lm_head.kernel
    kernel[...] = kernel[...].at[:, a].add(jnp.asarray(8.0 * hidden / np.dot(hidden, hidden)))
    teacher_path = make_checkpoint(tmp_path / "teacher", teacher)

    teachers = _teachers(student, {"t": teacher_path}, {}, default="t")
    batch = _batch([prompt, prompt], [[a], [b]], rows_per_micro_batch=2)
    scoring = {k: batch[k] for k in ("tokens", "targets", "segment_ids", "loss_mask", "sequence")}
    graphdef, params, expert_bias = split_model(model)
    train_logp = np.asarray(micro_batched_log_probs(params, expert_bias, scoring, graphdef=graphdef,
                                                    sampling=SamplingFilter()))
    teacher_logp = teachers.log_probs(scoring, teachers.route([{}, {}]), SamplingFilter(), 512)
    advantage = np.asarray(losses.mopd_advantages(teacher_logp, train_logp, batch["loss_mask"]))
    mask = batch["loss_mask"] > 0
    by_token = {int(t): float(v) for t, v in zip(batch["targets"][mask], advantage[mask])}
    assert by_token[a] > 0 > by_token[b]

    tx = optax.sgd(0.5)
    graphdef, state = init_train_state(model, tx, 0)
    arrays = {"tokens": batch["tokens"], "targets": batch["targets"], "segment_ids": batch["segment_ids"],
              "loss_mask": batch["loss_mask"], "advantages": advantage, "inf_logp": train_logp}
    loss_fn = PolicyLoss(SamplingFilter(), "icepop", 0.5, 2.0, clip_low=None, clip_high=None)
    state, out = train_step(state, {k: jnp.asarray(v) for k, v in arrays.items()}, graphdef=graphdef, tx=tx,
                            loss_fn=loss_fn, bias_update_rate=0.0)
    new_logp = np.asarray(micro_batched_log_probs(state.params, state.expert_bias, scoring, graphdef=graphdef,
                                                  sampling=SamplingFilter()))
    at_a = mask & (batch["targets"] == a)
    assert new_logp[at_a].item() > train_logp[at_a].item() + 1e-3
    assert float(out["grad_norm"]) > 0


def test_routing_by_domain_with_two_teachers(student, tmp_path):
    other = make_checkpoint(tmp_path / "other",
                            cj.model.nemotron_h.NemotronH(cj.load_pretrained(student).config, rngs=nnx.Rngs(7)))
    teachers = _teachers(student, {"math": student, "chat": other, "chat_again": other},
                         {"math": "math", "instruction_following": "chat"}, default="chat_again")
    assert len(teachers.paths) == 2   # one checkpoint named twice is loaded once
    metas = [{"domain": "math"}, {"domain": "instruction_following"}, {"domain": "code"}, {"domain": "math"}]
    chosen = teachers.route(metas)
    assert chosen.tolist() == [0, 1, 1, 0]
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15]]
    responses = [[20, 21, 22], [23, 24], [25], [26, 27, 28, 29]]
    batch = _batch(prompts, responses, rows_per_micro_batch=1, row_len=8)   # one sequence per micro-batch
    got = teachers.log_probs(batch, chosen, SamplingFilter(), 512)
    for j, path in enumerate([student, other]):
        g, p, b = split_model(cj.load_pretrained(path))
        full = np.asarray(micro_batched_log_probs(p, b, batch, graphdef=g, sampling=SamplingFilter()))
        mine = np.where(batch["sequence"] >= 0, chosen[np.maximum(batch["sequence"], 0)], -1) == j
        np.testing.assert_allclose(got[mine], full[mine], rtol=0, atol=1e-6)
    # resident: one gives the same log-probs, one teacher in memory at a time
    one = _teachers(student, {"math": student, "chat": other}, {"math": "math"}, default="chat", resident="one")
    np.testing.assert_allclose(one.log_probs(batch, one.route(metas), SamplingFilter(), 512), got, atol=1e-6)
    assert len(one.resident) == 1


def test_routing_without_a_teacher_is_one_clear_error(student):
    teachers = _teachers(student, {"math": student}, {"math": "math"})
    with pytest.raises(ValueError, match="no teacher for domain 'code'"):
        teachers.route([{"domain": "code", "source": "tiny-code"}])


def test_a_teacher_of_another_architecture_is_refused(student, tmp_path):
    config = cj.load_pretrained(student).config.replace(layer_pattern="M*")
    other = make_checkpoint(tmp_path / "other", cj.model.nemotron_h.NemotronH(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="not the student's architecture"):
        _teachers(student, {"x": other}, {}, default="x")


@pytest.mark.parametrize("override, message", [
    (["algorithm=mopd"], "mopd.teachers: algorithm mopd needs at least one teacher"),
    (["algorithm=mopd", "mopd.teachers.a=/x", "grpo.dynamic_filter=false", "grpo.train_logprobs=false",
      "grpo.importance_weights=none", "grpo.mismatch_threshold=null"], "would silently be the teacher's log-prob"),
    (["algorithm=mopd", "mopd.teachers.a=/x"], "grpo.dynamic_filter: MOPD's advantages come from the teachers"),
    (["mopd.teachers.a=/x", "mopd.routing.math=b"], "mopd.routing.math: unknown teacher 'b'"),
])
def test_mopd_config_errors(override, message):
    with pytest.raises(Exception, match=message):
        load_rl_config("configs/rl/tiny.yaml", override)
