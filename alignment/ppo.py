"""Our PPO for RLHF: the math, the value head, rollouts, and one readable update loop.

`recipes/ppo.py` (`align ppo`) loads the models and calls this; tests drive it directly on tiny models.

One update (Ouyang et al. 2022; Ziegler et al. 2019; the "N implementation details of RLHF with PPO" notes):
  1. sample a batch of prompts, generate responses with the LoRA policy (stop at end of turn)
  2. score prompt + response with the reward model, normalised by the statistics the reward stage saved;
     a fixed penalty for responses that never end
  3. per-token reward = -kl_coef * KL(policy || reference) + score on the last response token, where the
     reference is the same network with its LoRA adapter disabled (no second copy in memory)
  4. GAE advantages from a value head, whitened; several epochs of clipped policy + clipped value loss over
     minibatches with gradient accumulation
  5. update the KL coefficient (fixed, or adaptive towards a target KL)
Metrics carry TRL's names (objective/kl, policy/clipfrac_avg, ...) so they read as TRL users know them.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

INVALID_LOGPROB = 1.0  # filler for padded response positions; always masked out


# ----------------------------------------------------------------------------------------------------------------
# math


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (all of them, or along `dim`)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the masked positions (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased:
        if n < 2:
            return torch.zeros_like(var)  # one value has no spread; whitening then only centres it
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked positions; padded positions come back as 0.

    With shift_mean=False the mean is added back (used for rewards: scale without moving the baseline)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over right-padded responses. Returns (advantages, returns), both (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}; V and r are 0 past the end,
    so the episode stops at the last real token. returns = A + V (the value target)."""
    rewards, values = rewards * mask, values * mask  # (B, T)
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float) -> dict:
    """PPO clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    Returns {"loss", "clipfrac" (share of tokens where the clipped term won), "approxkl" (0.5 * mean (log ratio)^2),
    "ratio" (mean ratio)}."""
    log_ratio = (logprobs - old_logprobs) * mask  # (B, T)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg1, pg2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
        mean_ratio = masked_mean(ratio, mask)
    return {"loss": loss, "clipfrac": clipfrac, "approxkl": approxkl, "ratio": mean_ratio}


def value_loss(values, old_values, returns, mask, cliprange_value: float) -> dict:
    """Clipped value loss: 0.5 * mean over tokens of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).

    Returns {"loss", "clipfrac" (share of tokens where the clipped term won)}."""
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf1 = (values - returns) ** 2
    vf2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((vf2 > vf1).float(), mask)
    return {"loss": loss, "clipfrac": clipfrac}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probs of tokens sampled from the policy.

    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, never negative)."""
    log_r = ref_logprobs - logprobs  # log q/p
    if kind == "k1":
        return -log_r
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise UserError(f"kl_estimator: expected 'k1' or 'k3', got {kind!r}")


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController:
    """Ziegler et al. (2019): steer the KL coefficient so the observed KL tracks `target`.

    e = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + e * n_steps / horizon."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient after a batch of n_steps episodes whose mean KL was current_kl."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


def kl_controller(kind: str, kl_coef: float, target: float, horizon: int):
    """Build the fixed or adaptive controller named in the config."""
    if kl_coef < 0:
        raise UserError(f"kl_coef: expected a number >= 0, got {kl_coef}")
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        if target <= 0 or horizon <= 0:
            raise UserError(f"kl_target and kl_horizon: expected > 0 for the adaptive controller, got {target}, {horizon}")
        return AdaptiveKLController(kl_coef, target, horizon)
    raise UserError(f"kl_controller: expected 'fixed' or 'adaptive', got {kind!r}")


# ----------------------------------------------------------------------------------------------------------------
# value head


