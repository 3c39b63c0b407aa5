"""Talk to a model in the terminal: the reply streams as it is produced, and the conversation is kept.

    align chat --model runs/tiny/dpo/merged
    align chat --model runs/tiny/dpo/merged --system "Answer in one sentence." --temperature 0
    printf 'What is 2 plus 3?\\n/reset\\nWho is Alice?\\n' | align chat --model runs/tiny/dpo/merged --temperature 0

Each line you type is a user turn; commands: `/reset` forgets the conversation, `/system TEXT` sets the system prompt
(`/system` alone removes it), `/exit` (or end of input) ends. The conversation is rendered with the model's chat
template through alignment.tokens.encode_chat, so a typed "<|im_end|>" or "<|im_start|>" is plain text, never a
control token. When the conversation no longer fits the model's context with room for a reply of max_new_tokens, its
oldest turns are dropped, with a notice. Input may be piped (one turn per line): replies go to stdout, notices to
stderr. Sampling options and speculative decoding (`--draft_model`) are those of `align generate`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from alignment.config import parse_config
from alignment.errors import UserError, exit_on_user_error
from alignment.sampling import GenerationArguments

COMMANDS = "/reset, /system TEXT, /exit"


@dataclass
class ChatConfig(GenerationArguments):
    """`align chat`: the model, sampling options and a system prompt."""

    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens per reply."})


def fit_context(tokenizer, system: str | None, history: list[dict], user: str, room: int) -> tuple[list[int], int]:
    """The prompt ids of the conversation plus the new user turn, dropping the oldest turns (a user message and its
    reply) until it fits in `room` tokens; returns (ids, turns dropped). The newest turn is never dropped."""
    from alignment.tokens import encode_chat

    dropped = 0
    while True:
        messages = [{"role": "system", "content": system}] if system else []
        messages = messages + history + [{"role": "user", "content": user}]
        ids = encode_chat(tokenizer, messages, add_generation_prompt=True)["input_ids"]
        if len(ids) <= room or not history:
            return ids, dropped
        history[:] = history[2:]
        dropped += 1


def main(cfg: ChatConfig, stdin=None, stdout=None) -> list[dict]:
    """Run the conversation loop over `stdin` (default: the terminal or pipe); returns one record per turn
    ({"user", "reply", "prompt_ids", "reply_ids", "finish_reason", "dropped"})."""
    from alignment.sampling import (SpeculativeStats, TokenStream, check_generation_inputs, generate,
                                    load_generation_models, stop_token_ids)

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    params = cfg.sampling_params(where="chat")
    tok, context = check_generation_inputs(cfg)
    if not tok.chat_template:
        raise UserError(f"model: {cfg.model}: its tokenizer has no chat template; expected a chat model "
                        "(or use `align generate --raw true`)")
    if cfg.max_new_tokens >= context:
        raise UserError(f"max_new_tokens: {cfg.max_new_tokens} leaves no room for a prompt in the model context of "
                        f"{context} tokens")
    model, draft = load_generation_models(cfg, tok)
    stops = stop_token_ids(tok, model)
    interactive = stdin.isatty() if hasattr(stdin, "isatty") else False

    def note(text: str) -> None:
        print(f"[{text}]", file=sys.stderr, flush=True)

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    if interactive:
        with_draft = f" (draft {cfg.draft_model})" if draft is not None else ""
        note(f"chat with {cfg.model}{with_draft}; commands: {COMMANDS}")
    system, history, turns = cfg.system, [], []
    stats = SpeculativeStats()
    tokens, seconds = 0, 0.0
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                break
        else:
            line = stdin.readline()
            if not line:
                break
        line = line.rstrip("\r\n")
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = []
            note("conversation reset")
            continue
        if command == "/system" or command.startswith("/system "):
            system = command[len("/system"):].strip() or None
            note(f"system prompt: {system!r}" if system else "system prompt removed")
            continue
        if command == "/help":
            note(f"commands: {COMMANDS}")
            continue
        if not command:
            continue
        ids, dropped = fit_context(tok, system, history, line, context - cfg.max_new_tokens)
        if dropped:
            note(f"dropped the {dropped} oldest turn{'s' * (dropped > 1)} to fit the context of {context} tokens")
        if len(ids) + cfg.max_new_tokens > context:
            note(f"message too long: {len(ids)} tokens with max_new_tokens {cfg.max_new_tokens} exceed the context of "
                 f"{context}; not sent")
            continue
        if interactive:
            write("assistant> ")
        # each turn its own seed (seed + turn number): a scripted session replays exactly
        params.seed = cfg.seed + len(turns)
        t0 = time.perf_counter()
        (completion,), = generate(model, tok, [ids], params, draft_model=draft, num_draft_tokens=cfg.num_draft_tokens,
                                  draft_schedule=cfg.draft_schedule, stats=stats,
                                  streamer=TokenStream(tok, 1, stops, on_text=lambda _, delta: write(delta),
                                                         halt_when_finished=False))
        seconds += time.perf_counter() - t0
        tokens += len(completion.token_ids)
        write("\n")
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": completion.text}]
        turns.append({"user": line, "reply": completion.text, "prompt_ids": ids, "reply_ids": completion.token_ids,
                      "finish_reason": completion.finish_reason, "dropped": dropped})
    spec = f", draft acceptance {stats.acceptance_rate:.3f}" if draft is not None and stats.drafted else ""
    rate = tokens / max(seconds, 1e-9)
    print(f"chat: {len(turns)} turns, {tokens} tokens in {seconds:.1f}s ({rate:.1f} tokens/s{spec})",
          file=sys.stderr)
    return turns


@exit_on_user_error
def cli(argv=None) -> None:
    (cfg,) = parse_config([ChatConfig], argv)
    main(cfg)


if __name__ == "__main__":
    cli()
