"""`evaluate` metric: bits per byte, byte/word/token perplexity from per-document log-likelihoods (lm-eval's math).

    import evaluate
    m = evaluate.load("evals/metrics/bits_per_byte")
    m.compute(predictions=[-120.5, -80.0], references=["first document ...", "second ..."], num_tokens=[40, 30])

predictions: the summed natural-log likelihood of each document (e.g. lm-eval's loglikelihood_rolling, or the
`loglikelihood` field of our FILE.samples.jsonl); references: the document texts (bytes and words are counted
from them: UTF-8 bytes, whitespace-split words, as lm-eval does).
"""

import math
import re

import datasets
import evaluate

_DESCRIPTION = __doc__
_KWARGS = "predictions: list[float] log-likelihoods; references: list[str] documents; num_tokens: optional list[int]"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class BitsPerByte(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("string")}))

    def _compute(self, predictions, references, num_tokens=None):
        ll = sum(predictions)
        nbytes = sum(len(t.encode("utf-8")) for t in references)
        words = sum(len(re.split(r"\s+", t)) for t in references)
        out = {"bits_per_byte": -ll / nbytes / math.log(2), "byte_perplexity": math.exp(-ll / nbytes),
               "word_perplexity": math.exp(-ll / words)}
        if num_tokens is not None:
            out["token_perplexity"] = math.exp(-ll / sum(num_tokens))
        return out
