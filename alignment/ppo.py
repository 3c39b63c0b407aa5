"""Our PPO for RLHF: the math, the value head, rollouts, and one readable update loop.

`recipes/ppo.py` (`align ppo`) loads the models and calls this; tests drive it directly on tiny models. Sampling
goes through `alignment.sampling`, scores through a score function (`alignment.rewards`).

One update (Ouyang et al. 2022; Ziegler et al. 2019; the "N implementation details of RLHF with PPO" notes):
  1. sample a batch of prompts, generate responses with the LoRA policy (stop at end of turn)
  2. score prompt + response (the reward model, normalised by the statistics the reward stage saved, a fixed
     penalty for responses that never end: alignment.rewards)
  3. per-token reward = -kl_coef * KL(policy || reference) + score on the last response token, where the
     reference is the same network with its LoRA adapter disabled (no second copy in memory)
  4. GAE advantages from a value head, whitened; several epochs of clipped policy + clipped value loss over
     minibatches with gradient accumulation
  5. update the KL coefficient (fixed, or adaptive towards a target KL)
Metrics carry TRL's names (objective/kl, policy/clipfrac_avg, ...) so they read as TRL users know them.

Data parallel under `accelerate launch` / `torchrun` (alignment.distributed): each process generates, scores and
runs the forward passes for its share of the rollout batch; the per-sample tensors are gathered, so every process
computes rewards, whitening, GAE and metrics over the whole batch; each minibatch is split over the processes and the
losses are sums over tokens divided by the minibatch's token count, so summing the gradients over processes gives
the gradient of the whole minibatch. Each prompt samples from its own seed (seed, update, index in the batch), so
its response does not depend on which process draws it: any number of processes runs the same training, up to
float rounding. Checkpoints are written by rank 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .errors import UserError
from .io import atomic_torch_save, atomic_write_json, rng_state, safe_torch_load, set_rng_state
from .sampling import SamplingParams, generate_batch, left_pad, row_seed, truncate_at_stop

INVALID_LOGPROB = 1.0  # filler for padded response positions; always masked out


# ----------------------------------------------------------------------------------------------------------------
# math


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (all of them, or along `dim`)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_mean(x: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """masked_mean of x, or, with `n_tokens`, the masked sum divided by it: the share of a mean over a minibatch that
    is split over micro-batches and processes (the shares of all parts add up to the minibatch's mean)."""
    return masked_mean(x, mask) if n_tokens is None else (x * mask).sum() / n_tokens


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


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float, n_tokens=None) -> dict:
    """PPO clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    Returns {"loss", "clipfrac" (share of tokens where the clipped term won), "approxkl" (0.5 * mean (log ratio)^2),
    "ratio" (mean ratio)}; with `n_tokens` each is this part's share of the minibatch's mean (token_mean)."""
    log_ratio = (logprobs - old_logprobs) * mask  # (B, T)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = token_mean(torch.max(pg1, pg2), mask, n_tokens)
    with torch.no_grad():
        clipfrac = token_mean((pg2 > pg1).float(), mask, n_tokens)
        approxkl = 0.5 * token_mean(log_ratio**2, mask, n_tokens)
        mean_ratio = token_mean(ratio, mask, n_tokens)
    return {"loss": loss, "clipfrac": clipfrac, "approxkl": approxkl, "ratio": mean_ratio}


def value_loss(values, old_values, returns, mask, cliprange_value: float, n_tokens=None) -> dict:
    """Clipped value loss: 0.5 * mean over tokens of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).

    Returns {"loss", "clipfrac" (share of tokens where the clipped term won)}; with `n_tokens` each is this part's
    share of the minibatch's mean (token_mean)."""
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf1 = (values - returns) ** 2
    vf2 = (v_clipped - returns) ** 2
    loss = 0.5 * token_mean(torch.max(vf1, vf2), mask, n_tokens)
    with torch.no_grad():
        clipfrac = token_mean((vf2 > vf1).float(), mask, n_tokens)
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
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of rollouts (log-probs use the same temperature).",
                                                      "range": (0, None, False, True, ())})
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
    seed: int = _f(0, "Seed of prompt order, sampling and initialisation.")


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


ScoreFn = Callable[[list[dict], list], torch.Tensor]


