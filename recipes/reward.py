"""Reward model training with TRL's RewardTrainer (Bradley-Terry on preference pairs), LoRA, 8-bit / 4-bit.

    align reward --config recipes/tiny/reward.yaml
    align reward --config recipes/hh/reward.yaml --model_name_or_path runs/hh/sft/merged

The model is `AutoModelForSequenceClassification` with one output and `pad_token_id` set, so the score is read at
the last real token whatever the padding side. Pairs (hh-rlhf dialogues, prompt/chosen/rejected text or
conversations) are tokenized here with the chat template (special-token safe) and handed to TRL as
`chosen_ids` / `rejected_ids`, each ending at its end-of-turn token: the position the score is read at. A pair whose
reply was cut by max_length before its end of turn is dropped and counted (its score would be read mid-reply).

Health gates before the stage counts as done: held-out pairwise accuracy must reach `min_eval_accuracy` AND beat the
untrained model's by `min_eval_improvement` (an untrained head can score high by chance on easy pairs), else the
stage fails and the previous output is left as it was. The reward mean and std over the training set go into
`<output_dir>/merged/reward_stats.json` for PPO to normalize rewards with.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from alignment.config import fingerprint_config, parse_stage_config, save_config
from alignment.errors import UserError, exit_on_user_error


@dataclass
class RewardScriptArguments:
    """Data, health gate and run options of the reward stage (model: `model_name_or_path`; training: RewardConfig)."""

    train_data: list[str] = field(default_factory=list, metadata={"help": "Preference sources PATH_OR_HUB_NAME[@WEIGHT]."})
    eval_data: list[str] = field(default_factory=list, metadata={"help": "Held-out preference sources (else eval_fraction of train_data)."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Fraction of train_data held out when eval_data is empty.",
                                                        "range": (0, 1, True, False, ())})
    dataset_split: str = field(default="train", metadata={"help": "Split read from hub datasets in train_data."})
    eval_split: str = field(default="test", metadata={"help": "Split read from hub datasets in eval_data."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many held-out pairs."})
    invalid_rows: str = field(default="error", metadata={"help": "A row that does not fit: 'error' (stop, naming it) or 'skip' (count)."})
    too_long: str = field(default="truncate", metadata={"help": "Pairs over max_length: 'truncate' (keep the prompt's end), 'drop' or 'error'."})
    min_eval_accuracy: float = field(default=0.5, metadata={"help": "Health gate: held-out pairwise accuracy must be >= this.",
                                                            "range": (0, 1, True, True, ())})
    eval_group_field: str | None = field(default=None, metadata={"help": "A field of the held-out rows (e.g. rejected_kind) to report "
                                                                 "held-out accuracy per value of (wrong facts apart from style)."})
    min_eval_improvement: float = field(default=0.0, metadata={"help": "Health gate: held-out accuracy must exceed the untrained "
                                                               "model's by more than this (0 = any improvement; -1 = off).",
                                                               "range": (-1, 1, True, True, ())})
    score_batch_size: int = field(default=16, metadata={"help": "Batch size for held-out accuracy and reward statistics."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished output_dir (one the suite wrote)."})


def to_reward_rows(tokenizer, pairs, wheres, max_length, too_long, label):
    """Tokenized pairs as TRL reward rows: full sequences `chosen_ids` / `rejected_ids` (prompt + reply), each ending
    at the end-of-turn token; pairs cut before it are dropped and counted."""
    from alignment.data import tokenize_preference

    rows = tokenize_preference(tokenizer, pairs, max_length, too_long, label, wheres)
    out = [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"],
            **({"group": r["group"]} if "group" in r else {})} for r in rows]
    pad = tokenizer.pad_token_id
    if any(pad in r["chosen_ids"] or pad in r["rejected_ids"] for r in out):
        # the model finds the last real token as the last non-pad id; a pad id inside a sequence would move it
        raise UserError(f"{label}: the pad token {tokenizer.pad_token!r} occurs inside sequences; expected a dedicated pad token")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        kept = [r for r in out if r["chosen_ids"][-1] == end and r["rejected_ids"][-1] == end]
        if len(kept) < len(out):
            print(f"{label}: dropped {len(out) - len(kept)} of {len(out)} pairs whose reply was cut before <|im_end|> by "
                  f"max_length={max_length} (the score is read at the end of turn)", file=sys.stderr)
        if not kept:
            raise UserError(f"{label}: every pair was cut before its end of turn by max_length={max_length}; expected a larger max_length")
        out = kept
    return out


def pairwise_accuracy(model, rows, pad_token_id, batch_size) -> tuple[float, list[float], list[float]]:
    """Fraction of pairs scored chosen > rejected, and the two score lists."""
    from alignment.modeling import reward_scores

    chosen = reward_scores(model, [r["chosen_ids"] for r in rows], pad_token_id, batch_size=batch_size)
    rejected = reward_scores(model, [r["rejected_ids"] for r in rows], pad_token_id, batch_size=batch_size)
    return (chosen > rejected).float().mean().item(), chosen.tolist(), rejected.tolist()


def main(cfg) -> dict:
    """Read and check pairs and model, train with RewardTrainer (resuming a killed run), gate on held-out accuracy,
    save with reward stats."""
    import torch
    from datasets import Dataset
    from transformers import set_seed

    from alignment import distributed, modeling
    from alignment.compat import RewardTrainer
    from alignment.data import load_preference_pairs, parse_source, split_holdout
    from alignment.io import StageRun, atomic_write_json

    script, args, model_args = cfg
    t0 = time.time()
    if not script.train_data:
        raise UserError("train_data: expected at least one preference data source")
    if not model_args.model_name_or_path:
        raise UserError("model_name_or_path: expected the input model directory (e.g. runs/tiny/sft/merged)")
    modeling.check_model_dir(model_args.model_name_or_path, "model_name_or_path")
    output_dir = args.output_dir

    # data: pairs -> (prompt + reply) token ids, special-token safe; a held-out split for the health gate
    tokenizer = modeling.load_tokenizer(model_args.model_name_or_path, args.chat_template_path)
    pairs, wheres = load_preference_pairs(script.train_data, script.dataset_split, args.seed, script.invalid_rows, "train_data")
    if script.eval_data:
        eval_pairs, eval_wheres = load_preference_pairs(script.eval_data, script.eval_split, args.seed, script.invalid_rows, "eval_data")
    else:
        train_part, eval_part = split_holdout(list(zip(pairs, wheres)), script.eval_fraction, args.seed)
        pairs, wheres = [p for p, _ in train_part], [w for _, w in train_part]
        eval_pairs, eval_wheres = [p for p, _ in eval_part], [w for _, w in eval_part]
    if not eval_pairs:
        raise UserError("eval_data: the health gate needs held-out pairs; give eval_data or eval_fraction > 0")
    if script.max_train_samples:
        pairs, wheres = pairs[: script.max_train_samples], wheres[: script.max_train_samples]
    if script.max_eval_samples:
        eval_pairs, eval_wheres = eval_pairs[: script.max_eval_samples], eval_wheres[: script.max_eval_samples]
    if script.eval_group_field:
        for p in eval_pairs:
            p["group"] = str(p.get("meta", {}).get(script.eval_group_field, "(none)"))
    train_rows = to_reward_rows(tokenizer, pairs, wheres, args.max_length, script.too_long, "train_data")
    eval_rows = to_reward_rows(tokenizer, eval_pairs, eval_wheres, args.max_length, script.too_long, "eval_data")
    eval_groups = [r.pop("group", None) for r in eval_rows]

    # output: every input checked; work in the partial sibling, resume it when the same run was killed
    inputs = [model_args.model_name_or_path] + [parse_source(s).path for s in script.train_data + script.eval_data]
    # (under accelerate launch / torchrun every process decides alike; only the main one writes files outside the Trainer)
    run = StageRun(output_dir, script.overwrite, fingerprint_config(script, args, model_args, processes=distributed.world_size()),
                   inputs, "reward")
    args.output_dir = str(run.start())
    checkpoint = run.trainer_checkpoint()

    # model: 1-output sequence classifier on the input LM (the `score` head starts random and is always trained)
    set_seed(args.seed)  # the seed decides the new weights (head, LoRA): the same on every process and in every run
    model = modeling.load_model(model_args.model_name_or_path, model_args, "reward", tokenizer, training=True,
                                gradient_checkpointing=args.gradient_checkpointing)
    if model_args.use_peft:
        model = modeling.add_lora(model, model_args, "SEQ_CLS")
    trainable, total = modeling.count_parameters(model)
    before = modeling.trainable_snapshot(model)
    acc_before, _, _ = pairwise_accuracy(model, eval_rows, tokenizer.pad_token_id, script.score_batch_size)

    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                            eval_dataset=Dataset.from_list(eval_rows), processing_class=tokenizer)
    modeling.adapters_fp32(trainer.model)
    result = trainer.train(resume_from_checkpoint=checkpoint)

    # health gates: a reward model that cannot rank held-out pairs, or no better than untrained, only teaches PPO noise
    acc, eval_chosen, eval_rejected = pairwise_accuracy(trainer.model, eval_rows, tokenizer.pad_token_id, script.score_batch_size)
    improved = script.min_eval_improvement < 0 or acc > acc_before + script.min_eval_improvement
    by_group: dict[str, list[float]] = {}
    for g, c, r in zip(eval_groups, eval_chosen, eval_rejected):
        if g is not None:
            by_group.setdefault(g, []).append(float(c > r))
    health = {"eval_accuracy": acc, "eval_accuracy_before": acc_before, "eval_pairs": len(eval_rows),
              "eval_accuracy_by_group": {g: {"accuracy": sum(v) / len(v), "pairs": len(v)} for g, v in sorted(by_group.items())},
              "min_eval_accuracy": script.min_eval_accuracy, "min_eval_improvement": script.min_eval_improvement,
              "passed": acc >= script.min_eval_accuracy and improved}
    if distributed.is_main():
        atomic_write_json(f"{args.output_dir}/health.json", health)
    if not health["passed"]:  # every process computed the same accuracies, so every process stops here
        if distributed.is_main():
            run.discard()  # a finished run that failed its gate: nothing in it to resume, nothing to keep
        distributed.barrier()
        why = (f"< min_eval_accuracy {script.min_eval_accuracy}" if acc < script.min_eval_accuracy else
               f"is not above the untrained model's {acc_before:.3f} + min_eval_improvement {script.min_eval_improvement}")
        raise UserError(f"reward health gate: held-out pairwise accuracy {acc:.3f} on {len(eval_rows)} pairs {why}; "
                        f"{output_dir} left as it was (train longer or check the data)")

    # normalization statistics for PPO: rewards of every training sequence (chosen and rejected)
    _, train_chosen, train_rejected = pairwise_accuracy(trainer.model, train_rows, tokenizer.pad_token_id, script.score_batch_size)
    scores = torch.tensor(train_chosen + train_rejected)
    stats = {"mean": scores.mean().item(), "std": scores.std().item() if len(scores) > 1 else 0.0, "n": len(scores)}

    trained = modeling.gathered_model(trainer, model_args.model_name_or_path, "reward")  # None on other processes
    if not distributed.is_main():
        distributed.barrier()  # the main process writes the outputs and swaps them into place
        return {}
    changed, n_tensors = modeling.changed_parameters(trained, before)
    modeling.save_stage_outputs(trained, tokenizer, model_args.model_name_or_path, args.output_dir, "reward",
                                extra_files={"reward_stats.json": stats})
    save_config(args.output_dir, script, args, model_args, overrides={"output_dir": output_dir})
    summary = {
        "train_loss": result.training_loss, "steps": result.global_step, "resumed_from": checkpoint, "train_pairs": len(train_rows),
        **health, "reward_stats": stats, "trainable_params": trainable, "total_params": total,
        "changed_tensors": changed, "trainable_tensors": n_tensors, "merged": f"{output_dir}/merged",
        "adapter": f"{output_dir}/adapter" if model_args.use_peft else None, "seconds": round(time.time() - t0, 1),
    }
    atomic_write_json(f"{args.output_dir}/summary.json", summary)
    run.commit()
    distributed.barrier()
    print(f"reward: {result.global_step} steps on {len(train_rows)} pairs, train loss {result.training_loss:.4f}; "
          f"held-out accuracy {acc_before:.3f} -> {acc:.3f} on {len(eval_rows)} pairs (gate {script.min_eval_accuracy})"
          + "".join(f", {g} {v['accuracy']:.3f} ({v['pairs']})" for g, v in health["eval_accuracy_by_group"].items()) + "; "
          f"reward mean {stats['mean']:.3f} std {stats['std']:.3f}; {changed}/{n_tensors} tensors changed; "
          f"merged -> {output_dir}/merged in {summary['seconds']:.0f}s", file=sys.stderr)
    return summary


@exit_on_user_error
def cli(argv=None) -> dict:
    """`align reward --config FILE.yaml [--key value ...]`."""
    from alignment.compat import ModelConfig, RewardConfig

    return main(parse_stage_config(RewardScriptArguments, RewardConfig, ModelConfig, argv))


if __name__ == "__main__":
    cli()
