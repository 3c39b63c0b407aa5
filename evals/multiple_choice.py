"""MMLU-style multiple choice: letter or cloze scoring, k-shot from the dev split, the protocol of lm-eval 0.4.13.

    align eval --model runs/tiny/sft/merged --tasks mmlu --mmlu_dir ../shared/data/eval/mmlu --num_fewshot 5

A task is a data spec with a version (`MCTask`). The prompt for one question, letter scoring (lm-eval `mmlu`):

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {dev question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}\\n\\n     (k times, the first k dev rows)
    {question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

and the four continuations " A".." D". Cloze scoring (lm-eval `mmlu_continuation`) uses "Question: {question}\\nAnswer:"
and the full answer texts as continuations; `acc_norm` divides each log-likelihood by the answer's characters.
With a chat template (lm-eval `--apply_chat_template`) the header is a system message, shots and question one user
message, the generation prompt follows, and the target delimiter is empty.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignment.data import fingerprint
from alignment.errors import UserError
from alignment.tokens import encode_chat, encode_text

from .scoring import ScoringModel, encode_pair, loglikelihoods

LETTERS = ("A", "B", "C", "D")
MC_VERSION = "1.0"  # bump when the prompt, choices or metric computation change
HEADERS = {
    "letter": "The following are multiple choice questions (with answers) about {subject}.\n\n",
    "cloze": "The following are questions (with answers) about {subject}.\n\n",
}


@dataclass
class MCTask:
    """One multiple-choice subject: where its rows come from and how they become prompts."""

    subject: str
    test: list[dict]
    dev: list[dict] = field(default_factory=list)
    source: str = ""
    version: str = MC_VERSION

    @property
    def name(self) -> str:
        return f"mmlu_{self.subject}"


def _answer_index(value, where: str) -> int:
    s = str(value).strip()
    if s in LETTERS:
        return LETTERS.index(s)
    if s in ("0", "1", "2", "3"):
        return int(s)
    raise UserError(f"{where}: answer {s!r} is not one of A-D or 0-3")


def _row(question, choices, answer, where: str) -> dict:
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: expected a non-empty question")
    if not isinstance(choices, (list, tuple)) or len(choices) != 4:
        n = len(choices) if isinstance(choices, (list, tuple)) else type(choices).__name__
        raise UserError(f"{where}: expected 4 choices, got {n}")
    return {"question": question, "choices": [str(c) for c in choices], "answer": _answer_index(answer, where)}


def read_mc_rows(path: str | Path) -> list[dict]:
    """Rows {question, choices, answer(0-3), subject?} of an MMLU file, read by the suite's one reader
    (alignment.data): original CSV (no header, letter answers), CSV with header `question,choice0..choice3,answer`,
    or JSONL/parquet in the cais/mmlu layout."""
    from alignment.data import read_file_rows, read_text

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: task file not found")
    if p.suffix not in (".csv", ".jsonl", ".parquet"):
        raise UserError(f"{p}: unsupported task file type; expected .csv, .jsonl or .parquet")
    rows: list[dict] = []
    if p.suffix == ".csv":
        first = next(csv.reader(io.StringIO(read_text(p))), [])
        header = [c.strip().lower() for c in first[:1]] == ["question"]
        width = len(first)
        if width < 3:
            raise UserError(f"{p}:1: expected question, 4 choices and answer, got {width} fields")
        names = None if header else ["question"] + [f"choice{i}" for i in range(width - 2)] + ["answer"]
        for r in read_file_rows(p, fieldnames=names):
            cells = list(r.data.values())
            rows.append(_row(cells[0], cells[1:-1], cells[-1], r.where))
    else:
        for r in read_file_rows(p):
            rec = r.data
            if not isinstance(rec, dict) or not {"question", "choices", "answer"} <= set(rec):
                raise UserError(f"{r.where}: expected fields question, choices, answer (cais/mmlu layout)")
            row = _row(rec["question"], rec["choices"], rec["answer"], r.where)
            if rec.get("subject"):
                row["subject"] = str(rec["subject"])
            rows.append(row)
    if not rows:
        raise UserError(f"{p}: no questions in the file")
    return rows


def _subject_of(path: Path, split: str) -> str:
    return re.sub(rf"_{split}$", "", path.stem)


def load_tasks(mmlu_dir: str | None = None, test_files: list[str] | None = None, dev_files: list[str] | None = None,
               subjects: list[str] | None = None) -> list[MCTask]:
    """Build one MCTask per subject from an MMLU directory (dev/ and test/) or explicit test/dev files."""
    tests: list[Path] = [Path(f) for f in (test_files or [])]
    devs: list[Path] = [Path(f) for f in (dev_files or [])]
    if mmlu_dir:
        d = Path(mmlu_dir)
        if not (d / "test").is_dir():
            raise UserError(f"{d}: expected an MMLU directory with test/ (and dev/) subfolders")
        tests += sorted(p for p in (d / "test").iterdir() if p.suffix in (".csv", ".jsonl", ".parquet"))
        if (d / "dev").is_dir():
            devs += sorted(p for p in (d / "dev").iterdir() if p.suffix in (".csv", ".jsonl", ".parquet"))
    if not tests:
        raise UserError("mmlu: no task files; set mmlu_dir or mmlu_test_files")
    by_subject: dict[str, MCTask] = {}
    dev_rows: dict[str, list[dict]] = {}
    for path in devs:
        for r in read_mc_rows(path):
            dev_rows.setdefault(r.get("subject") or _subject_of(path, "dev"), []).append(r)
    for path in tests:
        for r in read_mc_rows(path):
            subj = r.get("subject") or _subject_of(path, "test")
            task = by_subject.setdefault(subj, MCTask(subject=subj, test=[], source=str(path)))
            task.test.append(r)
    for subj, task in by_subject.items():
        task.dev = dev_rows.get(subj, [])
    if subjects:
        missing = [s for s in subjects if s not in by_subject]
        if missing:
            raise UserError(f"mmlu: subject(s) {', '.join(missing)} not found; available: {', '.join(sorted(by_subject))}")
        by_subject = {s: by_subject[s] for s in subjects}
    return [by_subject[s] for s in sorted(by_subject)]


def doc_to_text(row: dict, scoring: str) -> str:
    """The question part of a prompt (lm-eval's doc_to_text for mmlu / mmlu_continuation)."""
    q = row["question"].strip()
    if scoring == "letter":
        return q + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, row["choices"])) + "\nAnswer:"
    return f"Question: {q}\nAnswer:"


