"""On-policy preference pairs: sample several answers per prompt from a policy, judge them, keep best vs worst.

    align pairs --config recipes/tiny/pairs.yaml
    align pairs --config recipes/tiny/pairs.yaml --num_samples 16 --checker none

Off-policy pairs (a fixed dataset's chosen/rejected) teach a policy little when it never writes anything like the
rejected side. Pairs drawn from the policy's own samples show it its actual mistakes: each prompt gets
`num_samples` sampled answers, each answer a score, and the highest and lowest scored answers become a pair for
`align dpo` (iterative / online DPO with a reward model, as in RLHF pipelines that label their own samples).

The score is the reward model's, and with `checker` set, a ground-truth check comes first: a correct, well-formed answer
beats any other whatever the reward model says, and the reward model orders answers within each group. `checker:
tinyworld` scores tiny-world prompts (alignment.tinyworld.check; the prompt rows carry the answer). A prompt whose
samples all score the same (or differ by less than `min_margin`) gives no pair.

Output (output_dir, written atomically): pairs.jsonl ({"prompt", "chosen", "rejected", "chosen_score",
"rejected_score"}, TRL's conversational preference format), samples.jsonl (every sample and its score),
summary.json and config.yaml.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from alignment.config import parse_config, save_config
from alignment.errors import UserError, exit_on_user_error
from alignment.io import atomic_dir, check_output_dir

CHECKERS = ("none", "tinyworld")


@dataclass
class PairsConfig:
    """Sample, judge and pair a policy's answers."""

    model_name_or_path: str = field(default="", metadata={"help": "The policy (a Hugging Face model directory) to sample from."})
    prompts_file: str = field(default="", metadata={"help": "JSONL rows with 'prompt' (a message list or a string)."})
    output_dir: str = field(default="", metadata={"help": "Directory for pairs.jsonl, samples.jsonl and summary.json."})
    reward_model: str | None = field(default=None, metadata={"help": "A reward model directory (sequence classifier) that scores answers."})
    checker: str = field(default="none", metadata={"help": f"Ground-truth check ranked before the reward: one of {', '.join(CHECKERS)}."})
    num_samples: int = field(default=8, metadata={"help": "Answers sampled per prompt.", "range": (2, None, True, True, ())})
    pairs_per_prompt: int = field(default=1, metadata={"help": "Pairs per prompt: the k-th best against the k-th worst, k = 1..this."})
    min_margin: float = field(default=0.0, metadata={"help": "Keep a pair only when its scores differ by more than this."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0: pairs need varied samples).",
                                                      "range": (0, None, False, True, ())})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Longest answer in tokens."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use at most this many prompts."})
    batch_size: int = field(default=16, metadata={"help": "Reward model batch size."})
    cpu_threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed: the same seed gives the same pairs."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished output_dir (one the suite wrote)."})


def _check_cfg(cfg: PairsConfig) -> None:
    for key in ("model_name_or_path", "prompts_file", "output_dir"):
        if not getattr(cfg, key):
            raise UserError(f"{key}: missing; expected a path")
    if cfg.checker not in CHECKERS:
        raise UserError(f"checker: {cfg.checker!r}; expected one of {', '.join(CHECKERS)}")
    if cfg.reward_model is None and cfg.checker == "none":
        raise UserError("reward_model: missing; expected a reward model directory (or a checker)")
    if cfg.num_samples < 2:
        raise UserError(f"num_samples: {cfg.num_samples}; expected at least 2")
    if not 1 <= cfg.pairs_per_prompt <= cfg.num_samples // 2:
        raise UserError(f"pairs_per_prompt: {cfg.pairs_per_prompt}; expected 1 to num_samples // 2 ({cfg.num_samples // 2})")
    if cfg.temperature <= 0:
        raise UserError(f"temperature: {cfg.temperature}; expected a number above 0 (pairs need varied samples)")


def read_checked_prompts(path: str, checker: str, limit: int | None) -> list[dict]:
    """Prompt rows, validated; with a checker each row must carry the fields the checker reads."""
    from alignment.data import read_prompt_rows

    rows = read_prompt_rows(path, limit)
    if checker == "tinyworld":
        for r in rows:
            missing = [k for k in ("answer", "kind") if k not in r.data]
            if missing:
                raise UserError(f"{r.where}: checker tinyworld needs {', '.join(missing)}; "
                                "expected rows like alignment/tinyworld.py's rl/prompts.jsonl")
    return [r.data for r in rows]


