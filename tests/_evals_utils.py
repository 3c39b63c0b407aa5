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
