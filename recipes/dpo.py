"""Direct preference optimization with TRL's DPOTrainer: LoRA, 8-bit / 4-bit, cached reference log-probs.

    align dpo --config recipes/tiny/dpo.yaml
    align dpo --config recipes/tiny/dpo.yaml --beta 0.3 --loss_type ipo --output_dir runs/tiny/dpo-ipo

With LoRA the reference model is the same model with its adapter disabled (no second copy in memory); without
LoRA it is the input model before the first step. Either way the reference log-probabilities are computed once,
before training, and cached on disk under `ref_cache_dir`, keyed by the tokenized data's fingerprint, the input
model's hash, the tokenizer's hash and the quantization: a later run with another `beta` or `loss_type` (any of
TRL's) reuses them instead of running the reference model again.

Pairs are tokenized here with the chat template (special-token safe) and given to TRL as prompt_ids / chosen_ids /
rejected_ids. The closing line reports preference accuracy on held-out pairs before and after training: how often
the model gives the chosen reply a higher log-probability than the rejected one.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.config import fingerprint_config, parse_stage_config, save_config
from alignment.errors import UserError, exit_on_user_error


@dataclass
class DPOScriptArguments:
    """Data, cache and run options of the DPO stage (model: `model_name_or_path`; training: DPOConfig)."""

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
    chat_template_path: str | None = field(default=None, metadata={"help": "A .jinja chat template replacing the model's (DPOConfig has no such "
                                                                           "key)."})
    ref_cache_dir: str = field(default="runs/cache/dpo_ref_logps", metadata={"help": "Directory of cached reference log-probs (shared by runs)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished output_dir (one the suite wrote)."})


class RefLogpCache:
    """Reference log-probs on disk, one file per (data fingerprint, model hash, tokenizer hash, quantization)."""

    def __init__(self, directory, **key_parts):
        import hashlib

        self.dir = Path(directory)
        self.key_parts = key_parts
        self._key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
        self.hits: list[str] = []
        self.misses: list[str] = []

    def path(self, name: str, data_fingerprint: str) -> Path:
        """The cache file of one split (`train` / `eval`) with the given data fingerprint."""
        return self.dir / f"{name}-{data_fingerprint}-{self._key}.pt"

    def load(self, name: str, data_fingerprint: str):
        """(chosen, rejected) tensors, or None when not cached (counted as a hit or a miss)."""
        from alignment.io import safe_torch_load

        p = self.path(name, data_fingerprint)
        if not p.is_file():
            self.misses.append(name)
            return None
        blob = safe_torch_load(p, "reference log-prob cache")
        self.hits.append(name)
        return blob["ref_chosen_logps"], blob["ref_rejected_logps"]

    def save(self, name: str, data_fingerprint: str, chosen, rejected) -> Path:
        """Write one split's reference log-probs atomically (with the key parts, for humans); under a launcher every
        process calls it with the same values, the main process writes and the others wait."""
        from alignment import distributed
        from alignment.io import atomic_write_bytes

        if distributed.is_main():
            buf = io.BytesIO()
            torch.save({"ref_chosen_logps": torch.as_tensor(chosen), "ref_rejected_logps": torch.as_tensor(rejected),
                        "key": json.dumps({**self.key_parts, "data": data_fingerprint, "split": name})}, buf)
            atomic_write_bytes(self.path(name, data_fingerprint), buf.getvalue())
        distributed.barrier()
        return self.path(name, data_fingerprint)


@torch.no_grad()
def completion_logps(model, rows, pad_token_id: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the chosen and of the rejected reply given the prompt, one value per pair."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {"chosen_ids": [], "rejected_ids": []}
    for key in out:
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            seqs = [r["prompt_ids"] + r[key] for r in batch]
            T = max(map(len, seqs))
            ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            target = torch.zeros_like(ids, dtype=torch.bool)  # (B, T) True on reply tokens
            for j, (r, s) in enumerate(zip(batch, seqs)):
                ids[j, : len(s)] = torch.tensor(s)
                attn[j, : len(s)] = 1
                target[j, len(r["prompt_ids"]) : len(s)] = True
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float().cpu()  # (B, T, V)
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
            out[key].append((logp * target[:, 1:]).sum(-1))
    model.train(was_training)
    return torch.cat(out["chosen_ids"]), torch.cat(out["rejected_ids"])


def main(cfg) -> dict:
    """Read and check pairs and model, fetch or compute reference log-probs, train with DPOTrainer (resuming a killed
    run), save."""
    from datasets import Dataset
    from transformers import set_seed

    from alignment import distributed, modeling
    from alignment.compat import DPO_LOSS_TYPES, PretokenizedDPOTrainer
    from alignment.data import fingerprint, load_preference_pairs, parse_source, split_holdout, tokenize_preference
    from alignment.io import StageRun, atomic_write_json
    from alignment.tokens import tokenizer_hash

    script, args, model_args = cfg
    t0 = time.time()
    if not script.train_data:
        raise UserError("train_data: expected at least one preference data source")
    if not model_args.model_name_or_path:
        raise UserError("model_name_or_path: expected the input model directory (e.g. runs/tiny/sft/merged)")
    for lt in args.loss_type:
        if lt not in DPO_LOSS_TYPES:
            raise UserError(f"loss_type: {lt!r} is not a TRL DPO loss; expected one of {', '.join(DPO_LOSS_TYPES)}")
    if args.sync_ref_model:
        raise UserError("sync_ref_model: not supported here; the reference is fixed so its log-probs can be cached")
    cache_dir = Path(script.ref_cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"ref_cache_dir: {cache_dir} exists and is not a directory; expected a directory for cached log-probs")
    modeling.check_model_dir(model_args.model_name_or_path, "model_name_or_path")
    output_dir = args.output_dir

    # data: pairs -> prompt / chosen / rejected token ids (special-token safe), and a held-out split
    tokenizer = modeling.load_tokenizer(model_args.model_name_or_path, script.chat_template_path)
    pairs, wheres = load_preference_pairs(script.train_data, script.dataset_split, args.seed, script.invalid_rows, "train_data")
    if script.eval_data:
        eval_pairs, eval_wheres = load_preference_pairs(script.eval_data, script.eval_split, args.seed, script.invalid_rows, "eval_data")
    else:
        train_part, eval_part = split_holdout(list(zip(pairs, wheres)), script.eval_fraction, args.seed)
        pairs, wheres = [p for p, _ in train_part], [w for _, w in train_part]
        eval_pairs, eval_wheres = [p for p, _ in eval_part], [w for _, w in eval_part]
    if script.max_train_samples:
        pairs, wheres = pairs[: script.max_train_samples], wheres[: script.max_train_samples]
    if script.max_eval_samples:
        eval_pairs, eval_wheres = eval_pairs[: script.max_eval_samples], eval_wheres[: script.max_eval_samples]
    train_rows = tokenize_preference(tokenizer, pairs, args.max_length, script.too_long, "train_data", wheres)
    eval_rows = tokenize_preference(tokenizer, eval_pairs, args.max_length, script.too_long, "eval_data", eval_wheres) if eval_pairs else []
    if not eval_rows:
        args.eval_strategy = "no"

    # the reference log-probs depend on the data, the input weights, the tokenizer and how the weights are loaded
    args.precompute_ref_log_probs = True
    quant = "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else "none"
    cache = RefLogpCache(script.ref_cache_dir, model=modeling.model_hash(model_args.model_name_or_path),
                         tokenizer=tokenizer_hash(modeling.local_model_dir(model_args.model_name_or_path)), quantization=quant,
                         dtype=str(model_args.dtype), ld_alpha=args.ld_alpha, max_length=args.max_length,
                         truncation_mode=args.truncation_mode)
    fingerprints = {"train": fingerprint(train_rows), "eval": fingerprint(eval_rows)}

    # output: every input checked; work in the partial sibling, resume it when the same run was killed
    inputs = [model_args.model_name_or_path] + [parse_source(s).path for s in script.train_data + script.eval_data]
    # (under accelerate launch / torchrun every process decides alike; only the main one writes files outside the Trainer)
    run = StageRun(output_dir, script.overwrite, fingerprint_config(script, args, model_args, processes=distributed.world_size()),
                   inputs, "dpo")
    args.output_dir = str(run.start())
    checkpoint = run.trainer_checkpoint()

    set_seed(args.seed)  # the seed decides the new weights (LoRA): the same on every process and in every run
    model = modeling.load_model(model_args.model_name_or_path, model_args, "causal", tokenizer, training=True,
                                gradient_checkpointing=args.gradient_checkpointing)
    if model_args.use_peft:
        model = modeling.add_lora(model, model_args, "CAUSAL_LM")
    trainable, total = modeling.count_parameters(model)
    before = modeling.trainable_snapshot(model)

    trainer = PretokenizedDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                                     eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                                     processing_class=tokenizer, ref_cache=cache, data_fingerprints=fingerprints)
    modeling.adapters_fp32(trainer.model)
    result = trainer.train(resume_from_checkpoint=checkpoint)

    # preference accuracy on held-out pairs: reference (= before training) vs. trained policy
    acc_before = acc_after = implicit = None
    if eval_rows:
        ref_c, ref_r = torch.tensor(trainer.eval_dataset["ref_chosen_logps"]), torch.tensor(trainer.eval_dataset["ref_rejected_logps"])
        pol_c, pol_r = completion_logps(trainer.model, eval_rows, tokenizer.pad_token_id, args.per_device_eval_batch_size)
        acc_before = (ref_c > ref_r).float().mean().item()
        acc_after = (pol_c > pol_r).float().mean().item()
        implicit = ((pol_c - ref_c) > (pol_r - ref_r)).float().mean().item()

    trained = modeling.gathered_model(trainer, model_args.model_name_or_path, "causal")  # None on other processes
    if not distributed.is_main():
        distributed.barrier()  # the main process writes the outputs and swaps them into place
        return {}
    changed, n_tensors = modeling.changed_parameters(trained, before)
    modeling.save_stage_outputs(trained, tokenizer, model_args.model_name_or_path, args.output_dir, "causal")
    save_config(args.output_dir, script, args, model_args, overrides={"output_dir": output_dir})
    summary = {
        "train_loss": result.training_loss, "steps": result.global_step, "resumed_from": checkpoint, "train_pairs": len(train_rows),
        "eval_pairs": len(eval_rows), "loss_type": list(args.loss_type), "beta": args.beta,
        "eval_preference_accuracy_before": acc_before, "eval_preference_accuracy_after": acc_after,
        "eval_implicit_reward_accuracy": implicit, "ref_cache_hits": list(cache.hits), "ref_cache_misses": list(cache.misses),
        "trainable_params": trainable, "total_params": total, "changed_tensors": changed, "trainable_tensors": n_tensors,
        "merged": f"{output_dir}/merged", "adapter": f"{output_dir}/adapter" if model_args.use_peft else None,
        "seconds": round(time.time() - t0, 1),
    }
    atomic_write_json(f"{args.output_dir}/summary.json", summary)
    run.commit()
    distributed.barrier()
    acc_txt = (f"; held-out preference accuracy {acc_before:.3f} -> {acc_after:.3f} on {len(eval_rows)} pairs "
               f"(implicit reward accuracy {implicit:.3f})") if eval_rows else ""
    ref_txt = f"reference log-probs {'cached' if cache.hits and not cache.misses else 'computed'}"
    print(f"dpo ({'+'.join(args.loss_type)}, beta {args.beta}): {result.global_step} steps on {len(train_rows)} pairs, "
          f"train loss {result.training_loss:.4f}{acc_txt}; {ref_txt}; {changed}/{n_tensors} tensors changed; "
          f"merged -> {output_dir}/merged in {summary['seconds']:.0f}s", file=sys.stderr)
    return summary


@exit_on_user_error
def cli(argv=None) -> dict:
    """`align dpo --config FILE.yaml [--key value ...]`."""
    from alignment.compat import DPOConfig, ModelConfig

    return main(parse_stage_config(DPOScriptArguments, DPOConfig, ModelConfig, argv))


if __name__ == "__main__":
    cli()
