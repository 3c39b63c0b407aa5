"""Local lm-evaluation-harness task YAMLs for the same items we score, so the two can be compared item by item.

    python -m evals.tasks.lm_eval_tasks --mmlu_dir ../shared/data/eval/mmlu --out runs/lm_eval_tasks
    lm_eval --model hf --model_args pretrained=runs/base --include_path runs/lm_eval_tasks --tasks local_mmlu_astronomy

The MMLU files are rewritten in the cais/mmlu layout (question, subject, choices, answer as JSONL) so lm-eval reads
exactly the strings we read (its CSV loader would turn choices like "0" or "1.5" into numbers). The prompts are
lm-eval 0.4.13's own `mmlu` (letter) and `mmlu_continuation` (cloze) templates, copied as data. Perplexity uses a
`loglikelihood_rolling` task over a JSONL `text` column, as lm-eval's wikitext task does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from evals.multiple_choice import HEADERS, MCTask

LETTER_TEXT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
CLOZE_TEXT = "Question: {{question.strip()}}\nAnswer:"


def _jsonl(path: Path, rows: list[dict], subject: str) -> str:
    path.write_text("".join(json.dumps({"question": r["question"], "subject": subject, "choices": r["choices"],
                                        "answer": r["answer"]}) + "\n" for r in rows))
    return str(path.resolve())


def write_mc_tasks(tasks: list[MCTask], out_dir: str | Path, scoring: str = "letter", limit: int | None = None) -> list[str]:
    """Write data + one YAML per subject; returns the lm-eval task names (local_mmlu_<subject>[_cloze])."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for t in tasks:
        rows = t.test[:limit] if limit else t.test
        test = _jsonl(out / f"{t.subject}_test.jsonl", rows, t.subject)
        dev = _jsonl(out / f"{t.subject}_dev.jsonl", t.dev, t.subject)
        name = f"local_mmlu_{t.subject}" + ("_cloze" if scoring == "cloze" else "")
        spec = {
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": test, "dev": dev}},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "description": HEADERS[scoring].format(subject=t.subject.replace("_", " ")),
            "doc_to_text": LETTER_TEXT if scoring == "letter" else CLOZE_TEXT,
            "doc_to_choice": ["A", "B", "C", "D"] if scoring == "letter" else "{{choices}}",
            "doc_to_target": "answer" if scoring == "letter" else "{{answer}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
            + ([{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}] if scoring == "cloze" else []),
            "metadata": {"version": 1.0},
        }
        (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
        names.append(name)
    return names


def write_perplexity_task(documents: list[str], out_dir: str | Path, name: str = "local_perplexity") -> str:
    """Write documents as JSONL + a loglikelihood_rolling task YAML; returns the task name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
            "metadata": {"version": 1.0}}
    (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return name


def main(argv=None) -> None:
    from evals.multiple_choice import load_tasks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mmlu_dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scoring", default="letter", choices=["letter", "cloze"])
    args = ap.parse_args(argv)
    print("\n".join(write_mc_tasks(load_tasks(args.mmlu_dir), args.out, args.scoring)))


if __name__ == "__main__":
    main()
