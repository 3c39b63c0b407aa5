"""Imports from TRL / transformers / peft whose paths move between releases, kept in one place.

Pinned: trl 1.16, transformers 5.23, peft 0.21. When one of these moves, fix it here only.
"""

from __future__ import annotations

from trl import DPOConfig, DPOTrainer, ModelConfig, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer  # noqa: F401
from trl.trainer.dpo_trainer import DataCollatorForPreference as DPOCollator  # noqa: F401
from trl.trainer.reward_trainer import DataCollatorForPreference as RewardCollator  # noqa: F401
from trl.trainer.utils import use_adapter  # noqa: F401  (context manager: run a PeftModel with an adapter / none)

from transformers.trainer_utils import get_last_checkpoint  # noqa: F401

# DPO loss types TRL 1.16 implements (DPOConfig.loss_type); checked up front so a typo is a config error, not a
# stack trace in the middle of training.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)


def cpu_overrides(argv: list[str] | None) -> list[str]:
    """Without CUDA, append `--use_cpu true --bf16 false --fp16 false` to a stage's command line.

    TRL configs default to bf16=True and transformers rejects bf16 without a GPU inside the config's __post_init__,
    i.e. before `alignment.config.cpu_fallback` could switch it off, so the override has to reach the parser. It
    comes last, so it wins over the YAML and the user's flags, exactly like cpu_fallback; says so once."""
    import sys

    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    if torch.cuda.is_available() or any(a in ("-h", "--help") for a in argv):
        return argv
    print("note: no CUDA device; training on CPU in fp32 (use_cpu=True, bf16=False)", file=sys.stderr)
    return argv + ["--use_cpu", "true", "--bf16", "false", "--fp16", "false"]
