"""Supervised fine-tuning with TRL's SFTTrainer: assistant-only loss, LoRA, 8-bit / 4-bit.

    align sft --config recipes/tiny/sft.yaml
    align sft --config recipes/hh/sft.yaml --model_name_or_path runs/hh/base --output_dir runs/hh/sft

Data (messages, prompt/completion or alpaca rows) is rendered with the model's chat template and tokenized here by
`alignment.tokens.encode_chat`, so TRL receives `input_ids` + `assistant_masks` and only builds labels from them:
the loss covers assistant replies and their end-of-turn token `<|im_end|>` (that is how the model learns to stop).
Every input is read and checked before the output is touched; the run works in `.<output_dir>.partial/` (a killed
run resumes from its last checkpoint there) and replaces `<output_dir>/` only when it has finished: `merged/` (the
next stage's input), `adapter/` with LoRA, `config.yaml` and `summary.json`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

from alignment.config import fingerprint_config, parse_stage_config, save_config
from alignment.errors import UserError, exit_on_user_error


@dataclass
class SFTScriptArguments:
    """Data and run options of the SFT stage (the model is `model_name_or_path`, training is SFTConfig)."""

    train_data: list[str] = field(default_factory=list, metadata={"help": "Sources PATH_OR_HUB_NAME[@WEIGHT]: .json/.jsonl/.parquet/.csv(.gz) or "
                                                                          "hub names."})
    eval_data: list[str] = field(default_factory=list, metadata={"help": "Held-out sources for eval loss (else eval_fraction of train_data)."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Fraction of train_data held out for eval loss when eval_data is empty.",
                                                        "range": (0, 1, True, False, ())})
    dataset_split: str = field(default="train", metadata={"help": "Split read from hub datasets in train_data."})
    eval_split: str = field(default="test", metadata={"help": "Split read from hub datasets in eval_data."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training conversations (after mixing)."})
    invalid_rows: str = field(default="error", metadata={"help": "A row that does not fit: 'error' (stop, naming it) or 'skip' (count)."})
    too_long: str = field(default="truncate", metadata={"help": "Conversations over max_length: 'truncate', 'drop' or 'error'."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished output_dir (one the suite wrote)."})


def main(cfg) -> dict:
    """Read and check data and model, train with SFTTrainer (resuming a killed run), save adapter + merged."""
    from datasets import Dataset
    from transformers import set_seed

    from alignment import distributed, modeling
    from alignment.compat import SFTTrainer
    from alignment.data import load_conversations, parse_source, split_holdout, tokenize_sft
    from alignment.io import StageRun, atomic_write_json

    script, args, model_args = cfg
    t0 = time.time()
    if not script.train_data:
        raise UserError("train_data: expected at least one data source")
    if not model_args.model_name_or_path:
        raise UserError("model_name_or_path: expected the input model directory (e.g. runs/tiny/base)")
    modeling.check_model_dir(model_args.model_name_or_path, "model_name_or_path")
    output_dir = args.output_dir

    # data: rows -> conversations -> input_ids + assistant_masks (special-token safe)
    tokenizer = modeling.load_tokenizer(model_args.model_name_or_path, args.chat_template_path)
    if args.assistant_only_loss and "{% generation %}" not in (tokenizer.chat_template or "").replace("{%- generation", "{% generation"):
        raise UserError(f"{model_args.model_name_or_path}: the chat template has no {{% generation %}} markers, so no assistant "
                        "mask; set chat_template_path: recipes/templates/chatml.jinja (ChatML vocabularies) or assistant_only_loss: false")
    convs, wheres = load_conversations(script.train_data, script.dataset_split, args.seed, script.invalid_rows, "train_data")
    if script.eval_data:
        eval_convs, eval_wheres = load_conversations(script.eval_data, script.eval_split, args.seed, script.invalid_rows, "eval_data")
    else:
        train_part, eval_part = split_holdout(list(zip(convs, wheres)), script.eval_fraction, args.seed)
        convs, wheres = [c for c, _ in train_part], [w for _, w in train_part]
        eval_convs, eval_wheres = [c for c, _ in eval_part], [w for _, w in eval_part]
    if script.max_train_samples:
        convs, wheres = convs[: script.max_train_samples], wheres[: script.max_train_samples]
    train_rows = tokenize_sft(tokenizer, list(convs), args.max_length, script.too_long, "train_data", list(wheres))
    eval_rows = tokenize_sft(tokenizer, list(eval_convs), args.max_length, script.too_long, "eval_data", list(eval_wheres)) if eval_convs else []
    if not args.assistant_only_loss:  # train on every token: drop the mask so TRL's labels = input_ids
        train_rows = [{"input_ids": r["input_ids"]} for r in train_rows]
        eval_rows = [{"input_ids": r["input_ids"]} for r in eval_rows]
    # TRL's own assistant_only_loss re-renders `messages`; our rows are already tokenized with the mask
    assistant_only, args.assistant_only_loss = args.assistant_only_loss, False
    if not eval_rows:
        args.eval_strategy = "no"
    n_target = sum(sum(r["assistant_masks"]) if "assistant_masks" in r else len(r["input_ids"]) for r in train_rows)

    # output: every input checked; work in the partial sibling, resume it when the same run was killed
    inputs = [model_args.model_name_or_path] + [parse_source(s).path for s in script.train_data + script.eval_data]
    # (under accelerate launch / torchrun every process decides alike; only the main one writes files outside the Trainer)
    run = StageRun(output_dir, script.overwrite, fingerprint_config(script, args, model_args, processes=distributed.world_size()),
                   inputs, "sft")
    args.output_dir = str(run.start())
    checkpoint = run.trainer_checkpoint()

    # model: fp32 on CPU, optional 8/4-bit base + LoRA on attention and MLP projections
    set_seed(args.seed)  # the seed decides the new weights (LoRA): the same on every process and in every run
    model = modeling.load_model(model_args.model_name_or_path, model_args, "causal", tokenizer, training=True,
                                gradient_checkpointing=args.gradient_checkpointing)
    if model_args.use_peft:
        model = modeling.add_lora(model, model_args, "CAUSAL_LM")
    trainable, total = modeling.count_parameters(model)
    before = modeling.trainable_snapshot(model)

    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                         eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None, processing_class=tokenizer)
    modeling.adapters_fp32(trainer.model)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if eval_rows else {}

    trained = modeling.gathered_model(trainer, model_args.model_name_or_path, "causal")  # None on other processes
    if not distributed.is_main():
        distributed.barrier()  # the main process writes the outputs and swaps them into place
        return {}
    changed, n_tensors = modeling.changed_parameters(trained, before)
    modeling.save_stage_outputs(trained, tokenizer, model_args.model_name_or_path, args.output_dir, "causal")
    args.assistant_only_loss = assistant_only  # config.yaml records what the user asked for
    save_config(args.output_dir, script, args, model_args, overrides={"output_dir": output_dir})
    summary = {
        "train_loss": result.training_loss,
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval_ppl": math.exp(eval_metrics["eval_loss"]) if "eval_loss" in eval_metrics else None,
        "steps": result.global_step,
        "resumed_from": checkpoint,
        "train_examples": len(train_rows),
        "eval_examples": len(eval_rows),
        "loss_tokens": n_target,
        "trainable_params": trainable,
        "total_params": total,
        "changed_tensors": changed,
        "trainable_tensors": n_tensors,
        "merged": f"{output_dir}/merged",
        "adapter": f"{output_dir}/adapter" if model_args.use_peft else None,
        "seconds": round(time.time() - t0, 1),
    }
    atomic_write_json(f"{args.output_dir}/summary.json", summary)
    run.commit()
    distributed.barrier()
    eval_txt = f", eval loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else ""
    print(f"sft: {summary['steps']} steps on {len(train_rows)} conversations, train loss {result.training_loss:.4f}{eval_txt}; "
          f"{trainable:,}/{total:,} params trainable, {changed}/{n_tensors} tensors changed; "
          f"merged -> {output_dir}/merged in {summary['seconds']:.0f}s", file=sys.stderr)
    return summary


@exit_on_user_error
def cli(argv=None) -> dict:
    """`align sft --config FILE.yaml [--key value ...]`."""
    from alignment.compat import ModelConfig, SFTConfig

    return main(parse_stage_config(SFTScriptArguments, SFTConfig, ModelConfig, argv))


if __name__ == "__main__":
    cli()
