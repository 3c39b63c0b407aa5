"""`evaluate` metric: multiple-choice accuracy from per-choice log-likelihoods (lm-eval's acc and acc_norm).

    import evaluate
    m = evaluate.load("evals/metrics/mc_accuracy")
    m.compute(predictions=[[-1.2, -0.3, -2.0, -4.1]], references=[1], choices=[["Paris", "Rome", "Oslo", "Bern"]])

predictions: for each question the log-likelihood of every choice; references: the gold index. acc takes the
argmax (first on ties); acc_norm divides by each choice's length in characters (pass `choices`). Also returns
acc_stderr (sample standard error of the mean) and acc_centered ((acc - 1/k) / (1 - 1/k): 0 = chance).
"""

import math

import datasets
import evaluate

_DESCRIPTION = __doc__
_KWARGS = "predictions: list[list[float]]; references: list[int]; choices: optional list[list[str]] for acc_norm"


def _argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def _mean_se(xs):
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan"))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MCAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, choices=None):
        hits = [float(_argmax(p) == g) for p, g in zip(predictions, references)]
        acc, se = _mean_se(hits)
        k = len(predictions[0])
        out = {"acc": acc, "acc_stderr": se, "acc_centered": (acc - 1 / k) / (1 - 1 / k)}
        if choices is not None:
            norm = [float(_argmax([x / len(c) for x, c in zip(p, cs)]) == g) for p, g, cs in zip(predictions, references, choices)]
            out["acc_norm"], out["acc_norm_stderr"] = _mean_se(norm)
        return out