class ValueHead(nn.Module):
    """A linear map from the last hidden state to a scalar value per token.

    `trunk=None`: the head sits on the policy's own trunk (shared hidden states, LoRA trained by both losses).
    Otherwise `trunk` is a separate base model (AutoModel) trained only by the value loss."""

    def __init__(self, hidden_size: int, trunk: nn.Module | None = None):
        super().__init__()
        self.trunk = trunk
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)  # start at V = 0: the first advantages are the rewards themselves
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) hidden states -> (B, T) values."""
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# rollouts


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class PPOHyper:
    """The knobs of PPO itself (the stage config extends these, so tests can build them directly)."""

    rollout_batch_size: int = _f(16, "Prompts (episodes) per PPO update.")
    mini_batch_size: int = _f(8, "Episodes per optimizer step; rollout_batch_size must be a multiple of it.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per minibatch (mini_batch_size must be a multiple of it).")
    num_ppo_epochs: int = _f(4, "Passes over each rollout batch.")
    response_length: int = _f(32, "Maximum new tokens per response.")
    temperature: float = _f(1.0, "Sampling temperature of rollouts (log-probs use the same temperature).")
    learning_rate: float = _f(1e-4, "AdamW learning rate (policy LoRA and value head).")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    gamma: float = _f(1.0, "Discount factor.")
    lam: float = _f(0.95, "GAE lambda.")
    cliprange: float = _f(0.2, "PPO policy ratio clip range.")
    cliprange_value: float = _f(0.2, "Value clip range around the rollout's values.")
    vf_coef: float = _f(0.1, "Weight of the value loss.")
    kl_coef: float = _f(0.05, "Initial KL penalty coefficient (>= 0).")
    kl_controller: str = _f("fixed", "fixed or adaptive (Ziegler et al. 2019).")
    kl_target: float = _f(6.0, "Adaptive controller: target KL per response (nats).")
    kl_horizon: int = _f(10000, "Adaptive controller: horizon in episodes.")
    kl_estimator: str = _f("k1", "Per-token KL estimator in the reward: k1 (log ratio) or k3 (non-negative).")
    whiten_rewards: bool = _f(False, "Whiten per-token rewards (scale only) before GAE.")
    missing_eos_penalty: float = _f(1.0, "Subtracted from the score of a response that never reaches end of turn.")
    seed: int = _f(0, "Seed of prompt order, sampling and initialisation.")


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (B, L) ids and attention mask (generation continues from the right edge)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
        att[i, L - len(s):] = 1
    return ids, att


def truncate_at_stop(responses: torch.Tensor, stop_ids: list[int], pad_id: int):
    """Cut each response after its first stop token. Returns (responses, mask (B, R), ended (B,) bool)."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))  # (B, R)
    ended = is_stop.any(1)
    first = torch.where(ended, is_stop.int().argmax(1), torch.full_like(ended, responses.shape[1], dtype=torch.long))
    pos = torch.arange(responses.shape[1], device=responses.device)[None]  # (1, R)
    mask = (pos <= first[:, None]).long()  # the stop token itself is part of the response
    return responses.masked_fill(mask == 0, pad_id), mask, ended


def forward_response(policy, value_head, query, query_mask, response, response_mask, temperature: float,
                     need_values: bool = True, need_logprobs: bool = True):
    """Run [query | response] through the policy. Returns (logprobs (B, R), values (B, R) or None).

    logprobs[t] = log pi(response_t | query, response_<t) at the sampling temperature; values[t] = V of the
    state before response_t. Positions come from the attention mask so left padding does not shift them."""
    ids = torch.cat([query, response], 1)  # (B, Q+R)
    att = torch.cat([query_mask, response_mask], 1)
    pos = (att.cumsum(1) - 1).clamp(min=0)
    Q, R = query.shape[1], response.shape[1]
    shared = value_head is not None and value_head.trunk is None and need_values
    out = policy(input_ids=ids, attention_mask=att, position_ids=pos, output_hidden_states=shared, use_cache=False)
    logprobs = None
    if need_logprobs:
        logits = out.logits[:, Q - 1: Q + R - 1].float() / temperature  # (B, R, V): the logits that predicted each response token
        logprobs = torch.gather(F.log_softmax(logits, -1), 2, response[..., None]).squeeze(-1)  # (B, R)
        logprobs = logprobs.masked_fill(response_mask == 0, INVALID_LOGPROB)
    values = None
    if need_values and value_head is not None:
        if shared:
            hidden = out.hidden_states[-1]
        else:
            hidden = value_head.trunk(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False).last_hidden_state
        values = value_head(hidden[:, Q - 1: Q + R - 1]) * response_mask  # (B, R)
    return logprobs, values


