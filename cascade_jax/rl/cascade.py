"""The staged cascade: optional SFT, then GRPO / MOPD stages in the recipe's order, each from the previous
stage's result, with held-out evaluations, a report and an HF export at the end.

The run directory records the stage boundaries, so a rerun after a crash resumes inside the stage that was
running (at its step: each stage is a normal run directory with checkpoints) and never reruns a finished one:

    RUN/cascade.yaml                 the recipe as first run
    RUN/stages/NN-NAME/              one stage's run directory (checkpoint contract: loads, exports, resumes)
    RUN/stages/NN-NAME/stage_done.json   the marker: written once the stage reached its last step and was evaluated
    RUN/evals/start.json, NAME.json  held-out scores (cascade-eval's JSON) of the start and of every stage
    RUN/timings.jsonl                wall seconds per stage and per run segment (a resumed stage adds a line)
    RUN/report/                      report.md, rewards.png, evals.png
    RUN/hf/ (or `export`)            the final main-line result as an HF directory
    RUN/cascade_done.json            once all of the above exist
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from tqdm import tqdm

from cascade_jax.rl.cascade_config import CascadeConfig, stage_config, stage_dir
from cascade_jax.train.config import to_yaml
from cascade_jax.train.loop import read_complete

DONE = "stage_done.json"


@dataclasses.dataclass
class CascadeResult:
    reason: str                      # complete | already_complete | stopped | stage_complete
    detail: str
    report: str | None = None
    export: str | None = None


class Cascade:
    def __init__(self, cfg: CascadeConfig):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.start = cfg.start
        if cfg.sft.config is not None:
            from cascade_jax.train.config import load_sft_config

            self.sft_cfg = load_sft_config(cfg.sft.config, cfg.sft.overrides)
            self.start = self.sft_cfg.run_dir
        # Every stage's config is built (and validated) before anything runs.
        self.stage_cfgs = [stage_config(cfg, i, self.start, self._main_line_start(i)) for i in range(len(cfg.stages))]

    # ------------------------------------------------------------------ layout
    def _main_line_start(self, index: int) -> str:
        """What stage `index` starts from by default: the last earlier stage that is not a side branch."""
        for i in range(index - 1, -1, -1):
            if not self.cfg.stages[i].side_branch:
                return stage_dir(self.run_dir, i, self.cfg.stages[i].name)
        return self.start

    def _path(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)

    def stage_done(self, index: int) -> dict | None:
        path = os.path.join(self.stage_cfgs[index].run_dir, DONE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def final_checkpoint(self) -> str:
        return self._main_line_start(len(self.cfg.stages))

    def eval_labels(self) -> dict[str, str]:
        """Checkpoint path → the label of its evaluation (start, or a stage's name)."""
        labels = {os.path.realpath(self.start): "start"}
        for spec, stage_cfg in zip(self.cfg.stages, self.stage_cfgs):
            labels[os.path.realpath(stage_cfg.run_dir)] = spec.name
        return labels

    # ------------------------------------------------------------------ running
    def run(self, only_stage: str | None = None) -> CascadeResult:
        names = [s.name for s in self.cfg.stages]
        if only_stage is not None and only_stage not in names:
            raise ValueError(f"--stage: no stage {only_stage!r} in the recipe (stages: {', '.join(names)})")
        done_path = self._path("cascade_done.json")
        if only_stage is None and os.path.isfile(done_path):
            return CascadeResult("already_complete", f"{self.run_dir} is already complete; nothing to do",
                                 self._path("report", "report.md"), self._export_dir())
        if self.cfg.sft.config is None and not os.path.exists(self.start):   # before anything is written
            raise ValueError(f"start: no such checkpoint {self.start}")
        if not os.path.isfile(self._path("cascade.yaml")) and os.path.exists(self._export_dir()):
            raise ValueError(f"export: {self._export_dir()} already exists; choose another export directory")
        self._record_recipe()
        if only_stage is None and self.cfg.sft.config is not None:
            result = self._timed("sft", lambda: _run_sft(self.sft_cfg))
            if result.reason not in ("complete", "already_complete", "end_of_data"):
                return CascadeResult("stopped", f"SFT stopped at step {result.step} ({result.reason}); rerun to resume")
        if not os.path.exists(self.start):
            raise ValueError(f"start: no such checkpoint {self.start}")
        self._timed("start_eval", lambda: self._evaluate(self.start, "start"))
        for i, spec in enumerate(self.cfg.stages):
            if only_stage is not None and spec.name != only_stage:
                continue
            if self.stage_done(i) is not None:
                tqdm.write(f"cascade: stage {i + 1}/{len(names)} {spec.name} is done "
                           f"({os.path.relpath(self.stage_cfgs[i].run_dir, self.run_dir)}); skipping")
                continue
            stopped = self._run_stage(i)
            if stopped is not None:
                return stopped
        if only_stage is not None:
            return CascadeResult("stage_complete", f"stage {only_stage} is done")
        report = self._report()
        export = self._export()
        with open(done_path + ".tmp", "w") as f:
            json.dump({"final": self.final_checkpoint(), "export": export, "report": report}, f)
        os.replace(done_path + ".tmp", done_path)
        return CascadeResult("complete", "the cascade is complete", report, export)

    def _run_stage(self, i: int) -> CascadeResult | None:
        from cascade_jax.rl.grpo import run_grpo

        spec, stage_cfg = self.cfg.stages[i], self.stage_cfgs[i]
        start = stage_cfg.model.from_pretrained
        if not os.path.exists(start):
            raise ValueError(f"stages[{i}] ({spec.name}): its start {start} does not exist yet; run the cascade up "
                             f"to it (cascade-rl --config RECIPE without --stage)")
        tqdm.write(f"cascade: stage {i + 1}/{len(self.cfg.stages)} {spec.name} ({spec.kind}, "
                   f"{stage_cfg.train.steps} steps) from {start}")
        def train_and_evaluate():
            result = run_grpo(stage_cfg)
            if result.reason != "signal":
                self._evaluate(stage_cfg.run_dir, spec.name)
            return result

        result = self._timed(spec.name, train_and_evaluate)
        if result.reason == "signal":
            return CascadeResult("stopped", f"stage {spec.name} stopped by {result.detail} at step {result.step} of "
                                            f"{result.steps}; rerun the same command to continue there")
        complete = read_complete(stage_cfg.run_dir) or {"step": result.step}
        marker = os.path.join(stage_cfg.run_dir, DONE)
        with open(marker + ".tmp", "w") as f:
            json.dump({"stage": spec.name, "step": complete["step"], "start": start}, f)
        os.replace(marker + ".tmp", marker)
        return None

    def _timed(self, name: str, run):
        started = time.perf_counter()
        result = run()
        with open(self._path("timings.jsonl"), "a") as f:
            f.write(json.dumps({"stage": name, "seconds": round(time.perf_counter() - started, 1),
                                "reason": getattr(result, "reason", "done")}) + "\n")
        return result

    def _record_recipe(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        path = self._path("cascade.yaml")
        if not os.path.isfile(path):
            with open(path, "w") as f:
                f.write(to_yaml(self.cfg))

    # ------------------------------------------------------------------ evaluations, report, export
    def _eval_path(self, label: str) -> str:
        return self._path("evals", f"{label}.json")

    def _evaluate(self, checkpoint: str, label: str) -> dict:
        path = self._eval_path(label)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        import cascade_jax as cj
        from cascade_jax.data.tokenize import ChatTokenizer
        from cascade_jax.rl.eval_suite import evaluate, format_table

        e = self.cfg.eval
        tokenizer = ChatTokenizer(self.stage_cfgs[0].prompts.tokenizer)
        result = evaluate(cj.load_pretrained(checkpoint), tokenizer, e.suite, limit_per_domain=e.limit_per_domain,
                          pass_k=e.pass_k, max_new_tokens=e.max_new_tokens)
        result["checkpoint"] = checkpoint
        tqdm.write(f"cascade: held-out scores of {label}\n{format_table(result)}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        return result

    def timings(self) -> dict[str, float]:
        seconds: dict[str, float] = {}
        path = self._path("timings.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    record = json.loads(line)
                    seconds[record["stage"]] = seconds.get(record["stage"], 0.0) + record["seconds"]
        return seconds

    def _report(self) -> str:
        from cascade_jax.rl.cascade_report import cascade_report

        return cascade_report(self)

    def _export_dir(self) -> str:
        return self.cfg.export or self._path("hf")

    def _export(self) -> str:
        from tools.convert_hf.to_hf import convert_to_hf

        out = self._export_dir()
        # The export belongs to this cascade: one left by a run that crashed before its marker is replaced.
        tqdm.write(convert_to_hf(self.final_checkpoint(), out, overwrite=True))
        return out


def _run_sft(sft_cfg):
    from cascade_jax.train.sft import run_sft

    return run_sft(sft_cfg)


def run_cascade(cfg: CascadeConfig, only_stage: str | None = None) -> CascadeResult:
    return Cascade(cfg).run(only_stage)
