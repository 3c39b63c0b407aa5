"""Preference and generation evals: reward-model accuracy, DPO implicit-reward accuracy, win rate and KL.

    align eval --model runs/tiny/dpo/merged --tasks preference,dpo,winrate --reward_model runs/tiny/reward/merged \\
        --reference_model runs/tiny/sft/merged --preference_files runs/tiny/data/preference/test.jsonl \\
        --prompts_file runs/tiny/data/qa/test.jsonl

Python API (every function takes model paths and returns a metrics dict):
    reward_accuracy(reward_model, pairs)                       accuracy and mean margin of r(chosen) - r(rejected)
    dpo_accuracy(policy, reference, pairs, beta)               the same with DPO's implicit reward
    win_rate(policy, reference, reward_model, prompts, ...)    sampled responses scored by the reward model, KL
Pairs come from `read_pairs`: TRL conversational rows ({"prompt": [msgs], "chosen": [msg], "rejected": [msg]}),
plain-text rows ({"prompt": str, "chosen": str, "rejected": str}) or hh-rlhf dialogues ({"chosen": str,
"rejected": str} full text, split at the last "\\n\\nAssistant:").
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignment.data import read_jsonl, read_prompt_rows
from alignment.errors import UserError
from alignment.tokens import encode_chat, encode_text, validate_messages

from .scoring import LoadedModel, load_model, loglikelihoods

PREF_VERSION = "1.0"
HH_SPLIT = "\n\nAssistant:"


def read_pairs(path: str | Path, limit: int | None = None) -> list[dict]:
    """Preference pairs as {"prompt", "chosen", "rejected"}: message lists (conversational) or strings (text)."""
    pairs = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        if not isinstance(row, dict) or not {"chosen", "rejected"} <= set(row):
            raise UserError(f"{where}: expected 'chosen' and 'rejected' fields")
        c, r = row["chosen"], row["rejected"]
        if "prompt" not in row:  # hh-rlhf: two full dialogues differing in the last assistant turn
            if not (isinstance(c, str) and isinstance(r, str)) or HH_SPLIT not in c or HH_SPLIT not in r:
                raise UserError(f"{where}: expected hh-rlhf dialogues containing '\\n\\nAssistant:' or a 'prompt' field")
            k = c.rfind(HH_SPLIT) + len(HH_SPLIT)
            prompt = c[:k]
            if not r.startswith(prompt):
                k = r.rfind(HH_SPLIT) + len(HH_SPLIT)
                prompt = r[:k]
            pairs.append({"prompt": prompt, "chosen": c[len(prompt):], "rejected": r[len(prompt):]})
        elif isinstance(row["prompt"], list):
            pairs.append({"prompt": validate_messages(row["prompt"], f"{where}: prompt"),
                          "chosen": validate_messages(c, f"{where}: chosen"),
                          "rejected": validate_messages(r, f"{where}: rejected")})
        elif all(isinstance(x, str) for x in (row["prompt"], c, r)):
            pairs.append({"prompt": row["prompt"], "chosen": c, "rejected": r})
        else:
            raise UserError(f"{where}: expected prompt/chosen/rejected as message lists or strings")
        if limit and len(pairs) >= limit:
            break
    return pairs


def _prompt_and_completion(tok, prompt, completion) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the completion that follows it (chat template for message lists)."""
    if isinstance(prompt, list):
        p = encode_chat(tok, prompt, add_generation_prompt=True)["input_ids"]
        full = encode_chat(tok, prompt + completion)["input_ids"]
        if full[:len(p)] != p:  # a template that renders the prompt differently once answered
            raise UserError("chat template: the prompt's tokens change when the answer is appended")
        return p, full[len(p):]
    p = encode_text(tok, prompt)
    return p, encode_text(tok, prompt + completion)[len(p):]


def reward_scores(rm, tok, sequences: list[list[int]], batch_size: int = 16) -> list[float]:
    """Reward of each token sequence (alignment.modeling.reward_scores: read at its last real token, the end kept
    when longer than the context). Identical sequences are scored once, so two identical responses tie exactly (no
    float noise from batching); longest first, so batches carry little padding."""
    from alignment.modeling import reward_scores as score

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    unique = sorted(dict.fromkeys(tuple(s) for s in sequences), key=len, reverse=True)
    scores = dict(zip(unique, score(rm, [list(s) for s in unique], pad, batch_size=batch_size).tolist()))
    return [scores[tuple(s)] for s in sequences]


def response_rewards(rm, tok, prompts: list, responses: list[str], batch_size: int = 16) -> list[float]:
    """Reward of each (prompt, response): the response is the assistant turn after a chat prompt, or plain text."""
    seqs = []
    for p, resp in zip(prompts, responses):
        a, b = _prompt_and_completion(tok, p, [{"role": "assistant", "content": resp}] if isinstance(p, list) else resp)
        seqs.append(a + b)
    return reward_scores(rm, tok, seqs, batch_size)


