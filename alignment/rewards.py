"""Rewards: a learned reward model scoring (prompt, response) pairs, normalised with the statistics the reward
stage saved. Used by PPO, RLOO / GRPO, on-policy pairs and the win-rate eval: one way to score a response.

A response is rendered exactly as the reward stage saw its chosen/rejected replies: the prompt through the chat
template with the generation prompt, then the reply ending at its end-of-turn token, where the score is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .tokens import encode_prompt, reply_ids


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
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: expected a JSON object with numeric 'mean' and 'std'") from None
    if not math.isfinite(mean) or not math.isfinite(std) or std <= 0:
        raise UserError(f"{path}: expected a finite mean and a std > 0, got mean={mean}, std={std}")
    return mean, std


class RewardModel:
    """A sequence-classification reward model with its tokenizer: `score(prompts, responses)` -> (N,) float32.

    prompts are message lists (or strings); responses the assistant's reply texts. Scores are (raw - mean) / std
    with the reward stage's statistics when `normalize`, raw otherwise."""

    def __init__(self, path: str, normalize: bool = False, load_in_8bit: bool = False, batch_size: int = 16,
                 device=None, where: str = "reward_model"):
        from .modeling import check_model_dir, load_model, load_tokenizer
        from .sampling import pad_id

        check_model_dir(path, where)
        self.path = str(path)
        self.mean, self.std = reward_stats(path, normalize)
        self.tokenizer = load_tokenizer(path)
        self.model = load_model(path, kind="reward", tokenizer=self.tokenizer, device=device, load_in_8bit=load_in_8bit,
                                dtype="float32" if not load_in_8bit else "float16")
        self.pad = pad_id(self.tokenizer)
        self.batch_size = batch_size

    def sequences(self, prompts: list, responses: list[str]) -> list[list[int]]:
        """The token ids the model scores: prompt with generation prompt, then the reply up to its end of turn."""
        out = []
        for p, r in zip(prompts, responses):
            prompt_ids = encode_prompt(self.tokenizer, p)
            out.append(prompt_ids + reply_ids(self.tokenizer, prompt_ids, p, r))
        return out

    @torch.no_grad()
    def score(self, prompts: list, responses: list[str]) -> torch.Tensor:
        """Normalised scores of each prompt followed by its response, (N,) float32."""
        from .modeling import reward_scores

        raw = reward_scores(self.model, self.sequences(prompts, responses), self.pad, self.batch_size)
        return (raw - self.mean) / self.std


@dataclass
class OnlineRLArguments:
    """Prompts, rewards and run options shared by the online RL stages (`align ppo`, `align rloo`, `align grpo`)."""

    reward_model: str = field(default="runs/tiny/reward/merged", metadata={"help": "Reward model directory (sequence classification, 1 label)."})
    normalize_reward: bool = field(default=True, metadata={"help": "Normalise scores with <reward_model>/reward_stats.json (false = raw scores)."})
    reward_load_in_8bit: bool = field(default=False, metadata={"help": "Load the reward model in 8-bit (bitsandbytes)."})
    reward_batch_size: int = field(default=16, metadata={"help": "Sequences per reward-model forward pass."})
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "Subtracted from the score of a response that never reaches end of turn."})
    prompts: str = field(default="runs/tiny/data/rl/prompts.jsonl", metadata={"help": "Prompts .jsonl(.gz): {'prompt': messages} rows or HH "
                                                                                      "dialogues."})
    max_prompts: int = field(default=0, metadata={"help": "Use at most this many prompts (0 = all).", "range": (0, None, True, True, ())})
    long_prompts: str = field(default="error", metadata={"help": "A prompt too long for the context: 'error' (stop, naming it) or 'skip' (count)."})
    cpu_threads: int = field(default=0, metadata={"help": "torch threads on CPU (0 = torch's default). 1 is several times faster for tiny models on "
                                                          "a busy machine."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished output directory (one the suite wrote)."})


class RewardFunction:
    """One named reward: `fn(rows, completions) -> list[float]`, and the weight it enters the total with.

    rows: the prompt rows ({"prompt": messages, ...the row's other fields}); completions: alignment.sampling.Completion
    (token_ids up to the stop token, text, finish_reason)."""

    def __init__(self, name: str, fn, weight: float = 1.0):
        self.name, self.fn, self.weight = name, fn, weight

    def __call__(self, rows: list[dict], completions: list) -> list[float]:
        return [float(x) for x in self.fn(rows, completions)]


def reward_model_function(rm: RewardModel) -> RewardFunction:
    """The learned reward model's (normalised) score of each response."""
    return RewardFunction("reward_model", lambda rows, comps: rm.score([r["prompt"] for r in rows], [c.text for c in comps]).tolist())


def ends_at_end_of_turn_function(penalty: float) -> RewardFunction:
    """-penalty for a response that never reaches end of turn (cut at the length limit), else 0."""
    return RewardFunction("missing_eos_penalty", lambda rows, comps: [0.0 if c.stopped else -1.0 for c in comps], penalty)


def total_reward(functions: list[RewardFunction], rows: list[dict], completions: list) -> tuple[torch.Tensor, dict]:
    """The weighted sum of the reward functions, (B,), and each function's mean (for logging)."""
    total = torch.zeros(len(completions))
    means = {}
    for f in functions:
        vals = torch.tensor(f(rows, completions), dtype=torch.float32)
        total += f.weight * vals
        means[f.name] = float(vals.mean()) if len(vals) else 0.0
    return total, means


def trl_reward_functions(functions: list[RewardFunction], tokenizer) -> list:
    """Our reward functions in the form TRL's GRPO / RLOO trainers call: f(prompts, completions, completion_ids,
    **columns) -> list[float], named (TRL logs each mean as rewards/<name>/mean). Completions are rebuilt from the
    completion ids up to the stop token, as PPO sees them; the prompt rows' other columns arrive as keyword arguments."""
    from .sampling import FINISH_LENGTH, FINISH_STOP, Completion, decode_response, stop_token_ids

    stops = stop_token_ids(tokenizer)

    def wrap(f: RewardFunction):
        def reward(prompts, completions, completion_ids, **columns) -> list[float]:
            comps = []
            for ids in completion_ids:
                ids = list(ids)
                end = next((j for j, t in enumerate(ids) if t in stops), None)
                kept = ids if end is None else ids[:end + 1]
                comps.append(Completion(kept, decode_response(tokenizer, kept, stops), FINISH_LENGTH if end is None else FINISH_STOP, 0))
            extra = {k: v for k, v in columns.items() if isinstance(v, list) and len(v) == len(prompts)}
            rows = [{"prompt": p, **{k: v[i] for k, v in extra.items()}} for i, p in enumerate(prompts)]
            return f(rows, comps)

        reward.__name__ = f.name
        return reward

    return [wrap(f) for f in functions]
