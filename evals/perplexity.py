"""Perplexity and bits-per-byte of documents, with rolling windows for documents longer than the context.

    align eval --model runs/tiny/base --tasks perplexity --perplexity_files runs/tiny/data/corpus/heldout.jsonl

Each document is encoded as plain text (special-token strings stay text) and scored in windows of at most L tokens
(the model's context length). The first window is preceded by the prefix token (<|endoftext|>, lm-eval's
`prefix_token_id`: bos, else eos) so the first token has something to condition on; each later window predicts
`stride` new tokens conditioned on the L - stride tokens before them. With stride = L (the default) this is
exactly lm-eval 0.4.13's `loglikelihood_rolling` (context_len=1): disjoint windows, every token predicted once.

Metrics (lm-eval names; words = whitespace-split pieces, bytes = UTF-8 bytes of the document):
    word_perplexity = exp(-sum ll / sum words)     byte_perplexity = exp(-sum ll / sum bytes)
    bits_per_byte   = -sum ll / sum bytes / ln 2   token_perplexity = exp(loss), loss = -sum ll / sum tokens
Bits per byte does not depend on the tokenizer, so it compares models with different vocabularies.
"""

from __future__ import annotations

import math
import re

import numpy as np

from alignment.data import fingerprint
from alignment.errors import UserError
from alignment.tokens import encode_text

from .scoring import ScoringModel, loglikelihoods

PPL_VERSION = "1.0"


def rolling_windows(tokens: list[int], prefix: int, max_len: int, stride: int | None = None):
    """Yield (context ids, continuation ids) windows that predict every token of `tokens` exactly once."""
    stride = stride or max_len
    if not 1 <= stride <= max_len:
        raise UserError(f"stride: expected 1..{max_len} (the context length), got {stride}")
    if not tokens:
        return
    first = min(max_len, len(tokens))
    # the first window predicts tokens[0:first] from [prefix] + tokens[0:first-1]; as a (context, continuation)
    # request that is context [prefix] and continuation tokens[0:first]
    yield [prefix], tokens[:first]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, stride)
        end = done + n
        # condition on up to max_len - n tokens before the n predicted ones (disjoint context/continuation)
        window = tokens[max(0, end - max_len - 1):end - 1]
        yield window[:len(window) - (n - 1)], tokens[end - n:end]
        done = end


def count_words(text: str) -> int:
    """Words as lm-eval counts them: pieces of a split on runs of whitespace."""
    return len(re.split(r"\s+", text))


def evaluate_perplexity(lm: ScoringModel, documents: list[str], name: str = "perplexity", stride: int | None = None,
                        batch_size: int = 16, progress: bool = True) -> tuple[dict, list[dict]]:
    """Score documents; returns (metrics dict, one sample record per document)."""
    if not documents:
        raise UserError(f"{name}: no documents to score (empty text file or column?)")
    tok = lm.tokenizer
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if prefix is None:
        raise UserError(f"{lm.path}: the tokenizer has neither bos nor eos token; expected one as the rolling prefix")
    requests, owner, n_tokens = [], [], []
    for d, text in enumerate(documents):
        ids = encode_text(tok, text)
        n_tokens.append(len(ids))
        for w in rolling_windows(ids, prefix, lm.max_length, stride):
            requests.append(w)
            owner.append(d)
    scores = loglikelihoods(lm, requests, batch_size=batch_size, desc=f"{name} windows", progress=progress)
    ll = np.zeros(len(documents))
    for d, (s, _, _) in zip(owner, scores):
        ll[d] += s
    words = np.array([count_words(t) for t in documents], dtype=float)
    nbytes = np.array([len(t.encode("utf-8")) for t in documents], dtype=float)
    toks = np.array(n_tokens, dtype=float)
    loss = -ll.sum() / toks.sum()
    metrics = {
        "task": name, "version": PPL_VERSION, "n": len(documents), "num_fewshot": 0, "scoring": "loglikelihood_rolling",
        "data_hash": fingerprint(documents),
        "stride": stride or lm.max_length, "max_length": lm.max_length, "tokenizer_hash": lm.tokenizer_hash,
        "tokens": int(toks.sum()), "words": int(words.sum()), "bytes": int(nbytes.sum()),
        "loss": float(loss), "token_perplexity": math.exp(loss),
        "word_perplexity": math.exp(-ll.sum() / words.sum()),
        "byte_perplexity": math.exp(-ll.sum() / nbytes.sum()),
        "bits_per_byte": float(-ll.sum() / nbytes.sum() / math.log(2)),
    }
    if len(documents) > 1:
        # spread of per-document bits/byte: a guide to noise between runs (lm-eval reports none for these)
        bpb_doc = -ll / nbytes / math.log(2)
        metrics["bits_per_byte_stderr"] = float(np.std(bpb_doc, ddof=1) / math.sqrt(len(documents)))
    samples = [{"task": name, "doc_id": d, "loglikelihood": float(ll[d]), "tokens": n_tokens[d], "words": int(words[d]),
                "bytes": int(nbytes[d])} for d in range(len(documents))]
    return metrics, samples
