"""Model loading and batched log-likelihood scoring shared by every eval.

The protocol follows lm-evaluation-harness 0.4.13's `HFLM` so our numbers equal its numbers:
- a request is (context ids, continuation ids); the model input is `(ctx + cont)[-(L+1):][:-1]`, i.e. the context
  is truncated from the left to fit the model's context length L;
- inputs are right-padded and run without an attention mask (causal attention never looks at the padding);
- log-probabilities are a float32 log-softmax over the vocabulary at the continuation positions.

Three things make it faster without changing a number (beyond float rounding):
- requests whose input sequence is identical (the four one-token letter answers " A".." D" after the same
  prompt) share one forward pass, so the shared context is computed once;
- inputs sharing a long prefix (the header and few-shot block of one subject) compute it once and reuse its
  key/value cache for every question;
- the output head and log-softmax run only at the positions that are scored, not at every position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alignment.compat import cache_layers, make_cache
from alignment.errors import UserError

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer says


@dataclass
class ScoringModel:
    """A causal LM ready to score: model, tokenizer, context length and identifying hashes."""

    model: torch.nn.Module
    tokenizer: object
    max_length: int
    path: str
    adapter: str | None
    model_hash: str
    tokenizer_hash: str


def resolve_max_length(config, tokenizer) -> int:
    """Context length as lm-eval resolves it: config fields, then tokenizer.model_max_length, then 2048."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(config, attr, None)
        if v:
            return int(v)
    mml = getattr(tokenizer, "model_max_length", None)
    if mml and mml < 10**12:  # transformers' "infinity" sentinel means unset
        return int(mml)
    return DEFAULT_MAX_LENGTH


def scoring_model(path: str, adapter: str | None = None, load_in_8bit: bool = False, load_in_4bit: bool = False,
                  device: str | None = None, max_length: int | None = None) -> ScoringModel:
    """Load a causal LM (local directory or hub name, optionally + LoRA adapter, 8-bit or 4-bit) for scoring, with the
    one loader (alignment.modeling.load_model): fp32 on CPU, an adapter merged into unquantized weights."""
    from alignment.modeling import load_model, load_tokenizer, local_model_dir, model_hash
    from alignment.tokens import tokenizer_hash

    if load_in_8bit and load_in_4bit:
        raise UserError("config: choose one of load_in_8bit and load_in_4bit")
    tokenizer = load_tokenizer(path)
    model = load_model(path, tokenizer=tokenizer, adapter=adapter, device=device, load_in_8bit=load_in_8bit,
                       load_in_4bit=load_in_4bit)
    return ScoringModel(model=model, tokenizer=tokenizer, max_length=max_length or resolve_max_length(model.config, tokenizer),
                        path=str(path), adapter=adapter, model_hash=model_hash(path),
                        tokenizer_hash=tokenizer_hash(local_model_dir(path)))


def _decoder_and_head(model):
    """The transformer body and output head, so the head runs only at scored positions (None: use full logits)."""
    try:
        body, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    if body is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        return None, None
    return body, head


def prefix_groups(inputs: list[tuple], keep: list[int] | None = None, min_prefix: int = 64) -> list[tuple[int, list[int]]]:
    """Group inputs that share a long token prefix (the header and few-shot block of one subject).

    Returns (prefix length, input indices) pairs; prefix length 0 = no sharing. The prefix leaves at least
    keep[i] (>= 1) trailing tokens of every member, the positions that are scored, in its own suffix."""
    keep = keep or [1] * len(inputs)
    buckets: dict[tuple, list[int]] = {}
    for i, inp in enumerate(inputs):
        buckets.setdefault(tuple(inp[:min_prefix]) if len(inp) > min_prefix else ("solo", i), []).append(i)
    groups, solo = [], []
    for members in buckets.values():
        if len(members) < 2:
            solo += members
            continue
        first = inputs[members[0]]
        lcp = min(len(inputs[i]) - max(1, keep[i]) for i in members)
        for i in members[1:]:
            other = inputs[i]
            k = min(min_prefix, lcp)  # the bucket key guarantees the first min_prefix tokens agree
            while k < lcp and other[k] == first[k]:
                k += 1
            lcp = k
        if lcp >= min_prefix:
            groups.append((lcp, members))
        else:
            solo += members
    if solo:
        groups.append((0, solo))
    return groups


