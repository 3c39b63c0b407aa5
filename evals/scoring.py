"""Model loading and batched log-likelihood scoring shared by every eval.

The protocol follows lm-evaluation-harness 0.4.13's `HFLM` so our numbers equal its numbers:
- a request is (context ids, continuation ids); the model input is `(ctx + cont)[-(L+1):][:-1]`, i.e. the context
  is truncated from the left to fit the model's context length L;
- inputs are right-padded and run without an attention mask (causal attention never looks at the padding);
- log-probabilities are a float32 log-softmax over the vocabulary at the continuation positions.

Four things make it faster without changing a number (beyond float rounding):
- each distinct context runs once, and its last position scores the first token of every continuation (the four
  one-token letters " A".." D" after one prompt cost one forward pass);
- longer continuations of a shared context (the answer texts of one question) run on the context's key/value cache,
  so the question is not recomputed per choice;
- contexts sharing a long prefix (the description and few-shot block of one subject) compute it once and reuse its
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
    return ScoringModel(model=model, tokenizer=tokenizer,
                        max_length=max_length or resolve_max_length(model.config, tokenizer), path=str(path),
                        adapter=adapter, model_hash=model_hash(path),
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


def prefix_groups(inputs: list[tuple], keep: list[int] | None = None,
                  min_prefix: int = 64) -> list[tuple[int, list[int]]]:
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
                   desc: str = "scoring", progress: bool = True,
                   share_prefix: bool = True) -> list[tuple[float, bool, list[float]]]:
    """Score each (context ids, continuation ids): (sum log p(cont | ctx), is greedy, per-token log-probs).

    The model reads `(ctx + cont)[-(L+1):][:-1]` as in lm-eval. Each distinct context runs once: its last position
    scores every continuation's first token (the four letters after one prompt), and longer continuations of a
    shared context (the answer texts of one question) run on its key/value cache. Contexts sharing a long prefix
    (few-shot prompts) compute it once too. The result is independent of batch size and order up to float rounding;
    `share_prefix=False` runs every request as one plain forward pass (the reference the fast path is tested
    against)."""
    L = lm.max_length
    contexts: dict[tuple, int] = {}  # distinct context (as the model reads it) -> index
    plan = []  # per request: (context index, continuation)
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("loglikelihood requests need a non-empty context and continuation")
        if len(cont) > L:
            raise UserError(f"a continuation of {len(cont)} tokens exceeds the model's context length {L}")
        c = tuple(ctx[-(L + 1 - len(cont)):])  # what fits before the continuation: lm-eval's left truncation
        plan.append((contexts.setdefault(c, len(contexts)), tuple(cont)))
    conts: list[dict[tuple, None]] = [{} for _ in contexts]  # per context: its distinct continuations, in order
    for i, cont in plan:
        conts[i].setdefault(cont, None)
    body, head = _decoder_and_head(lm.model)
    if body is None or not share_prefix:
        scored = _plain_scores(lm, [(c, k) for c, ks in zip(contexts, conts) for k in ks], batch_size, desc, progress)
    else:
        scored = _shared_scores(lm, body, head, list(contexts), [list(k) for k in conts], batch_size, desc, progress)
    ctx_list = list(contexts)
    out = []
    for i, cont in plan:
        tok = scored[(ctx_list[i], cont)]
        out.append((float(sum(t for t, _ in tok)), all(g for _, g in tok), [t for t, _ in tok]))
    return out


def _pick(lp: torch.Tensor, targets: list[int]) -> list[tuple[float, bool]]:
    """(log p(target), target is the argmax) at each row of a (P, V) log-prob matrix."""
    tgt = torch.tensor(targets, device=lp.device)
    tok = lp.gather(1, tgt[:, None])[:, 0].tolist()
    greedy = (lp.argmax(-1) == tgt).tolist()
    return list(zip(tok, greedy))


def _plain_scores(lm: ScoringModel, items: list[tuple[tuple, tuple]], batch_size: int, desc: str,
                  progress: bool) -> dict:
    """Every (context, continuation) as its own input ctx + cont[:-1], right-padded, full logits (the reference)."""
    device = next(lm.model.parameters()).device
    out = {}
    order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + len(items[i][1])))
    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start:start + batch_size]]
        seqs = [list(c) + list(k[:-1]) for c, k in chunk]
        batch = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)  # right-padded with id 0, as lm-eval
        for r, s in enumerate(seqs):
            batch[r, :len(s)] = torch.tensor(s)
        lp = F.log_softmax(lm.model(input_ids=batch.to(device)).logits.float(), dim=-1)  # (B, T, V)
        for r, (c, k) in enumerate(chunk):
            out[(c, k)] = _pick(lp[r, len(c) - 1:len(c) - 1 + len(k)], list(k))
        bar.update(len(chunk))
    bar.close()
    return out


def _shared_scores(lm: ScoringModel, body, head, contexts: list[tuple], conts: list[list[tuple]], batch_size: int,
                   desc: str, progress: bool) -> dict:
    """Contexts once (a long shared prefix once per group), then the continuations that share a context on its cache.

    A context with a single continuation runs together with it (one pass, as before); a context with several runs
    alone, its last position scoring every first token, and the rest of each continuation runs on the context's
    key/value cache with an attention mask over the context's padding and its own positions."""
    device = next(lm.model.parameters()).device
    # phase-1 input per context: the context, plus its continuation when it is the only one
    inputs = [c + conts[i][0][:-1] if len(conts[i]) == 1 else c for i, c in enumerate(contexts)]
    need = [len(conts[i][0]) if len(conts[i]) == 1 else 1 for i in range(len(contexts))]  # scored trailing positions
    out: dict = {}
    bar = tqdm(total=len(contexts), desc=desc, disable=not progress, leave=False)
    for plen, members in prefix_groups(inputs, need):
        kv = None
        if plen:  # the shared prefix once: its keys/values serve every member
            prefix = torch.tensor([inputs[members[0]][:plen]], device=device)
            kv = cache_layers(body(input_ids=prefix, use_cache=True).past_key_values)
        order = sorted(members, key=lambda i: -len(inputs[i]))  # longest first, as lm-eval: least padding
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            T = len(inputs[chunk[0]]) - plen
            batch = torch.zeros(len(chunk), T, dtype=torch.long)  # right-padded: causal attention never sees it
            for r, i in enumerate(chunk):
                batch[r, :len(inputs[i]) - plen] = torch.tensor(inputs[i][plen:])
            multi = [i for i in chunk if len(conts[i]) > 1 and any(len(k) > 1 for k in conts[i])]
            kwargs = {"use_cache": kv is not None or bool(multi)}
            if kv is not None:
                b = len(chunk)
                kwargs["past_key_values"] = make_cache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
                                                        for k, v in kv])
            res = body(input_ids=batch.to(device), **kwargs)
            hidden = res.last_hidden_state  # (B, T, H)
            rows, cols = [], []
            for r, i in enumerate(chunk):
                n = len(inputs[i]) - plen
                rows += [r] * need[i]
                cols += list(range(n - need[i], n))
            picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # (P, H)
            lp = F.log_softmax(head(picked).float(), dim=-1)  # (P, V)
            offset = 0
            for i in chunk:
                rows_i = lp[offset:offset + need[i]]
                offset += need[i]
                if len(conts[i]) == 1:
                    out[(contexts[i], conts[i][0])] = _pick(rows_i, list(conts[i][0]))
                else:  # the last context position scores each continuation's first token
                    firsts = _pick(rows_i.expand(len(conts[i]), -1), [k[0] for k in conts[i]])
                    for k, f in zip(conts[i], firsts):
                        out[(contexts[i], k)] = [f]
            if multi:
                _continue_on_cache(body, head, cache_layers(res.past_key_values), chunk, multi, contexts, conts, plen,
                                   batch_size, device, out)
            bar.update(len(chunk))
    bar.close()
    return out


