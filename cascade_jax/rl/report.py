"""The end-of-run report of a cascade: training curves, held-out scores after every stage, wall times.

`write_report(out_dir, stages, evals)` writes `rewards.png` (one panel per RL stage: its reward, or for
MOPD its advantage, against the step), `evals.png` (pass@1 of every domain after every stage,
pass@k dashed) and `report.md`, each atomically (temp file, then rename). The inputs are plain data:

- `stages`: in order, `{"name", "kind": "sft"|"grpo"|"mopd", "run_dir", "seconds": float|None,
  "domains": [the stage's own domains]}`, optionally `"start": label` (the eval of the checkpoint the
  stage started from; default: the eval just before the stage's own in `evals`). Each run_dir's
  `metrics.jsonl` holds one JSON object per logged step (missing files and keys are tolerated).
- `evals`: `[(label, result)]` in order, `result` as returned by `cascade_jax.rl.eval_suite.evaluate`
  (label "start" or a stage's name).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence

RL_KINDS = ("grpo", "mopd")
CURVE_KEYS = {   # the first key a stage's metrics hold is drawn
    "grpo": ("reward_mean", "pass_rate", "eval_accuracy", "loss"),
    "mopd": ("mopd_advantage_mean", "reward_mean", "pass_rate", "loss"),
    "sft": ("loss", "eval_loss"),
}


# ---------------------------------------------------------------------------------------- reading
def read_metrics(run_dir: str | None) -> list[dict]:
    """The logged steps of a run, by step (lines of one step are merged, a later value winning, e.g. a step
    logged again after a resume); a missing file or an unreadable line is skipped."""
    path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
    if not path or not os.path.isfile(path):
        return []
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                by_step[int(record["step"])] = {**by_step.get(int(record["step"]), {}), **record}
    return [by_step[s] for s in sorted(by_step)]


def curve(metrics: Sequence[dict], kind: str) -> tuple[str | None, list[int], list[float]]:
    """(key, steps, values) of the first key among CURVE_KEYS[kind] that some step logged (finite values)."""
    for key in CURVE_KEYS.get(kind, CURVE_KEYS["grpo"]):
        points = [(m["step"], float(m[key])) for m in metrics
                  if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
        if points:
            return key, [p[0] for p in points], [p[1] for p in points]
    return None, [], []


def eval_domains(evals: Sequence[tuple[str, dict]]) -> list[str]:
    """Every domain of the evals, in order of first appearance."""
    return list(dict.fromkeys(d for _, result in evals for d in result.get("domains", {})))


def _pass_key(result: dict) -> str | None:
    k = result.get("pass_k")
    return f"pass@{k}" if k is not None else None


def _headline(result: dict | None, domain: str) -> float | None:
    """A domain's headline score: pass@1 over the samples at T = 1 (the paper's avg@n, what RL optimises),
    or the greedy accuracy for results without samples."""
    entry = (result or {}).get("domains", {}).get(domain)
    return None if entry is None else entry.get("pass@1", entry.get("greedy"))


def start_label(stages: Sequence[dict], index: int, labels: Sequence[str]) -> str | None:
    """The eval a stage's change is measured from: its `start`, else the eval just before its own."""
    stage = stages[index]
    if stage.get("start"):
        return stage["start"]
    if stage["name"] in labels:
        at = list(labels).index(stage["name"])
        return labels[at - 1] if at > 0 else None
    return None


# ---------------------------------------------------------------------------------------- markdown
def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def scores_table(evals: Sequence[tuple[str, dict]]) -> str:
    domains = eval_domains(evals)
    keys = {_pass_key(r) for _, r in evals} - {None}
    pass_name = keys.pop() if len(keys) == 1 else "pass@k"
    lines = [f"| eval | {' | '.join(domains)} |", "|---|" + "---|" * len(domains)]
    for label, result in evals:
        key, cells = _pass_key(result), []
        for domain in domains:
            entry = result.get("domains", {}).get(domain)
            if entry is None:
                cells.append("–")
            else:
                cells.append(f"{_num(entry.get('pass@1'))} / {_num(entry.get('greedy'))} / "
                             f"{_num(entry.get(key) if key else None)}")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    ns = {d: next((r["domains"][d].get("n") for _, r in evals if d in r.get("domains", {})), None)
          for d in domains}
    suites = sorted({str(r.get("suite")) for _, r in evals if r.get("suite") is not None})
    note = (f"Each cell: pass@1 (mean over the samples at T = 1) / greedy accuracy / {pass_name} (held out"
            f"{', suite ' + ', '.join(suites) if suites else ''}; prompts per domain: "
            + ", ".join(f"{d} {n}" for d, n in ns.items()) + ").")
    return "\n".join(["## Held-out scores after every stage", "", *lines, "", note])


def wall_time_table(stages: Sequence[dict]) -> str:
    lines = ["## Wall time per stage", "", "| stage | kind | seconds | h:mm:ss |", "|---|---|---|---|"]
    for stage in stages:
        lines.append(f"| {stage['name']} | {stage.get('kind', '')} | {_num(stage.get('seconds'), 1)} | "
                     f"{_duration(stage.get('seconds'))} |")
    known = [s["seconds"] for s in stages if s.get("seconds") is not None]
    if known:
        lines.append(f"| total | | {sum(known):.1f} | {_duration(sum(known))} |")
    return "\n".join(lines)