@torch.no_grad()
def loglikelihoods(lm: ScoringModel, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                   desc: str = "scoring", progress: bool = True, share_prefix: bool = True) -> list[tuple[float, bool, list[float]]]:
    """Score each (context ids, continuation ids): (sum log p(cont | ctx), is greedy, per-token log-probs).

    Requests with the same model input share one forward pass, and inputs sharing a long prefix (few-shot
    prompts) compute it once and reuse its key/value cache; the result is independent of batch size and order
    up to float rounding."""
    L = lm.max_length
    inputs: dict[tuple, int] = {}  # unique model input -> index
    plan = []  # per request: (input index, continuation)
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("loglikelihood requests need a non-empty context and continuation")
        if len(cont) > L:
            raise UserError(f"a continuation of {len(cont)} tokens exceeds the model's context length {L}")
        inp = tuple((ctx + cont)[-(L + 1):][:-1])
        plan.append((inputs.setdefault(inp, len(inputs)), cont))
    unique = list(inputs)
    # how many trailing positions each input needs scored (the longest continuation that uses it)
    need = [0] * len(unique)
    for i, cont in plan:
        need[i] = max(need[i], len(cont))
    body, head = _decoder_and_head(lm.model)
    device = next(lm.model.parameters()).device
    logprobs: list[torch.Tensor | None] = [None] * len(unique)  # per input: (need, V) float32 on cpu
    groups = prefix_groups(unique, need) if share_prefix and body is not None else [(0, list(range(len(unique))))]
    bar = tqdm(total=len(unique), desc=desc, disable=not progress, leave=False)
    for plen, members in groups:
        kv = None
        if plen:  # the shared prefix once: its keys/values serve every member
            prefix = torch.tensor([unique[members[0]][:plen]], device=device)
            kv = cache_layers(body(input_ids=prefix, use_cache=True).past_key_values)
        order = sorted(members, key=lambda i: -len(unique[i]))  # longest first, as lm-eval: least padding
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            T = len(unique[chunk[0]]) - plen
            batch = torch.zeros(len(chunk), T, dtype=torch.long)  # right-padded with id 0, as lm-eval
            for r, i in enumerate(chunk):
                batch[r, :len(unique[i]) - plen] = torch.tensor(unique[i][plen:])
            batch = batch.to(device)
            if body is None:
                logits = lm.model(input_ids=batch).logits  # (B, T, V)
                lp = F.log_softmax(logits.float(), dim=-1).cpu()
                for r, i in enumerate(chunk):
                    n = len(unique[i])
                    logprobs[i] = lp[r, n - need[i]:n]
                bar.update(len(chunk))
                continue
            kwargs = {}
            if kv is not None:
                kwargs["past_key_values"] = make_cache([(k.expand(len(chunk), -1, -1, -1), v.expand(len(chunk), -1, -1, -1)) for k, v in kv])
            hidden = body(input_ids=batch, use_cache=kv is not None, **kwargs).last_hidden_state  # (B, T, H)
            rows, cols = [], []
            for r, i in enumerate(chunk):
                n = len(unique[i]) - plen
                rows += [r] * need[i]
                cols += list(range(n - need[i], n))
            picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # (P, H)
            lp = F.log_softmax(head(picked).float(), dim=-1).cpu()  # (P, V)
            offset = 0
            for i in chunk:
                logprobs[i] = lp[offset:offset + need[i]]
                offset += need[i]
            bar.update(len(chunk))
    bar.close()
    out = []
    for i, cont in plan:
        lp = logprobs[i][-len(cont):]  # (len(cont), V)
        tgt = torch.tensor(cont)
        tok = lp.gather(1, tgt[:, None])[:, 0]
        out.append((float(tok.sum()), bool((lp.argmax(-1) == tgt).all()), tok.tolist()))
    return out


def encode_pair(tokenizer, context: str, continuation: str, encode) -> tuple[list[int], list[int]]:
    """Split (context, continuation) into ids as lm-eval does: trailing context spaces move to the continuation,
    the whole string is encoded and the continuation is what follows the context's own encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]
