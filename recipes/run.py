"""`align run recipes/<recipe>`: run a recipe's stages in order, then write runs/<recipe>/report.md with plots.

    align run recipes/tiny
    align run recipes/tiny --from sft          # redo sft and everything after it

recipes/<recipe>/pipeline.yaml lists the stages; each runs as its own process,
`python -m alignment.cli <stage> --config recipes/<recipe>/<name>.yaml`, with its progress bars on the terminal.
A name is a stage (`sft`) or a stage with a suffix (`eval_sft` runs `align eval` with recipes/<recipe>/eval_sft.yaml),
so one stage can run several times. The first failing stage stops the run and its error is repeated at the end.

A stage that finished is not run again: after success the runner writes runs/<recipe>/stages/<name>.json (time,
config hash, output path). It is redone when its YAML changed, its output is gone, `--from` names it or an
earlier stage, or an earlier stage ran (its output is this stage's input, directly or not). Stage outputs are read back for the report: a `.json` output (an eval report) is its metric dict;
a directory may hold `metrics.json`.

Afterwards, for every model named in pipeline.yaml's `models` (name=HF directory), the tiny-world answer accuracy
and well-formed rate are measured on `qa_file` (alignment.tinyworld.answer_accuracy) when qa_file is set, and the
report puts all of it in one table with PNG plots.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignment.cli import STAGES
from alignment.config import parse_config
from alignment.errors import UserError, exit_on_user_error
from alignment.io import atomic_write_json, atomic_write_text


@dataclass
class PipelineConfig:
    """A recipe's pipeline.yaml: which stages, in which order, and what the report evaluates."""

    stages: list[str] = field(default_factory=list, metadata={"help": "Stage names in order; `eval_x` runs stage eval with eval_x.yaml."})
    output_dir: str = field(default="", metadata={"help": "Where markers and report.md go (default runs/<recipe>)."})
    models: list[str] = field(default_factory=list, metadata={"help": "NAME=HF_DIR models compared in the report, in order."})
    qa_file: str | None = field(default=None, metadata={"help": "Tiny-world qa/test.jsonl: answer accuracy of each model's generations."})
    qa_limit: int = field(default=0, metadata={"help": "Score only the first N questions (0 = all)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Generation length limit for answer accuracy."})
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


def stage_output(config_path: Path) -> str | None:
    """The output path a stage YAML names (output_dir, or output for data and eval)."""
    data = yaml.safe_load(config_path.read_text()) or {}
    return data.get("output_dir") or data.get("output")


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_stage(stage: str, config: Path) -> tuple[int, str]:
    """Run one stage in a child process; its stdout and stderr stream through (progress bars included).
    Returns (exit status, the last lines of its stderr)."""
    cmd = [sys.executable, "-m", "alignment.cli", stage, "--config", str(config)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=os.environ.copy())
    tail = b""
    while chunk := proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(4096):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-4000:]
    rc = proc.wait()
    lines = [ln.strip() for ln in tail.decode("utf-8", "replace").replace("\r", "\n").splitlines() if ln.strip()]
    return rc, "\n".join(lines[-3:])


def read_metrics(output: str | None) -> dict:
    """A stage's metric dict: its .json output, or metrics.json inside its output directory."""
    if not output:
        return {}
    p = Path(output)
    for f in (p if p.suffix == ".json" else p / "metrics.json",):
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError:
                return {}
    return {}


def winrate_samples(output: str | None, n: int = 3) -> list[dict]:
    """The first `n` win-rate records an eval stage logged (its FILE.samples.jsonl next to FILE.json), if any."""
    if not output or not output.endswith(".json"):
        return []
    path = Path(output[:-len(".json")] + ".samples.jsonl")
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("task") == "win_rate":
            out.append(rec)
            if len(out) == n:
                break
    return out


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested metrics as {"a/b": number} (numbers only: what a table and a plot can show)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def model_metrics(pc: PipelineConfig) -> dict[str, dict]:
    """Per model: tiny-world answer accuracy and well-formed rate (when pipeline.yaml sets qa_file).

    Bits-per-byte, multiple-choice accuracy, reward win rate against SFT and KL to the reference come from the eval
    stages (`eval_<model>` entries, read by read_metrics) and are merged into the table by `report_rows`."""
    from alignment.tinyworld import answer_accuracy

    out = {}
    if not pc.qa_file:
        return out
    for spec in pc.models:
        name, _, model_dir = spec.partition("=")
        if not Path(model_dir, "config.json").is_file():
            print(f"run: report: {name}: no model at {model_dir}; skipped", file=sys.stderr)
            continue
        t0 = time.time()
        out[name] = answer_accuracy(model_dir, pc.qa_file, limit=pc.qa_limit or None, max_new_tokens=pc.max_new_tokens)
        print(f"run: {name}: answer accuracy {out[name]['answer_accuracy']:.3f} ± {out[name]['answer_accuracy_stderr']:.3f}, "
              f"well-formed {out[name]['well_formed_rate']:.3f} ({time.time() - t0:.0f}s)")
    return out


