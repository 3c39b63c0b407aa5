"""Generative tasks: greedy answers, checked against the ground truth.

    align eval --model runs/base --tasks gsm8k --task_data gsm8k=~/data/grade_school_math/data --num_fewshot 5
    align eval --model runs/tiny/sft/merged --tasks answers --answer_files runs/tiny/data/qa/test.jsonl

`generate_until` specs (gsm8k; evals/tasks/*.yaml) follow lm-eval 0.4.13: the prompt as for multiple choice (the
spec's description, shots and question, or the chat template), left-truncated to leave room for `max_gen_toks`;
greedy generation through the suite's one sampler (alignment.sampling.generate: batched, KV cache), stopped at the
spec's `until` strings and the end-of-text token; the text (special tokens dropped) is cut before the first stop
string; each `filter_list` pipeline extracts the answer (regex, take_first) and `exact_match` compares it with the
target after the metric's `regexes_to_ignore`, `ignore_case` and `ignore_punctuation`. Metrics are reported as
`exact_match` for an unfiltered answer and `exact_match_<filter>` per filter (strict_match, flexible_extract).

`answers` (the tiny world's answer accuracy): each row of the file is a prompt row with its ground truth (the fields
`alignment.tinyworld.check` reads: answer, kind, entity, choices). The model answers greedily through the suite's one
sampler (batched, KV cache, stops at end of turn), and each answer is scored by the tiny-world checker: it states the
answer and no competing value. Also reported: the well-formed rate (ended at <|im_end|>, one short sentence, no role
markers) and how often generation stopped before max_new_tokens.
"""

from __future__ import annotations


from alignment.data import fingerprint
from alignment.errors import UserError
from alignment.rewards import apply_filter, exact_match  # noqa: F401  (one answer extraction for evals and rewards)
from alignment.stats import mean_stderr

from .scoring import ScoringModel
from .taskdata import TaskData, public

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
                raise UserError(f"{r.where}: the {checker} checker needs {', '.join(missing)}; expected rows like "
                                "qa/test.jsonl of `align data tinyworld`")
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
    gens = [g[0] for g in generate(lm.model, lm.tokenizer, ids, params, batch_size=batch_size, progress=True,
                                   desc="answers")]
    correct = [float(check(r, g.text)) for r, g in zip(rows, gens)]
    formed = [float(well_formed(g.text, g.stopped)) for g in gens]
    stopped = [float(g.stopped) for g in gens]
    out = {"task": "answers", "version": ANSWERS_VERSION, "n": len(rows), "num_fewshot": 0,
           "scoring": "greedy+tinyworld_checker", "max_new_tokens": max_new_tokens, "source": source,
           "data_hash": fingerprint(rows)}
    for name, values in (("answer_accuracy", correct), ("well_formed_rate", formed), ("stopped_rate", stopped)):
        out[name], out[f"{name}_stderr"] = mean_stderr(values)
    question = lambda r: r["prompt"][-1]["content"] if isinstance(r["prompt"], list) else r["prompt"]  # noqa: E731
    samples = [{"task": "answers", "doc_id": i, "question": question(r), "answer": g.text, "correct": bool(c),
                "well_formed": bool(f), "stopped": g.stopped}
               for i, (r, g, c, f) in enumerate(zip(rows, gens, correct, formed))]
    out["examples"] = samples[:num_samples]
    return out, samples


# ---------------------------------------------------------------------------------------------------- generate_until


