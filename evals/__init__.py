"""Evaluation: perplexity, MMLU-style multiple choice, preference and win rate, reports and comparison."""
