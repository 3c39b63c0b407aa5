"""Online RL with TRL's RLOOTrainer against the same rewards and prompts as `align ppo`.

    align rloo --config recipes/tiny/rloo.yaml

REINFORCE with a leave-one-out baseline: each completion is scored against the mean of the other
`num_generations - 1` completions of its prompt; no value head. Prompt ids come from the suite's special-token-safe encoder (a user message
holding "<|im_start|>assistant" stays text). Rewards: the reward model (normalised) and a penalty for completions
that never reach end of turn, each logged by TRL under its own name. Writes <output_dir>/adapter, merged/,
summary.json and config.yaml; the run works in `.<output_dir>.partial/` and a killed run resumes from its checkpoint.
"""

from __future__ import annotations

import time

from alignment.config import fingerprint_config, parse_stage_config, save_config
from alignment.errors import UserError, exit_on_user_error
from alignment.rewards import OnlineRLArguments


def main(cfg) -> dict:
    """Validate, load prompts and rewards, train with RLOOTrainer (resuming a killed run), save adapter + merged."""
    import torch
    from datasets import Dataset

    from alignment.compat import SafeRLOOTrainer
    from alignment.data import encode_prompts, read_prompt_rows
    from alignment.io import StageRun, atomic_write_json
    from alignment.data import prompt_columns
    from alignment.modeling import context_length, load_config, load_model, lora_config, save_stage_outputs
    from alignment.rewards import check_online_inputs, online_rewards, trl_online_summary, trl_reward_functions

    script, args, model_args = cfg
    t0 = time.time()
    tok, use_rm = check_online_inputs(script, model_args.model_name_or_path)
    if args.beta < 0:
        raise UserError(f"beta: {args.beta}; expected the KL coefficient >= 0")
    context = context_length(load_config(model_args.model_name_or_path, "model_name_or_path"))
    rows = read_prompt_rows(script.prompts, script.max_prompts or None)
    kept = encode_prompts(tok, rows, context, args.max_completion_length or 0, script.long_prompts)
    # the prompt rows' other fields reach the reward functions as columns (TRL passes them as keyword arguments)
    dataset = Dataset.from_list(prompt_columns(kept))

    output_dir = args.output_dir
    run = StageRun(output_dir, script.overwrite, fingerprint_config(script, args, model_args),
                   [model_args.model_name_or_path, script.prompts] + ([script.reward_model] if use_rm else []), "rloo")
    args.output_dir = str(run.start())
    checkpoint = run.trainer_checkpoint()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if script.cpu_threads and device.type == "cpu":
        torch.set_num_threads(script.cpu_threads)
    functions = online_rewards(script, use_rm, device)
    args.reward_weights = [f.weight for f in functions]
    policy = load_model(model_args.model_name_or_path, model_args, "causal", tok, training=True, device=device)
    trainer = SafeRLOOTrainer(model=policy, reward_funcs=trl_reward_functions(functions, tok), args=args, train_dataset=dataset,
                              processing_class=tok, peft_config=lora_config(model_args) if model_args.use_peft else None)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    save_stage_outputs(trainer.model, tok, model_args.model_name_or_path, args.output_dir)
    save_config(args.output_dir, script, args, model_args, overrides={"output_dir": output_dir})
    summary = trl_online_summary(trainer, result, "rloo", time.time() - t0, checkpoint)
    atomic_write_json(f"{args.output_dir}/summary.json", summary)
    run.commit()
    print(f"rloo: -> {output_dir}/merged")
    return summary


@exit_on_user_error
def cli(argv=None) -> dict:
    """`align rloo --config FILE.yaml [--key value ...]`."""
    from alignment.compat import RLOOConfig, ModelConfig

    return main(parse_stage_config(OnlineRLArguments, RLOOConfig, ModelConfig, argv))


if __name__ == "__main__":
    cli()
