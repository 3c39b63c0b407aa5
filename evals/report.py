"""Versioned eval reports: JSON (the record), Markdown (for people) and a PNG plot, written side by side.

A report carries what is needed to compare two of them honestly: the schema version; the model path and content
hash; the tokenizer hash; per task its version, n, n-shot, scoring and metrics with standard errors; the resolved
config, seed, git commit, date and wall time. Metric names follow lm-eval (acc, acc_stderr, acc_norm,
word_perplexity, byte_perplexity, bits_per_byte).
"""

from __future__ import annotations

import json
import math
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from alignment.errors import UserError
from alignment.io import atomic_write_bytes, atomic_write_json, atomic_write_text

SCHEMA_VERSION = 1
LOWER_IS_BETTER = {"bits_per_byte", "word_perplexity", "byte_perplexity", "token_perplexity", "loss", "kl"}
# numbers in a task's result that describe the run or the data, not the model: never shown or compared as metrics
NOT_METRICS = {"n", "num_fewshot", "num_samples", "stride", "max_length", "max_new_tokens", "temperature", "seed",
               "tokens", "words", "bytes", "reward_policy", "reward_reference"}


def metric_names(result: dict) -> list[str]:
    """A task result's metrics, in the order written: its numbers that are not standard errors or run settings."""
    return [k for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not k.endswith("_stderr") and k not in NOT_METRICS]


def git_commit() -> str | None:
    """The commit of the code that produced a report (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def build_report(model: dict, results: dict, config: dict, seed: int, wall_time: float) -> dict:
    """Assemble the report dict (model = {path, adapter, hash, tokenizer_hash, max_length})."""
    return {"schema_version": SCHEMA_VERSION, "model": model, "results": results, "config": config, "seed": seed,
            "git_commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(wall_time, 3)}


def _clean(v):
    """NaN/inf are not JSON: store them as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def load_report(path: str | Path) -> dict:
    """Read a report and check its schema version (an older or unknown schema is a user error)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: report not found")
    try:
        rep = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: undecodable bytes at byte {e.start}; expected a UTF-8 JSON report written by `align eval`") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not a JSON report ({e.msg} at line {e.lineno})") from None
    if not isinstance(rep, dict) or "schema_version" not in rep:
        raise UserError(f"{p}: no schema_version; expected a report written by `align eval`")
    if rep["schema_version"] != SCHEMA_VERSION:
        raise UserError(f"{p}: report schema version {rep['schema_version']}, expected {SCHEMA_VERSION}; re-run `align eval`")
    if not isinstance(rep.get("results"), dict) or not all(isinstance(r, dict) for r in rep["results"].values()):
        raise UserError(f"{p}: 'results' must be a mapping of task name to a mapping of metrics")
    if not isinstance(rep.get("model"), dict):
        raise UserError(f"{p}: 'model' must be a mapping (path, hash, tokenizer_hash); expected a report written by `align eval`")
    return rep


def fmt(v, metric: str = "") -> str:
    """A metric value for a table."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 or metric.startswith("acc") else f"{v:.2f}"
    return str(v)


