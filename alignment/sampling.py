"""Sampling: the one wrapper over transformers' `generate` (KV cache always), used by PPO rollouts, on-policy pairs,
the win-rate and generative evals, and `align generate` / `align chat` / `align serve`.

- `SamplingParams`: greedy (temperature 0) or sampled (temperature, top-k, top-p, min-p), repetition penalty,
  max_new_tokens, num_return_sequences, seed; validated with one clear line per bad value.
- `stop_token_ids`: generation stops at end of text and end of turn (<|im_end|>), whatever the model's own config.
- `generate_batch`: one left-padded batch of prompt ids -> the new tokens (B, R), as `model.generate` returns them;
  with `row_seeds` each row samples from its own generator (`row_seed`), so a row's tokens do not depend on the
  batch it is in or on the process that draws it (PPO on several processes).
- `truncate_at_stop`: cut each response after its first stop token, with the response mask.
- `generate`: prompts (token id lists) -> `Completion`s (ids, text, finish reason), batched, seeded, with progress;
  with `draft_model` it decodes speculatively (`speculative_decode`), one prompt at a time.
- `speculative_decode`: a small draft model proposes tokens, the target checks them all in one forward pass and keeps
  what it would have produced itself: greedy output is token for token the target's greedy output, and sampled output
  follows the target's distribution exactly (`accept_draft`, the accept/reject rule of speculative sampling).
  `SpeculativeStats` counts drafted and accepted tokens (the acceptance rate) and target forward passes.
- `TokenStream`: the streamer of `align chat` and `align serve`: the answers' text as tokens arrive, cut at stop
  tokens and stop strings, never splitting a UTF-8 character; it can end a generation early (`Halt`).

Why not transformers' assisted generation (`generate(assistant_model=...)`, which implements the same rule): it takes
one sequence at a time too, refuses num_return_sequences > 1, reports no acceptance counts, and calls the assistant's
full `generate` once per round, an overhead that on a CPU costs more than the draft's forward passes themselves
(docs/inference.md has the measurements).

Every call builds its own GenerationConfig with every knob set, so a model directory's saved sampling defaults
(e.g. temperature 0.8 in generation_config.json) never leak into a run that asked for something else.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch

from .errors import UserError

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass
class SamplingParams:
    """How to decode: temperature 0 is greedy; otherwise sample after top-k / top-p / min-p filtering."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    seed: int | None = 0

    def check(self, where: str = "sampling") -> "SamplingParams":
        """Raise UserError for a value out of range; returns self."""
        rules = [("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
                 ("temperature", self.temperature >= 0, "a number >= 0 (0 = greedy)"),
                 ("top_k", self.top_k >= 0, "an integer >= 0 (0 = off)"),
                 ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
                 ("min_p", 0 <= self.min_p < 1, "a number in [0, 1)"),
                 ("repetition_penalty", self.repetition_penalty > 0, "a number > 0 (1 = off)"),
                 ("num_return_sequences", self.num_return_sequences >= 1, "an integer >= 1")]
        for name, ok, expected in rules:
            if not ok:
                raise UserError(f"{where}: {name}: {getattr(self, name)}; expected {expected}")
        if self.num_return_sequences > 1 and self.temperature == 0:
            raise UserError(f"{where}: num_return_sequences: {self.num_return_sequences} with greedy decoding (temperature 0) "
                            "would repeat one answer; expected temperature > 0")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One generated response: its token ids (up to and including the stop token), text, and why it ended."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int

    @property
    def stopped(self) -> bool:
        return self.finish_reason == FINISH_STOP


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """End of text, end of turn (<|im_end|>) and the model's own stop ids: where generation ends."""
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids += eos if isinstance(eos, list) else [eos]
    unk = tokenizer.unk_token_id
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i != unk))


def pad_id(tokenizer) -> int:
    """The padding id (pad, else end of text)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(seqs: list[list[int]], pad: int, device=None, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (B, L) ids and attention mask (generation continues from the right edge); L is the
    longest list, or `width` when given (e.g. the longest of a batch split over processes)."""
    L = max([len(s) for s in seqs] + [width or 0])
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
        att[i, L - len(s):] = 1
    return (ids, att) if device is None else (ids.to(device), att.to(device))