def report_rows(models: dict[str, dict], stage_metrics: dict[str, dict]) -> dict[str, dict]:
    """One row per model: its answer metrics plus the numbers of the stage named eval_<model>, if any."""
    rows = {}
    names = list(models) + [n[len("eval_"):] for n in stage_metrics if n.startswith("eval_") and n[len("eval_"):] not in models]
    for name in names:
        row = {}
        m = models.get(name, {})
        for k in ("answer_accuracy", "answer_accuracy_stderr", "well_formed_rate"):
            if k in m:
                row[k] = m[k]
        rep = stage_metrics.get(f"eval_{name}", {})
        row.update(_flat(rep.get("results", rep)))  # an `align eval` report keeps task -> metrics under "results"
        rows[name] = row
    return rows


def _pick(row: dict, suffix: str) -> str | None:
    """The first metric key of `row` ending in `suffix` (task names vary: mmlu_tinyworld/acc, mmlu/acc, ...)."""
    return next((k for k in sorted(row) if k.endswith(suffix)), None)


def headline_table(rows: dict[str, dict]) -> dict[str, dict[str, str]]:
    """The few numbers a reader compares across stages, formatted as 'mean ± stderr' ('' where not measured)."""
    spec = [  # column, metric key (or key suffix); its standard error is the key + "_stderr" when measured
        ("bits/byte (held-out)", "perplexity/bits_per_byte"),
        ("MC acc (chance 0.25)", "/acc"),
        ("answer accuracy", "answer_accuracy"),
        ("well-formed, ends at <|im_end|>", "well_formed_rate"),
        ("RM win rate vs SFT", "win_rate/win_rate"),
        ("KL to SFT (nats)", "win_rate/kl"),
    ]
    out = {}
    for name, row in rows.items():
        cells = {}
        for col, key in spec:
            k = key if key in row else _pick(row, key)
            se = row.get(f"{k}_stderr") if k else None
            cells[col] = "" if k is None else f"{row[k]:.3f}" + (f" ± {se:.3f}" if se is not None else "")
        out[name] = cells
    return out