def _continue_on_cache(body, head, layers, chunk, multi, contexts, conts, plen, batch_size, device, out) -> None:
    """Score tokens 2.. of the continuations of the contexts in `multi` on the chunk's key/value cache
    (B, h, P+T, d)."""
    T = layers[0][0].shape[2] - plen  # padded context length of the chunk
    row_of = {i: r for r, i in enumerate(chunk)}
    items = sorted(((i, k) for i in multi for k in conts[i] if len(k) > 1), key=lambda x: -len(x[1]))
    for start in range(0, len(items), batch_size):
        part = items[start:start + batch_size]
        idx = torch.tensor([row_of[i] for i, _ in part], device=device)
        Tk = len(part[0][1]) - 1
        ids = torch.zeros(len(part), Tk, dtype=torch.long)
        mask = torch.zeros(len(part), plen + T + Tk, dtype=torch.long)  # 1 = attend: prefix, real context, own tokens
        pos = torch.zeros(len(part), Tk, dtype=torch.long)
        for r, (i, k) in enumerate(part):
            n_ctx = len(contexts[i]) - plen
            ids[r, :len(k) - 1] = torch.tensor(k[:-1])
            mask[r, :plen + n_ctx] = 1
            mask[r, plen + T:plen + T + len(k) - 1] = 1
            pos[r] = plen + n_ctx + torch.arange(Tk)  # each continuation right after its own context
        cache = make_cache([(k.index_select(0, idx), v.index_select(0, idx)) for k, v in layers])
        hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                      past_key_values=cache, use_cache=True).last_hidden_state  # (B, Tk, H)
        rows = [r for r, (_, k) in enumerate(part) for _ in range(len(k) - 1)]
        cols = [j for _, k in part for j in range(len(k) - 1)]
        picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # (P, H)
        lp = F.log_softmax(head(picked).float(), dim=-1)  # (P, V)
        offset = 0
        for i, k in part:
            out[(contexts[i], k)] = out[(contexts[i], k)] + _pick(lp[offset:offset + len(k) - 1], list(k[1:]))
            offset += len(k) - 1


def encode_pair(tokenizer, context: str, continuation: str, encode) -> tuple[list[int], list[int]]:
    """Split (context, continuation) into ids as lm-eval does: trailing context spaces move to the continuation,
    the whole string is encoded and the continuation is what follows the context's own encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]