def load_reward_model(path: str, device: str | None = None):
    """A sequence-classification reward model (num_labels=1) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{path}: no config.json; expected a reward model directory")
    if not (Path(path) / "tokenizer.json").is_file():
        raise UserError(f"{path}: no tokenizer.json; expected the tokenizer saved beside the reward model")
    tok = AutoTokenizer.from_pretrained(path)
    rm = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, num_labels=1)
    if rm.config.pad_token_id is None:
        rm.config.pad_token_id = tok.pad_token_id
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return rm.to(device).eval(), tok


def _summary(x: np.ndarray, name: str) -> dict:
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {name: float(x.mean()), f"{name}_stderr": se}


def reward_accuracy(reward_model: str, pairs: list[dict], batch_size: int = 16) -> tuple[dict, list[dict]]:
    """Fraction of pairs where the reward model scores chosen above rejected, and the mean margin."""
    rm, tok = load_reward_model(reward_model)
    seqs = []
    for p in pairs:
        for side in ("chosen", "rejected"):
            a, b = _prompt_and_completion(tok, p["prompt"], p[side])
            seqs.append(a + b)
    r = np.array(reward_scores(rm, tok, seqs, batch_size))
    margin = r[0::2] - r[1::2]
    acc = (margin > 0).astype(float)
    out = {"task": "reward_accuracy", "version": PREF_VERSION, "n": len(pairs), "num_fewshot": 0, "scoring": "reward",
           "reward_model": str(reward_model), **_summary(acc, "acc"), **_summary(margin, "margin")}
    samples = [{"task": "reward_accuracy", "doc_id": i, "chosen_reward": float(r[2 * i]), "rejected_reward": float(r[2 * i + 1])}
               for i in range(len(pairs))]
    return out, samples


def _completion_logps(lm: LoadedModel, pairs: list[dict], batch_size: int) -> np.ndarray:
    reqs = []
    for p in pairs:
        for side in ("chosen", "rejected"):
            reqs.append(_prompt_and_completion(lm.tokenizer, p["prompt"], p[side]))
    return np.array([s for s, _, _ in loglikelihoods(lm, reqs, batch_size=batch_size, desc="completion log-probs")])


def dpo_accuracy(policy: str | LoadedModel, reference: str | LoadedModel, pairs: list[dict], beta: float = 0.1,
                 batch_size: int = 16) -> tuple[dict, list[dict]]:
    """DPO implicit reward r = beta * (log pi(y|x) - log ref(y|x)): accuracy of r(chosen) > r(rejected), margin."""
    pol = policy if isinstance(policy, LoadedModel) else load_model(policy)
    ref = reference if isinstance(reference, LoadedModel) else load_model(reference)
    if pol.tokenizer_hash != ref.tokenizer_hash:
        raise UserError(f"{ref.path}: the reference model's tokenizer differs from the policy's; expected the same")
    r = beta * (_completion_logps(pol, pairs, batch_size) - _completion_logps(ref, pairs, batch_size))
    margin = r[0::2] - r[1::2]
    acc = (margin > 0).astype(float)
    out = {"task": "dpo_accuracy", "version": PREF_VERSION, "n": len(pairs), "num_fewshot": 0, "scoring": f"implicit_reward(beta={beta})",
           "reference_model": ref.path, **_summary(acc, "acc"), **_summary(margin, "margin")}
    samples = [{"task": "dpo_accuracy", "doc_id": i, "chosen_reward": float(r[2 * i]), "rejected_reward": float(r[2 * i + 1])}
               for i in range(len(pairs))]
    return out, samples


def read_prompts(path: str | Path, limit: int | None = None) -> list:
    """Prompts from JSONL rows with "prompt" (message list or string)."""
    return [row["prompt"] for _, row in read_prompt_rows(path, limit)]


@torch.no_grad()
def sample_responses(lm: LoadedModel, prompts: list, max_new_tokens: int = 64, temperature: float = 1.0,
                     top_k: int = 0, seed: int = 0, num_samples: int = 1) -> list[dict]:
    """`num_samples` sampled responses per prompt (flat, prompt by prompt), seeded per prompt so results do not
    depend on order or batching. Each: prompt_ids, response_ids (up to and including the stop token), response."""
    tok = lm.tokenizer
    gen = getattr(lm.model, "generation_config", None)
    eos = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else tok.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    device = next(lm.model.parameters()).device
    out = []
    for i, p in enumerate(tqdm(prompts, desc=f"sampling {Path(lm.path).name}", leave=False)):
        ids = encode_chat(tok, p, add_generation_prompt=True)["input_ids"] if isinstance(p, list) else encode_text(tok, p)
        ids = ids[-(lm.max_length - max_new_tokens):]
        torch.manual_seed(seed * 1_000_003 + i)
        seqs = lm.model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                 do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0, max_new_tokens=max_new_tokens,
                                 num_return_sequences=num_samples, eos_token_id=eos, pad_token_id=tok.pad_token_id)[:, len(ids):].tolist()
        for seq in seqs:
            end = next((j for j, t in enumerate(seq) if t in stops), None)
            seq = seq if end is None else seq[:end + 1]  # shorter samples of a batch are padded after their stop token
            text_ids = [t for t in seq if t not in stops and t != tok.pad_token_id]
            out.append({"prompt_ids": ids, "response_ids": seq, "response": tok.decode(text_ids, skip_special_tokens=True)})
    return out


def win_rate(policy: str | LoadedModel, reference: str | LoadedModel, reward_model: str, prompts: list, max_new_tokens: int = 64,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 16, num_samples: int = 1) -> tuple[dict, list[dict]]:
    """Sample from policy and reference, score both with the reward model: win rate (ties count half) with a 95%
    interval, and KL(policy || reference) estimated on the policy's samples (exact in expectation at temperature 1).

    With `num_samples` k > 1 each prompt gets k samples from each model and its outcome is the share of the k*k
    policy-vs-reference comparisons the policy wins: the same quantity, P(reward(policy) > reward(reference)), with
    less sampling noise. Standard errors are taken over prompts, so they stay honest when samples of a prompt agree."""
    if num_samples < 1:
        raise UserError(f"winrate: num_samples must be at least 1, got {num_samples}")
    pol = policy if isinstance(policy, LoadedModel) else load_model(policy)
    ref = reference if isinstance(reference, LoadedModel) else load_model(reference)
    if pol.tokenizer_hash != ref.tokenizer_hash:
        raise UserError(f"{ref.path}: the reference model's tokenizer differs from the policy's; expected the same")
    rm, rm_tok = load_reward_model(reward_model)
    n, k = len(prompts), num_samples
    ps = sample_responses(pol, prompts, max_new_tokens, temperature, seed=seed, num_samples=k)
    rs = sample_responses(ref, prompts, max_new_tokens, temperature, seed=seed, num_samples=k)

    each = [p for p in prompts for _ in range(k)]
    rewards = response_rewards(rm, rm_tok, each + each, [s["response"] for s in ps + rs], batch_size)
    r_pol, r_ref = np.array(rewards[:n * k]).reshape(n, k), np.array(rewards[n * k:]).reshape(n, k)
    diff = r_pol[:, :, None] - r_ref[:, None, :]  # (n, k, k): every policy sample against every reference sample
    outcome = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5)).mean(axis=(1, 2))  # (n,)
    # KL(pi || ref) = E_{y~pi}[log pi(y|x) - log ref(y|x)], k Monte-Carlo samples per prompt, averaged per prompt
    keep = [j for j, s in enumerate(ps) if s["response_ids"]]
    reqs = [(ps[j]["prompt_ids"], ps[j]["response_ids"]) for j in keep]
    lp_pol = np.array([x for x, _, _ in loglikelihoods(pol, reqs, batch_size=batch_size, desc="policy log-probs")])
    lp_ref = np.array([x for x, _, _ in loglikelihoods(ref, reqs, batch_size=batch_size, desc="reference log-probs")])
    per_prompt: dict[int, list[float]] = {}
    for j, d in zip(keep, lp_pol - lp_ref):
        per_prompt.setdefault(j // k, []).append(float(d))
    kl = np.array([np.mean(v) for v in per_prompt.values()]) if per_prompt else np.zeros(1)
    wr = _summary(outcome, "win_rate")
    half = 1.96 * (wr["win_rate_stderr"] if len(outcome) > 1 else 0.5)
    out = {"task": "win_rate", "version": PREF_VERSION, "n": n, "num_samples": k, "num_fewshot": 0, "scoring": "reward_model",
           "reference_model": ref.path, "reward_model": str(reward_model), "max_new_tokens": max_new_tokens,
           "temperature": temperature, **wr, "win_rate_ci95": [max(0.0, wr["win_rate"] - half), min(1.0, wr["win_rate"] + half)],
           "reward_policy": float(r_pol.mean()), "reward_reference": float(r_ref.mean()), **_summary(kl, "kl")}
    samples = [{"task": "win_rate", "doc_id": i, "prompt": prompts[i],
                "policy_response": ps[i * k]["response"], "reference_response": rs[i * k]["response"],
                "policy_reward": float(r_pol[i, 0]), "reference_reward": float(r_ref[i, 0]), "outcome": float(outcome[i]),
                **({"policy_responses": [s["response"] for s in ps[i * k:(i + 1) * k]],
                    "reference_responses": [s["response"] for s in rs[i * k:(i + 1) * k]],
                    "policy_rewards": r_pol[i].tolist(), "reference_rewards": r_ref[i].tolist()} if k > 1 else {})}
               for i in range(n)]
    return out, samples
