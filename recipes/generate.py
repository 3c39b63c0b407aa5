"""Generate answers from any causal LM: prompts in, completions out (JSONL), batched, optionally speculative.

    align generate --model runs/tiny/dpo/merged --prompt "What is 2 plus 3?" --prompt "Who is Alice's best friend?"
    align generate --model runs/tiny/sft/merged --prompts_file runs/tiny/data/rl/prompts.jsonl \\
        --output runs/tiny/answers.jsonl
    align generate --model runs/tiny/base --raw true --prompt "Alice" --temperature 0 --draft_model runs/tiny/distill

Prompts come from `--prompt TEXT` (repeatable) and/or `--prompts_file`: a .txt file (one prompt per line) or rows
alignment.data reads (JSONL / JSON / parquet / CSV with "prompt" as a string or messages, "messages" conversations up
to their last user turn, hh-rlhf dialogues). When the tokenizer has a chat template, a text prompt becomes a user turn
(after `--system`, if given) rendered with the template, special-token safe; `--raw true` continues the text as is.
Prompts are generated in left-padded batches with the KV cache; with `--draft_model` (speculative decoding) one at a
time. `--output FILE.jsonl` gets one row per completion, {"index", "sample", "prompt", "completion", "tokens",
"prompt_tokens", "finish_reason"}, written atomically; without it the completions are printed. The last line is a
summary: tokens, tokens/s and, with a draft, the acceptance rate.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from alignment.config import parse_config
from alignment.errors import UserError, exit_on_user_error
from alignment.sampling import GenerationArguments


@dataclass
class GenerateConfig(GenerationArguments):
    """`align generate`: prompts, model and sampling options, output file."""

    prompt: list[str] = field(default_factory=list, metadata={"help": "A prompt (repeat --prompt for more)."})
    prompts_file: str | None = field(default=None, metadata={"help": "Prompts: .txt (one per line) or rows with "
                                                                     "'prompt' / 'messages'."})
    output: str | None = field(default=None, metadata={"help": "Write the completions here (.jsonl); none = print "
                                                               "them."})
    raw: bool = field(default=False, metadata={"help": "Continue the prompt text as is, without the chat template."})
    num_return_sequences: int = field(default=1, metadata={"help": "Completions per prompt (needs temperature > 0)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call (without a draft)."})
    max_prompts: int = field(default=0, metadata={"help": "Use at most this many prompts of the file (0 = all).",
                                                  "range": (0, None, True, True, ())})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output file."})


def read_prompts(cfg: GenerateConfig) -> list[tuple[str, object]]:
    """(place, prompt) pairs: the --prompt texts, then the file's rows (a prompt is a string or a message list)."""
    from alignment.data import read_prompt_rows

    prompts: list[tuple[str, object]] = []
    for i, text in enumerate(cfg.prompt, 1):
        if not text.strip():
            raise UserError(f"--prompt {i}: empty; expected text")
        prompts.append((f"--prompt {i}", text))
    if cfg.prompts_file:
        prompts += [(r.where, r.data["prompt"]) for r in read_prompt_rows(cfg.prompts_file, cfg.max_prompts or None)]
    if not prompts:
        raise UserError("prompt: none given; expected --prompt TEXT or --prompts_file FILE")
    return prompts


def encode(tokenizer, prompt, system: str | None, raw: bool, where: str) -> list[int]:
    """A prompt's token ids: raw text as is, else through the chat template with the generation prompt (when the
    tokenizer has one); data text never becomes a control token."""
    from alignment.tokens import encode_chat, encode_text

    if raw or not tokenizer.chat_template:
        if not isinstance(prompt, str):
            raise UserError(f"{where}: a message list needs the chat template; expected a text prompt "
                            f"({'--raw true' if raw else 'the tokenizer has no chat template'})")
        return encode_text(tokenizer, prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return encode_chat(tokenizer, messages, add_generation_prompt=True)["input_ids"]


def main(cfg: GenerateConfig) -> list[dict]:
    """Validate, load, generate, write; returns the output rows."""
    import torch

    from alignment.io import atomic_write_text, check_writable_file
    from alignment.sampling import SpeculativeStats, check_generation_inputs, generate, load_generation_models

    # -- validate every input before loading a model or writing anything
    params = cfg.sampling_params(cfg.num_return_sequences)
    if cfg.output:
        out_path = check_writable_file(cfg.output, ".jsonl")
        if out_path.exists() and not cfg.overwrite:
            raise UserError(f"output: {out_path} exists; pass --overwrite true to replace it")
    tok, context = check_generation_inputs(cfg)
    prompts = read_prompts(cfg)
    ids = []
    for where, prompt in prompts:
        p = encode(tok, prompt, cfg.system, cfg.raw, where)
        if len(p) + cfg.max_new_tokens > context:
            raise UserError(f"{where}: prompt is {len(p)} tokens; with max_new_tokens {cfg.max_new_tokens} that "
                            f"exceeds the model context of {context} tokens")
        ids.append(p)

    model, draft = load_generation_models(cfg, tok)
    stats = SpeculativeStats()
    t0 = time.perf_counter()
    completions = generate(model, tok, ids, params, batch_size=cfg.batch_size, progress=cfg.progress, draft_model=draft,
                           num_draft_tokens=cfg.num_draft_tokens, draft_schedule=cfg.draft_schedule, stats=stats)
    seconds = time.perf_counter() - t0

    rows = [{"index": i, "sample": j, "prompt": prompt, "completion": c.text, "tokens": len(c.token_ids),
             "prompt_tokens": c.prompt_tokens, "finish_reason": c.finish_reason}
            for i, ((_, prompt), group) in enumerate(zip(prompts, completions)) for j, c in enumerate(group)]
    if cfg.output:
        atomic_write_text(cfg.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif len(rows) == 1:
        print(rows[0]["completion"])
    else:
        for r in rows:
            shown = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
            label = f"{r['index']}.{r['sample']}" if cfg.num_return_sequences > 1 else f"{r['index']}"
            print(f"### {label} {shown}\n{r['completion']}\n")
    tokens = sum(r["tokens"] for r in rows)
    spec = (f"; draft {cfg.draft_model}: acceptance {stats.acceptance_rate:.3f} ({stats.accepted}/{stats.drafted}), "
            f"{stats.tokens_per_pass:.2f} tokens per target pass") if draft is not None else ""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"generate: {len(prompts)} prompts x {cfg.num_return_sequences} -> {tokens} tokens in {seconds:.1f}s "
          f"({tokens / max(seconds, 1e-9):.1f} tokens/s, {device}){spec}"
          + (f"; -> {cfg.output}" if cfg.output else ""), file=sys.stderr)
    return rows


def merge_repeated(argv: list[str], flag: str = "--prompt") -> list[str]:
    """`--prompt a --prompt b` -> `--prompt a b` (the parser keeps only the last of a repeated list flag)."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
        elif argv[i].startswith(flag + "="):
            values.append(argv[i][len(flag) + 1:])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + ([flag, *values] if values else [])


@exit_on_user_error
def cli(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    (cfg,) = parse_config([GenerateConfig], merge_repeated(argv))
    main(cfg)


if __name__ == "__main__":
    cli()
