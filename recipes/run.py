"""`align run recipes/<recipe>`: run a recipe's stages in order, then write runs/<recipe>/report.md with plots.

    align run recipes/tiny
    align run recipes/tiny --from sft          # redo sft and everything after it

recipes/<recipe>/pipeline.yaml lists the stages; each runs as its own process,
`python -m alignment.cli <stage> --config recipes/<recipe>/<name>.yaml`, with its progress bars on the terminal.
A name is a stage (`sft`) or a stage with a suffix (`eval_sft` runs `align eval` with recipes/<recipe>/eval_sft.yaml),
so one stage can run several times. The first failing stage stops the run and its error is repeated at the end.

A stage that finished is not run again: after success the runner writes runs/<recipe>/stages/<name>.json (time,
config hash, output path). It is redone when its YAML changed, its output is gone, `--from` names it or an earlier
stage, or an earlier stage ran (its output is this stage's input, directly or not). A stage that was killed has no
marker, so it runs again, and the stage itself resumes from its last checkpoint when its config and inputs are
unchanged (alignment.io.StageRun); a changed input starts it over.

The report (evals/report.py) puts the eval stages' reports side by side: one row per `eval_<model>` stage, the same
numbers `align compare` shows, with a panel per headline metric and sample answers from each eval's samples file.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignment.cli import STAGES
from alignment.config import parse_config
from alignment.errors import UserError, exit_on_user_error
from alignment.io import atomic_write_json


@dataclass
class PipelineConfig:
    """A recipe's pipeline.yaml: which stages run, in which order, and where the report goes."""

    recipe: str = field(default="", metadata={"help": "The recipe directory (the command line's first argument)."})
    stages: list[str] = field(default_factory=list, metadata={"help": "Stage names in order; `eval_x` runs stage eval with eval_x.yaml."})
    output_dir: str = field(default="", metadata={"help": "Where markers and report.md go (default runs/<recipe>)."})
    from_stage: str | None = field(default=None, metadata={"help": "Redo this stage and every later one (`--from STAGE`)."})
    report: bool = field(default=True, metadata={"help": "Write report.md after the stages."})


def stage_of(name: str) -> str:
    """The `align` stage a pipeline entry runs: the name itself, or the stage it starts with followed by `_`."""
    if name in STAGES:
        return name
    for stage in sorted(STAGES, key=len, reverse=True):
        if name.startswith(stage + "_"):
            return stage
    raise UserError(f"pipeline.yaml: stages: {name!r} is not a stage; expected one of {', '.join(STAGES)} (or STAGE_suffix)")


