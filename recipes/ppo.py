"""RLHF with our PPO loop: LoRA policy, value head, reference = the policy with its adapter disabled.

    align ppo --config recipes/tiny/ppo.yaml
    align ppo --config recipes/tiny/ppo.yaml --num_updates 5 --resume_from_checkpoint latest

Reads the SFT model (`model_name_or_path`), the reward model (`reward_model`, with the reward_stats.json the
reward stage wrote beside it) and prompts (rl/prompts.jsonl rows {"prompt": [messages]}, or Anthropic HH
.jsonl.gz dialogues). Writes <output_dir>/adapter, <output_dir>/merged (plain HF model), value_head.pt,
metrics.jsonl, curves.png, summary.json, config.yaml, and checkpoints/step_N for exact resume.
The math and the loop are in alignment/ppo.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from alignment.config import parse_config, save_config
from alignment.errors import UserError, exit_on_user_error
from alignment.io import atomic_dir, atomic_write_json, check_output_dir
from alignment.ppo import (PPO, PPOHyper, RewardModelScorer, ValueHead, check_same_tokenizer, encode_prompts,
                           kl_controller, load_reward_model, plot_curves, read_prompt_rows, reward_stats)


@dataclass
class PPOStageConfig(PPOHyper):
    """The `align ppo` stage: PPO hyper-parameters plus data, reward model, schedule and outputs."""

    output_dir: str = field(default="runs/tiny/ppo", metadata={"help": "Where adapter/, merged/ and logs are written."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output directory."})
    reward_model: str = field(default="runs/tiny/reward/merged", metadata={"help": "Reward model directory (sequence classification, 1 label)."})
    normalize_reward: bool = field(default=True, metadata={"help": "Normalise scores with <reward_model>/reward_stats.json (false = raw scores)."})
    reward_load_in_8bit: bool = field(default=False, metadata={"help": "Load the reward model in 8-bit (bitsandbytes)."})
    reward_batch_size: int = field(default=16, metadata={"help": "Sequences per reward-model forward pass."})
    prompts: str = field(default="runs/tiny/data/rl/prompts.jsonl", metadata={"help": "Prompts .jsonl(.gz): {'prompt': messages} rows or HH dialogues."})
    max_prompts: int = field(default=0, metadata={"help": "Use at most this many prompts (0 = all)."})
    long_prompts: str = field(default="error", metadata={"help": "A prompt too long for the context: 'error' (stop, naming it) or 'skip' (count)."})
    eval_prompts: int = field(default=32, metadata={"help": "Prompts held out for the before/after report and win rate (0 = none)."})
    num_updates: int = field(default=20, metadata={"help": "PPO updates (each: rollout_batch_size episodes)."})
    value_model: str = field(default="policy", metadata={"help": "'policy' (value head on the policy trunk) or a model directory for a separate value trunk."})
    save_steps: int = field(default=0, metadata={"help": "Write a resumable checkpoint every N updates (0 = only at the end)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoints/step_N directory, or 'latest'."})
    logging_steps: int = field(default=1, metadata={"help": "Log metrics every N updates."})
    cpu_threads: int = field(default=0, metadata={"help": "torch threads on CPU (0 = torch's default). 1 is several times faster for tiny models on a busy machine."})
    report_to: list[str] = field(default_factory=list, metadata={"help": "Trackers: tensorboard, wandb (empty = none)."})


def latest_checkpoint(output_dir: str) -> Path:
    """The newest checkpoints/step_N under output_dir."""
    ckpts = sorted(Path(output_dir, "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    if not ckpts:
        raise UserError(f"{output_dir}/checkpoints: no checkpoint to resume from")
    return ckpts[-1]


def trackers(cfg: PPOStageConfig, out: Path) -> list:
    """Log functions for the trackers named in report_to."""
    fns = []
    for name in cfg.report_to:
        if name in ("none", ""):
            continue
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            w = SummaryWriter(str(out / "tensorboard"))
            fns.append(lambda m, step, w=w: [w.add_scalar(k, v, step) for k, v in m.items() if isinstance(v, (int, float))])
        elif name == "wandb":
            import wandb

            run = wandb.init(project="alignment-ppo", config=asdict(cfg), dir=str(out))
            fns.append(lambda m, step, run=run: run.log(m, step=step))
        else:
            raise UserError(f"report_to: unknown tracker {name!r}; expected tensorboard or wandb")
    return fns


def main(cfg) -> dict:
    """Validate inputs, load models, run PPO updates with checkpoints, write adapter + merged and the report.

    cfg: (ModelConfig, PPOStageConfig) as parsed by `cli`."""
    from transformers import AutoModel

    from alignment.modeling import add_lora, check_model_dir, load_model, load_tokenizer, quantization_config, save_stage_outputs

    model_args, cfg = cfg
    t0 = time.time()
    # -- validate everything before writing anything
    if not model_args.model_name_or_path:
        raise UserError("model_name_or_path: expected the SFT model directory (e.g. runs/tiny/sft/merged)")
    check_model_dir(model_args.model_name_or_path, "model_name_or_path")
    check_model_dir(cfg.reward_model, "reward_model")
    kl_controller(cfg.kl_controller, cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)  # kl_coef < 0 etc.: fail before loading
    if cfg.num_updates < 1:
        raise UserError(f"num_updates: expected >= 1, got {cfg.num_updates}")
    resume = cfg.resume_from_checkpoint
    out = Path(cfg.output_dir)
    if not resume:
        check_output_dir(out, cfg.overwrite)
    mean, std = reward_stats(cfg.reward_model, cfg.normalize_reward)
    tok = load_tokenizer(model_args.model_name_or_path)
    check_same_tokenizer(tok, load_tokenizer(cfg.reward_model), model_args.model_name_or_path, cfg.reward_model)
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(model_args.model_name_or_path).max_position_embeddings
    rows = read_prompt_rows(cfg.prompts, cfg.max_prompts + cfg.eval_prompts if cfg.max_prompts else 0)
    prompts = encode_prompts(tok, rows, context, cfg.response_length, cfg.prompts, cfg.long_prompts)
    n_eval = min(cfg.eval_prompts, len(prompts) // 4)  # never more than a quarter of the prompts
    eval_rows, train_rows = prompts[:n_eval], prompts[n_eval:]
    if len(train_rows) < cfg.rollout_batch_size:
        print(f"note: {len(train_rows)} training prompts < rollout_batch_size {cfg.rollout_batch_size}; prompts repeat within a batch", file=sys.stderr)
    stop_ids = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int) and i != tok.unk_token_id]

    # -- models
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_model(model_args.model_name_or_path, model_args, kind="causal", tokenizer=tok)
    quantized = quantization_config(model_args) is not None
    if not quantized:
        policy.to(device)
    ref_model = None
    if model_args.use_peft:
        policy = add_lora(policy, model_args)
    else:  # full fine-tuning: the reference needs its own frozen copy
        ref_model = load_model(model_args.model_name_or_path, model_args, kind="causal", tokenizer=tok).to(device).eval()
        ref_model.requires_grad_(False)
    hidden = policy.config.hidden_size
    trunk = None
    if cfg.value_model != "policy":
        check_model_dir(cfg.value_model, "value_model")
        trunk = AutoModel.from_pretrained(cfg.value_model, dtype=torch.float32)
        hidden = trunk.config.hidden_size
    value_head = ValueHead(hidden, trunk).to(device)
    rm = load_reward_model(cfg.reward_model, cfg.reward_load_in_8bit, device)
    scorer = RewardModelScorer(rm, tok, mean, std, cfg.reward_batch_size)
    hp = PPOHyper(**{k: getattr(cfg, k) for k in PPOHyper.__dataclass_fields__})
    ppo = PPO(policy, value_head, tok, scorer, train_rows, hp, stop_ids, ref_model=ref_model, device=device)

    # -- output dir, resume
    if resume:
        ckpt = latest_checkpoint(cfg.output_dir) if resume == "latest" else Path(resume)
        ppo.load_checkpoint(ckpt)
        print(f"ppo: resumed from {ckpt} at update {ppo.step}")
    elif out.exists() and cfg.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, model_args, cfg)

    before = ppo.evaluate(eval_rows) if eval_rows and ppo.step == 0 else None
    log_fns = trackers(cfg, out)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.num_updates, initial=ppo.step, desc="ppo", unit="update")
    with open(out / "metrics.jsonl", "w") as log:
        # rewritten from the checkpoint's history: updates logged after the last checkpoint are redone, not duplicated
        log.writelines(json.dumps(m) + "\n" for m in ppo.history)
        while ppo.step < cfg.num_updates:
            m = ppo.update()
            log.write(json.dumps(m) + "\n")
            log.flush()
            if ppo.step % cfg.logging_steps == 0:
                for fn in log_fns:
                    fn(m, ppo.step)
            bar.set_postfix(score=f"{m['objective/scores']:.3f}", kl=f"{m['objective/kl']:.3f}", clip=f"{m['policy/clipfrac_avg']:.2f}")
            bar.update(1)
            if cfg.save_steps and ppo.step % cfg.save_steps == 0 and ppo.step < cfg.num_updates:
                with atomic_dir(out / "checkpoints" / f"step_{ppo.step:06d}", overwrite=True) as tmp:
                    ppo.save_checkpoint(tmp)
    bar.close()
    with atomic_dir(out / "checkpoints" / f"step_{ppo.step:06d}", overwrite=True) as tmp:
        ppo.save_checkpoint(tmp)

    after = ppo.evaluate(eval_rows) if eval_rows else None
    if before is None and eval_rows:  # resumed: the reference is still there to compare against
        before = {"score_policy": after["score_reference"], "kl": 0.0}
    save_stage_outputs(policy, tok, model_args.model_name_or_path, out, overwrite=True)
    torch.save(value_head.state_dict(), out / "value_head.pt")
    plotted = plot_curves(ppo.history, out / "curves.png")
    h = ppo.history
    summary = {
        "updates": ppo.step, "episodes": ppo.step * cfg.rollout_batch_size, "seconds": round(time.time() - t0, 1),
        "first_update": {k: h[0][k] for k in ("objective/scores", "objective/kl", "objective/rlhf_reward")},
        "last_update": {k: h[-1][k] for k in ("objective/scores", "objective/kl", "objective/rlhf_reward")},
        "eval_before": before, "eval_after": after, "curves": "curves.png" if plotted else None,
    }
    atomic_write_json(out / "summary.json", summary)
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

    return main(parse_config([ModelConfig, PPOStageConfig], argv))


if __name__ == "__main__":
    cli()
