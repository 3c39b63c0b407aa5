"""Alignment-focused post-training suite: the shared library (configs, data formats, model loading, PPO)."""

__version__ = "0.1.0"