def generation_config(params: SamplingParams, stop_ids: list[int], pad: int):
    """A transformers GenerationConfig with every decoding knob set explicitly."""
    from transformers import GenerationConfig

    sample = not params.greedy
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens, do_sample=sample,
        # greedy: the sampling knobs at transformers' own defaults, which it does not warn about
        temperature=params.temperature if sample else 1.0, top_k=params.top_k if sample else 50,
        top_p=params.top_p if sample else 1.0, min_p=(params.min_p or None) if sample else None,
        repetition_penalty=params.repetition_penalty, num_return_sequences=params.num_return_sequences,
        eos_token_id=list(stop_ids), pad_token_id=pad, use_cache=True)


def row_seed(*parts: int) -> int:
    """A seed for one row from integers such as (run seed, update, prompt index): distinct parts, distinct seeds."""
    out = 0
    for p in parts:
        out = (out * 1_000_003 + p) % 2**63
    return out


class RowSeededSampler:
    """A logits processor that samples row i of a batch from its own generator (seeded with seeds[i]): the row's tokens
    depend only on its seed and its logits, not on its batch neighbours. Run with greedy decoding, it applies the
    sampling knobs itself (temperature, top-k, top-p, min-p, with transformers' own warpers) and adds Gumbel noise,
    -log E with E ~ Exp(1), to the log-probabilities: the argmax is then a sample of the filtered distribution."""

    def __init__(self, seeds: list[int], params: SamplingParams, device):
        from transformers.generation import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                             TopPLogitsWarper)

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.warpers = LogitsProcessorList(
            ([TemperatureLogitsWarper(params.temperature)] if params.temperature != 1.0 else [])
            + ([TopKLogitsWarper(params.top_k)] if params.top_k else [])
            + ([TopPLogitsWarper(params.top_p)] if params.top_p < 1.0 else [])
            + ([MinPLogitsWarper(params.min_p)] if params.min_p else []))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = torch.log_softmax(self.warpers(input_ids, scores).float(), -1)  # (B, V), -inf where filtered out
        noise = torch.stack([torch.empty(scores.shape[1], device=scores.device).exponential_(generator=g) for g in self.generators])
        # an exact 0 (float32 rounding) would give +inf - inf = nan on a filtered token; tiny keeps -inf there
        return scores - noise.clamp_min(torch.finfo(noise.dtype).tiny).log()


@torch.no_grad()
def generate_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
                   stop_ids: list[int], pad: int, row_seeds: list[int] | None = None, **generate_kwargs) -> torch.Tensor:
    """New tokens for one left-padded batch: (B * num_return_sequences, R), padded after each sequence's stop token.

    Uses the torch RNG as it stands (callers seed it), or, with `row_seeds` (one per returned sequence), a generator
    per row (RowSeededSampler); `generate_kwargs` reach `model.generate` (e.g. a streamer)."""
    if row_seeds is not None and not params.greedy:
        from dataclasses import replace

        from transformers.generation import LogitsProcessorList

        k = params.num_return_sequences
        if len(row_seeds) != len(input_ids) * k:
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {len(input_ids)} x {k} sequences")
        sampler = RowSeededSampler(row_seeds, params, input_ids.device)
        input_ids, attention_mask = input_ids.repeat_interleave(k, 0), attention_mask.repeat_interleave(k, 0)
        greedy = replace(params, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, num_return_sequences=1)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config(greedy, stop_ids, pad),
                             logits_processor=LogitsProcessorList([sampler]), **generate_kwargs)
        return out[:, input_ids.shape[1]:]
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                         generation_config=generation_config(params, stop_ids, pad), **generate_kwargs)
    return out[:, input_ids.shape[1]:]


