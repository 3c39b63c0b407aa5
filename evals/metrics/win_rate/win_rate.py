"""`evaluate` metric: win rate of a policy over a reference from reward-model scores, with a 95% interval.

    import evaluate
    m = evaluate.load("evals/metrics/win_rate")
    m.compute(predictions=[1.3, 0.2, 0.9], references=[0.8, 0.2, 1.5])

predictions: the reward of the policy's response to each prompt; references: the reward of the reference model's
response to the same prompt. A win counts 1, a tie 1/2, a loss 0; the interval is mean ± 1.96 standard errors.
"""

import math

import datasets
import evaluate

_DESCRIPTION = __doc__
_KWARGS = "predictions: list[float] policy rewards; references: list[float] reference rewards"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}))

    def _compute(self, predictions, references):
        o = [1.0 if p > r else 0.0 if p < r else 0.5 for p, r in zip(predictions, references)]
        n = len(o)
        m = sum(o) / n
        se = math.sqrt(sum((x - m) ** 2 for x in o) / (n - 1) / n) if n > 1 else float("nan")
        half = 1.96 * se if n > 1 else 0.5
        return {"win_rate": m, "win_rate_stderr": se, "win_rate_ci95": [max(0.0, m - half), min(1.0, m + half)]}
