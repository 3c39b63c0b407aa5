"""Preference and generation evals: reward-model accuracy, DPO implicit-reward accuracy, win rate and KL.

    align eval --model runs/tiny/dpo/merged --tasks preference,dpo,winrate --reward_model runs/tiny/reward/merged \\
        --reference_model runs/tiny/sft/merged --preference_files runs/tiny/data/preference/test.jsonl \\
        --prompts_file runs/tiny/data/qa/test.jsonl

Python API (every function takes model paths or loaded models and returns (metrics, per-item samples)):
    evaluate_reward_accuracy(reward_model, pairs)                    accuracy and mean margin of r(chosen) - r(rejected)
    evaluate_dpo_accuracy(policy, reference, pairs, beta)            the same with DPO's implicit reward
    evaluate_win_rate(policy, reference, reward_model, prompts, ...) sampled responses scored by the reward model, KL
Pairs and prompts are read by the suite's one reader (alignment.data): TRL preference rows (conversational or text)
and hh-rlhf dialogues become chat conversations; prompts are message lists or strings. Responses are sampled by the
one sampler (alignment.sampling) and scored by the one reward scorer (alignment.rewards), exactly as PPO scores them.
"""

from __future__ import annotations

import numpy as np
import torch

from alignment.data import fingerprint
from alignment.errors import UserError
from alignment.modeling import model_hash
from alignment.rewards import RewardModel
from alignment.stats import mean_stderr, win_rate
from alignment.tokens import encode_prompt, reply_ids

from .scoring import ScoringModel, loglikelihoods, scoring_model

PREF_VERSION = "1.1"  # 1.1: the reply is scored up to its end-of-turn token (1.0 read the score one token later)


def read_pairs(path: str, limit: int | None = None) -> list[dict]:
    """Preference pairs {"prompt": messages, "chosen": [msg], "rejected": [msg]} of a file (any preference format)."""
    from alignment.data import convert_rows, preference_pair, read_rows

    rows = read_rows(path)
    pairs = convert_rows(rows[:limit] if limit else rows, preference_pair, "error", str(path))
    return pairs


def read_prompts(path: str, limit: int | None = None) -> list:
    """Prompts (message lists or strings) of a prompt-rows file (alignment.data.read_prompt_rows)."""
    from alignment.data import read_prompt_rows

    return [r.data["prompt"] for r in read_prompt_rows(path, limit)]


def _summary(x, name: str) -> dict:
    m, se = mean_stderr(x)
    return {name: m, f"{name}_stderr": se}


def evaluate_reward_accuracy(reward_model: str | RewardModel, pairs: list[dict], batch_size: int = 16) -> tuple[dict, list[dict]]:
    """Fraction of pairs where the reward model scores chosen above rejected, and the mean margin."""
    rm = reward_model if isinstance(reward_model, RewardModel) else RewardModel(reward_model, batch_size=batch_size)
    prompts = [p["prompt"] for p in pairs for _ in range(2)]
    replies = [p[side][0]["content"] for p in pairs for side in ("chosen", "rejected")]
    r = rm.score(prompts, replies).numpy()
    margin = r[0::2] - r[1::2]
    out = {"task": "reward_accuracy", "version": PREF_VERSION, "n": len(pairs), "num_fewshot": 0, "scoring": "reward",
           "reward_model": rm.path, "reward_model_hash": model_hash(rm.path), "data_hash": fingerprint(pairs),
           **_summary((margin > 0).astype(float), "acc"), **_summary(margin, "margin")}
    samples = [{"task": "reward_accuracy", "doc_id": i, "chosen_reward": float(r[2 * i]), "rejected_reward": float(r[2 * i + 1])}
               for i in range(len(pairs))]
    return out, samples


def _reply_requests(tok, prompts: list, replies: list[str]) -> list[tuple[list[int], list[int]]]:
    out = []
    for p, reply in zip(prompts, replies):
        ctx = encode_prompt(tok, p)
        out.append((ctx, reply_ids(tok, ctx, p, reply)))
    return out


def evaluate_dpo_accuracy(policy: str | ScoringModel, reference: str | ScoringModel, pairs: list[dict], beta: float = 0.1,
                          batch_size: int = 16) -> tuple[dict, list[dict]]:
    """DPO implicit reward r = beta * (log pi(y|x) - log ref(y|x)): accuracy of r(chosen) > r(rejected), margin."""
    pol = policy if isinstance(policy, ScoringModel) else scoring_model(policy)
    ref = reference if isinstance(reference, ScoringModel) else scoring_model(reference)
    if pol.tokenizer_hash != ref.tokenizer_hash:
        raise UserError(f"{ref.path}: the reference model's tokenizer differs from the policy's; expected the same")
    reqs = _reply_requests(pol.tokenizer, [p["prompt"] for p in pairs for _ in range(2)],
                           [p[side][0]["content"] for p in pairs for side in ("chosen", "rejected")])
    lp = [np.array([s for s, _, _ in loglikelihoods(m, reqs, batch_size=batch_size, desc="completion log-probs")]) for m in (pol, ref)]
    r = beta * (lp[0] - lp[1])
    margin = r[0::2] - r[1::2]
    out = {"task": "dpo_accuracy", "version": PREF_VERSION, "n": len(pairs), "num_fewshot": 0, "scoring": f"implicit_reward(beta={beta})",
           "reference_model": ref.path, "reference_model_hash": ref.model_hash, "data_hash": fingerprint(pairs),
           **_summary((margin > 0).astype(float), "acc"), **_summary(margin, "margin")}
    samples = [{"task": "dpo_accuracy", "doc_id": i, "chosen_reward": float(r[2 * i]), "rejected_reward": float(r[2 * i + 1])}
               for i in range(len(pairs))]
    return out, samples