def choices_of(row: dict, scoring: str) -> list[str]:
    """The continuations that are scored (without the target delimiter)."""
    return list(LETTERS) if scoring == "letter" else list(row["choices"])


def build_context(task: MCTask, row: dict, num_fewshot: int, scoring: str, tokenizer=None, chat: bool = False,
                  multiturn: bool = True):
    """The context of one question: a string (plain) or, with a chat template, the rendered token ids.

    With a chat template the header is the system message; shots are user/assistant turns (`multiturn`, lm-eval's
    default with --apply_chat_template) or are folded into the one user message."""
    if num_fewshot > len(task.dev):
        raise UserError(f"mmlu_{task.subject}: num_fewshot={num_fewshot} but the dev split has {len(task.dev)} rows")
    header = HEADERS[scoring].format(subject=task.subject.replace("_", " "))
    shots = [(doc_to_text(r, scoring), choices_of(r, scoring)[r["answer"]]) for r in task.dev[:num_fewshot]]
    question = doc_to_text(row, scoring)
    if not chat:
        return header + "".join(f"{q} {a}\n\n" for q, a in shots) + question
    messages = [{"role": "system", "content": header}]
    if multiturn:
        for q, a in shots:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": question})
    else:
        messages.append({"role": "user", "content": "".join(f"{q} {a}\n\n" for q, a in shots) + question})
    return encode_chat(tokenizer, messages, add_generation_prompt=True)["input_ids"]


def _split_trailing_space(tok, ids: list[int]) -> tuple[list[int], str]:
    """Move the context's trailing whitespace tokens (the template's "\\n" after "assistant") to the continuation,
    as lm-eval's _encode_pair does with the rendered string; token level, so data text stays special-token safe."""
    ids = list(ids)
    space = ""
    while ids and (piece := tok.decode(ids[-1:])) and not piece.strip():
        space = piece + space
        ids.pop()
    return ids, space


