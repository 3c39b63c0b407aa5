"""The few statistics every report shares: a mean with its standard error, and a win rate over paired samples."""

from __future__ import annotations

import math

import numpy as np


def mean_stderr(x) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)); the error is NaN for fewer than 2 values."""
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


def win_rate(policy, reference) -> dict:
    """Win rate of a policy over a reference from per-prompt scores, ties counting half.

    `policy` and `reference` are (n,) or (n, k) arrays: k samples per prompt from each. A prompt's outcome is the
    share of its k*k policy-vs-reference comparisons the policy wins, so k > 1 estimates the same quantity,
    P(score(policy) > score(reference)), with less sampling noise; the standard error is over prompts.
    Returns win_rate, win_rate_stderr, win_rate_ci95 (mean +- 1.96 se, clipped to [0, 1]) and the per-prompt outcomes."""
    p, r = np.asarray(policy, dtype=float), np.asarray(reference, dtype=float)
    if p.ndim == 1:
        p, r = p[:, None], r[:, None]
    diff = p[:, :, None] - r[:, None, :]  # (n, k, k): every policy sample against every reference sample
    outcome = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5)).mean(axis=(1, 2))  # (n,)
    m, se = mean_stderr(outcome)
    half = 1.96 * se if len(outcome) > 1 else 0.5
    return {"win_rate": m, "win_rate_stderr": se, "win_rate_ci95": [max(0.0, m - half), min(1.0, m + half)],
            "outcomes": outcome.tolist()}