def own_domain_table(stages: Sequence[dict], evals: Sequence[tuple[str, dict]]) -> str:
    labels = [label for label, _ in evals]
    results = dict(evals)
    rows = []
    for i, stage in enumerate(stages):
        before_label = start_label(stages, i, labels)
        for domain in stage.get("domains") or ():
            before = _headline(results.get(before_label), domain)
            after = _headline(results.get(stage["name"]), domain)
            change = None if before is None or after is None else after - before
            rows.append(f"| {stage['name']} | {domain} | {before_label or '–'} {_num(before)} | {_num(after)} | "
                        f"{'–' if change is None else f'{change:+.3f}'} |")
    if not rows:
        return ""
    return "\n".join(["## Each stage on its own domains (pass@1 at T = 1, held out)", "",
                      "| stage | domain | before | after | change |", "|---|---|---|---|---|", *rows])


def training_table(stages: Sequence[dict], metrics: dict[str, list[dict]]) -> str:
    lines = ["## Training curves", "", "| stage | kind | steps logged | metric | first | last |",
             "|---|---|---|---|---|---|"]
    for stage in stages:
        if not stage.get("run_dir"):   # e.g. the start's evaluation: time, no training
            continue
        logged = metrics[stage["name"]]
        key, _, values = curve(logged, stage.get("kind", "grpo"))
        lines.append(f"| {stage['name']} | {stage.get('kind', '')} | {len(logged)} | {key or '–'} | "
                     f"{_num(values[0] if values else None)} | {_num(values[-1] if values else None)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rewards_figure(stages: Sequence[dict], metrics: dict[str, list[dict]]):
    plt = _pyplot()
    rl = [s for s in stages if s.get("kind") in RL_KINDS]
    fig, axes = plt.subplots(1, max(1, len(rl)), figsize=(4 * max(1, len(rl)), 3.2), squeeze=False)
    if not rl:
        axes[0, 0].text(0.5, 0.5, "no RL stages", ha="center", va="center")
        axes[0, 0].set_axis_off()
    for ax, stage in zip(axes[0], rl):
        key, steps, values = curve(metrics[stage["name"]], stage["kind"])
        ax.set_title(f"{stage['name']} ({stage['kind']})", fontsize=10)
        if key is None:
            ax.text(0.5, 0.5, "no metrics", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.plot(steps, values, marker="." if len(steps) < 50 else None)
            ax.set_ylabel(key)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def evals_figure(evals: Sequence[tuple[str, dict]]):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(evals) + 2), 3.6))
    labels = [label for label, _ in evals]
    x = list(range(len(labels)))
    for i, domain in enumerate(eval_domains(evals)):
        color = f"C{i % 10}"
        headline = [_headline(r, domain) for _, r in evals]
        ax.plot(x, [math.nan if v is None else v for v in headline], marker="o", color=color, label=domain)
        passes = [(r.get("domains", {}).get(domain) or {}).get(_pass_key(r) or "") for _, r in evals]
        if any(v is not None for v in passes):
            ax.plot(x, [math.nan if v is None else v for v in passes], linestyle="--", color=color, alpha=0.6)
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("held-out pass@1 (pass@k dashed)")
    ax.grid(alpha=0.3)
    if labels:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no evaluations", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- writing
def _temp_beside(path: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    os.close(fd)
    return tmp


def _save_figure(fig, path: str) -> None:
    plt = _pyplot()
    tmp = _temp_beside(path)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def _save_text(text: str, path: str) -> None:
    tmp = _temp_beside(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def render_markdown(stages: Sequence[dict], evals: Sequence[tuple[str, dict]], metrics: dict[str, list[dict]],
                    extra_sections: Sequence[str] = ()) -> str:
    parts = ["# Cascade report", ""]
    if evals:
        parts += [scores_table(evals), "", "![held-out scores](evals.png)", ""]
    else:
        parts += ["No held-out evaluations were recorded.", ""]
    if own := own_domain_table(stages, evals):
        parts += [own, ""]
    if stages:
        parts += [wall_time_table(stages), "", training_table(stages, metrics), ""]
        if any(s.get("kind") in RL_KINDS for s in stages):
            parts += ["![RL curves](rewards.png)", ""]
    for section in extra_sections:
        if section and section.strip():
            parts += [section.strip(), ""]
    return "\n".join(parts)


def write_report(out_dir: str, stages: Sequence[dict], evals: Sequence[tuple[str, dict]], *,
                 extra_sections: Sequence[str] = ()) -> dict[str, str]:
    """Writes report.md, rewards.png and evals.png into `out_dir`; returns {"report", "rewards", "evals"}
    → their paths."""
    os.makedirs(out_dir, exist_ok=True)
    stages, evals = list(stages), [(str(label), result) for label, result in evals]
    metrics = {s["name"]: read_metrics(s.get("run_dir")) for s in stages}
    paths = {"rewards": os.path.join(out_dir, "rewards.png"), "evals": os.path.join(out_dir, "evals.png"),
             "report": os.path.join(out_dir, "report.md")}
    _save_figure(rewards_figure(stages, metrics), paths["rewards"])
    _save_figure(evals_figure(evals), paths["evals"])
    _save_text(render_markdown(stages, evals, metrics, extra_sections), paths["report"])
    return paths
