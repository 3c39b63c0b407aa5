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
