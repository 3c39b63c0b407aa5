"""Rewards: a learned reward model and verifiable reward functions, for PPO, RLOO / GRPO, on-policy pairs and the
win-rate eval: one way to score a response.

A response is rendered for the reward model exactly as the reward stage saw its chosen/rejected replies: the prompt
through the chat template with the generation prompt, then the reply ending at its end-of-turn token, where the
score is read; scores are normalised with the statistics the reward stage saved.

The online RL stages take `rewards`, a list of `NAME[:ARGS][@WEIGHT]` (weight 1 unless given); the total is the
weighted sum, and each reward's mean is logged as `rewards/<NAME>/mean` (TRL's names):

    model                     the learned reward model (`reward_model`, normalised with its reward_stats.json)
    tinyworld[:PARTIAL]       1 when the tiny world's checker accepts the answer (rows carry answer, kind, ...); else
                              PARTIAL (default 0) when it is at least about the asked person (or sum); else 0
    exact_match[:FIELD]       1 when the answer extracted from the completion as lm-eval's gsm8k does (flexible-extract:
                              the last number) matches the row's FIELD (default `answer`; the text after "####" when
                              it has one) under gsm8k's exact match (commas, $, a final period ignored), else 0
    ends_at_end_of_turn       0 when the completion ended at end of turn, -1 when the length limit cut it
    length:MIN:MAX            0 for MIN..MAX words, -1 outside
    python:FILE.py:FUNCTION   a function of yours, loaded from the file the config names (never from data):
                              FUNCTION(prompts, completions, **fields) -> list of numbers, one per completion, where
                              prompts are message lists, completions the reply texts, and fields the prompt rows'
                              other columns as lists (TRL's reward-function signature)
"""

from __future__ import annotations

import json
import math
import re
import string
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
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "Subtracted from the score of a response that never reaches end of turn "
                                                              "(the weight of the default `ends_at_end_of_turn` reward)."})
    rewards: list[str] = field(default_factory=lambda: ["model", "ends_at_end_of_turn"],
                               metadata={"help": "Rewards NAME[:ARGS][@WEIGHT]: model, tinyworld, exact_match[:FIELD], ends_at_end_of_turn, "
                                                 "length:MIN:MAX, python:FILE.py:FUNCTION (see alignment/rewards.py)."})
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
    return RewardFunction("model", lambda rows, comps: rm.score([r["prompt"] for r in rows], [c.text for c in comps]).tolist())


def ends_at_end_of_turn_function(penalty: float) -> RewardFunction:
    """-1 (times `penalty`, its weight) for a response that never reaches end of turn (cut at the length limit), else 0."""
    return RewardFunction("ends_at_end_of_turn", lambda rows, comps: [0.0 if c.stopped else -1.0 for c in comps], penalty)


# GSM8K's answer extraction, as lm-eval's gsm8k task runs it: "#### 42" (strict-match), or the last number
# (flexible-extract), then exact match after removing commas, dollar signs, everything up to "#### " and a final period
GSM8K_STRICT = [{"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"}, {"function": "take_first"}]
GSM8K_FLEXIBLE = [{"function": "regex", "group_select": -1, "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)"}, {"function": "take_first"}]
GSM8K_MATCH = {"regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"], "ignore_case": True}