@dataclass
class Experience:
    """One batch of rollouts with everything the PPO epochs need (all (B, ...) tensors, no grad)."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor
    texts: list[str] = field(default_factory=list)

    def select(self, idx: torch.Tensor) -> "Experience":
        """The rows `idx` of every tensor field."""
        kw = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        kw["texts"] = []
        return Experience(**kw)


ScoreFn = Callable[[list, list[str], torch.Tensor, torch.Tensor], torch.Tensor]


class PPO:
    """The PPO loop state: policy (LoRA), value head, optimizer, KL controller, and the update step.

    policy: a peft model (reference = adapter disabled) or, for full fine-tuning, any causal LM with `ref_model`.
    score_fn(prompts, response_texts, response_ids, response_mask) -> (B,) normalised scores.
    prompts: a list of {"prompt": messages, "input_ids": [...]} rows, sampled in a seeded order per epoch."""

    def __init__(self, policy, value_head: ValueHead, tokenizer, score_fn: ScoreFn, prompts: list[dict],
                 hp: PPOHyper, stop_ids: list[int], ref_model=None, device: str | torch.device = "cpu"):
        self.policy, self.value_head, self.tokenizer, self.score_fn = policy, value_head, tokenizer, score_fn
        self.prompts, self.hp, self.stop_ids, self.ref_model = prompts, hp, list(stop_ids), ref_model
        self.device = torch.device(device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if ref_model is None and not hasattr(policy, "disable_adapter"):
            raise UserError("ppo: the policy has no LoRA adapter to disable; pass a reference model (or use_peft: true)")
        if hp.rollout_batch_size % hp.mini_batch_size or hp.mini_batch_size % hp.gradient_accumulation_steps:
            raise UserError(f"batch sizes: rollout_batch_size ({hp.rollout_batch_size}) must be a multiple of "
                            f"mini_batch_size ({hp.mini_batch_size}), and that of gradient_accumulation_steps "
                            f"({hp.gradient_accumulation_steps})")
        self.kl_ctl = kl_controller(hp.kl_controller, hp.kl_coef, hp.kl_target, hp.kl_horizon)
        self.params = [p for p in list(policy.parameters()) + list(value_head.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=hp.learning_rate, eps=1e-5, weight_decay=0.0)
        self.step = 0
        self.history: list[dict] = []

    # -- rollouts --------------------------------------------------------------------------------------------

    def prompt_batch(self, step: int) -> list[dict]:
        """The prompts of update `step`: a seeded permutation per pass over the prompts, so resume needs no state."""
        B, n = self.hp.rollout_batch_size, len(self.prompts)
        out = []
        for k in range(step * B, (step + 1) * B):
            epoch, i = divmod(k, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.hp.seed * 100003 + epoch))
            out.append(self.prompts[int(perm[i])])
        return out

    def ref_logprobs(self, query, query_mask, response, response_mask):
        """Log-probs of the response under the reference: the policy with its adapter disabled."""
        if self.ref_model is not None:
            return forward_response(self.ref_model, None, query, query_mask, response, response_mask, self.hp.temperature, need_values=False)[0]
        with self.policy.disable_adapter():
            return forward_response(self.policy, None, query, query_mask, response, response_mask, self.hp.temperature, need_values=False)[0]

    @torch.no_grad()
    def rollout(self, rows: list[dict], reference: bool = False):
        """Sample responses (from the reference when `reference`). Returns query, query_mask, response, mask, ended, texts."""
        hp = self.hp
        query, query_mask = left_pad([r["input_ids"] for r in rows], self.pad_id)
        query, query_mask = query.to(self.device), query_mask.to(self.device)
        kw = dict(input_ids=query, attention_mask=query_mask, do_sample=True, temperature=hp.temperature, top_k=0, top_p=1.0,
                  max_new_tokens=hp.response_length, eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        if reference and self.ref_model is not None:
            out = self.ref_model.generate(**kw)
        elif reference:
            with self.policy.disable_adapter():
                out = self.policy.generate(**kw)
        else:
            out = self.policy.generate(**kw)
        response, response_mask, ended = truncate_at_stop(out[:, query.shape[1]:], self.stop_ids, self.pad_id)
        texts = [response_content(self.tokenizer.decode(r[m.bool()], skip_special_tokens=False)) for r, m in zip(response, response_mask)]
        return query, query_mask, response, response_mask, ended, texts

    def scores(self, rows, texts, response, response_mask, ended) -> torch.Tensor:
        """Normalised reward-model (or programmatic) scores minus the penalty for responses that never end, (B,)."""
        s = self.score_fn([r["prompt"] for r in rows], texts, response, response_mask).to(self.device).float()
        return s - self.hp.missing_eos_penalty * (~ended).float()

    @torch.no_grad()
    def make_experience(self, rows: list[dict]) -> Experience:
        """Generate, score and compute per-token rewards, advantages and returns for a batch of prompts."""
        hp = self.hp
        self.policy.eval()
        self.value_head.eval()
        query, query_mask, response, response_mask, ended, texts = self.rollout(rows)
        logprobs, values = forward_response(self.policy, self.value_head, query, query_mask, response, response_mask, hp.temperature)
        ref_logprobs = self.ref_logprobs(query, query_mask, response, response_mask)
        scores = self.scores(rows, texts, response, response_mask, ended)

        mask = response_mask.float()
        kl = kl_estimate(logprobs, ref_logprobs, hp.kl_estimator) * mask  # (B, R)
        rewards = -self.kl_ctl.value * kl
        last = response_mask.sum(1) - 1  # (B,) index of the last real response token
        rewards[torch.arange(len(rows), device=rewards.device), last] += scores
        if hp.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, hp.gamma, hp.lam)
        advantages = whiten(advantages, mask)
        return Experience(query, query_mask, response, response_mask, ended, logprobs, ref_logprobs, values, scores,
                          rewards, advantages, returns, kl, texts)

    # -- the update ------------------------------------------------------------------------------------------

    def train_on(self, exp: Experience) -> dict:
        """Several epochs of clipped policy + value loss over shuffled minibatches with gradient accumulation."""
        hp = self.hp
        self.policy.train()
        self.value_head.train()
        B = exp.query.shape[0]
        micro = hp.mini_batch_size // hp.gradient_accumulation_steps
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "pg_clip", "vf_clip", "approxkl", "ratio", "entropy")}
        for _ in range(hp.num_ppo_epochs):
            perm = torch.randperm(B)
            for start in range(0, B, hp.mini_batch_size):
                self.optimizer.zero_grad(set_to_none=True)
                for m in range(start, start + hp.mini_batch_size, micro):
                    mb = exp.select(perm[m: m + micro].to(exp.query.device))
                    mask = mb.response_mask.float()
                    logprobs, values = forward_response(self.policy, self.value_head, mb.query, mb.query_mask,
                                                        mb.response, mb.response_mask, hp.temperature)
                    pg = policy_loss(logprobs, mb.logprobs, mb.advantages, mask, hp.cliprange)
                    vf = value_loss(values, mb.values, mb.returns, mask, hp.cliprange_value)
                    loss = pg["loss"] + hp.vf_coef * vf["loss"]
                    (loss / hp.gradient_accumulation_steps).backward()
                    for k, v in (("pg", pg["loss"]), ("vf", vf["loss"]), ("pg_clip", pg["clipfrac"]), ("vf_clip", vf["clipfrac"]),
                                 ("approxkl", pg["approxkl"]), ("ratio", pg["ratio"]), ("entropy", masked_mean(-logprobs, mask))):
                        stats[k].append(float(v.detach()))
                if hp.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, hp.max_grad_norm)
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        return {k: mean(v) for k, v in stats.items()}

    def update(self) -> dict:
        """One PPO iteration: rollouts for the next prompt batch, the PPO epochs, the KL controller. Returns metrics."""
        rows = self.prompt_batch(self.step)
        exp = self.make_experience(rows)
        s = self.train_on(exp)
        mask = exp.response_mask.float()
        seq_kl = exp.kl.sum(1)  # (B,)
        kl_coef = self.kl_ctl.value
        non_score = (-kl_coef * exp.kl).sum(1)
        metrics = {
            "episode": (self.step + 1) * self.hp.rollout_batch_size,
            "objective/kl": float(seq_kl.mean()),
            "objective/entropy": float((-exp.logprobs * mask).sum(1).mean()),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float((exp.scores + non_score).mean()),
            "objective/scores": float(exp.scores.mean()),
            "policy/approxkl_avg": s["approxkl"],
            "policy/clipfrac_avg": s["pg_clip"],
            "policy/entropy_avg": s["entropy"],
            "loss/policy_avg": s["pg"],
            "loss/value_avg": s["vf"],
            "val/clipfrac_avg": s["vf_clip"],
            "val/ratio": s["ratio"],
            "val/num_eos_tokens": int(exp.ended.sum()),
            "val/response_length": float(mask.sum(1).mean()),
            "kl_coef": kl_coef,
            "lr": self.hp.learning_rate,
        }
        self.kl_ctl.update(metrics["objective/kl"], self.hp.rollout_batch_size)
        self.step += 1
        metrics["step"] = self.step
        self.history.append(metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self, rows: list[dict], batch_size: int = 16) -> dict:
        """Score policy and reference responses to the same prompts: mean scores, KL of the policy, win rate."""
        self.policy.eval()
        pol, ref, kls = [], [], []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i: i + batch_size]
            q, qm, r, rm, ended, texts = self.rollout(chunk)
            pol.append(self.scores(chunk, texts, r, rm, ended))
            lp, _ = forward_response(self.policy, None, q, qm, r, rm, self.hp.temperature, need_values=False)
            kls.append((kl_estimate(lp, self.ref_logprobs(q, qm, r, rm), "k1") * rm).sum(1))
            q, qm, r, rm, ended, texts = self.rollout(chunk, reference=True)
            ref.append(self.scores(chunk, texts, r, rm, ended))
        pol, ref, kls = torch.cat(pol), torch.cat(ref), torch.cat(kls)
        win = float(((pol > ref).float() + 0.5 * (pol == ref).float()).mean())
        return {"score_policy": float(pol.mean()), "score_reference": float(ref.mean()), "kl": float(kls.mean()),
                "win_rate": win, "n": len(rows)}

    # -- checkpoint ------------------------------------------------------------------------------------------

    def trainable_state(self) -> dict:
        """The trainable tensors of policy (LoRA, or everything for full fine-tuning) and value head, by name."""
        state = {f"policy.{n}": p.detach().cpu().clone() for n, p in self.policy.named_parameters() if p.requires_grad}
        state.update({f"value.{n}": p.detach().cpu().clone() for n, p in self.value_head.named_parameters() if p.requires_grad})
        return state

    def save_checkpoint(self, path: str | Path) -> None:
        """Everything an exact resume needs: trainable weights, optimizer, KL controller, step, metrics, RNG."""
        import numpy as np

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.trainable_state(), path / "trainable.pt")
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, path / "rng.pt")
        (path / "state.json").write_text(json.dumps({"step": self.step, "kl_controller": self.kl_ctl.state_dict(),
                                                     "hyper": asdict(self.hp), "history": self.history}, indent=1))

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by save_checkpoint (same models, same config)."""
        import numpy as np

        path = Path(path)
        if not (path / "state.json").is_file():
            raise UserError(f"{path}: not a PPO checkpoint (no state.json)")
        state = torch.load(path / "trainable.pt", map_location="cpu")
        named = {f"policy.{n}": p for n, p in self.policy.named_parameters() if p.requires_grad}
        named.update({f"value.{n}": p for n, p in self.value_head.named_parameters() if p.requires_grad})
        if set(named) != set(state):
            diff = sorted(set(named) ^ set(state))[:3]
            raise UserError(f"{path}: checkpoint does not match this model and LoRA config (differs at {diff})")
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(state[k])
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
        meta = json.loads((path / "state.json").read_text())
        self.step, self.history = meta["step"], meta["history"]
        self.kl_ctl.load_state_dict(meta["kl_controller"])
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# prompts and the reward model


