"""Multiple choice: the log-likelihood of each choice after the prompt, for every `multiple_choice` task spec.

    align eval --model runs/base --tasks mmlu --mmlu_dir ../shared/data/eval/mmlu --num_fewshot 5
    align eval --model runs/base --tasks arc_challenge,hellaswag,piqa,truthfulqa_mc2,winogrande --data_dir ~/evaldata

One scorer for every spec in evals/tasks/ (and a user's YAML), following lm-eval 0.4.13: the prompt is the spec's
description, shots and question (evals/taskspec.py); each choice is scored as the continuation
`target_delimiter + choice` (or, for multiple-input tasks such as winogrande, each choice is a context and the shared
target is the continuation). Metrics per document, averaged with the standard error of the mean:
- `acc`: the most likely choice is the right one; `acc_norm`: the same after dividing by the choice's characters;
  `acc_bytes`: by its UTF-8 bytes; `exact_match`: the right choice is the greedy continuation;
- `acc_centered`: acc rescaled so chance (1 / number of choices) is 0 and perfect is 1;
- with `process_results: {true_probability_mass: LABELS}` (truthfulqa_mc2), every metric is the normalised
  probability mass on the choices whose label is 1.
With a chat template (`--apply_chat_template`) the description is the system message, shots are user/assistant turns
(`fewshot_as_multiturn`, lm-eval's default) or one user message, the generation prompt follows and the target
delimiter is empty. A spec with `subtasks` (MMLU's subjects) reports each subtask and, with more than one, the group:
every metric over all items (micro) plus `acc_macro`, the mean of the subtasks' accuracies.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from alignment.data import fingerprint
from alignment.errors import UserError
from alignment.stats import mean_stderr
from alignment.tokens import encode_chat, encode_text

from .scoring import ScoringModel, encode_pair, loglikelihoods
from .taskdata import TaskData, public
from .taskspec import chat_messages, plain_text


def special_prefix(tok) -> list[int]:
    """The ids a tokenizer puts before text by default (a BOS for Llama-style tokenizers, nothing for ours): lm-eval
    encodes prompts with the tokenizer's defaults, so a prompt starts with them."""
    with_special = tok.encode("a", add_special_tokens=True)
    plain = tok.encode("a", add_special_tokens=False)
    n = len(with_special) - len(plain)
    return with_special[:n] if n > 0 and with_special[n:] == plain else []


def context_ids(tok, turns, chat: bool, multiturn: bool, prefix: list[int]) -> list[int] | str:
    """A prompt as lm-eval feeds it: plain text (encoded by the caller, with its continuation) or the chat template's
    ids with the generation prompt (data text special-token safe)."""
    if not chat:
        return plain_text(turns)
    ids = encode_chat(tok, chat_messages(turns, multiturn), add_generation_prompt=True)["input_ids"]
    return ids if not prefix or ids[:len(prefix)] == prefix else prefix + ids


def split_trailing_space(tok, ids: list[int]) -> tuple[list[int], str]:
    """Move the context's trailing whitespace tokens (the template's "\\n" after "assistant") to the continuation,
    as lm-eval's _encode_pair does with the rendered string; token level, so data text stays special-token safe."""
    ids = list(ids)
    space = ""
    while ids and (piece := tok.decode(ids[-1:])) and not piece.strip():
        space = piece + space
        ids.pop()
    return ids, space


def _request(tok, ctx, cont: str, prefix: list[int], enc) -> tuple[list[int], list[int]]:
    if isinstance(ctx, list):  # chat ids
        ctx_ids, space = split_trailing_space(tok, ctx)
        return ctx_ids, encode_text(tok, space + cont)
    if ctx == "":  # lm-eval conditions an empty context on the prefix token (bos, else eos)
        first = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return [first], enc(cont)
    c, k = encode_pair(tok, ctx, cont, enc)
    return prefix + c, k