def apply_filter(steps: list[dict], response: str) -> str:
    """One filter pipeline of lm-eval on one response: regex (findall, group_select, fallback), remove_whitespace,
    take_first."""
    resps = [response]
    for step in steps:
        fn = step["function"]
        if fn == "regex":
            pattern = re.compile(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"))
            out = []
            for r in resps:
                match = pattern.findall(r)
                if match:
                    match = match[step.get("group_select", 0)]
                    if isinstance(match, tuple):
                        match = next((m for m in match if m), step.get("fallback", "[invalid]"))
                    out.append(match.strip())
                else:
                    out.append(step.get("fallback", "[invalid]"))
            resps = out
        elif fn == "remove_whitespace":
            resps = [r.strip() for r in resps]
        elif fn == "take_first":
            resps = resps[:1]
    return resps[0]


def exact_match(prediction: str, reference: str, regexes_to_ignore=None, ignore_case: bool = False,
                ignore_punctuation: bool = False, ignore_numbers: bool = False) -> float:
    """lm-eval's exact_match for one pair (its port of HF evaluate's): strip the regexes, optionally case,
    punctuation and digits, then compare."""
    for rx in regexes_to_ignore or []:
        prediction, reference = re.sub(rx, "", prediction), re.sub(rx, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    if ignore_numbers:
        table = str.maketrans("", "", string.digits)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def extract_answer(text: str, mode: str = "flexible") -> str | None:
    """The final answer of a solution as lm-eval's gsm8k filters extract it ("#### 42", or with `flexible` the last
    number), None when there is none."""
    got = apply_filter(GSM8K_STRICT if mode == "strict" else GSM8K_FLEXIBLE, text)
    return None if got == "[invalid]" else got


def exact_match_function(field_name: str = "answer") -> RewardFunction:
    """1 when the completion's answer (lm-eval's gsm8k flexible-extract) matches the row's `field_name` (the text after
    its "####" when it has one, as gsm8k's target) under gsm8k's exact match, else 0: the eval's own scoring."""
    def fn(rows, comps):
        out = []
        for r, c in zip(rows, comps):
            if field_name not in r:
                raise UserError(f"rewards: exact_match needs the field {field_name!r} in every prompt row; a row has only {sorted(r)}")
            gold = str(r[field_name]).split("####")[-1].strip()
            out.append(exact_match(apply_filter(GSM8K_FLEXIBLE, c.text), gold, **GSM8K_MATCH))
        return out

    return RewardFunction("exact_match", fn)


def tinyworld_function(partial: float = 0.0) -> RewardFunction:
    """1 when the tiny world's checker accepts the answer (it states the fact and no competing value); else `partial`
    when the answer is at least about the asked person (or sum), else 0."""
    from .tinyworld import about_the_asked, check

    def fn(rows, comps):
        for r in rows:
            if "answer" not in r or "kind" not in r:
                raise UserError(f"rewards: tinyworld needs answer and kind in every prompt row (rl/prompts.jsonl of `align data`); "
                                f"a row has only {sorted(r)}")
        return [1.0 if check(r, c.text) else partial if partial and about_the_asked(r, c.text) else 0.0 for r, c in zip(rows, comps)]

    return RewardFunction("tinyworld", fn)


def length_function(lo: int, hi: int) -> RewardFunction:
    """0 for a reply of lo..hi words, -1 outside."""
    return RewardFunction("length", lambda rows, comps: [0.0 if lo <= len(c.text.split()) <= hi else -1.0 for c in comps])


def python_function(path: str, name: str) -> RewardFunction:
    """A user's reward function FUNCTION(prompts, completions, **fields) from a .py file the config names."""
    import importlib.util

    p = Path(path)
    if not p.is_file() or p.suffix != ".py":
        raise UserError(f"rewards: python:{path}:{name}: {path} is not a .py file")
    spec = importlib.util.spec_from_file_location(f"align_user_reward_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"rewards: python:{path}:{name}: importing {path} failed ({type(e).__name__}: {e})") from None
    user_fn = getattr(module, name, None)
    if not callable(user_fn):
        raise UserError(f"rewards: python:{path}:{name}: {path} defines no function {name!r}")

    def fn(rows, comps):
        fields = {k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r}) if k not in ("prompt", "input_ids")}
        try:
            values = user_fn([r["prompt"] for r in rows], [c.text for c in comps], **fields)
        except Exception as e:
            raise UserError(f"rewards: {name} (from {path}) raised {type(e).__name__}: {e}") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(comps):
            raise UserError(f"rewards: {name} (from {path}) returned {type(values).__name__}; expected a list of {len(comps)} numbers")
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserError(f"rewards: {name} (from {path}) returned {v!r} for sample {i} ({comps[i].text[:40]!r}); expected a finite number")
        return values

    return RewardFunction(name, fn)


def _is_fraction(text: str) -> bool:
    try:
        return 0 <= float(text) <= 1
    except ValueError:
        return False


def parse_reward_spec(spec: str) -> tuple[str, list[str], float]:
    """`NAME[:ARGS][@WEIGHT]` -> (name, args, weight)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"rewards: {spec!r}; expected NAME[:ARGS][@WEIGHT]")
    body, sep, weight = spec.rpartition("@") if "@" in spec else (spec, "", "")
    try:
        w = float(weight) if sep else 1.0
    except ValueError:
        raise UserError(f"rewards: {spec!r}: weight {weight!r} is not a number") from None
    if not math.isfinite(w):
        raise UserError(f"rewards: {spec!r}: weight must be finite")
    name, *args = body.split(":")
    return name, args, w


def build_rewards(specs: list[str], reward_model: "RewardModel | None", missing_eos_penalty: float) -> list[RewardFunction]:
    """The reward functions a config names (see the module docstring); `reward_model` serves `model`."""
    out = []
    for spec in specs:
        name, args, weight = parse_reward_spec(spec)
        if name == "model" and not args:
            if reward_model is None:
                raise UserError("rewards: model needs reward_model (a reward model directory)")
            f = reward_model_function(reward_model)
        elif name == "tinyworld" and len(args) <= 1 and all(_is_fraction(a) for a in args):
            f = tinyworld_function(float(args[0]) if args else 0.0)
        elif name == "exact_match" and len(args) <= 1:
            f = exact_match_function(args[0] if args else "answer")
        elif name == "ends_at_end_of_turn" and not args:
            f = ends_at_end_of_turn_function(1.0)
            if "@" not in spec:
                weight = missing_eos_penalty
        elif name == "length" and len(args) == 2 and all(a.isdigit() for a in args) and int(args[0]) <= int(args[1]):
            f = length_function(int(args[0]), int(args[1]))
        elif name == "python" and len(args) == 2:
            f = python_function(args[0], args[1])
        else:
            raise UserError(f"rewards: {spec!r}; expected one of model, tinyworld[:PARTIAL], exact_match[:FIELD], ends_at_end_of_turn, "
                            "length:MIN:MAX, python:FILE.py:FUNCTION, each optionally @WEIGHT")
        f.weight = weight
        out.append(f)
    if not out:
        raise UserError("rewards: expected at least one reward")
    if len({f.name for f in out}) < len(out):
        raise UserError(f"rewards: {specs}: each reward may appear once")
    return out


def needs_reward_model(specs: list[str]) -> bool:
    """True when `model` is among the rewards."""
    return any(parse_reward_spec(s)[0] == "model" for s in specs)


def check_online_inputs(script: OnlineRLArguments, policy: str | None):
    """What every online RL stage (ppo, rloo, grpo) checks before it writes anything: the policy and reward model
    directories, the reward specs, the reward statistics, and that policy and reward model share a tokenizer.
    Returns (the policy's tokenizer, whether the reward model is one of the rewards)."""
    from .modeling import check_model_dir, load_tokenizer, same_tokenizer

    if not policy:
        raise UserError("model_name_or_path: expected the SFT model directory (e.g. runs/tiny/sft/merged)")
    check_model_dir(policy, "model_name_or_path")
    use_rm = needs_reward_model(script.rewards)
    if use_rm:
        check_model_dir(script.reward_model, "reward_model")
    build_rewards([s for s in script.rewards if not s.startswith("model")], None, script.missing_eos_penalty)  # the specs
    tok = load_tokenizer(policy)
    if use_rm:
        reward_stats(script.reward_model, script.normalize_reward)
        if not same_tokenizer(tok, load_tokenizer(script.reward_model)):
            raise UserError(f"reward_model: {script.reward_model}: its tokenizer differs from the policy's ({policy}); "
                            "expected both stages to use the same tokenizer")
    return tok, use_rm


def online_rewards(script: OnlineRLArguments, use_rm: bool, device) -> list[RewardFunction]:
    """The reward functions `script.rewards` names, with the reward model loaded on `device` when it is one of them."""
    rm = RewardModel(script.reward_model, script.normalize_reward, script.reward_load_in_8bit, script.reward_batch_size, device) \
        if use_rm else None
    return build_rewards(script.rewards, rm, script.missing_eos_penalty)


def trl_online_summary(trainer, result, name: str, seconds: float, checkpoint: str | None) -> dict:
    """summary.json of a TRL online trainer's run (rloo, grpo): steps, first and last logged rewards, and the curve of
    each logged step's total reward, each reward's mean and the KL; prints one line."""
    logs = [h for h in trainer.state.log_history if "reward" in h]
    summary = {"trainer": type(trainer).__name__.removeprefix("Safe"), "steps": result.global_step, "seconds": round(seconds, 1),
               "resumed_from": checkpoint, "first_log": logs[0] if logs else None, "last_log": logs[-1] if logs else None,
               "curve": [{k: v for k, v in h.items() if k in ("step", "reward", "kl") or k.startswith("rewards/")} for h in logs]}
    if logs:
        f, last = logs[0], logs[-1]
        print(f"{name}: {result.global_step} steps in {summary['seconds']}s; reward {f['reward']:+.3f} -> {last['reward']:+.3f}, "
              f"kl {f.get('kl', float('nan')):.4f} -> {last.get('kl', float('nan')):.4f}")
    return summary


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
