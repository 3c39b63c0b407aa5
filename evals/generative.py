"""Generative tasks: greedy answers to questions, checked against the ground truth.

    align eval --model runs/tiny/sft/merged --tasks answers --answer_files runs/tiny/data/qa/test.jsonl

`answers` (the tiny world's answer accuracy): each row of the file is a prompt row with its ground truth (the fields
`alignment.tinyworld.check` reads: answer, kind, entity, choices). The model answers greedily through the suite's one
sampler (batched, KV cache, stops at end of turn), and each answer is scored by the tiny-world checker: it states the
answer and no competing value. Also reported: the well-formed rate (ended at <|im_end|>, one short sentence, no role
markers) and how often generation stopped before max_new_tokens.
"""

from __future__ import annotations

from alignment.data import fingerprint
from alignment.errors import UserError
from alignment.stats import mean_stderr

from .scoring import ScoringModel

ANSWERS_VERSION = "1.0"
CHECKERS = ("tinyworld",)


def read_answer_rows(paths: list[str], checker: str, limit: int | None = None) -> list[dict]:
    """Prompt rows with the fields `checker` reads (one clear error naming the row when one is missing)."""
    from alignment.data import read_prompt_rows

    if checker not in CHECKERS:
        raise UserError(f"checker: {checker!r}; expected one of {', '.join(CHECKERS)}")
    rows = []
    for path in paths:
        for r in read_prompt_rows(path):
            missing = [k for k in ("answer", "kind") if k not in r.data]
            if missing:
                raise UserError(f"{r.where}: the {checker} checker needs {', '.join(missing)}; expected rows like qa/test.jsonl "
                                "of `align data tinyworld`")
            rows.append(r.data)
    if not rows:
        raise UserError(f"answers: no questions in {', '.join(paths)}")
    return rows[:limit] if limit else rows


def evaluate_answers(lm: ScoringModel, rows: list[dict], max_new_tokens: int = 48, batch_size: int = 16,
                     num_samples: int = 5, source: str = "") -> tuple[dict, list[dict]]:
    """Greedy answers, checked: answer_accuracy, well_formed_rate, stopped_rate (each with its standard error)."""
    from alignment.sampling import SamplingParams, generate
    from alignment.tinyworld import check, well_formed
    from alignment.tokens import encode_prompt

    ids = [encode_prompt(lm.tokenizer, r["prompt"])[-(lm.max_length - max_new_tokens):] for r in rows]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=None)
    gens = [g[0] for g in generate(lm.model, lm.tokenizer, ids, params, batch_size=batch_size, progress=True, desc="answers")]
    correct = [float(check(r, g.text)) for r, g in zip(rows, gens)]
    formed = [float(well_formed(g.text, g.stopped)) for g in gens]
    stopped = [float(g.stopped) for g in gens]
    out = {"task": "answers", "version": ANSWERS_VERSION, "n": len(rows), "num_fewshot": 0, "scoring": "greedy+tinyworld_checker",
           "max_new_tokens": max_new_tokens, "source": source, "data_hash": fingerprint(rows)}
    for name, values in (("answer_accuracy", correct), ("well_formed_rate", formed), ("stopped_rate", stopped)):
        out[name], out[f"{name}_stderr"] = mean_stderr(values)
    question = lambda r: r["prompt"][-1]["content"] if isinstance(r["prompt"], list) else r["prompt"]  # noqa: E731
    samples = [{"task": "answers", "doc_id": i, "question": question(r), "answer": g.text, "correct": bool(c),
                "well_formed": bool(f), "stopped": g.stopped} for i, (r, g, c, f) in enumerate(zip(rows, gens, correct, formed))]
    out["examples"] = samples[:num_samples]
    return out, samples
