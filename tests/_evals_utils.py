"""Helpers for the evals tests: a small MMLU subset on disk and an offline lm-eval 0.4.13 run for parity."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from conftest import SHARED

# CI: ../shared beside the clone (conftest.SHARED); a checkout elsewhere can point SHARED_DATA at the folder
MMLU = Path(os.environ.get("SHARED_DATA", SHARED), "eval", "mmlu").resolve()


def write_mmlu_subset(root: Path, subjects=("astronomy", "high_school_us_history"), n_test: int = 8) -> Path:
    """Copy the first n_test test rows and all dev rows of some shared subjects into root/{test,dev}/."""
    for split, n in (("test", n_test), ("dev", None)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in subjects:
            with open(MMLU / split / f"{s}_{split}.csv", newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
            rows = rows[: (n + 1) if n else None]
            with open(root / split / f"{s}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rows)
    return root


def run_lm_eval(model_dir, task_dir, tasks, num_fewshot=0, apply_chat_template=False, batch_size=4, limit=None):
    """lm-eval's simple_evaluate on local task YAMLs, offline, on CPU; returns its results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=list(tasks), num_fewshot=num_fewshot,
        batch_size=batch_size, device="cpu", log_samples=True, apply_chat_template=apply_chat_template, limit=limit,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), bootstrap_iters=0)


# ---------------------------------------------------------------------------------------------------- public layouts

_W = ("the cat dog bird sat ran saw a red blue green small big house tree river hill Alice Bob likes has is was and but "
      "then one two three four five six seven eight nine water light stone").split()
LM_EVAL_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "truthfulqa_mc1", "truthfulqa_mc2", "winogrande", "gsm8k")


def _words(rng, lo=3, hi=9) -> str:
    return " ".join(rng.choice(_W) for _ in range(rng.randint(lo, hi)))