def read_prompt_rows(path: str | Path, limit: int = 0) -> list[tuple[int, list[dict]]]:
    """(line number, prompt messages) from .jsonl(.gz): rows with "prompt" (messages or a string, which becomes one
    user turn), or hh-rlhf rows with "chosen" (the dialogue up to its last assistant turn)."""
    from .data import read_prompt_rows as read_rows

    rows = read_rows(path, limit or None)
    return [(i, [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"]) for i, r in rows]


def encode_prompts(tokenizer, rows, context: int, response_length: int, where: str, long_prompts: str = "error") -> list[dict]:
    """Encode prompts with the chat template and the generation prompt.

    A prompt that leaves no room for response_length tokens in the context is an error, or with
    long_prompts="skip" is dropped and counted."""
    from .tokens import encode_chat

    if long_prompts not in ("error", "skip"):
        raise UserError(f"long_prompts: expected 'error' or 'skip', got {long_prompts!r}")
    out, skipped = [], 0
    for line, msgs in rows:
        ids = encode_chat(tokenizer, msgs, add_generation_prompt=True)["input_ids"]
        if len(ids) + response_length > context:
            if long_prompts == "skip":
                skipped += 1
                continue
            raise UserError(f"{where}:{line}: prompt is {len(ids)} tokens; with response_length {response_length} "
                            f"that exceeds the model context of {context} tokens (or set long_prompts: skip)")
        out.append({"prompt": msgs, "input_ids": ids})
    if skipped:
        print(f"{where}: skipped {skipped} of {len(rows)} prompts too long for the context", file=sys.stderr)
    if not out:
        raise UserError(f"{where}: no prompt fits the context of {context} tokens with response_length {response_length}")
    return out


def reward_stats(reward_dir: str | Path, normalize: bool) -> tuple[float, float]:
    """(mean, std) to normalise reward-model scores, from reward_stats.json; (0, 1) when normalize is off."""
    if not normalize:
        return 0.0, 1.0
    path = Path(reward_dir) / "reward_stats.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; expected the reward stage's normalisation statistics "
                        f"(or set normalize_reward: false to use raw scores)")
    try:
        s = json.loads(path.read_text())
        mean, std = float(s["mean"]), float(s["std"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"{path}: expected a JSON object with numeric 'mean' and 'std'") from None
    if not math.isfinite(mean) or not math.isfinite(std) or std <= 0:
        raise UserError(f"{path}: expected a finite mean and a std > 0, got mean={mean}, std={std}")
    return mean, std


def check_same_tokenizer(policy_tok, reward_tok, policy_path: str, reward_path: str) -> None:
    """The reward model must read tokens the way the policy writes them: same vocabulary and special tokens."""
    if policy_tok.get_vocab() != reward_tok.get_vocab() or policy_tok.all_special_tokens != reward_tok.all_special_tokens:
        raise UserError(f"{reward_path}: the reward model's tokenizer differs from the policy's ({policy_path}); "
                        f"expected both stages to use the same tokenizer")


class RewardModelScorer:
    """Score (prompt, response) conversations with a sequence-classification reward model, normalised.

    The conversation is re-rendered with the chat template, exactly as the reward stage saw chosen/rejected
    answers, and scored at its last token."""

    def __init__(self, model, tokenizer, mean: float, std: float, batch_size: int = 16):
        self.model, self.tokenizer, self.mean, self.std, self.batch_size = model, tokenizer, mean, std, batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def raw(self, conversations: list[list[dict]]) -> torch.Tensor:
        """Unnormalised reward-model scores of full conversations, (N,)."""
        from .modeling import reward_scores
        from .tokens import encode_chat

        seqs = [encode_chat(self.tokenizer, c)["input_ids"] for c in conversations]
        return reward_scores(self.model, seqs, self.pad_id, batch_size=self.batch_size)

    def __call__(self, prompts, texts, response=None, response_mask=None) -> torch.Tensor:
        """Normalised scores (N,) of each prompt followed by the assistant response text."""
        conv = [list(p) + [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]
        return (self.raw(conv) - self.mean) / self.std


def response_content(text: str) -> str:
    """The assistant content of a generated response: the text before its end-of-turn / end-of-text token."""
    for stop in ("<|im_end|>", "<|endoftext|>"):
        text = text.split(stop)[0]
    return text


# ----------------------------------------------------------------------------------------------------------------
# plots


def plot_curves(history: list[dict], path: str | Path) -> bool:
    """Write reward and KL per update as a PNG; returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes, ("objective/scores", "objective/rlhf_reward", "objective/kl")):
        ax.plot(steps, [h[key] for h in history], marker=".")
        ax.set_title(key)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------------
# loading shared by `align ppo`, `align rloo` and `align grpo`


def load_reward_model(path: str, load_in_8bit: bool, device):
    """The frozen reward model (AutoModelForSequenceClassification, 1 label), optionally 8-bit."""
    from transformers import AutoModelForSequenceClassification

    from .modeling import quantization_config

    q = quantization_config(type("RewardArgs", (), {"load_in_8bit": load_in_8bit, "load_in_4bit": False})())
    kw = {"quantization_config": q, "device_map": {"": str(device)}} if q is not None else {}
    rm = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32 if q is None else torch.float16, **kw)
    if q is None:
        rm.to(device)
    return rm.eval().requires_grad_(False)


@dataclass
class OnlineRLArguments:
    """Reward model and prompts for `align rloo` / `align grpo` (training: TRL's RLOOConfig / GRPOConfig)."""

    reward_model: str = _f("runs/tiny/reward/merged", "Reward model directory (sequence classification, 1 label).")
    normalize_reward: bool = _f(True, "Normalise scores with <reward_model>/reward_stats.json (false = raw scores).")
    reward_load_in_8bit: bool = _f(False, "Load the reward model in 8-bit (bitsandbytes).")
    reward_batch_size: int = _f(16, "Sequences per reward-model forward pass.")
    missing_eos_penalty: float = _f(1.0, "Subtracted from the score of a completion that never reaches end of turn.")
    prompts: str = _f("runs/tiny/data/rl/prompts.jsonl", "Prompts .jsonl(.gz): {'prompt': messages} rows or HH dialogues.")
    max_prompts: int = _f(0, "Use at most this many prompts (0 = all).")
    long_prompts: str = _f("error", "A prompt too long for the context: 'error' (stop, naming it) or 'skip' (count).")
    cpu_threads: int = _f(0, "torch threads on CPU (0 = torch's default). 1 is several times faster for tiny models on a busy machine.")
    overwrite: bool = _f(False, "Replace an existing output directory (else resume from its last checkpoint).")


def run_trl_online(trainer_name: str, cfg) -> dict:
    """`align rloo` / `align grpo`: TRL's RLOOTrainer / GRPOTrainer with our reward model, prompts and outputs.

    cfg: (OnlineRLArguments, RLOOConfig | GRPOConfig, ModelConfig)."""
    import time

    import trl
    from datasets import Dataset
    from transformers import AutoConfig
    from transformers.trainer_utils import get_last_checkpoint

    from .config import cpu_fallback, save_config
    from .io import atomic_write_json, check_output_dir
    from .modeling import check_model_dir, load_model, load_tokenizer, lora_config, save_stage_outputs

    script, args, model_args = cfg
    t0 = time.time()
    cpu_fallback(args)
    if not model_args.model_name_or_path:
        raise UserError("model_name_or_path: expected the SFT model directory (e.g. runs/tiny/sft/merged)")
    check_model_dir(model_args.model_name_or_path, "model_name_or_path")
    check_model_dir(script.reward_model, "reward_model")
    if args.beta < 0:
        raise UserError(f"beta: expected the KL coefficient >= 0, got {args.beta}")
    out = Path(args.output_dir)
    last = get_last_checkpoint(str(out)) if out.is_dir() and not script.overwrite else None
    if last is None:
        check_output_dir(out, script.overwrite)
    mean, std = reward_stats(script.reward_model, script.normalize_reward)
    tok = load_tokenizer(model_args.model_name_or_path)
    check_same_tokenizer(tok, load_tokenizer(script.reward_model), model_args.model_name_or_path, script.reward_model)
    context = AutoConfig.from_pretrained(model_args.model_name_or_path).max_position_embeddings
    rows = read_prompt_rows(script.prompts, script.max_prompts)
    kept = encode_prompts(tok, rows, context, args.max_completion_length or 0, script.prompts, script.long_prompts)
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in kept])
    stop_ids = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int)}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if script.cpu_threads and device.type == "cpu":
        torch.set_num_threads(script.cpu_threads)
    scorer = RewardModelScorer(load_reward_model(script.reward_model, script.reward_load_in_8bit, device), tok, mean, std,
                               script.reward_batch_size)

    def reward_model(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        """Normalised reward-model score of each prompt + completion, minus the missing end-of-turn penalty."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        prompts = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        s = scorer(prompts, [response_content(t) for t in texts])
        if completion_ids is not None:
            ended = torch.tensor([any(i in stop_ids for i in ids) for ids in completion_ids])
            s = s - script.missing_eos_penalty * (~ended).float()
        return s.tolist()

    if out.exists() and script.overwrite:
        import shutil

        shutil.rmtree(out)
    policy = load_model(model_args.model_name_or_path, model_args, kind="causal", tokenizer=tok)
    trainer_cls = getattr(trl, trainer_name)
    trainer = trainer_cls(model=policy, reward_funcs=reward_model, args=args, train_dataset=dataset, processing_class=tok,
                          peft_config=lora_config(model_args) if model_args.use_peft else None)
    result = trainer.train(resume_from_checkpoint=last)
    save_stage_outputs(trainer.model, tok, model_args.model_name_or_path, out, overwrite=True)
    save_config(out, script, args, model_args)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    summary = {"trainer": trainer_name, "steps": result.global_step, "seconds": round(time.time() - t0, 1),
               "first_log": logs[0] if logs else None, "last_log": logs[-1] if logs else None}
    atomic_write_json(out / "summary.json", summary)
    if logs:
        f, l = logs[0], logs[-1]
        print(f"{trainer_name}: {result.global_step} steps in {summary['seconds']}s -> {out}/merged; reward "
              f"{f['reward']:+.3f} -> {l['reward']:+.3f}, kl {f.get('kl', float('nan')):.4f} -> {l.get('kl', float('nan')):.4f}")
    return summary
