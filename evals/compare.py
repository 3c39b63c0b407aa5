"""`align compare`: eval reports side by side, deltas against the first, deltas within noise marked.

    align compare runs/tiny/eval/base.json runs/tiny/eval/sft.json runs/tiny/eval/dpo.json --output runs/tiny/eval/compare.md

One row per (task, metric) for every metric of every task, one column per report. A delta is marked `~` (noise)
when it is within two standard errors of the difference, sqrt(se_a^2 + se_b^2) * 2. A task is comparable only when
its protocol agrees across reports (version, n, n-shot, scoring, chat template and few-shot turns), the items actually
scored are the same (their hash), preference tasks used the same reward and reference models and sampling settings,
and perplexities come from the same tokenizer (bits per byte excepted: it does not depend on the tokenizer);
otherwise compare refuses (exit status 2) naming the difference, unless --force. Writes Markdown and a PNG.
"""

from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from alignment.config import parse_config
from alignment.errors import UserError, exit_on_user_error
from alignment.io import atomic_write_bytes, atomic_write_text

from .report import LOWER_IS_BETTER, fmt, load_report, metric_names

# what must agree for two numbers of a task to be comparable: the protocol, the items actually scored (their hash), the
# judge and the reference of preference tasks, and how responses were sampled
PROTOCOL_KEYS = ("version", "n", "num_fewshot", "scoring", "apply_chat_template", "fewshot_as_multiturn", "stride",
                 "data_hash", "reward_model_hash", "reference_model_hash", "temperature", "max_new_tokens", "num_samples")
TOKENIZER_DEPENDENT = {"word_perplexity", "byte_perplexity", "token_perplexity", "loss"}


@dataclass
class CompareConfig:
    """Reports to compare and where to write the table."""

    reports: list[str] = field(default_factory=list, metadata={"help": "Report JSON files; the first is the baseline."})
    output: str | None = field(default=None, metadata={"help": "Markdown path (default: compare.md beside the first report); a .png is written "
                                                               "beside it."})
    labels: list[str] = field(default_factory=list, metadata={"help": "Column names (default: each report's file stem)."})
    force: bool = field(default=False, metadata={"help": "Compare even when protocols or tokenizers differ (marked in the table)."})


def check_comparable(reports: list[dict], names: list[str], force: bool = False) -> list[str]:
    """Problems that make a comparison dishonest; raises UserError for them unless force (then returns them)."""
    problems = []
    tasks = sorted({t for r in reports for t in r["results"]})
    for t in tasks:
        present = [(n, r["results"][t]) for n, r in zip(names, reports) if t in r["results"]]
        for key in PROTOCOL_KEYS:
            values = {repr(res.get(key)) for _, res in present}
            if len(values) > 1:
                problems.append(f"task {t}: {key} differs (" + ", ".join(f"{n}={res.get(key)}" for n, res in present) + ")")
        if any(m in res for _, res in present for m in TOKENIZER_DEPENDENT):
            toks = {r["model"].get("tokenizer_hash") for n, r in zip(names, reports) if t in r["results"]}
            if len(toks) > 1:
                problems.append(f"task {t}: perplexities from different tokenizers ({', '.join(sorted(map(str, toks)))}); "
                                "only bits_per_byte compares across tokenizers")
    if problems and not force:
        raise UserError(f"{problems[0]}; pass --force true to compare anyway")
    return problems


