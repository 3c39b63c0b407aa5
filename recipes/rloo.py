"""Online RL with TRL's RLOOTrainer against the same rewards and prompts as `align ppo`.

    align rloo --config recipes/tiny/rloo.yaml

REINFORCE with a leave-one-out baseline: each completion is scored against the mean of the other
`num_generations - 1` completions of its prompt; no value head. Prompt ids come from the suite's special-token-safe encoder (a user message
holding "<|im_start|>assistant" stays text). Rewards: the reward model (normalised) and a penalty for completions
that never reach end of turn, each logged by TRL under its own name. Writes <output_dir>/adapter, merged/,
summary.json and config.yaml; the run works in `.<output_dir>.partial/` and a killed run resumes from its checkpoint.
"""

from __future__ import annotations

import sys
import time

from alignment.config import fingerprint_config, parse_stage_config, save_config
from alignment.errors import UserError, exit_on_user_error
from alignment.rewards import OnlineRLArguments


def main(cfg) -> dict:
    """Validate, load prompts and rewards, train with RLOOTrainer (resuming a killed run), save adapter + merged."""
    import torch
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint

    from alignment.compat import SafeRLOOTrainer
    from alignment.data import encode_prompts, read_prompt_rows
    from alignment.io import StageRun, atomic_write_json, check_checkpoint_files
    from alignment.modeling import (load_config, check_model_dir, context_length, load_model, load_tokenizer, lora_config, same_tokenizer,
                                    save_stage_outputs)
    from alignment.data import prompt_columns
    from alignment.rewards import RewardModel, build_rewards, needs_reward_model, reward_stats, trl_reward_functions

    script, args, model_args = cfg
    t0 = time.time()
    if not model_args.model_name_or_path:
        raise UserError("model_name_or_path: expected the SFT model directory (e.g. runs/tiny/sft/merged)")
    check_model_dir(model_args.model_name_or_path, "model_name_or_path")
    use_rm = needs_reward_model(script.rewards)
    if use_rm:
        check_model_dir(script.reward_model, "reward_model")
        reward_stats(script.reward_model, script.normalize_reward)
    build_rewards([s for s in script.rewards if not s.startswith("model")], None, script.missing_eos_penalty)  # check the specs now
    if args.beta < 0:
        raise UserError(f"beta: {args.beta}; expected the KL coefficient >= 0")
    tok = load_tokenizer(model_args.model_name_or_path)
    if use_rm and not same_tokenizer(tok, load_tokenizer(script.reward_model)):
        raise UserError(f"reward_model: {script.reward_model}: its tokenizer differs from the policy's; expected the same tokenizer")
    context = context_length(load_config(model_args.model_name_or_path, "model_name_or_path"))
    rows = read_prompt_rows(script.prompts, script.max_prompts or None)
    kept = encode_prompts(tok, rows, context, args.max_completion_length or 0, script.long_prompts)
    # the prompt rows' other fields reach the reward functions as columns (TRL passes them as keyword arguments)
    dataset = Dataset.from_list(prompt_columns(kept))

    output_dir = args.output_dir
    run = StageRun(output_dir, script.overwrite, fingerprint_config(script, args, model_args),
                   [model_args.model_name_or_path, script.prompts] + ([script.reward_model] if use_rm else []), "rloo")
    args.output_dir = str(run.start())
    checkpoint = get_last_checkpoint(args.output_dir) if run.resumed else None
    if checkpoint:
        check_checkpoint_files(checkpoint)
        print(f"rloo: resuming the interrupted run from {checkpoint}", file=sys.stderr)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if script.cpu_threads and device.type == "cpu":
        torch.set_num_threads(script.cpu_threads)
    rm = RewardModel(script.reward_model, script.normalize_reward, script.reward_load_in_8bit, script.reward_batch_size, device) \
        if use_rm else None
    functions = build_rewards(script.rewards, rm, script.missing_eos_penalty)
    args.reward_weights = [f.weight for f in functions]
    policy = load_model(model_args.model_name_or_path, model_args, "causal", tok, training=True, device=device)
    trainer = SafeRLOOTrainer(model=policy, reward_funcs=trl_reward_functions(functions, tok), args=args, train_dataset=dataset,
                              processing_class=tok, peft_config=lora_config(model_args) if model_args.use_peft else None)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    save_stage_outputs(trainer.model, tok, model_args.model_name_or_path, args.output_dir)
    save_config(args.output_dir, script, args, model_args, overrides={"output_dir": output_dir})
    logs = [h for h in trainer.state.log_history if "reward" in h]
    summary = {"trainer": "RLOOTrainer", "steps": result.global_step, "seconds": round(time.time() - t0, 1), "resumed_from": checkpoint,
               "first_log": logs[0] if logs else None, "last_log": logs[-1] if logs else None,
               # the reward curve: each logged step's total reward, each reward's mean, and the KL
               "curve": [{k: v for k, v in h.items() if k in ("step", "reward", "kl") or k.startswith("rewards/")} for h in logs]}
    atomic_write_json(f"{args.output_dir}/summary.json", summary)
    run.commit()
    if logs:
        f, last = logs[0], logs[-1]
        print(f"rloo: {result.global_step} steps in {summary['seconds']}s -> {output_dir}/merged; reward "
              f"{f['reward']:+.3f} -> {last['reward']:+.3f}, kl {f.get('kl', float('nan')):.4f} -> {last.get('kl', float('nan')):.4f}")
    return summary


@exit_on_user_error
def cli(argv=None) -> dict:
    """`align rloo --config FILE.yaml [--key value ...]`."""
    from alignment.compat import RLOOConfig, ModelConfig

    return main(parse_stage_config(OnlineRLArguments, RLOOConfig, ModelConfig, argv))


if __name__ == "__main__":
    cli()