def pick_pairs(scores: list[tuple], k: int, min_margin: float) -> list[tuple[int, int]]:
    """Indices (chosen, rejected): the i-th best against the i-th worst for i < k, distinct answers only.

    `scores` are comparable tuples (checker result first, then reward); the margin is on the last element (the
    reward) when the first elements tie, else a checker difference always counts."""
    order = sorted(range(len(scores)), key=lambda j: scores[j])
    out = []
    for i in range(min(k, len(order) // 2)):
        lo, hi = order[i], order[-1 - i]
        if scores[hi] <= scores[lo]:  # ascending order: every later pair ties too
            break
        same_group = scores[hi][:-1] == scores[lo][:-1]
        if same_group and scores[hi][-1] - scores[lo][-1] <= min_margin:
            break
        out.append((hi, lo))
    return out


def main(cfg: PairsConfig) -> dict:
    """Sample num_samples answers per prompt, score them, write best-vs-worst pairs; returns the summary."""
    from alignment.modeling import check_model_dir, load_model, load_tokenizer, same_tokenizer
    from alignment.rewards import RewardModel
    from alignment.sampling import SamplingParams, generate
    from alignment.tinyworld import check, well_formed
    from alignment.tokens import encode_prompt

    t0 = time.time()
    _check_cfg(cfg)
    check_output_dir(cfg.output_dir, cfg.overwrite)
    check_model_dir(cfg.model_name_or_path, "model_name_or_path")
    if cfg.reward_model:
        check_model_dir(cfg.reward_model, "reward_model")
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    rows = read_checked_prompts(cfg.prompts_file, cfg.checker, cfg.max_prompts)
    tok = load_tokenizer(cfg.model_name_or_path)
    if cfg.reward_model and not same_tokenizer(tok, load_tokenizer(cfg.reward_model)):
        raise UserError(f"reward_model: {cfg.reward_model}: its tokenizer differs from the policy's; expected the same tokenizer")
    model = load_model(cfg.model_name_or_path, tokenizer=tok)
    rm = RewardModel(cfg.reward_model, batch_size=cfg.batch_size) if cfg.reward_model else None

    # num_samples answers per prompt, seeded per prompt: the same seed gives the same pairs
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            num_return_sequences=cfg.num_samples, seed=cfg.seed)
    prompt_ids = [encode_prompt(tok, r["prompt"]) for r in rows]
    context = model.config.max_position_embeddings
    if cfg.max_new_tokens >= context:
        raise UserError(f"max_new_tokens: {cfg.max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens")
    samples = generate(model, tok, [p[-(context - cfg.max_new_tokens):] for p in prompt_ids], params, seed_per_prompt=True,
                       progress=True, desc="sampling")
    texts = [[c.text for c in group] for group in samples]

    rewards = [[0.0] * cfg.num_samples for _ in rows]
    if rm is not None:
        flat = rm.score([r["prompt"] for r in rows for _ in range(cfg.num_samples)], [t for g in texts for t in g]).tolist()
        rewards = [flat[i * cfg.num_samples:(i + 1) * cfg.num_samples] for i in range(len(rows))]
    # the checker's judgement: the right fact, said well (ends at end of turn, one short sentence, no stray role markers),
    # so a chosen answer is one worth imitating and a rejected one differs from it in the fact
    correct = [[check(r, c.text) and well_formed(c.text, c.stopped) for c in group] if cfg.checker == "tinyworld" else [False] * len(group)
               for r, group in zip(rows, samples)]

    pairs, records, unpaired = [], [], 0
    for i, r in enumerate(tqdm(rows, desc="pairs", leave=False)):
        # an empty answer cannot be a DPO completion; among identical answers keep one
        first = {}
        for j, t in enumerate(texts[i]):
            if t.strip():
                first.setdefault(t, j)
        keep = list(first.values())
        scores = [(int(correct[i][j]), float(rewards[i][j])) for j in keep]
        for j in range(cfg.num_samples):
            records.append({"prompt_index": i, "response": texts[i][j], "reward": float(rewards[i][j]), "correct": correct[i][j]})
        picked = pick_pairs(scores, cfg.pairs_per_prompt, cfg.min_margin)
        unpaired += not picked
        for hi, lo in picked:
            c, rj = keep[hi], keep[lo]
            as_msg = isinstance(r["prompt"], list)
            pairs.append({"prompt": r["prompt"],
                          "chosen": [{"role": "assistant", "content": texts[i][c]}] if as_msg else texts[i][c],
                          "rejected": [{"role": "assistant", "content": texts[i][rj]}] if as_msg else texts[i][rj],
                          "chosen_score": list(scores[hi]), "rejected_score": list(scores[lo])})
    if not pairs:
        raise UserError(f"{cfg.prompts_file}: no prompt gave two answers that score apart; expected a policy whose samples vary "
                        f"(raise num_samples or temperature, or lower min_margin)")

    flat_r = np.array([x for g in rewards for x in g])
    flat_c = np.array([x for g in correct for x in g])
    summary = {
        "prompts": len(rows), "samples": len(records), "pairs": len(pairs),
        "prompts_without_pair": unpaired,
        "reward_mean": float(flat_r.mean()) if rm is not None else None,
        "reward_chosen": float(np.mean([p["chosen_score"][1] for p in pairs])) if rm is not None else None,
        "reward_rejected": float(np.mean([p["rejected_score"][1] for p in pairs])) if rm is not None else None,
        "sample_accuracy": float(flat_c.mean()) if cfg.checker != "none" else None,
        "chosen_correct": float(np.mean([p["chosen_score"][0] for p in pairs])) if cfg.checker != "none" else None,
        "rejected_correct": float(np.mean([p["rejected_score"][0] for p in pairs])) if cfg.checker != "none" else None,
        "seconds": round(time.time() - t0, 1),
    }
    with atomic_dir(cfg.output_dir, cfg.overwrite) as tmp:
        (tmp / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        (tmp / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in records), encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        save_config(tmp, cfg)
    judged = " + ".join(x for x in (f"checker {cfg.checker}" if cfg.checker != "none" else "", "reward model" if rm else "") if x)
    extra = ""
    if rm is not None:
        extra += f", reward chosen {summary['reward_chosen']:.2f} vs rejected {summary['reward_rejected']:.2f}"
    if cfg.checker != "none":
        extra += (f", sample accuracy {summary['sample_accuracy']:.3f}, chosen correct {summary['chosen_correct']:.2f} "
                  f"vs rejected {summary['rejected_correct']:.2f}")
    print(f"pairs: {len(rows)} prompts x {cfg.num_samples} samples judged by {judged} -> {len(pairs)} pairs"
          f" ({summary['prompts_without_pair']} prompts gave none){extra}; -> {cfg.output_dir}/pairs.jsonl in {summary['seconds']:.0f}s")
    return summary


@exit_on_user_error
def cli(argv=None) -> None:
    (cfg,) = parse_config([PairsConfig], argv)
    main(cfg)


if __name__ == "__main__":
    cli()
