"""`align <stage> --config recipes/<recipe>/<stage>.yaml [--key value ...]`: one command for every stage.

Each stage is also runnable as `python -m <module>`; this file only dispatches to the module's `cli(argv)`.
"""

from __future__ import annotations

import importlib
import os
import sys

# stage -> (module, one-line description), in pipeline order
STAGES: dict[str, tuple[str, str]] = {
    "data": ("alignment.tinyworld", "generate the offline tiny-world dataset family (align data tinyworld --seed N --output DIR)"),
    "tokenizer": ("pretrain.tokenizer", "train a byte-level BPE tokenizer with reserved special tokens and a chat template"),
    "prepare": ("pretrain.data", "clean, deduplicate, decontaminate, tokenize and pack a pretraining corpus into shards"),
    "pretrain": ("pretrain.train", "pretrain the from-scratch Llama model on packed shards (resumable, distributed)"),
    "export": ("pretrain.export", "export a from-scratch model (checkpoint or fresh init) as a Hugging Face directory"),
    "sft": ("recipes.sft", "supervised fine-tuning with TRL (LoRA, 8-bit/4-bit), assistant-only loss"),
    "reward": ("recipes.reward", "train a reward model on preference pairs with health gates"),
    "pairs": ("recipes.pairs", "on-policy preference pairs: sample a policy, judge by reward model / checker, best vs worst"),
    "dpo": ("recipes.dpo", "direct preference optimization with TRL and cached reference log-probs"),
    "ppo": ("recipes.ppo", "RLHF with our PPO loop: LoRA policy, value head, KL to the disabled-adapter reference"),
    "rloo": ("recipes.rloo", "online RL with TRL's RLOOTrainer against the same reward model"),
    "grpo": ("recipes.grpo", "online RL with TRL's GRPOTrainer against the same reward model"),
    "distill": ("recipes.distill", "train a small draft model on a target's outputs and logits, for speculative decoding"),
    "generate": ("recipes.generate", "generate completions for prompts (JSONL out), batched, optionally speculative with a draft"),
    "chat": ("recipes.chat", "chat with a model in the terminal: streamed replies, multi-turn history, /reset /system /exit"),
    "eval": ("evals.harness", "score a model: perplexity / bits-per-byte, multiple choice, preference, win rate"),
    "compare": ("evals.compare", "compare eval reports side by side, marking deltas within noise"),
    "serve": ("recipes.serve", "serve models: OpenAI-compatible API, chat page, blind arena whose votes become preference data"),
    "memory": ("recipes.memory", "will it fit? peak GPU memory of a stage YAML from config.json alone, per 16/24 GB card"),
    "run": ("recipes.run", "run a whole recipe directory stage by stage and write a report (align run recipes/tiny)"),
}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: align <stage> --config recipes/<recipe>/<stage>.yaml [--key value ...]", "", "stages:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in STAGES.items()]
    lines += ["", "`align <stage> --help` lists a stage's config keys."]
    return "\n".join(lines)


def main(argv=None) -> None:
    """Entry point of the `align` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        import difflib

        close = difflib.get_close_matches(stage, list(STAGES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(STAGES)}"
        print(f"error: unknown stage '{stage}'{hint}", file=sys.stderr)
        sys.exit(2)
    module_name = STAGES[stage][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"error: stage '{stage}' is not available in this version ({module_name} is missing)", file=sys.stderr)
            sys.exit(2)
        raise
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from alignment import config

    config.PROG = f"align {stage}"  # usage and --help name the command the user typed
    module.cli(rest)


if __name__ == "__main__":
    main()