def read_stage_yaml(config_path: Path) -> dict:
    """A stage YAML as a mapping (one clear line when it is not valid YAML or not a mapping)."""
    try:
        data = yaml.safe_load(config_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{config_path}: not a valid UTF-8 YAML file ({' '.join(str(e).split())[:160]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{config_path}: expected a YAML mapping of config keys, got a {type(data).__name__}")
    return data


def stage_output(config_path: Path) -> str | None:
    """The output path a stage YAML names (output_dir, or output for data and eval)."""
    data = read_stage_yaml(config_path)
    return data.get("output_dir") or data.get("output")


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_stage(stage: str, config: Path) -> tuple[int, str]:
    """Run one stage in a child process; its stdout and stderr stream through (progress bars included).
    Returns (exit status, the last lines of its stderr)."""
    cmd = [sys.executable, "-m", "alignment.cli", stage, "--config", str(config)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    tail = b""
    while chunk := proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(4096):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-4000:]
    rc = proc.wait()
    lines = [ln.strip() for ln in tail.decode("utf-8", "replace").replace("\r", "\n").splitlines() if ln.strip()]
    return rc, "\n".join(lines[-3:])


def read_metrics(output: str | None) -> dict:
    """A stage's metric dict for report.json: summary.json of its output directory, if any."""
    f = Path(output, "summary.json") if output else None
    if f is None or not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError):
        return {}


def sample_records(report_path: str, n_answers: int = 5, n_winrate: int = 3) -> list[dict]:
    """A few per-item records an eval stage logged (FILE.samples.jsonl beside FILE.json): checked answers when it ran
    the answers task, else win-rate samples."""
    path = Path(report_path[:-len(".json")] + ".samples.jsonl")
    if not report_path.endswith(".json") or not path.is_file():
        return []
    answers, wins = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("task") == "answers" and len(answers) < n_answers:
            answers.append(rec)
        elif rec.get("task") == "win_rate" and len(wins) < n_winrate:
            wins.append(rec)
    return answers or wins


def main(pc: PipelineConfig) -> dict:
    """Check every stage YAML, run the stages (skipping finished ones), stop at the first failure, write the report."""
    from evals.report import answers_correct, load_report, write_pipeline_report

    t_start = time.time()
    recipe = Path(pc.recipe)
    out_dir = Path(pc.output_dir or f"runs/{recipe.name}")
    if not pc.stages:
        raise UserError(f"{recipe / 'pipeline.yaml'}: stages: expected a list of stage names")
    plan = [(name, stage_of(name), recipe / f"{name}.yaml") for name in pc.stages]
    for name, _, cfg in plan:
        if not cfg.is_file():
            raise UserError(f"{cfg}: not found; pipeline.yaml lists stage {name!r}")
        read_stage_yaml(cfg)
    names = [n for n, _, _ in plan]
    if pc.from_stage and pc.from_stage not in names:
        raise UserError(f"--from: {pc.from_stage!r} is not in this pipeline; expected one of {', '.join(names)}")
    redo_from = names.index(pc.from_stage) if pc.from_stage else len(names)
    markers = out_dir / "stages"

    timings, outputs = [], {}
    for i, (name, stage, cfg) in enumerate(plan):
        marker, output = markers / f"{name}.json", stage_output(cfg)
        outputs[name] = output
        done = marker.is_file() and json.loads(marker.read_text()).get("config_hash") == _hash(cfg) and (not output or Path(output).exists())
        if done and i < redo_from:
            print(f"run: [{i + 1}/{len(plan)}] {name}: done earlier (remove {marker} or pass --from {name} to redo)")
            timings.append({"name": name, "status": "cached", "seconds": json.loads(marker.read_text()).get("seconds", 0.0)})
            continue
        print(f"run: [{i + 1}/{len(plan)}] {name}: align {stage} --config {cfg}", flush=True)
        marker.unlink(missing_ok=True)
        t0 = time.time()
        rc, err = run_stage(stage, cfg)
        seconds = time.time() - t0
        if rc != 0:
            raise UserError(f"stage {name} failed (exit {rc}) after {seconds:.0f}s: {' | '.join(err.splitlines()) or 'no error output'}")
        atomic_write_json(marker, {"stage": stage, "config": str(cfg), "config_hash": _hash(cfg), "output": output,
                                   "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        timings.append({"name": name, "status": "ran", "seconds": seconds})
        print(f"run: [{i + 1}/{len(plan)}] {name}: ok in {seconds:.1f}s", flush=True)
        redo_from = min(redo_from, i + 1)  # its output changed: every later stage reads it, directly or not

    result = {"stages": timings}
    if pc.report:
        evals = {n[len("eval_"):]: outputs[n] for n, stage, _ in plan if stage == "eval" and n.startswith("eval_") and outputs[n]}
        reports = {m: load_report(p) for m, p in evals.items() if Path(p).is_file()}
        samples = {m: sample_records(p) for m, p in evals.items()}
        correct = {m: answers_correct(p[:-len(".json")] + ".samples.jsonl") for m, p in evals.items()}
        reward = next((outputs[n] for n, stage, _ in plan if stage == "reward"), None)
        health = json.loads(Path(reward, "health.json").read_text()) if reward and Path(reward, "health.json").is_file() else None
        stage_metrics = {n: read_metrics(outputs[n]) for n, stage, _ in plan if stage != "eval"}
        path = write_pipeline_report(out_dir, recipe.name, timings, reports, samples, health, stage_metrics, correct)
        result["report"] = str(path)
    total = time.time() - t_start
    ran = sum(t["status"] == "ran" for t in timings)
    print(f"run: {recipe.name}: {len(timings)} stages ({ran} ran, {len(timings) - ran} cached) in {total:.1f}s"
          + (f"; report {result['report']}" if "report" in result else ""))
    return result


@exit_on_user_error
def cli(argv=None) -> None:
    """`align run RECIPE_DIR [--from STAGE] [--key value ...]` (keys of PipelineConfig override pipeline.yaml)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: align run RECIPE_DIR [--from STAGE] [--key value ...]\n\n" + (__doc__ or "").strip())
        return
    if not argv or argv[0].startswith("-"):
        raise UserError("command line: expected a recipe directory, e.g. `align run recipes/tiny`")
    recipe, rest = Path(argv[0]), argv[1:]
    pipeline = recipe / "pipeline.yaml"
    if not pipeline.is_file():
        raise UserError(f"{pipeline}: not found; expected a recipe directory with pipeline.yaml")
    rest = ["--from_stage" if a == "--from" else a for a in rest]
    (pc,) = parse_config([PipelineConfig], ["--config", str(pipeline), "--recipe", str(recipe), *rest])
    main(pc)


if __name__ == "__main__":
    cli()