def evaluate_mc(lm: ScoringModel, tasks: list[TaskData], apply_chat_template: bool = False,
                fewshot_as_multiturn: bool = True, batch_size: int = 16,
                progress: bool = True) -> tuple[dict, list[dict]]:
    """Score every document of every task in one batched pass; returns (results by task name, per-document samples)."""
    tok = lm.tokenizer
    prefix = special_prefix(tok)
    enc_cached = functools.lru_cache(maxsize=8192)(lambda s: tuple(encode_text(tok, s)))
    enc = lambda s: list(enc_cached(s))  # noqa: E731 - the choices of one question share a context
    requests, owners, items = [], [], []  # owners[j] = item index; items[i] = (task index, doc index, choices, gold)
    for ti, t in enumerate(tasks):
        spec = t.spec
        delim = "" if apply_chat_template else spec.target_delimiter  # lm-eval: no delimiter after a chat template
        for di, (doc, shots) in enumerate(zip(t.docs, t.shots)):
            choices = spec.choices(doc)
            gold = spec.gold(doc, choices)
            ctxs = [context_ids(tok, turns, apply_chat_template, fewshot_as_multiturn, prefix)
                    for turns in spec.turns(doc, shots)]
            if spec.multiple_input(doc):
                target = str(spec.target(doc))
                pairs = [(ctx, delim + target) for ctx in ctxs]
            else:
                pairs = [(ctxs[0], delim + c) for c in choices]
            for ctx, cont in pairs:
                requests.append(_request(tok, ctx, cont, prefix, enc))
                owners.append(len(items))
            items.append((ti, di, choices, gold))
    names = ", ".join(dict.fromkeys(t.group or t.name for t in tasks))
    desc = f"{names} ({len(items)} items)"
    scores = loglikelihoods(lm, requests, batch_size=batch_size, desc=desc, progress=progress)
    per_item: list[list] = [[] for _ in items]
    for j, (ll, greedy, _) in zip(owners, scores):
        per_item[j].append((ll, greedy))
    results, samples = {}, []
    values_by_task: dict[int, dict[str, list[float]]] = {}
    for (ti, di, choices, gold), scored in zip(items, per_item):
        spec, doc = tasks[ti].spec, tasks[ti].docs[di]
        lls = np.array([ll for ll, _ in scored])
        pred = int(np.argmax(lls))
        pred_norm = int(np.argmax(lls / np.array([float(len(c)) for c in choices])))
        pred_bytes = int(np.argmax(lls / np.array([float(len(c.encode("utf-8"))) for c in choices])))
        if spec.process_results:
            mass = _true_mass(spec, doc, lls)
            vals = {m["metric"]: mass for m in spec.metric_list}
        else:
            every = {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold),
                     "acc_bytes": float(pred_bytes == gold), "exact_match": float(scored[gold][1])}
            vals = {m["metric"]: every[m["metric"]] for m in spec.metric_list}
            vals["_chance"] = 1.0 / len(choices)
        store = values_by_task.setdefault(ti, {})
        for k, v in vals.items():
            store.setdefault(k, []).append(v)
        samples.append({"task": tasks[ti].name, "doc_id": di, "target": gold, "loglikelihoods": lls.tolist(),
                        "pred": pred, "pred_norm": pred_norm,
                        **{k: v for k, v in vals.items() if not k.startswith("_")}})
    groups: dict[str, list[int]] = {}
    for ti, t in enumerate(tasks):
        vals = values_by_task.get(ti, {})
        if not t.docs:
            raise UserError(f"{t.name}: no documents to score")
        results[t.name] = _summary(vals)
        shots = list({id(s): public(s) for ss in t.shots for s in ss}.values())
        results[t.name].update(task=t.name, version=t.spec.version, n=len(t.docs), num_fewshot=t.num_fewshot,
                               data_hash=fingerprint([public(d) for d in t.docs] + shots), scoring=t.spec.scoring,
                               apply_chat_template=apply_chat_template, source=t.source,
                               fewshot_as_multiturn=apply_chat_template and fewshot_as_multiturn)
        if t.group:
            groups.setdefault(t.group, []).append(ti)
    for group, members in groups.items():
        if len(members) < 2:
            continue
        merged: dict[str, list[float]] = {}
        for ti in members:
            for k, v in values_by_task[ti].items():
                merged.setdefault(k, []).extend(v)
        agg = _summary(merged)
        if "acc" in merged:
            accs = [np.mean(values_by_task[ti]["acc"]) for ti in members]
            # macro stderr: the subtask means are independent, so Var(mean of means) = sum(se^2) / k^2
            ses = [mean_stderr(values_by_task[ti]["acc"])[1] for ti in members]
            agg.update(acc_macro=float(np.mean(accs)),
                       acc_macro_stderr=math.sqrt(sum(s ** 2 for s in ses)) / len(members))
        first = tasks[members[0]]
        agg.update(task=group, version=first.spec.version, n=sum(len(tasks[ti].docs) for ti in members),
                   num_fewshot=first.num_fewshot, scoring=first.spec.scoring, apply_chat_template=apply_chat_template,
                   data_hash=fingerprint([results[tasks[ti].name]["data_hash"] for ti in members]),
                   subtasks=[tasks[ti].name for ti in members])
        results[group] = agg
    # each group right after its last subtask, so a report reads mmlu_<subject>..., mmlu, arc_easy, ...
    last = {tasks[m[-1]].name: g for g, m in groups.items() if g in results}
    ordered = {}
    for name, r in results.items():
        if name not in groups:
            ordered[name] = r
            if name in last:
                ordered[last[name]] = results[last[name]]
    return ordered, samples


def _summary(values: dict[str, list[float]]) -> dict:
    """Each metric's mean and standard error; acc_centered from acc and the chance level of each document."""
    out = {}
    for k, v in values.items():
        if k.startswith("_"):
            continue
        out[k], out[f"{k}_stderr"] = mean_stderr(v)
    if "acc" in values and "_chance" in values:
        chance = float(np.mean(values["_chance"]))
        out["acc_centered"] = float((out["acc"] - chance) / (1 - chance)) if chance < 1 else float("nan")
    return out


def _true_mass(spec, doc: dict, lls: np.ndarray) -> float:
    """truthfulqa_mc2 (lm-eval's process_results_mc2): the normalised probability of the choices labelled 1."""
    expr = spec.process_results["true_probability_mass"]
    labels = spec.evaluate(expr, doc, "process_results.true_probability_mass", doc.get("_where", "document"))
    if not isinstance(labels, (list, tuple)) or len(labels) != len(lls):
        raise spec.error(doc, f"true_probability_mass labels {labels!r}; expected one 0/1 per choice ({len(lls)})")
    probs = np.exp(lls)
    probs = probs / probs.sum()
    return float(probs[np.array(labels) == 1].sum())
