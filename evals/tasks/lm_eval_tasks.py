"""lm-evaluation-harness task YAMLs for the same items we score, so the two can be compared item by item.

    python -m evals.tasks.lm_eval_tasks --mmlu_dir ../shared/data/eval/mmlu --out runs/lm_eval_tasks
    lm_eval --model hf --model_args pretrained=runs/base --include_path runs/lm_eval_tasks --tasks local_mmlu_astronomy

- `write_lm_eval_task`: lm-eval's OWN task YAML for a task (arc_easy, hellaswag, gsm8k, ...: `include:` of the file in
  the installed lm_eval package) pointed at local JSONL files in the hub layout, so lm-eval runs its definition on our
  files.
- `write_mc_tasks`: MMLU subjects as local tasks, the files rewritten in the cais/mmlu layout (question, subject,
  choices, answer as JSONL) so lm-eval reads exactly the strings we read (its CSV loader would turn choices like "0"
  or "1.5" into numbers); the prompts are lm-eval 0.4.13's `mmlu` (letter) and `mmlu_continuation` (cloze) templates.
- `write_perplexity_task`: a `loglikelihood_rolling` task over a JSONL `text` column, as lm-eval's wikitext task does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

# our spec name -> lm-eval 0.4.13's YAML for the same task, relative to lm_eval/tasks
LM_EVAL_YAML = {
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml", "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml",
    "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml", "winogrande": "winogrande/default.yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",
}
HEADERS = {
    "letter": "The following are multiple choice questions (with answers) about {subject}.\n\n",
    "cloze": "The following are questions (with answers) about {subject}.\n\n",
}
LETTER_TEXT = ("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}"
               "\nAnswer:")
CLOZE_TEXT = "Question: {{question.strip()}}\nAnswer:"


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path.resolve())


def write_lm_eval_task(task: str, splits: dict[str, list[dict]], out_dir: str | Path, name: str | None = None) -> str:
    """lm-eval's own YAML for `task`, reading `splits` (split name -> rows in the hub layout) from local JSONL files;
    returns the task name to pass to lm-eval (default local_<task>)."""
    import lm_eval

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or f"local_{task}"
    files = {split: _write_jsonl(out / f"{name}_{split}.jsonl", rows) for split, rows in splits.items()}
    base = Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAML[task]
    spec = {"include": str(base), "task": name, "tag": [], "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": files}}
    (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return name


def write_mc_tasks(tasks, out_dir: str | Path, scoring: str = "letter", limit: int | None = None) -> list[str]:
    """MMLU subjects (TaskData of the mmlu spec) as local lm-eval tasks: data + one YAML per subject; returns the task
    names (local_mmlu_<subject>[_cloze])."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for t in tasks:
        subject = t.name[len("mmlu_"):]
        rows = t.docs[:limit] if limit else t.docs

        def cais(docs):
            return [{"question": d["question"], "subject": subject, "choices": d["choices"], "answer": d["answer"]}
                    for d in docs]

        test = _write_jsonl(out / f"{subject}_test.jsonl", cais(rows))
        dev = _write_jsonl(out / f"{subject}_dev.jsonl", cais(t.pool or rows))  # (0-shot: never read, but must exist)
        name = f"local_mmlu_{subject}" + ("_cloze" if scoring == "cloze" else "")
        spec = {
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": test, "dev": dev}},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "description": HEADERS[scoring].format(subject=subject.replace("_", " ")),
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
            "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
            "metadata": {"version": 1.0}}
    (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return name


def mmlu_tasks(mmlu_dir: str | Path, scoring: str = "letter", num_fewshot: int = 0, limit: int | None = None,
               subjects: list[str] | None = None):
    """The mmlu spec's subjects read from an MMLU directory (test/, dev/), as `align eval --tasks mmlu` reads them."""
    from evals.taskdata import load_task
    from evals.taskspec import load_spec

    spec = load_spec("mmlu" if scoring == "letter" else "mmlu_continuation")
    spec.task = "mmlu"
    return load_task(spec, task_data={"mmlu": {None: str(mmlu_dir)}}, num_fewshot=num_fewshot, limit=limit,
                     subtasks=subjects)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mmlu_dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scoring", default="letter", choices=["letter", "cloze"])
    args = ap.parse_args(argv)
    print("\n".join(write_mc_tasks(mmlu_tasks(args.mmlu_dir, args.scoring), args.out, args.scoring)))


if __name__ == "__main__":
    main()
