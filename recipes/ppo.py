"""RLHF with our PPO loop: LoRA policy, value head, reference = the policy with its adapter disabled.

    align ppo --config recipes/tiny/ppo.yaml
    align ppo --config recipes/tiny/ppo.yaml --num_updates 30 --overwrite true

Reads the SFT model (`model_name_or_path`), the reward model (`reward_model`, with the reward_stats.json the
reward stage wrote beside it) and prompts (rl/prompts.jsonl rows {"prompt": [messages]}, or Anthropic HH
.jsonl.gz dialogues). Writes <output_dir>/adapter, <output_dir>/merged (plain HF model), value_head.safetensors,
metrics.jsonl, curves.png, summary.json, config.yaml, and checkpoints/step_N. The run works in
`.<output_dir>.partial/` and replaces `<output_dir>/` only when it has finished; a killed run with the same config
and inputs resumes from its last checkpoint there, bitwise equal to an uninterrupted run.
The math and the loop are in alignment/ppo.py; rewards in alignment/rewards.py.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.config import fingerprint_config, parse_stage_config, save_config
from alignment.errors import UserError, exit_on_user_error
from alignment.ppo import PPOHyper
from alignment.rewards import OnlineRLArguments


@dataclass
class PPOStageConfig(PPOHyper, OnlineRLArguments):
    """The `align ppo` stage: PPO hyper-parameters, prompts and rewards, schedule and outputs."""

    output_dir: str = field(default="runs/tiny/ppo", metadata={"help": "Where adapter/, merged/ and logs are written."})
    eval_prompts: int = field(default=32, metadata={"help": "Prompts held out for the before/after report and win rate (0 = none)."})
    num_updates: int = field(default=20, metadata={"help": "PPO updates (each: rollout_batch_size episodes)."})
    value_model: str = field(default="policy", metadata={"help": "'policy' (value head on the policy trunk) or a model directory for a separate "
                                                                 "value trunk."})
    save_steps: int = field(default=0, metadata={"help": "Write a resumable checkpoint every N updates (0 = only at the end)."})
    logging_steps: int = field(default=1, metadata={"help": "Log metrics to the trackers every N updates.", "range": (1, None, True, True, ())})
    report_to: list[str] = field(default_factory=list, metadata={"help": "Trackers: tensorboard, wandb (empty = none)."})


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoints/step_N under directory, or None."""
    ckpts = sorted(Path(directory, "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return ckpts[-1] if ckpts else None


def main(cfg) -> dict:
    """Validate inputs, load models, run PPO updates with checkpoints, write adapter + merged and the report."""
    from transformers import AutoModel

    from alignment import distributed
    from alignment.data import encode_prompts, read_prompt_rows
    from alignment.io import StageRun, atomic_dir, atomic_write_json
    from alignment.modeling import (load_config, add_lora, check_model_dir, context_length, default_device, load_model, save_stage_outputs)
    from alignment.ppo import PPO, ValueHead, check_batch_sizes, kl_controller, plot_curves
    from alignment.rewards import check_online_inputs, online_rewards, total_reward
    from alignment.sampling import stop_token_ids
    from alignment.tracking import Trackers, check_report_to

    cfg, _, model_args = cfg
    t0 = time.time()
    # under accelerate launch / torchrun: every process runs this file on its share of each batch (alignment/ppo.py);
    # all read the same inputs and decide alike, only the main one writes
    distributed.init()
    main_process = distributed.is_main()
    # -- validate everything before writing anything
    tok, use_rm = check_online_inputs(cfg, model_args.model_name_or_path)
    if cfg.value_model != "policy":
        check_model_dir(cfg.value_model, "value_model")
    kl_controller(cfg.kl_controller, cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)  # kl_coef < 0 etc.: fail before loading
    check_batch_sizes(cfg, distributed.world_size())
    if cfg.kl_estimator not in ("k1", "k3"):
        raise UserError(f"kl_estimator: {cfg.kl_estimator!r}; expected 'k1' or 'k3'")
    check_report_to(cfg.report_to)
    context = context_length(load_config(model_args.model_name_or_path, "model_name_or_path"))
    rows = read_prompt_rows(cfg.prompts, cfg.max_prompts + cfg.eval_prompts if cfg.max_prompts else None)
    prompts = encode_prompts(tok, rows, context, cfg.response_length, cfg.long_prompts)
    n_eval = min(cfg.eval_prompts, len(prompts) // 4)  # never more than a quarter of the prompts
    eval_rows, train_rows = prompts[:n_eval], prompts[n_eval:]
    if len(train_rows) < cfg.rollout_batch_size and main_process:
        print(f"note: {len(train_rows)} training prompts < rollout_batch_size {cfg.rollout_batch_size}; prompts repeat within a batch",
              file=sys.stderr)
    stop_ids = stop_token_ids(tok)

    inputs = [model_args.model_name_or_path, cfg.prompts] + ([cfg.reward_model] if use_rm else []) + \
        ([cfg.value_model] if cfg.value_model != "policy" else [])
    run = StageRun(cfg.output_dir, cfg.overwrite, fingerprint_config(cfg, model_args), inputs, "ppo")
    work = run.start()

    # -- models
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)
    torch.manual_seed(cfg.seed)
    device = default_device()  # this process's GPU under a launcher
    policy = load_model(model_args.model_name_or_path, model_args, "causal", tok, training=True, device=device)
    ref_model = None
    if model_args.use_peft:
        policy = add_lora(policy, model_args)
    else:  # full fine-tuning: the reference needs its own frozen copy
        ref_model = load_model(model_args.model_name_or_path, model_args, "causal", tok, device=device)
    hidden, trunk = policy.config.hidden_size, None
    if cfg.value_model != "policy":
        trunk = AutoModel.from_pretrained(cfg.value_model, dtype=torch.float32)
        hidden = trunk.config.hidden_size
    value_head = ValueHead(hidden, trunk).to(device)
    rewards = online_rewards(cfg, use_rm, device)
    reward_means: dict = {}  # each reward's mean over the last rollout batch, logged as rewards/<name>/mean

    def score(rows, completions):
        total, means = total_reward(rewards, rows, completions)
        reward_means.clear()
        reward_means.update(means)
        return total

    hp = PPOHyper(**{k: getattr(cfg, k) for k in PPOHyper.__dataclass_fields__})
    ppo = PPO(policy, value_head, tok, score, train_rows, hp, stop_ids, ref_model=ref_model, device=device)

    # -- resume a killed run of the same config and inputs from its last checkpoint
    ckpt = latest_checkpoint(work) if run.resumed else None
    if ckpt is not None:
        ppo.load_checkpoint(ckpt)
        if main_process:
            print(f"ppo: resuming the interrupted run from {ckpt} at update {ppo.step}", file=sys.stderr)
    if main_process:
        save_config(work, cfg, model_args, overrides={"output_dir": cfg.output_dir})

    def checkpoint():  # rank 0 writes it (every process holds the same weights and optimizer state)
        if main_process:
            with atomic_dir(work / "checkpoints" / f"step_{ppo.step:06d}", overwrite=True) as tmp:
                ppo.save_checkpoint(tmp)
        distributed.barrier()

    before = ppo.evaluate(eval_rows) if eval_rows and ppo.step == 0 else None
    trackers = Trackers(work, cfg.report_to, "align-ppo", fingerprint_config(cfg, model_args), history=ppo.history, active=main_process)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.num_updates, initial=ppo.step, desc="ppo", unit="update", disable=not main_process)
    while ppo.step < cfg.num_updates:
        m = ppo.update()
        shares = distributed.all_gather_objects(dict(reward_means))  # each process scored an equal share of the batch
        m.update({f"rewards/{k}/mean": sum(d[k] for d in shares) / len(shares) for k in reward_means})  # (also kept in history)
        if ppo.step % cfg.logging_steps == 0 or ppo.step == cfg.num_updates:
            trackers.log(m, ppo.step)
        bar.set_postfix(score=f"{m['objective/scores']:.3f}", kl=f"{m['objective/kl']:.3f}", clip=f"{m['policy/clipfrac_avg']:.2f}")
        bar.update(1)
        if cfg.save_steps and ppo.step % cfg.save_steps == 0 and ppo.step < cfg.num_updates:
            checkpoint()
    bar.close()
    trackers.close()
    checkpoint()

    after = ppo.evaluate(eval_rows) if eval_rows else None
    if before is None and eval_rows:  # resumed: the reference is still there to compare against
        before = {"score_policy": after["score_reference"], "kl": 0.0}
    if not main_process:
        distributed.barrier()  # the main process writes the outputs and swaps them into place
        return {}
    save_stage_outputs(policy, tok, model_args.model_name_or_path, work)
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}, str(work / "value_head.safetensors"))
    plotted = plot_curves(ppo.history, work / "curves.png")
    h = ppo.history
    summary = {
        "updates": ppo.step, "episodes": ppo.step * cfg.rollout_batch_size, "seconds": round(time.time() - t0, 1),
        "resumed_from": str(ckpt) if ckpt else None,
        "first_update": {k: h[0][k] for k in ("objective/scores", "objective/kl", "objective/rlhf_reward")},
        "last_update": {k: h[-1][k] for k in ("objective/scores", "objective/kl", "objective/rlhf_reward")},
        "eval_before": before, "eval_after": after, "curves": "curves.png" if plotted else None,
    }
    atomic_write_json(work / "summary.json", summary)
    run.commit()
    distributed.barrier()
    out = cfg.output_dir
    print(f"ppo: {ppo.step} updates ({summary['episodes']} episodes) in {summary['seconds']}s -> {out}/merged")
    print(f"  train score {summary['first_update']['objective/scores']:+.3f} -> {summary['last_update']['objective/scores']:+.3f}, "
          f"KL {summary['first_update']['objective/kl']:.3f} -> {summary['last_update']['objective/kl']:.3f}")
    if after:
        print(f"  held-out ({after['n']} prompts): reward {before['score_policy']:+.3f} (SFT) -> {after['score_policy']:+.3f} (PPO), "
              f"KL {after['kl']:.3f}, reward-model win rate of PPO vs SFT {after['win_rate']:.2f}")
    return summary


@exit_on_user_error
def cli(argv=None) -> dict:
    """`align ppo --config FILE.yaml [--key value ...]`."""
    from alignment.compat import ModelConfig

    return main(parse_stage_config(PPOStageConfig, None, ModelConfig, argv))


if __name__ == "__main__":
    cli()