def truncate_at_stop(responses: torch.Tensor, stop_ids: list[int], pad: int):
    """Cut each response after its first stop token. Returns (responses, mask (B, R), ended (B,) bool)."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))  # (B, R)
    ended = is_stop.any(1)
    first = torch.where(ended, is_stop.int().argmax(1), torch.full_like(ended, responses.shape[1], dtype=torch.long))
    pos = torch.arange(responses.shape[1], device=responses.device)[None]  # (1, R)
    mask = (pos <= first[:, None]).long()  # the stop token itself is part of the response
    return responses.masked_fill(mask == 0, pad), mask, ended


def decode_response(tokenizer, ids: list[int], stop_ids: list[int]) -> str:
    """The text of a response: everything before its first stop token, special tokens included as text (a stray
    "<|im_start|>" is what the model said, and checkers and reward models should see it)."""
    end = next((j for j, t in enumerate(ids) if t in stop_ids), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=False)


def _completions(tokenizer, new_tokens: torch.Tensor, stop_ids: list[int], pad: int, prompt_tokens: list[int]) -> list[Completion]:
    responses, mask, ended = truncate_at_stop(new_tokens, stop_ids, pad)
    out = []
    for row, m, e, n in zip(responses.tolist(), mask.tolist(), ended.tolist(), prompt_tokens):
        ids = [t for t, keep in zip(row, m) if keep]
        out.append(Completion(ids, decode_response(tokenizer, ids, stop_ids), FINISH_STOP if e else FINISH_LENGTH, n))
    return out


def generate(model, tokenizer, prompts: list[list[int]], params: SamplingParams, batch_size: int = 16,
             seed_per_prompt: bool = False, progress: bool = False, desc: str = "generating", *, draft_model=None,
             num_draft_tokens: int = 4, draft_schedule: str = "constant", stats: "SpeculativeStats | None" = None,
             **generate_kwargs) -> list[list[Completion]]:
    """`params.num_return_sequences` completions per prompt (token id lists), in prompt order.

    Seeding: with `seed_per_prompt` each prompt is generated alone from seed * 1_000_003 + its index, so its samples
    do not depend on order or batching; otherwise each batch of `batch_size` prompts is seeded from seed and its first
    index (the same config gives the same samples). With `params.seed` None the torch RNG is used as it stands.

    With `draft_model` (same tokenizer) every prompt is decoded alone by `speculative_decode` and seeded as with
    `seed_per_prompt`; `stats` (a SpeculativeStats) accumulates its counts. Greedy output is the same as without a
    draft; sampled output has the same distribution (not the same samples: the random numbers are drawn differently)."""
    from tqdm.auto import tqdm

    params.check()
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, model)
    pad = pad_id(tokenizer)
    k = params.num_return_sequences
    step = 1 if seed_per_prompt or draft_model is not None else batch_size
    if draft_model is not None and set(generate_kwargs) - {"streamer"}:
        raise ValueError(f"speculative decoding takes no generate kwargs but a streamer, got {sorted(generate_kwargs)}")
    out: list[list[Completion]] = []
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(prompts), step):
        chunk = prompts[start: start + step]
        if params.seed is not None:
            torch.manual_seed(params.seed * 1_000_003 + start)
        if draft_model is not None:
            rows = [speculative_decode(model, draft_model, chunk[0], params, stops, num_draft_tokens, draft_schedule,
                                       stats=stats, **generate_kwargs) for _ in range(k)]
            new = torch.full((k, max(map(len, rows))), pad, dtype=torch.long)
            for i, r in enumerate(rows):
                new[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        else:
            ids, att = left_pad(chunk, pad, device)
            new = generate_batch(model, ids, att, params, stops, pad, **generate_kwargs)
        flat = _completions(tokenizer, new.cpu(), stops, pad, [len(p) for p in chunk for _ in range(k)])
        out += [flat[i * k:(i + 1) * k] for i in range(len(chunk))]
        bar.update(len(chunk))
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------- speculative decoding

DRAFT_SCHEDULES = ("constant", "adaptive")
MAX_DRAFT_TOKENS = 16  # the adaptive schedule's ceiling: past this, one rejection wastes more than a run of hits saves


@dataclass
class SpeculativeStats:
    """Counts over speculative runs: draft tokens proposed and accepted, target verification passes, tokens produced."""

    drafted: int = 0
    accepted: int = 0
    target_passes: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted draft tokens (0 when none were drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens produced per target forward pass (1 for plain decoding)."""
        return self.tokens / self.target_passes if self.target_passes else 0.0