class StopOnStrings:
    """A transformers stopping criterion: a row is done once one of `stops` appears in its last generated tokens
    (decoded with special tokens, as lm-eval's MultiTokenEOSCriteria looks back len(stop tokens) + 2 tokens)."""

    def __init__(self, tokenizer, stops: list[str], prompt_len: int):
        from alignment.tokens import encode_text

        self.tok, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len
        self.lookback = max([len(encode_text(tokenizer, s)) + 2 for s in self.stops] or [1])

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        tail = input_ids[:, self.prompt_len:][:, -self.lookback:]
        texts = self.tok.batch_decode(tail)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def evaluate_generate_until(lm: ScoringModel, tasks: list[TaskData], apply_chat_template: bool = False,
                            fewshot_as_multiturn: bool = True, batch_size: int = 16, max_gen_toks: int | None = None,
                            progress: bool = True) -> tuple[dict, list[dict]]:
    """Greedy answers for every document of every task, filtered and scored; returns (results, per-document samples)."""
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    from alignment.sampling import SamplingParams, generate
    from alignment.tokens import encode_text

    from .multiple_choice import context_ids, special_prefix

    tok = lm.tokenizer
    prefix = special_prefix(tok)
    eos = tok.decode([tok.eos_token_id], skip_special_tokens=False) if tok.eos_token_id is not None else None
    results, samples = {}, []
    for t in tasks:
        spec = t.spec
        n_new = max_gen_toks or spec.generation_kwargs["max_gen_toks"]
        room = lm.max_length - n_new
        if room < 1:
            raise UserError(f"{t.name}: max_gen_toks {n_new} leaves no room for a prompt in the model's context of "
                            f"{lm.max_length} tokens; expected fewer (--max_gen_toks)")
        until = list(spec.generation_kwargs["until"])
        until += [eos] if eos and eos not in until else []  # lm-eval stops at end of text too
        prompts = []
        for doc, shots in zip(t.docs, t.shots):
            (turns,) = spec.turns(doc, shots)
            ctx = context_ids(tok, turns, apply_chat_template, fewshot_as_multiturn, prefix)
            ids = ctx if isinstance(ctx, list) else prefix + encode_text(tok, ctx)
            prompts.append(ids[-room:])  # lm-eval truncates the prompt from the left
        # longest first, as lm-eval batches them: the least padding, and the same rows share a batch
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts: list[str] = [""] * len(prompts)
        params = SamplingParams(max_new_tokens=n_new, temperature=0.0, seed=None)
        bar = tqdm(total=len(order), desc=f"{t.name} ({len(order)} items)", disable=not progress, leave=False)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = [prompts[i] for i in chunk]
            stop = StoppingCriteriaList([StopOnStrings(tok, until, max(map(len, batch)))])
            gens = generate(lm.model, tok, batch, params, batch_size=len(batch), progress=False, stopping_criteria=stop)
            for i, g in zip(chunk, gens):
                text = tok.decode(g[0].token_ids, skip_special_tokens=True)
                for term in until:  # cut before the first stop string, as lm-eval's postprocessing
                    if term:
                        text = text.split(term)[0]
                texts[i] = text
            bar.update(len(chunk))
        bar.close()
        filters = spec.filter_list or [{"name": "none", "filter": [{"function": "take_first"}]}]
        values: dict[str, list[float]] = {}
        for di, (doc, text) in enumerate(zip(t.docs, texts)):
            gold = spec.target(doc)
            gold = spec.choices(doc)[gold] if spec.doc_to_choice is not None else str(gold)
            record = {"task": t.name, "doc_id": di, "target": gold, "response": text}
            for f in filters:
                answer = apply_filter(f["filter"], text)
                for m in spec.metric_list:
                    kwargs = {k: v for k, v in m.items() if k not in ("metric", "aggregation", "higher_is_better")}
                    key = m["metric"] if f["name"] == "none" else f"{m['metric']}_{f['name'].replace('-', '_')}"
                    score = exact_match(answer, gold, **kwargs)
                    values.setdefault(key, []).append(score)
                    record[f"answer_{f['name'].replace('-', '_')}"] = answer
                    record[key] = score
            samples.append(record)
        out = {}
        for k, v in values.items():
            out[k], out[f"{k}_stderr"] = mean_stderr(v)
        shots = list({id(s): public(s) for ss in t.shots for s in ss}.values())
        out.update(task=t.name, version=spec.version, n=len(t.docs), num_fewshot=t.num_fewshot,
                   data_hash=fingerprint([public(d) for d in t.docs] + shots), scoring=spec.scoring,
                   max_new_tokens=n_new, apply_chat_template=apply_chat_template,
                   fewshot_as_multiturn=apply_chat_template and fewshot_as_multiturn, source=t.source)
        results[t.name] = out
    return results, samples