def sample(lm: ScoringModel, prompts: list, max_new_tokens: int, temperature: float, seed: int, num_samples: int) -> list:
    """`num_samples` responses per prompt (alignment.sampling, seeded per prompt: independent of order and batching),
    each with the prompt ids it continued: [(prompt_ids, Completion)] flat, prompt by prompt."""
    from alignment.sampling import SamplingParams, generate

    ids = [encode_prompt(lm.tokenizer, p)[-(lm.max_length - max_new_tokens):] for p in prompts]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, num_return_sequences=num_samples, seed=seed)
    out = generate(lm.model, lm.tokenizer, ids, params, seed_per_prompt=True, progress=True, desc=f"sampling {lm.path}")
    return [(p, c) for p, group in zip(ids, out) for c in group]


@torch.no_grad()
def evaluate_win_rate(policy: str | ScoringModel, reference: str | ScoringModel, reward_model: str, prompts: list,
                      max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0, batch_size: int = 16,
                      num_samples: int = 1) -> tuple[dict, list[dict]]:
    """Sample from policy and reference, score both with the reward model: win rate (ties count half) with a 95%
    interval, and KL(policy || reference) estimated on the policy's samples (exact in expectation at temperature 1).

    With `num_samples` k > 1 each prompt gets k samples from each model and its outcome is the share of the k*k
    policy-vs-reference comparisons the policy wins (alignment.stats.win_rate); standard errors are over prompts."""
    if num_samples < 1:
        raise UserError(f"winrate: num_samples must be at least 1, got {num_samples}")
    pol = policy if isinstance(policy, ScoringModel) else scoring_model(policy)
    ref = reference if isinstance(reference, ScoringModel) else scoring_model(reference)
    if pol.tokenizer_hash != ref.tokenizer_hash:
        raise UserError(f"{ref.path}: the reference model's tokenizer differs from the policy's; expected the same")
    rm = RewardModel(reward_model, batch_size=batch_size)
    n, k = len(prompts), num_samples
    ps = sample(pol, prompts, max_new_tokens, temperature, seed, k)
    rs = sample(ref, prompts, max_new_tokens, temperature, seed, k)

    each = [p for p in prompts for _ in range(k)]
    rewards = rm.score(each + each, [c.text for _, c in ps + rs]).numpy()
    r_pol, r_ref = rewards[:n * k].reshape(n, k), rewards[n * k:].reshape(n, k)
    wr = win_rate(r_pol, r_ref)
    # KL(pi || ref) = E_{y~pi}[log pi(y|x) - log ref(y|x)], k Monte-Carlo samples per prompt, averaged per prompt
    keep = [j for j, (_, c) in enumerate(ps) if c.token_ids]
    reqs = [(ps[j][0], ps[j][1].token_ids) for j in keep]
    lp_pol = np.array([x for x, _, _ in loglikelihoods(pol, reqs, batch_size=batch_size, desc="policy log-probs")])
    lp_ref = np.array([x for x, _, _ in loglikelihoods(ref, reqs, batch_size=batch_size, desc="reference log-probs")])
    per_prompt: dict[int, list[float]] = {}
    for j, d in zip(keep, lp_pol - lp_ref):
        per_prompt.setdefault(j // k, []).append(float(d))
    kl = np.array([np.mean(v) for v in per_prompt.values()]) if per_prompt else np.zeros(1)
    outcome = wr.pop("outcomes")
    out = {"task": "win_rate", "version": PREF_VERSION, "n": n, "num_samples": k, "num_fewshot": 0, "scoring": "reward_model",
           "reference_model": ref.path, "reference_model_hash": ref.model_hash, "reward_model": str(reward_model),
           "reward_model_hash": model_hash(reward_model), "data_hash": fingerprint(prompts), "max_new_tokens": max_new_tokens,
           "temperature": temperature, "seed": seed, **wr, "reward_policy": float(r_pol.mean()),
           "reward_reference": float(r_ref.mean()), **_summary(kl, "kl")}
    samples = [{"task": "win_rate", "doc_id": i, "prompt": prompts[i],
                "policy_response": ps[i * k][1].text, "reference_response": rs[i * k][1].text,
                "policy_reward": float(r_pol[i, 0]), "reference_reward": float(r_ref[i, 0]), "outcome": float(outcome[i]),
                **({"policy_responses": [c.text for _, c in ps[i * k:(i + 1) * k]],
                    "reference_responses": [c.text for _, c in rs[i * k:(i + 1) * k]],
                    "policy_rewards": r_pol[i].tolist(), "reference_rewards": r_ref[i].tolist()} if k > 1 else {})}
               for i in range(n)]
    return out, samples