def _jsonl(path: Path, rows) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_public_layouts(root: Path, n: int = 10, n_train: int = 6, seed: int = 0, length: tuple = (3, 9)) -> dict:
    """Small files of every built-in task in a public layout under root, as people download them (written here, not
    downloaded), and the same items in the hub layout for lm-eval. Returns {task: {split: hub rows}}.

    arc_challenge: original ARC JSONL (3-5 choices, labels A-E or 1-4); arc_easy: hub parquet; hellaswag: original
    JSONL with [title] and [step] markers; piqa: X.jsonl + X-labels.lst; truthfulqa: original mc_task.json;
    winogrande: JSONL with a blank; gsm8k: grade-school-math JSONL with "#### N" answers."""
    import json
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    lo, hi = length
    hub: dict = {}

    def arc(k):
        rows = []
        for i in range(k):
            m = rng.randint(3, 5)
            labels = list("ABCDE"[:m]) if m == 5 or rng.random() < 0.6 else list("1234"[:m])
            texts = list(dict.fromkeys(_words(rng, 1, 4) for _ in range(m + 3)))[:m]
            rows.append({"id": f"q{i}", "question": _words(rng, lo, hi).capitalize() + "?", "choices": {"text": texts, "label": labels},
                         "answerKey": rng.choice(labels)})
        return rows

    for task, folder in (("arc_challenge", "ARC-Challenge"), ("arc_easy", "ARC-Easy")):
        splits = {"train": arc(n_train), "test": arc(n)}
        hub[task] = splits
        for split, rows in splits.items():
            if task == "arc_challenge":  # the original layout: question.stem, question.choices[{text, label}]
                orig = [{"id": r["id"], "question": {"stem": r["question"], "choices": [{"text": t, "label": lab} for t, lab in
                                                                                      zip(r["choices"]["text"], r["choices"]["label"])]},
                         "answerKey": r["answerKey"]} for r in rows]
                _jsonl(root / "ARC-V1-Feb2018-2" / folder / f"{folder}-{split.capitalize()}.jsonl", orig)
            else:  # the hub's parquet
                d = root / "ai2_arc" / folder
                d.mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.Table.from_pylist(rows), d / f"{split}-00000-of-00001.parquet")

    def hella(k):
        rows = []
        for i in range(k):
            ctx_a = _words(rng, lo, hi).capitalize() + "."
            ctx_b = _words(rng, 2, 5) + (" [title]" if rng.random() < 0.3 else "")
            endings = [_words(rng, 3, 8) + rng.choice(["", " [step] next", "  twice", " [title] Go on"]) + "." for _ in range(4)]
            rows.append({"ind": i, "activity_label": rng.choice(["Making tea", "Walking the dog", "Home and Garden"]), "ctx_a": ctx_a,
                         "ctx_b": ctx_b, "ctx": ctx_a + " " + ctx_b, "endings": endings, "source_id": f"s{i}", "split": "val",
                         "split_type": "indomain", "label": rng.randint(0, 3)})
        return rows

    splits = {"train": hella(n_train), "validation": hella(n)}
    for split, rows in splits.items():
        _jsonl(root / "hellaswag" / f"hellaswag_{'val' if split == 'validation' else 'train'}.jsonl", rows)
    hub["hellaswag"] = {s: [dict(r, label=str(r["label"])) for r in rows] for s, rows in splits.items()}

    def piqa(k):
        return [{"goal": _words(rng, lo, hi).capitalize() + "?", "sol1": _words(rng, 2, 7), "sol2": _words(rng, 2, 7),
                 "label": rng.randint(0, 1)} for _ in range(k)]

    splits = {"train": piqa(n_train), "validation": piqa(n)}
    for split, rows in splits.items():
        stem = "valid" if split == "validation" else "train"
        _jsonl(root / "piqa" / f"{stem}.jsonl", [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"]} for r in rows])
        (root / "piqa" / f"{stem}-labels.lst").write_text("".join(f"{r['label']}\n" for r in rows))
    hub["piqa"] = splits

    tqa = []
    for i in range(n):
        answers = list(dict.fromkeys(_words(rng, 2, 6).capitalize() + "." for _ in range(8)))
        k1, k2 = rng.randint(2, 5), rng.randint(3, 6)
        mc2_labels = [1] * rng.randint(1, k2 - 1)
        mc2_labels += [0] * (k2 - len(mc2_labels))
        tqa.append({"question": _words(rng, lo, hi).capitalize() + "?", "mc1_targets": {"choices": answers[:k1], "labels": [1] + [0] * (k1 - 1)},
                    "mc2_targets": {"choices": answers[:k2], "labels": mc2_labels}})
    orig = [{"question": r["question"], **{k: dict(zip(r[k]["choices"], r[k]["labels"])) for k in ("mc1_targets", "mc2_targets")}} for r in tqa]
    (root / "TruthfulQA" / "data").mkdir(parents=True, exist_ok=True)
    (root / "TruthfulQA" / "data" / "mc_task.json").write_text(json.dumps(orig, indent=1))
    hub["truthfulqa_mc1"] = hub["truthfulqa_mc2"] = {"validation": tqa}

    def wino(k):
        rows = []
        for i in range(k):
            o1, o2 = rng.sample(["Alice", "Bob", "the cat", "the dog", "the bird"], 2)
            sentence = f"{o1.capitalize()} saw {o2} because _ {_words(rng, 2, hi)}."
            rows.append({"qID": f"w{i}", "sentence": sentence, "option1": o1, "option2": o2, "answer": rng.choice(["1", "2"])})
        return rows

    splits = {"train": wino(n_train), "validation": wino(n)}
    for split, rows in splits.items():
        _jsonl(root / "winogrande_1.1" / ("dev.jsonl" if split == "validation" else "train_xl.jsonl"), rows)
    hub["winogrande"] = splits

    def gsm(k):
        rows = []
        for i in range(k):
            a, b = rng.randint(2, 99), rng.randint(2, 999)
            total = rng.choice([f"{a * b:,}", str(a + b), f"-{a}", f"{a}.5"])
            rows.append({"question": f"{_words(rng, lo, hi).capitalize()} has {a} and {b}. How many?",
                         "answer": f"{_words(rng, 2, 6)} <<{a}+{b}={a + b}>>{a + b} then ${b}.\n#### {total}"})
        return rows

    splits = {"train": gsm(n_train), "test": gsm(n)}
    for split, rows in splits.items():
        _jsonl(root / "grade_school_math" / "data" / f"{split}.jsonl", rows)
    hub["gsm8k"] = splits
    return hub