def logits_processors(params: SamplingParams) -> list:
    """The logits processors `model.generate` applies for `params`, in its order: repetition penalty, then (sampling
    only) temperature, top-k, top-p, min-p. Speculative decoding applies the same ones to the target and the draft,
    each called as `proc(ids (1, L), scores (1, V))` (a plain list: transformers' LogitsProcessorList inspects every
    processor's signature on every call, ~1 ms a token on a CPU)."""
    from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    procs = []
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if not params.greedy:
        if params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            procs.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            procs.append(TopPLogitsWarper(params.top_p))
        if params.min_p:
            procs.append(MinPLogitsWarper(params.min_p))
    return procs


def accept_draft(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor) -> tuple[int, int]:
    """The accept/reject rule of speculative sampling (Leviathan et al. 2023, Chen et al. 2023).

    p (k+1, V): the target's distributions at the k drafted positions and one past them; q (k, V): the draft's
    distributions the k `drafted` tokens were sampled from. Draft token i is kept with probability
    min(1, p_i(x)/q_i(x)); at the first rejection the next token is sampled from max(p_i - q_i, 0), normalized, and
    when all k are kept, from p_k. Whatever q is, the tokens produced follow p exactly. Returns (number of drafted
    tokens kept, next token)."""
    k = drafted.numel()
    pos = torch.arange(k)
    px, qx = p[pos, drafted], q[pos, drafted]  # (k,)
    keep = torch.rand(k, device=p.device) * qx <= px  # u <= p/q without dividing by a q that may underflow
    n = int(keep.long().cumprod(0).sum())
    if n == k:
        return n, int(torch.multinomial(p[k], 1))
    residual = (p[n] - q[n]).clamp(min=0)  # (V,)
    total = residual.sum()
    # total is 0 only when p[n] == q[n] up to rounding, where a rejection had probability ~0: p itself is then exact
    return n, int(torch.multinomial(residual / total if total > 0 else p[n], 1))


def crop_cache(cache, n_remove: int) -> None:
    """Drop the last `n_remove` positions of a KV cache in place (`crop` takes a negative count; 0 is a no-op here,
    where transformers 4 would read crop(0) as "keep 0 positions")."""
    if n_remove > 0:
        cache.crop(-n_remove)