def check_batch_sizes(hp: PPOHyper, world: int = 1) -> None:
    """rollout_batch_size must be a multiple of mini_batch_size, and that of processes x gradient_accumulation_steps
    (each process takes mini_batch_size / processes episodes of every minibatch, in that many micro-batches)."""
    if hp.rollout_batch_size % hp.mini_batch_size or hp.mini_batch_size % (world * hp.gradient_accumulation_steps):
        procs = f"{world} processes x " if world > 1 else ""
        raise UserError(f"batch sizes: rollout_batch_size ({hp.rollout_batch_size}) must be a multiple of "
                        f"mini_batch_size ({hp.mini_batch_size}), and that of {procs}gradient_accumulation_steps "
                        f"({hp.gradient_accumulation_steps})")


class PPO:
    """The PPO loop state: policy (LoRA), value head, optimizer, KL controller, and the update step.

    policy: a peft model (reference = adapter disabled) or, for full fine-tuning, any causal LM with `ref_model`.
    score_fn(rows, completions) -> (B,) scores (rows: the prompt dicts; completions: alignment.sampling.Completion).
    prompts: a list of {"prompt": messages, "input_ids": [...], ...the row's other fields} (alignment.data.encode_prompts),
    sampled in a seeded order per epoch. Under a launcher every process builds the same PPO and calls the same methods;
    each works on its share of every batch (module docstring)."""

    def __init__(self, policy, value_head: ValueHead, tokenizer, score_fn: ScoreFn, prompts: list[dict],
                 hp: PPOHyper, stop_ids: list[int], ref_model=None, device: str | torch.device = "cpu"):
        self.policy, self.value_head, self.tokenizer, self.score_fn = policy, value_head, tokenizer, score_fn
        self.prompts, self.hp, self.stop_ids, self.ref_model = prompts, hp, list(stop_ids), ref_model
        self.device = torch.device(device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if ref_model is None and not hasattr(policy, "disable_adapter"):
            raise UserError("ppo: the policy has no LoRA adapter to disable; pass a reference model (or use_peft: true)")
        check_batch_sizes(hp, self.world)
        self.kl_ctl = kl_controller(hp.kl_controller, hp.kl_coef, hp.kl_target, hp.kl_horizon)
        self.params = [p for p in list(policy.parameters()) + list(value_head.parameters()) if p.requires_grad]
        distributed.broadcast_params(self.params)  # every process starts from rank 0's initialisation
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

    def share(self, n: int) -> range:
        """This process's contiguous share of n items (all of them for one process; the last shares may be shorter)."""
        size = -(-n // self.world)
        return range(min(n, self.rank * size), min(n, (self.rank + 1) * size))

    def ref_logprobs(self, query, query_mask, response, response_mask):
        """Log-probs of the response under the reference: the policy with its adapter disabled."""
        if self.ref_model is not None:
            return forward_response(self.ref_model, None, query, query_mask, response, response_mask, self.hp.temperature, need_values=False)[0]
        with self.policy.disable_adapter():
            return forward_response(self.policy, None, query, query_mask, response, response_mask, self.hp.temperature, need_values=False)[0]

    @torch.no_grad()
    def rollout(self, rows: list[dict], seeds: list[int], reference: bool = False, query_width: int | None = None):
        """Sample responses, row i from its own seed (from the reference when `reference`); queries left-padded to
        `query_width` when given. Returns query, query_mask, response, mask, ended, texts."""
        from .sampling import decode_response

        query, query_mask = left_pad([r["input_ids"] for r in rows], self.pad_id, self.device, width=query_width)
        params = SamplingParams(max_new_tokens=self.hp.response_length, temperature=self.hp.temperature, seed=None)
        if reference and self.ref_model is not None:
            new = generate_batch(self.ref_model, query, query_mask, params, self.stop_ids, self.pad_id, row_seeds=seeds)
        elif reference:
            with self.policy.disable_adapter():
                new = generate_batch(self.policy, query, query_mask, params, self.stop_ids, self.pad_id, row_seeds=seeds)
        else:
            new = generate_batch(self.policy, query, query_mask, params, self.stop_ids, self.pad_id, row_seeds=seeds)
        response, response_mask, ended = truncate_at_stop(new, self.stop_ids, self.pad_id)
        texts = [decode_response(self.tokenizer, r[m.bool()].tolist(), self.stop_ids) for r, m in zip(response, response_mask)]
        return query, query_mask, response, response_mask, ended, texts

    def scores(self, rows, texts, response, response_mask, ended) -> torch.Tensor:
        """The score function's scores of the responses, (B,)."""
        from .sampling import FINISH_LENGTH, FINISH_STOP, Completion

        comps = [Completion(r[m.bool()].tolist(), t, FINISH_STOP if e else FINISH_LENGTH, 0)
                 for r, m, t, e in zip(response, response_mask, texts, ended.tolist())]
        return torch.as_tensor(self.score_fn(rows, comps), dtype=torch.float32).to(self.device)

    @torch.no_grad()
    def make_experience(self, rows: list[dict], step: int | None = None) -> Experience:
        """Generate, score and compute per-token rewards, advantages and returns for a batch of prompts.

        Each process generates, scores and runs the forward passes for its share of `rows`; the results are gathered,
        so the rewards, whitening and advantages are those of the whole batch, on every process."""
        hp = self.hp
        self.policy.eval()
        self.value_head.eval()
        step = self.step if step is None else step
        mine = self.share(len(rows))
        seeds = [row_seed(hp.seed, step, k) for k in mine]  # prompt k of update `step` samples alike on any process
        width = max(len(r["input_ids"]) for r in rows)  # the whole batch's query width, the same on every process
        query, query_mask, response, response_mask, ended, texts = self.rollout([rows[k] for k in mine], seeds, query_width=width)
        R = int(distributed.all_reduce(torch.tensor(response.shape[1]), "max"))  # the whole batch's response width
        response = F.pad(response, (0, R - response.shape[1]), value=self.pad_id)  # (b, R)
        response_mask = F.pad(response_mask, (0, R - response_mask.shape[1]))
        logprobs, values = forward_response(self.policy, self.value_head, query, query_mask, response, response_mask, hp.temperature)
        ref_logprobs = self.ref_logprobs(query, query_mask, response, response_mask)
        scores = self.scores([rows[k] for k in mine], texts, response, response_mask, ended)
        if self.world > 1:  # every process gets the whole batch, in prompt order (shares are contiguous)
            query, query_mask, response, response_mask, ended, logprobs, ref_logprobs, values, scores = (
                distributed.all_gather_cat(t) for t in (query, query_mask, response, response_mask, ended, logprobs,
                                                        ref_logprobs, values, scores))
            texts = [t for part in distributed.all_gather_objects(texts) for t in part]

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

    def train_on(self, exp: Experience, step: int | None = None) -> dict:
        """Several epochs of clipped policy + value loss over shuffled minibatches with gradient accumulation.

        The minibatches are the same on every process (a permutation seeded by seed, update and epoch); each process
        takes its share of a minibatch in `gradient_accumulation_steps` micro-batches. Losses are sums over tokens
        divided by the minibatch's token count, so the gradients summed over micro-batches and processes are the
        gradient of the minibatch's mean loss, however it is split."""
        hp = self.hp
        self.policy.train()
        self.value_head.train()
        step = self.step if step is None else step
        B, M = exp.query.shape[0], hp.mini_batch_size
        micro = M // self.world // hp.gradient_accumulation_steps
        keys = ("pg", "vf", "pg_clip", "vf_clip", "approxkl", "ratio", "entropy")
        sums = torch.zeros(len(keys), dtype=torch.float64)  # this process's shares of each minibatch's means, summed
        n_minibatches = 0
        for epoch in range(hp.num_ppo_epochs):
            perm = torch.randperm(B, generator=torch.Generator().manual_seed(row_seed(hp.seed, step, epoch)))
            for start in range(0, B, M):
                self.optimizer.zero_grad(set_to_none=True)
                idx = perm[start: start + M]
                n_tokens = exp.response_mask[idx.to(exp.response_mask.device)].sum().clamp(min=1).float()  # the whole minibatch's
                mine = idx[self.rank * (M // self.world): (self.rank + 1) * (M // self.world)]
                for m in range(0, len(mine), micro):
                    mb = exp.select(mine[m: m + micro].to(exp.query.device))
                    mask = mb.response_mask.float()
                    logprobs, values = forward_response(self.policy, self.value_head, mb.query, mb.query_mask,
                                                        mb.response, mb.response_mask, hp.temperature)
                    pg = policy_loss(logprobs, mb.logprobs, mb.advantages, mask, hp.cliprange, n_tokens)
                    vf = value_loss(values, mb.values, mb.returns, mask, hp.cliprange_value, n_tokens)
                    (pg["loss"] + hp.vf_coef * vf["loss"]).backward()
                    sums += torch.tensor([float(v.detach()) for v in (pg["loss"], vf["loss"], pg["clipfrac"], vf["clipfrac"], pg["approxkl"],
                                                                       pg["ratio"], token_mean(-logprobs.detach(), mask, n_tokens))],
                                         dtype=torch.float64)
                distributed.all_reduce_grads(self.params)  # sum over processes: the whole minibatch's gradient
                if hp.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, hp.max_grad_norm)
                self.optimizer.step()
                n_minibatches += 1
        self.optimizer.zero_grad(set_to_none=True)
        means = distributed.all_reduce(sums) / max(n_minibatches, 1)
        return dict(zip(keys, means.tolist()))

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
        """Score policy and reference responses to the same prompts: mean scores, KL of the policy, win rate.

        Prompt i samples from the same seed for the policy and the reference, in every evaluation; each process
        evaluates its share of the rows."""
        self.policy.eval()
        mine = list(self.share(len(rows)))
        pol, ref, kls = [], [], []
        for i in range(0, len(mine), batch_size):
            idx = mine[i: i + batch_size]
            chunk, seeds = [rows[k] for k in idx], [row_seed(self.hp.seed, 2**31, k) for k in idx]
            q, qm, r, rm, ended, texts = self.rollout(chunk, seeds)
            pol += self.scores(chunk, texts, r, rm, ended).tolist()
            lp, _ = forward_response(self.policy, None, q, qm, r, rm, self.hp.temperature, need_values=False)
            kls += (kl_estimate(lp, self.ref_logprobs(q, qm, r, rm), "k1") * rm).sum(1).tolist()
            q, qm, r, rm, ended, texts = self.rollout(chunk, seeds, reference=True)
            ref += self.scores(chunk, texts, r, rm, ended).tolist()
        pol, ref, kls = (torch.tensor([x for part in distributed.all_gather_objects(v) for x in part]) for v in (pol, ref, kls))
        from .stats import win_rate

        return {"score_policy": float(pol.mean()), "score_reference": float(ref.mean()), "kl": float(kls.mean()),
                "win_rate": win_rate(pol.cpu().numpy(), ref.cpu().numpy())["win_rate"], "n": len(rows)}

    # -- checkpoint ------------------------------------------------------------------------------------------

    def trainable_state(self) -> dict:
        """The trainable tensors of policy (LoRA, or everything for full fine-tuning) and value head, by name."""
        state = {f"policy.{n}": p.detach().cpu().clone() for n, p in self.policy.named_parameters() if p.requires_grad}
        state.update({f"value.{n}": p.detach().cpu().clone() for n, p in self.value_head.named_parameters() if p.requires_grad})
        return state

    def save_checkpoint(self, path: str | Path) -> None:
        """Everything an exact resume needs: trainable weights, optimizer, KL controller, step, metrics, RNG.

        Tensors and plain values only (loaded back with weights_only=True: a checkpoint never runs code)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.trainable_state(), path / "trainable.pt")
        atomic_torch_save(self.optimizer.state_dict(), path / "optimizer.pt")
        atomic_torch_save(rng_state(), path / "rng.pt")
        atomic_write_json(path / "state.json", {"step": self.step, "kl_controller": self.kl_ctl.state_dict(),
                                                "hyper": asdict(self.hp), "history": self.history}, indent=1)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by save_checkpoint (same models, same config)."""
        path = Path(path)
        if not (path / "state.json").is_file():
            raise UserError(f"{path}: not a PPO checkpoint (no state.json)")
        state = safe_torch_load(path / "trainable.pt", "PPO checkpoint")
        named = {f"policy.{n}": p for n, p in self.policy.named_parameters() if p.requires_grad}
        named.update({f"value.{n}": p for n, p in self.value_head.named_parameters() if p.requires_grad})
        if not isinstance(state, dict) or set(named) != set(state):
            diff = sorted(set(named) ^ set(state if isinstance(state, dict) else {}))[:3]
            raise UserError(f"{path}: checkpoint does not match this model and LoRA config (differs at {diff})")
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(state[k])
        self.optimizer.load_state_dict(safe_torch_load(path / "optimizer.pt", "PPO optimizer state"))
        try:
            meta = json.loads((path / "state.json").read_text())
            self.step, self.history = meta["step"], meta["history"]
            self.kl_ctl.load_state_dict(meta["kl_controller"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path / 'state.json'}: expected the JSON a PPO checkpoint writes (step, history, kl_controller)") from None
        set_rng_state(safe_torch_load(path / "rng.pt", "PPO RNG state"))


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
