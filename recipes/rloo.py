"""Online RL with TRL's RLOOTrainer against the same reward model and prompts as `align ppo`.

    align rloo --config recipes/tiny/rloo.yaml

REINFORCE with a leave-one-out baseline over `num_generations` samples per prompt: no value head. Writes
<output_dir>/adapter, <output_dir>/merged, summary.json and config.yaml; resumes from its last checkpoint.
The shared loading and reward function live in alignment/ppo.py (`run_trl_online`).
"""

from __future__ import annotations

from alignment.config import parse_config
from alignment.errors import exit_on_user_error
from alignment.ppo import OnlineRLArguments, run_trl_online


def main(cfg) -> dict:
    """cfg: (OnlineRLArguments, RLOOConfig, ModelConfig)."""
    return run_trl_online("RLOOTrainer", cfg)


@exit_on_user_error
def cli(argv=None) -> dict:
    """`align rloo --config FILE.yaml [--key value ...]`."""
    from trl import RLOOConfig

    from alignment.compat import ModelConfig, cpu_overrides

    return main(parse_config([OnlineRLArguments, RLOOConfig, ModelConfig], cpu_overrides(argv)))


if __name__ == "__main__":
    cli()