def write_report(out_dir: Path, recipe: str, timings: list[dict], models: dict[str, dict], stage_metrics: dict[str, dict],
                 sampled: dict[str, list[dict]] | None = None) -> Path:
    """report.md: stage times, the model table, plots (report_times.png, report_models.png) and sample answers (the
    tiny-world checker's, else the first win-rate samples of the model's eval stage, `sampled`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report_rows(models, stage_metrics)
    lines = [f"# Report: {recipe}", "", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {t['name']} | {t['status']} | {t['seconds']:.1f} |" for t in timings]
    lines += ["", f"Total: {sum(t['seconds'] for t in timings):.1f} s", ""]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(timings) + 1))
    ax.barh([t["name"] for t in timings][::-1], [t["seconds"] for t in timings][::-1])
    ax.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out_dir / "report_times.png", dpi=100)
    plt.close(fig)
    lines += ["![stage times](report_times.png)", ""]
    if rows:
        headline = headline_table(rows)
        keys = [k for k in next(iter(headline.values())) if any(cells[k] for cells in headline.values())]  # measured columns
        lines += ["## Models", "", "Values are mean ± one standard error; full metrics are in report.json.", "",
                  "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(cells[k] for k in keys) + " |" for name, cells in headline.items()]
        lines.append("")
        health = out_dir / "reward" / "health.json"
        if health.is_file():
            h = json.loads(health.read_text())
            lines += [f"Reward model held-out pair accuracy: {h.get('eval_accuracy_before', float('nan')):.3f} before training -> "
                      f"{h['eval_accuracy']:.3f} after ({h.get('eval_pairs')} pairs; gate {h.get('min_eval_accuracy')}).", ""]
        plotted = [k for k in ("answer_accuracy", "well_formed_rate") if any(k in r for r in rows.values())]
        if plotted:
            fig, axes = plt.subplots(1, len(plotted), figsize=(4 * len(plotted), 3), squeeze=False)
            for ax, k in zip(axes[0], plotted):
                names = [n for n in rows if k in rows[n]]
                err = [rows[n].get(k + "_stderr", 0) for n in names] if k == "answer_accuracy" else None
                ax.bar(names, [rows[n][k] for n in names], yerr=err, capsize=3)
                ax.set_title(k.replace("_", " "))
                ax.set_ylim(0, 1)
            fig.tight_layout()
            fig.savefig(out_dir / "report_models.png", dpi=100)
            plt.close(fig)
            lines += ["![models](report_models.png)", ""]
    for name, m in models.items():
        if m.get("samples"):
            lines += [f"### Sample answers: {name}", ""]
            lines += [f"- Q: {s['question']} → {s['answer']!r} ({'correct' if s['correct'] else 'wrong'})" for s in m["samples"]]
            lines.append("")
    for name, recs in (sampled or {}).items():
        if recs and not models.get(name, {}).get("samples"):
            lines += [f"### Sample answers: {name} (sampled; reward-model score of this answer, then of the reference's)", ""]
            for r in recs:
                prompt = r["prompt"][-1]["content"] if isinstance(r["prompt"], list) else r["prompt"]
                lines.append(f"- Q: {_short(prompt, 100)} → {_short(r['policy_response'], 160)!r} ({r['policy_reward']:+.2f} vs "
                             f"{r['reference_reward']:+.2f})")
            lines.append("")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    atomic_write_json(out_dir / "report.json", {"recipe": recipe, "stages": timings, "models": rows, "stage_metrics": stage_metrics})
    return path


def main(recipe_dir: str, pc: PipelineConfig) -> dict:
    """Run the stages (skipping finished ones), stop at the first failure, then write the report."""
    t_start = time.time()
    recipe = Path(recipe_dir)
    out_dir = Path(pc.output_dir or f"runs/{recipe.name}")
    if not pc.stages:
        raise UserError(f"{recipe / 'pipeline.yaml'}: stages: expected a list of stage names")
    plan = [(name, stage_of(name), recipe / f"{name}.yaml") for name in pc.stages]
    for name, _, cfg in plan:
        if not cfg.is_file():
            raise UserError(f"{cfg}: not found; pipeline.yaml lists stage {name!r}")
    names = [n for n, _, _ in plan]
    if pc.from_stage and pc.from_stage not in names:
        raise UserError(f"--from: {pc.from_stage!r} is not in this pipeline; expected one of {', '.join(names)}")
    redo_from = names.index(pc.from_stage) if pc.from_stage else len(names)
    markers = out_dir / "stages"

    timings, stage_metrics, sampled = [], {}, {}
    for i, (name, stage, cfg) in enumerate(plan):
        marker, output = markers / f"{name}.json", stage_output(cfg)
        done = marker.is_file() and json.loads(marker.read_text()).get("config_hash") == _hash(cfg) and (not output or Path(output).exists())
        if done and i < redo_from:
            print(f"run: [{i + 1}/{len(plan)}] {name}: done earlier (remove {marker} or pass --from {name} to redo)")
            timings.append({"name": name, "status": "cached", "seconds": json.loads(marker.read_text()).get("seconds", 0.0)})
        else:
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
        stage_metrics[name] = read_metrics(output)
        if name.startswith("eval_"):
            sampled[name[len("eval_"):]] = winrate_samples(output)

    result = {"stages": timings}
    if pc.report:
        models = model_metrics(pc)
        path = write_report(out_dir, recipe.name, timings, models, stage_metrics, sampled)
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
    if not argv or argv[0].startswith("-"):
        raise UserError("command line: expected a recipe directory, e.g. `align run recipes/tiny`")
    recipe, rest = Path(argv[0]), argv[1:]
    pipeline = recipe / "pipeline.yaml"
    if not pipeline.is_file():
        raise UserError(f"{pipeline}: not found; expected a recipe directory with pipeline.yaml")
    rest = ["--from_stage" if a == "--from" else a for a in rest]
    (pc,) = parse_config([PipelineConfig], ["--config", str(pipeline), *rest])
    main(str(recipe), pc)


if __name__ == "__main__":
    cli()