def _mean_stderr(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def evaluate_mc(lm: ScoringModel, tasks: list[MCTask], num_fewshot: int = 0, scoring: str = "letter",
                apply_chat_template: bool = False, batch_size: int = 16, limit: int | None = None,
                progress: bool = True, fewshot_as_multiturn: bool = True) -> tuple[dict, list[dict]]:
    """Score every task; returns (results by task name + aggregate 'mmlu', per-item sample records)."""
    if scoring not in HEADERS:
        raise UserError(f"scoring: {scoring!r} is not one of letter, cloze")
    tok = lm.tokenizer
    # data text never becomes a control id; memoized because the four choices of a question share a context
    enc_cached = functools.lru_cache(maxsize=4096)(lambda s: tuple(encode_text(tok, s)))
    enc = lambda s: list(enc_cached(s))  # noqa: E731
    requests, owners = [], []  # owners[i] = (task index, row index, choice index)
    for ti, task in enumerate(tasks):
        for ri, row in enumerate(task.test[:limit] if limit else task.test):
            ctx = build_context(task, row, num_fewshot, scoring, tok, apply_chat_template, fewshot_as_multiturn)
            for ci, choice in enumerate(choices_of(row, scoring)):
                if apply_chat_template:  # lm-eval: empty target delimiter after the generation prompt
                    ctx_ids, space = _split_trailing_space(tok, ctx)
                    requests.append((ctx_ids, encode_text(tok, space + choice)))
                else:
                    requests.append(encode_pair(tok, ctx, " " + choice, enc))
                owners.append((ti, ri, ci))
    scores = loglikelihoods(lm, requests, batch_size=batch_size, desc=f"mmlu {scoring} {num_fewshot}-shot", progress=progress)
    lls: dict[tuple[int, int], list[float]] = {}
    for (ti, ri, ci), (ll, _, _) in zip(owners, scores):
        lls.setdefault((ti, ri), []).append(ll)
    results, samples = {}, []
    all_acc, all_norm = [], []
    for ti, task in enumerate(tasks):
        acc, acc_norm = [], []
        rows = task.test[:limit] if limit else task.test
        for ri, row in enumerate(rows):
            ll = np.array(lls[(ti, ri)])
            choices = choices_of(row, scoring)
            pred = int(np.argmax(ll))
            pred_norm = int(np.argmax(ll / np.array([float(len(c)) for c in choices])))
            acc.append(float(pred == row["answer"]))
            acc_norm.append(float(pred_norm == row["answer"]))
            samples.append({"task": task.name, "doc_id": ri, "target": row["answer"], "loglikelihoods": ll.tolist(),
                            "pred": pred, "pred_norm": pred_norm, "acc": acc[-1], "acc_norm": acc_norm[-1]})
        a, an = np.array(acc), np.array(acc_norm)
        results[task.name] = _mc_metrics(a, an, scoring)
        results[task.name].update(task=task.name, version=task.version, n=len(rows), num_fewshot=num_fewshot,
                                  data_hash=fingerprint(rows + task.dev[:num_fewshot]),
                                  scoring=scoring, apply_chat_template=apply_chat_template, source=task.source,
                                  fewshot_as_multiturn=apply_chat_template and fewshot_as_multiturn)
        all_acc.append(a)
        all_norm.append(an)
    if len(tasks) > 1:
        micro = _mc_metrics(np.concatenate(all_acc), np.concatenate(all_norm), scoring)
        macro = [float(a.mean()) for a in all_acc]
        # macro stderr: the subject means are independent, so Var(mean of means) = sum(se^2) / k^2
        macro_se = math.sqrt(sum(_mean_stderr(a) ** 2 for a in all_acc)) / len(all_acc)
        micro.update(task="mmlu", version=MC_VERSION, n=int(sum(len(a) for a in all_acc)), num_fewshot=num_fewshot,
                     data_hash=fingerprint([results[t.name]["data_hash"] for t in tasks]),
                     scoring=scoring, apply_chat_template=apply_chat_template, subjects=[t.subject for t in tasks],
                     acc_macro=float(np.mean(macro)), acc_macro_stderr=macro_se)
        results["mmlu"] = micro
    return results, samples


def _mc_metrics(acc: np.ndarray, acc_norm: np.ndarray, scoring: str) -> dict:
    out = {"acc": float(acc.mean()), "acc_stderr": _mean_stderr(acc),
           # chance-centred: 0 at random guessing (1/4), 1 at perfect
           "acc_centered": float((acc.mean() - 0.25) / 0.75)}
    if scoring == "cloze":
        out.update(acc_norm=float(acc_norm.mean()), acc_norm_stderr=_mean_stderr(acc_norm))
    return out
