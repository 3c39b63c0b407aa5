"""Sampling: the one wrapper over transformers' `generate` (KV cache always), used by PPO rollouts, on-policy pairs,
the win-rate and generative evals, and `align generate` / `align chat` / `align serve`.

- `SamplingParams`: greedy (temperature 0) or sampled (temperature, top-k, top-p, min-p), repetition penalty,
  max_new_tokens, num_return_sequences, seed; validated with one clear line per bad value.
- `stop_token_ids`: generation stops at end of text and end of turn (<|im_end|>), whatever the model's own config.
- `generate_batch`: one left-padded batch of prompt ids -> the new tokens (B, R), as `model.generate` returns them;
  with `row_seeds` each row samples from its own generator (`row_seed`), so a row's tokens do not depend on the
  batch it is in or on the process that draws it (PPO on several processes).
- `truncate_at_stop`: cut each response after its first stop token, with the response mask.
- `generate`: prompts (token id lists) -> `Completion`s (ids, text, finish reason), batched, seeded, with progress.

Every call builds its own GenerationConfig with every knob set, so a model directory's saved sampling defaults
(e.g. temperature 0.8 in generation_config.json) never leak into a run that asked for something else.
"""

from __future__ import annotations

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
    stop: list[str] = field(default_factory=list)

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
             seed_per_prompt: bool = False, progress: bool = False, desc: str = "generating",
             **generate_kwargs) -> list[list[Completion]]:
    """`params.num_return_sequences` completions per prompt (token id lists), in prompt order.

    Seeding: with `seed_per_prompt` each prompt is generated alone from seed * 1_000_003 + its index, so its samples
    do not depend on order or batching; otherwise each batch of `batch_size` prompts is seeded from seed and its first
    index (the same config gives the same samples). With `params.seed` None the torch RNG is used as it stands."""
    from tqdm.auto import tqdm

    params.check()
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, model)
    pad = pad_id(tokenizer)
    k = params.num_return_sequences
    step = 1 if seed_per_prompt else batch_size
    out: list[list[Completion]] = []
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(prompts), step):
        chunk = prompts[start: start + step]
        if params.seed is not None:
            torch.manual_seed(params.seed * 1_000_003 + start)
        ids, att = left_pad(chunk, pad, device)
        new = generate_batch(model, ids, att, params, stops, pad, **generate_kwargs)
        flat = _completions(tokenizer, new.cpu(), stops, pad, [len(p) for p in chunk for _ in range(k)])
        out += [flat[i * k:(i + 1) * k] for i in range(len(chunk))]
        bar.update(len(chunk))
    bar.close()
    return out