def to_markdown(rep: dict) -> str:
    """Render a report as a Markdown page: a header with provenance, then one row per task."""
    m = rep["model"]
    lines = [f"# Eval report: `{m.get('path')}`", "",
             f"- model hash `{m.get('hash')}`, tokenizer hash `{m.get('tokenizer_hash')}`"
             + (f", adapter `{m['adapter']}`" if m.get("adapter") else ""),
             f"- schema {rep['schema_version']}, git `{(rep.get('git_commit') or '-')[:10]}`, {rep.get('date')}, "
             f"seed {rep.get('seed')}, wall time {rep.get('wall_time_s')} s", "",
             "| task | version | n | shots | scoring | metric | value | stderr |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rep["results"].items():
        for metric in metric_names(r):
            if r.get(metric) is not None:
                lines.append(f"| {name} | {r.get('version')} | {r.get('n')} | {r.get('num_fewshot')} | {r.get('scoring')} | "
                             f"{metric} | {fmt(r[metric], metric)} | {fmt(r.get(metric + '_stderr'))} |")
    return "\n".join(lines) + "\n"


def plot_report(rep: dict, path: str | Path) -> None:
    """Bar chart of accuracy-like metrics per task (with 1.96 stderr whiskers) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    names, vals, errs = [], [], []
    for name, r in rep["results"].items():
        for metric in ("acc", "win_rate", "bits_per_byte"):
            if r.get(metric) is not None:
                names.append(f"{name}\n{metric}")
                vals.append(r[metric])
                se = r.get(f"{metric}_stderr")
                errs.append(1.96 * se if se is not None and math.isfinite(se) else 0.0)
                break
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), vals, yerr=errs, capsize=3, color="#4C72B0")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_title(Path(rep["model"].get("path", "")).name or "report", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_report(rep: dict, path: str | Path, samples: list[dict] | None = None) -> dict:
    """Write FILE.json, FILE.md, FILE.png (and FILE.samples.jsonl when samples are given); returns the paths."""
    p = Path(path)
    if p.suffix != ".json":
        raise UserError(f"{p}: the report path must end in .json")
    rep = _clean(rep)
    atomic_write_json(p, rep)
    out = {"json": str(p), "markdown": str(p.with_suffix(".md")), "plot": str(p.with_suffix(".png"))}
    atomic_write_text(out["markdown"], to_markdown(rep))
    plot_report(rep, out["plot"])
    if samples is not None:
        out["samples"] = str(p.with_suffix(".samples.jsonl"))
        atomic_write_text(out["samples"], "".join(json.dumps(_clean(s), default=str) + "\n" for s in samples))
    return out


# ---------------------------------------------------------------------------------------------------- pipeline report

# the columns a reader compares across stages: (column, task, metric, chance or parity line for the plot)
PAIRED_COLUMN = "answer acc Δ vs SFT (paired)"
HEADLINE_COLUMNS = (
    ("bits/byte (held-out)", "perplexity", "bits_per_byte", None),
    ("MC acc (chance 0.25)", "mmlu", "acc", 0.25),
    ("answer accuracy", "answers", "answer_accuracy", None),
    (PAIRED_COLUMN, None, None, 0.0),
    ("well-formed, ends at <|im_end|>", "answers", "well_formed_rate", None),
    ("RM win rate vs SFT", "win_rate", "win_rate", 0.5),
    ("KL to SFT (nats)", "win_rate", "kl", None),
)


def _task_result(rep: dict, task: str) -> dict | None:
    """The result of `task` in a report: the task itself, or for mmlu the only mmlu_<subject> when there is one."""
    res = rep.get("results", {})
    if task in res:
        return res[task]
    if task == "mmlu":
        subjects = [k for k in res if k.startswith("mmlu_")]
        return res[subjects[0]] if len(subjects) == 1 else None
    return None


def headline_rows(reports: dict[str, dict]) -> dict[str, dict[str, tuple[float, float | None]]]:
    """Per model (name -> eval report): column -> (value, stderr) for the headline columns it measured."""
    out = {}
    for name, rep in reports.items():
        cells = {}
        for col, task, metric, _ in HEADLINE_COLUMNS:
            if task is None:  # computed across reports (add_paired_answer_deltas)
                continue
            r = _task_result(rep, task)
            if r is not None and isinstance(r.get(metric), (int, float)):
                cells[col] = (float(r[metric]), r.get(f"{metric}_stderr"))
        out[name] = cells
    return out


def paired_delta(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of b - a over the same items, and its standard error (paired: the items' own difficulty cancels)."""
    from alignment.stats import mean_stderr

    if len(a) != len(b) or not a:
        raise UserError(f"paired comparison: {len(a)} against {len(b)} items; expected the same items in both")
    return mean_stderr([y - x for x, y in zip(a, b)])


def answers_correct(samples_path: str | Path) -> list[float] | None:
    """Per-question correctness (1/0) of the answers task in a FILE.samples.jsonl, in question order (None without it)."""
    p = Path(samples_path)
    if not p.is_file():
        return None
    recs = [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    got = sorted((r["doc_id"], float(r["correct"])) for r in recs if r.get("task") == "answers")
    return [c for _, c in got] or None


def add_paired_answer_deltas(rows: dict[str, dict], correct: dict[str, list[float] | None], baseline: str = "sft") -> None:
    """Add the column 'answer acc Δ vs SFT (paired)' to each model's row: the difference in answer accuracy over the
    same held-out questions, with its paired standard error (what "beyond noise" is judged by)."""
    base = correct.get(baseline)
    for name, cells in rows.items():
        if name != baseline and base is not None and correct.get(name) is not None and len(correct[name]) == len(base):
            cells[PAIRED_COLUMN] = paired_delta(base, correct[name])


def headline_markdown(rows: dict[str, dict]) -> list[str]:
    """The headline table as Markdown lines: only the columns some model measured; 'mean ± stderr'."""
    cols = [c for c, *_ in HEADLINE_COLUMNS if any(c in cells for cells in rows.values())]
    if not cols:
        return []
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731
    lines = ["| model | " + " | ".join(esc(c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, cells in rows.items():
        vals = []
        for c in cols:
            v, se = cells.get(c, (None, None))
            num = f"{v:+.3f}" if c == PAIRED_COLUMN and v is not None else f"{v:.3f}" if v is not None else ""
            vals.append(num + (f" ± {se:.3f}" if v is not None and isinstance(se, (int, float)) and math.isfinite(se) else ""))
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return lines


def plot_headline(rows: dict[str, dict], path: str | Path) -> bool:
    """One panel per headline column: a bar per model with 1.96-stderr whiskers, and the chance (MC) or parity
    (win rate) line. Returns False when nothing was measured."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(c, line) for c, _, _, line in HEADLINE_COLUMNS if any(c in cells for cells in rows.values())]
    if not cols:
        return False
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2), squeeze=False)
    for ax, (col, line) in zip(axes[0], cols):
        names = [n for n in rows if col in rows[n]]
        vals = [rows[n][col][0] for n in names]
        errs = [1.96 * se if isinstance(se, (int, float)) and math.isfinite(se) else 0.0 for se in (rows[n][col][1] for n in names)]
        ax.bar(names, vals, yerr=errs, capsize=3, color="#4C72B0")
        if line is not None:
            ax.axhline(line, color="gray", ls="--", lw=1)
        ax.set_title(col, fontsize=8)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def _short(text, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"


def write_pipeline_report(out_dir: str | Path, recipe: str, timings: list[dict], reports: dict[str, dict],
                          samples: dict[str, list[dict]] | None = None, health: dict | None = None,
                          stage_metrics: dict | None = None, correct: dict[str, list[float] | None] | None = None) -> Path:
    """report.md (+ report.json, report_times.png, report_models.png) of a pipeline run: stage times, the headline
    table built from the models' eval reports (the numbers `align compare` shows), a panel per headline metric,
    the reward model's health, and a few sample answers per model (checked answers, else win-rate samples)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    lines = [f"# Report: {recipe}", "", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {t['name']} | {t['status']} | {t['seconds']:.1f} |" for t in timings]
    lines += ["", f"Total: {sum(t['seconds'] for t in timings):.1f} s", ""]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(timings) + 1))
    ax.barh([t["name"] for t in timings][::-1], [t["seconds"] for t in timings][::-1])
    ax.set_xlabel("seconds")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out / "report_times.png", buf.getvalue())
    lines += ["![stage times](report_times.png)", ""]
    rows = headline_rows(reports)
    add_paired_answer_deltas(rows, correct or {})
    table = headline_markdown(rows)
    if table:
        lines += ["## Models", "", "Values are mean ± one standard error, from each model's eval report "
                  "(`align compare` shows the same numbers); the full reports are listed in report.json.", ""] + table + [""]
        deltas = {n: c[PAIRED_COLUMN] for n, c in rows.items() if PAIRED_COLUMN in c}
        if deltas:
            beyond = [n for n, (d, se) in deltas.items() if isinstance(se, (int, float)) and math.isfinite(se) and d > 2 * se]
            lines += [("Answer accuracy beats SFT by more than two standard errors of the paired difference for: " + ", ".join(beyond) + ".")
                      if beyond else "No model's answer accuracy beats SFT by more than two standard errors of the paired difference "
                      "(the same held-out questions): at this scale that gain is within noise.", ""]
        if health:
            groups = health.get("eval_accuracy_by_group") or {}
            by = "".join(f"{', ' if i else '; by kind of rejected answer: '}{g} {v['accuracy']:.3f} ({v['pairs']})"
                         for i, (g, v) in enumerate(groups.items()))
            lines += [f"Reward model held-out pair accuracy: {health.get('eval_accuracy_before', float('nan')):.3f} before training -> "
                      f"{health['eval_accuracy']:.3f} after ({health.get('eval_pairs')} pairs; gate {health.get('min_eval_accuracy')}){by}.", ""]
        if plot_headline(rows, out / "report_models.png"):
            lines += ["![models](report_models.png)", ""]
    for name, recs in (samples or {}).items():
        if not recs:
            continue
        if "correct" in recs[0]:
            lines += [f"### Sample answers: {name}", ""]
            lines += [f"- Q: {s['question']} → {s['answer']!r} ({'correct' if s['correct'] else 'wrong'})" for s in recs]
        else:
            lines += [f"### Sample answers: {name} (sampled; reward-model score of this answer, then of the reference's)", ""]
            for r in recs:
                prompt = r["prompt"][-1]["content"] if isinstance(r["prompt"], list) else r["prompt"]
                lines.append(f"- Q: {_short(prompt, 100)} → {_short(r['policy_response'], 160)!r} ({r['policy_reward']:+.2f} vs "
                             f"{r['reference_reward']:+.2f})")
        lines.append("")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    flat = {name: {f"{c}": v for c, (v, _) in cells.items()} for name, cells in rows.items()}
    atomic_write_json(out / "report.json", {"recipe": recipe, "stages": timings, "headline": flat,
                                            "models": {n: rep.get("results", {}) for n, rep in reports.items()},
                                            "stage_metrics": stage_metrics or {}})
    return path