def process(procs: list, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Apply logits processors in order: ids (1, L) the context, scores (1, V)."""
    for proc in procs:
        scores = proc(ids, scores)
    return scores


def _forward(model, ids: torch.Tensor, cache, last_only: bool = False):
    """One cached forward pass: (logits (1, T or 1, V) as float32, the cache)."""
    import inspect

    # a prefill needs no logits at all; models that can skip the vocabulary projection say so in their signature
    skip = last_only and "logits_to_keep" in inspect.signature(model.forward).parameters
    kwargs = {"logits_to_keep": 1} if skip else {}
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)
    return out.logits.float(), out.past_key_values


@torch.no_grad()
def speculative_decode(model, draft, prompt: list[int], params: SamplingParams, stop_ids: list[int],
                       num_draft_tokens: int = 4, schedule: str = "constant", streamer=None,
                       stats: SpeculativeStats | None = None, accept=accept_draft) -> list[int]:
    """The new tokens (up to and including a stop token, at most max_new_tokens) of one prompt, decoded speculatively.

    Each round the draft proposes up to k tokens one by one (k = num_draft_tokens; `schedule` "adaptive" grows k by 2
    after a round with every draft kept and shrinks it by 1 otherwise, as transformers' heuristic does), then the
    target scores all of them in one forward pass. Greedy: the drafts the target's argmax agrees with are kept, plus
    the target's own next token. Sampling: `accept` (the speculative sampling rule). Both models run with their own
    KV cache, rolled back past rejected drafts. The torch RNG is used as it stands (callers seed it); `streamer` gets
    the prompt, then the new tokens as they are accepted (transformers' streamer protocol)."""
    if schedule not in DRAFT_SCHEDULES:
        raise ValueError(f"schedule must be one of {DRAFT_SCHEDULES}, got {schedule!r}")
    device = next(model.parameters()).device
    procs = logits_processors(params)
    stops = torch.tensor(stop_ids, dtype=torch.long)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, L): prompt and accepted tokens
    if streamer is not None:
        streamer.put(ids.cpu())
    # Both caches hold every accepted token but the last, which the next round feeds (its logits are needed).
    t_cache = d_cache = None
    t_len = d_len = 0
    if ids.shape[1] > 1:
        _, t_cache = _forward(model, ids[:, :-1], None, last_only=True)
        _, d_cache = _forward(draft, ids[:, :-1], None, last_only=True)
        t_len = d_len = ids.shape[1] - 1
    k = max(0, num_draft_tokens)
    new: list[int] = []
    while len(new) < params.max_new_tokens:
        L = ids.shape[1]
        # 1. draft: at most what is left minus the token the target adds itself
        budget = min(k, params.max_new_tokens - len(new) - 1)
        drafted, q_rows = [], []
        seq = ids
        for _ in range(budget):
            logits, d_cache = _forward(draft, seq[:, d_len:], d_cache)
            d_len = seq.shape[1]
            scores = process(procs, seq, logits[:, -1])  # (1, V)
            if params.greedy:
                tok = scores.argmax(-1)
            else:
                q_rows.append(torch.softmax(scores, -1)[0])
                tok = torch.multinomial(q_rows[-1], 1)
            drafted.append(int(tok))
            seq = torch.cat([seq, tok.view(1, 1)], 1)
            if drafted[-1] in stop_ids:  # the target would end there too, or reject it
                break
        # 2. verify: the target scores the pending token and every draft in one pass
        logits, t_cache = _forward(model, seq[:, t_len:], t_cache)
        logits = logits[0, -(len(drafted) + 1):]  # (n_draft + 1, V)
        scores = torch.stack([process(procs, seq[:, :L + i], logits[i:i + 1])[0]
                              for i in range(len(drafted) + 1)])  # (n_draft + 1, V)
        d = torch.tensor(drafted, dtype=torch.long, device=device)
        if params.greedy:
            best = scores.argmax(-1)  # (n_draft + 1,)
            n = int((best[:len(drafted)] == d).long().cumprod(0).sum())
            nxt = int(best[n])
        elif drafted:
            n, nxt = accept(torch.softmax(scores, -1), torch.stack(q_rows), d)
        else:
            n, nxt = 0, int(torch.multinomial(torch.softmax(scores[0], -1), 1))
        kept = drafted[:n] + [nxt]
        # 3. roll back both caches to the accepted tokens (the target's holds ids + drafts, the draft's all but one)
        crop_cache(t_cache, len(drafted) - n)
        t_len = L + n
        if d_len > L + n:
            crop_cache(d_cache, d_len - (L + n))
            d_len = L + n
        hit = torch.isin(torch.tensor(kept), stops).nonzero()
        if len(hit):
            kept = kept[: int(hit[0]) + 1]
        ids = torch.cat([ids, torch.tensor([kept], dtype=torch.long, device=device)], 1)
        new += kept
        if stats is not None:
            stats.drafted += len(drafted)
            stats.accepted += n
            stats.target_passes += 1
            stats.tokens += len(kept)
        if streamer is not None:
            streamer.put(torch.tensor(kept))
        if len(hit):
            break
        if schedule == "adaptive" and budget == k:
            k = min(k + 2, MAX_DRAFT_TOKENS) if n == len(drafted) == k else max(1, k - 1)
    if streamer is not None:
        streamer.end()
    return new


# ------------------------------------------------------------------------------------ command-line models and streams


@dataclass
class GenerationArguments:
    """The model, draft and sampling options shared by `align generate` and `align chat`."""

    model: str = field(default="", metadata={"help": "A Hugging Face causal LM directory (a stage's merged/, an "
                                                     "exported base) or hub name."})
    adapter: str | None = field(default=None, metadata={"help": "A LoRA adapter directory applied to `model` (its own "
                                                                "base model)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the model in 8-bit (bitsandbytes)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the model in 4-bit NF4 (bitsandbytes)."})
    dtype: str = field(default="auto", metadata={"help": "auto (float32 on CPU), float32, bfloat16 or float16."})
    system: str | None = field(default=None, metadata={"help": "A system prompt put before the conversation (chat "
                                                               "template only)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens generated per answer."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 = greedy decoding."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens only (0 = off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: the smallest set of tokens with this much "
                                                        "probability, in (0, 1]."})
    min_p: float = field(default=0.0, metadata={"help": "Drop tokens less likely than min_p times the most likely one "
                                                        "(0 = off)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Divide the scores of tokens already present by "
                                                                     "this (1 = off)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed: the same seed gives the same samples on the same "
                                                   "machine."})
    draft_model: str | None = field(default=None, metadata={"help": "A small model with the same tokenizer for "
                                                                    "speculative decoding (e.g. "
                                                                    "from `align distill`)."})
    num_draft_tokens: int = field(default=4, metadata={"help": "Tokens the draft proposes per target pass (the start "
                                                               "value when adaptive)."})
    draft_schedule: str = field(default="constant", metadata={
        "help": f"Draft length: {' or '.join(DRAFT_SCHEDULES)} (+2 after a round fully accepted, -1 otherwise)."})
    cpu_threads: int = field(default=0, metadata={"help": "torch threads on CPU (0 = torch's default)."})

    def sampling_params(self, num_return_sequences: int = 1, where: str = "sampling") -> SamplingParams:
        """The SamplingParams these options describe (checked)."""
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              num_return_sequences=num_return_sequences, seed=self.seed).check(where)


def check_generation_inputs(args: GenerationArguments):
    """Validate the model, adapter and draft before anything is loaded; returns (tokenizer, context length).

    A draft must share the target's tokenizer and vocabulary (its token ids are checked by the target's logits) and
    reach at least the target's context."""
    from .modeling import check_model_dir, context_length, load_config, load_tokenizer, same_tokenizer

    if not args.model:
        raise UserError("model: missing; expected a Hugging Face model directory (e.g. runs/tiny/dpo/merged)")
    check_model_dir(args.model, "model")
    config = load_config(args.model, "model")
    if args.adapter and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise UserError(f"adapter: {args.adapter}: no adapter_config.json; expected a PEFT LoRA adapter directory")
    if args.draft_schedule not in DRAFT_SCHEDULES:
        raise UserError(f"draft_schedule: {args.draft_schedule!r}; expected one of {', '.join(DRAFT_SCHEDULES)}")
    tok = load_tokenizer(args.model)
    context = context_length(config)
    if args.draft_model:
        check_model_dir(args.draft_model, "draft_model")
        dconfig = load_config(args.draft_model, "draft_model")
        if not same_tokenizer(tok, load_tokenizer(args.draft_model)):
            raise UserError(f"draft_model: {args.draft_model}: its tokenizer differs from the model's ({args.model}); "
                            "expected the same tokenizer (train one with `align distill`)")
        tv, dv = config.get_text_config().vocab_size, dconfig.get_text_config().vocab_size
        if tv != dv:
            raise UserError(f"draft_model: {args.draft_model}: vocab_size {dv} differs from the model's {tv}; "
                            "expected the same vocabulary")
        context = min(context, context_length(dconfig))
    return tok, context


def load_generation_models(args: GenerationArguments, tokenizer):
    """(model, draft or None), frozen for inference: the model with its adapter merged, 8-bit or 4-bit as asked."""
    from .modeling import load_model

    if args.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(args.cpu_threads)
    model = load_model(args.model, tokenizer=tokenizer, adapter=args.adapter, load_in_8bit=args.load_in_8bit,
                       load_in_4bit=args.load_in_4bit, dtype=args.dtype)
    draft = load_model(args.draft_model, tokenizer=tokenizer, dtype=args.dtype) if args.draft_model else None
    return model, draft


class Halt(Exception):
    """Raised by the streamer inside `generate` to end it early: every answer is finished, or the client went away."""


@dataclass
class Answer:
    """One finished answer: its text (stop string excluded), why it ended, and how many tokens were generated."""

    index: int
    text: str
    finish_reason: str
    tokens: int


def cut_at_stop_strings(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first occurrence of any stop string, and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` must wait before they are streamed: an incomplete UTF-8 character (the
    decoder shows it as U+FFFD until its last byte arrives) or what may be the start of a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


class TokenStream:
    """A transformers streamer (`put(ids)`, `end()`) over the `n` answers to one prompt.

    It keeps each answer's token ids up to its first stop token, decodes them as the sampler does
    (`alignment.sampling.decode_response`), ends an answer at the first stop string, and calls `on_text(index, delta)`
    with the text that can no longer change. `put` raises `Halt` once every answer is finished or `cancelled` is set,
    which ends the generation there (unless `halt_when_finished` is false: `align chat` lets `generate` end itself and
    keeps its Completion). The first `put` is the prompt (transformers' protocol) and is skipped; after it,
    a put holds one token per answer (n > 1) or any number of tokens of the only answer (n == 1)."""

    def __init__(
        self,
        tokenizer,
        n: int,
        stop_ids: list[int],
        stop_strings=(),
        on_text=None,
        cancelled: threading.Event | None = None,
        halt_when_finished: bool = True,
    ):
        self.tokenizer, self.n = tokenizer, n
        self.stop_ids = list(stop_ids)
        self.stops = [s for s in stop_strings if s]
        self.on_text = on_text
        self.cancelled = cancelled or threading.Event()
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.texts = [""] * n
        self.finish: list[str | None] = [None] * n
        self.sent = [0] * n
        self._prompt_seen = False
        self.halt_when_finished = halt_when_finished

    def put(self, value) -> None:
        """Take the next token(s); raise Halt when there is nothing left to generate."""
        if self.cancelled.is_set():
            raise Halt("cancelled")
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        flat = value.reshape(-1).tolist()
        for i, t in [(0, t) for t in flat] if self.n == 1 else enumerate(flat):
            self._add(i, int(t))
        if self.halt_when_finished and all(f is not None for f in self.finish):
            raise Halt("finished")

    def end(self) -> None:
        """transformers calls this when generation ends: flush what was held back (`close` does it too, after a Halt)."""
        for i in range(self.n):
            self._emit(i, final=True)

    def _add(self, i: int, token: int) -> None:
        if self.finish[i] is not None:  # padding after a finished answer, or tokens past its stop string
            return
        if token in self.stop_ids:
            self.ids[i].append(token)
            self.finish[i] = FINISH_STOP
            self._emit(i, final=True)
            return
        self.ids[i].append(token)
        text = decode_response(self.tokenizer, self.ids[i], self.stop_ids)
        text, hit = cut_at_stop_strings(text, self.stops)
        self.texts[i] = text
        if hit:
            self.finish[i] = FINISH_STOP
        self._emit(i, final=hit)

    def _emit(self, i: int, final: bool) -> None:
        text = self.texts[i]
        upto = len(text) if final else len(text) - held_back(text, self.stops)
        if upto > self.sent[i]:
            delta, self.sent[i] = text[self.sent[i] : upto], upto
            if self.on_text is not None:
                self.on_text(i, delta)

    def close(self) -> list[Answer]:
        """Finish every answer (one still open ran out of max_tokens) and flush what was held back."""
        for i in range(self.n):
            if self.finish[i] is None:
                self.finish[i] = FINISH_LENGTH
            self._emit(i, final=True)
        return [Answer(i, self.texts[i], self.finish[i], len(self.ids[i])) for i in range(self.n)]
