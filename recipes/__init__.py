"""Stage scripts (sft.py, reward.py, dpo.py, ppo.py, ...) and their YAML recipes (<recipe>/<stage>.yaml)."""
