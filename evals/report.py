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
# metrics shown in tables, in this order; lower is better for the perplexity family
HEADLINE = ("acc", "acc_norm", "acc_macro", "acc_centered", "bits_per_byte", "word_perplexity", "byte_perplexity",
            "token_perplexity", "margin", "win_rate", "kl")
LOWER_IS_BETTER = {"bits_per_byte", "word_perplexity", "byte_perplexity", "token_perplexity", "loss", "kl"}


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
        rep = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not a JSON report ({e.msg} at line {e.lineno})") from None
    if not isinstance(rep, dict) or "schema_version" not in rep:
        raise UserError(f"{p}: no schema_version; expected a report written by `align eval`")
    if rep["schema_version"] != SCHEMA_VERSION:
        raise UserError(f"{p}: report schema version {rep['schema_version']}, expected {SCHEMA_VERSION}; re-run `align eval`")
    if not isinstance(rep.get("results"), dict):
        raise UserError(f"{p}: 'results' must be a mapping of task name to metrics")
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
        for metric in HEADLINE:
            if metric in r:
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
