"""The end-of-cascade report: what `rl/report.py` draws (scores after every stage, each stage against its own
start on its own domains, curves, wall time), fed from a cascade's run directory, plus each MOPD-distilled
domain against its teacher."""

from __future__ import annotations

import json
import os

from cascade_jax.rl.report import read_metrics, write_report


def cascade_report(cascade) -> str:
    """Writes RUN/report/ and returns the path of report.md."""
    cfg, timings, labels = cascade.cfg, cascade.timings(), cascade.eval_labels()
    stages = []
    if cfg.sft.config is not None:
        stages.append({"name": "sft", "kind": "sft", "run_dir": cascade.start, "seconds": timings.get("sft"),
                       "domains": []})
    if "start_eval" in timings:
        stages.append({"name": "start_eval", "kind": "eval", "run_dir": None, "seconds": timings["start_eval"],
                       "domains": []})
    for spec, stage_cfg in zip(cfg.stages, cascade.stage_cfgs):
        stages.append({"name": spec.name, "kind": spec.kind, "run_dir": stage_cfg.run_dir,
                       "seconds": timings.get(spec.name), "domains": list(spec.domains),
                       "start": labels.get(os.path.realpath(stage_cfg.model.from_pretrained), "start")})
    evals = {}
    for label in ["start"] + [s.name for s in cfg.stages]:
        path = os.path.join(cfg.run_dir, "evals", f"{label}.json")
        if os.path.isfile(path):
            with open(path) as f:
                evals[label] = json.load(f)
    sections = [judge_section(cascade), teacher_section(cascade, evals, labels)]
    paths = write_report(os.path.join(cfg.run_dir, "report"), stages, list(evals.items()),
                         extra_sections=[s for s in sections if s])
    return paths["report"]


def _score(result: dict | None, domain: str) -> float | None:
    if result is None:
        return None
    entry = result.get("domains", {}).get(domain)
    return None if entry is None else entry.get("pass@1", entry["greedy"])


def teacher_section(cascade, evals: dict, labels: dict) -> str:
    """Each MOPD stage's routed domains: the teacher's score and the distilled student's."""
    margin = cascade.cfg.eval.teacher_margin
    rows = []
    for spec, stage_cfg in zip(cascade.cfg.stages, cascade.stage_cfgs):
        if spec.kind != "mopd":
            continue
        m = stage_cfg.mopd
        for domain, alias in m.routing.items():
            teacher_label = labels.get(os.path.realpath(m.teachers[alias]), "?")
            start_label = labels.get(os.path.realpath(stage_cfg.model.from_pretrained), "?")
            teacher = _score(evals.get(teacher_label), domain)
            before, after = _score(evals.get(start_label), domain), _score(evals.get(spec.name), domain)
            if teacher is None or after is None:
                continue
            gap = after - teacher
            rows.append(f"| {spec.name} | {domain} | {alias} ({teacher_label}) {teacher:.3f} | "
                        f"{'' if before is None else f'{before:.3f}'} | {after:.3f} | {gap:+.3f} | "
                        f"{'yes' if gap >= -margin else 'no'} |")
    if not rows:
        return ""
    return "\n".join([f"## MOPD: distilled domains against their teachers (margin {margin:.2f}, pass@1 at T = 1, held out)",
                      "", "| stage | domain | teacher | student before | student after | after − teacher | "
                          f"within {margin:.2f} |", "|---|---|---|---|---|---|---|", *rows])


def judge_section(cascade) -> str:
    """Judge-rewarded stages (RLHF): the held-out win rate against the stage start's answers, first and last
    evaluation, and the response length the judge's length terms act on."""
    rows = []
    for spec, stage_cfg in zip(cascade.cfg.stages, cascade.stage_cfgs):
        if stage_cfg.reward.kind == "verifier":
            continue
        metrics = read_metrics(stage_cfg.run_dir)
        wins = [m["eval_judge_win_rate"] for m in metrics if "eval_judge_win_rate" in m]
        lengths = [m["response_length"] for m in metrics if "response_length" in m]
        if not wins and not lengths:
            continue
        win = f"{wins[0]:.3f} → {wins[-1]:.3f}" if wins else "–"
        length = f"{lengths[0]:.1f} → {lengths[-1]:.1f}" if lengths else "–"
        rows.append(f"| {spec.name} | {stage_cfg.reward.kind} | {win} | {length} |")
    if not rows:
        return ""
    return "\n".join(["## Judge-rewarded stages (held-out win rate against the stage's start)", "",
                      "| stage | reward | win rate, first → last evaluation | response length, first → last step |",
                      "|---|---|---|---|", *rows])