def compare(reports: list[dict], names: list[str], force: bool = False) -> tuple[list[dict], list[str]]:
    """Rows {task, metric, values[], deltas[], noise[]} for every metric of every task, and the protocol problems."""
    problems = check_comparable(reports, names, force)
    rows = []
    tasks = list(dict.fromkeys(t for r in reports for t in r["results"]))
    for t in tasks:
        metrics = list(dict.fromkeys(m for r in reports if t in r["results"] for m in metric_names(r["results"][t])))
        for metric in metrics:
            vals = [r["results"].get(t, {}).get(metric) for r in reports]
            if all(v is None for v in vals) or not all(isinstance(v, (int, float)) or v is None for v in vals):
                continue
            ses = [r["results"].get(t, {}).get(f"{metric}_stderr") for r in reports]
            deltas, noise = [None], [False]
            for v, se in zip(vals[1:], ses[1:]):
                if v is None or vals[0] is None:
                    deltas.append(None)
                    noise.append(False)
                    continue
                d = v - vals[0]
                s = math.sqrt((ses[0] or 0.0) ** 2 + (se or 0.0) ** 2) if ses[0] is not None and se is not None else None
                deltas.append(d)
                noise.append(s is not None and abs(d) <= 2 * s)
            rows.append({"task": t, "metric": metric, "values": vals, "stderrs": ses, "deltas": deltas, "noise": noise,
                         "lower_is_better": metric in LOWER_IS_BETTER})
    return rows, problems


def to_markdown(rows: list[dict], names: list[str], problems: list[str]) -> str:
    """The comparison table: value (delta vs the first column; ~ = within 2 standard errors)."""
    lines = ["# Eval comparison", "", f"Baseline: **{names[0]}**. Deltas are against it; `~` marks a delta within "
             "2 standard errors (noise). (lower is better for perplexities, bits/byte and KL)", ""]
    if problems:
        lines += ["**Forced comparison; protocols differ:**", ""] + [f"- {p}" for p in problems] + [""]
    lines += ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for i, (v, se) in enumerate(zip(r["values"], r["stderrs"])):
            cell = fmt(v, r["metric"]) + (f" ± {fmt(se)}" if se is not None and v is not None else "")
            if i and r["deltas"][i] is not None:
                cell += f" ({r['deltas'][i]:+.4f}{' ~' if r['noise'][i] else ''})"
            cells.append(cell)
        lines.append(f"| {r['task']} | {r['metric']}{' ↓' if r['lower_is_better'] else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], names: list[str], path: str | Path) -> None:
    """Grouped bar chart: one group per (task, metric), one bar per report, 1.96 stderr whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if r["metric"] in ("acc", "acc_norm", "bits_per_byte", "win_rate", "margin")] or rows
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) * max(1, len(names)) / 2 + 2), 4))
    x = np.arange(len(rows))
    w = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        vals = [r["values"][j] if r["values"][j] is not None else 0.0 for r in rows]
        errs = [1.96 * r["stderrs"][j] if r["stderrs"][j] is not None else 0.0 for r in rows]
        ax.bar(x + j * w - 0.4 + w / 2, vals, w, yerr=errs, capsize=2, label=n)
    ax.set_xticks(x, [f"{r['task']}\n{r['metric']}" for r in rows], rotation=60, ha="right", fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(cfg: CompareConfig) -> str:
    """Load, check, tabulate; write Markdown + PNG; print the table; returns the Markdown."""
    if len(cfg.reports) < 2:
        raise UserError("compare: expected at least two report files")
    reports = [load_report(p) for p in cfg.reports]
    names = list(cfg.labels) or [Path(p).stem for p in cfg.reports]
    if len(names) != len(reports):
        raise UserError(f"labels: expected {len(reports)} labels, got {len(names)}")
    rows, problems = compare(reports, names, cfg.force)
    md = to_markdown(rows, names, problems)
    out = Path(cfg.output) if cfg.output else Path(cfg.reports[0]).with_name("compare.md")
    atomic_write_text(out, md)
    plot(rows, names, out.with_suffix(".png"))
    print(md)
    print(f"compare: {len(rows)} rows -> {out} (+ .png)", file=sys.stderr)
    return md


@exit_on_user_error
def cli(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # positional report files are the natural spelling: `align compare A.json B.json`
    files = []
    while argv and not argv[0].startswith("--"):
        files.append(argv.pop(0))
    (cfg,) = parse_config([CompareConfig], (["--reports", *files] if files else []) + argv)
    main(cfg)


if __name__ == "__main__":
    cli()
