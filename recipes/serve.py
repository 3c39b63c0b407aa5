"""Serve models over an OpenAI-compatible HTTP API, with a chat page and a blind arena that turns votes into DPO data.

    align serve --model runs/tiny/dpo/merged
    align serve --model runs/tiny/dpo/merged --model2 runs/tiny/sft/merged      # chat + arena at http://127.0.0.1:8000/
    align serve --config recipes/tiny/serve.yaml --port 8080

The page at / chats with either model (streamed tokens, system prompt, sampling controls, stop, copy) and, with two
models, runs the arena: one prompt to both, answers shown as A and B in a random order, and the person's vote
appended to `votes_dir`/preferences.jsonl as a TRL preference row that `align reward` and `align dpo` read
(`--train_data runs/arena/preferences.jsonl`), plus `votes.jsonl`, the log of every vote with the model identities.
Any OpenAI client works against http://127.0.0.1:8000/v1 (docs/serve.md: endpoints, limits, data format).

The server binds 127.0.0.1 (this machine only) unless `host` says otherwise; it has no authentication. It admits at
most `max_pending` requests at once (running or waiting; more get 503) and generates `max_parallel` at a time. Every
input is checked, and the port bound, before a model is loaded. Needs the `serve` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from alignment.config import parse_config
from alignment.errors import UserError, exit_on_user_error


@dataclass
class ServeConfig:
    """What to serve, where, and within which limits."""

    model: str = field(
        default="", metadata={"help": "The model to serve (a Hugging Face directory, e.g. runs/tiny/dpo/merged)."}
    )
    model2: str | None = field(
        default=None,
        metadata={"help": "A second model with the same tokenizer: both are served, and the arena compares them."},
    )
    adapter: str | None = field(default=None, metadata={"help": "A LoRA adapter directory applied to `model`."})
    adapter2: str | None = field(default=None, metadata={"help": "A LoRA adapter directory applied to `model2`."})
    draft_model: str | None = field(
        default=None, metadata={"help": "A small model with the same tokenizer for speculative decoding."}
    )
    host: str = field(
        default="127.0.0.1",
        metadata={
            "help": "The IP address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 is every "
            "interface (no authentication: anyone who reaches it can use it)."
        },
    )
    port: int = field(
        default=8000,
        metadata={"help": "The TCP port (0: any free port, printed at start).", "range": (0, 65535, True, True, ())},
    )
    votes_dir: str = field(
        default="runs/arena",
        metadata={"help": "Where arena votes go (preferences.jsonl, votes.jsonl); created at the first vote."},
    )
    max_pending: int = field(
        default=16,
        metadata={
            "help": "Requests admitted at once, running or waiting; one more is refused with 503.",
            "range": (1, None, True, True, ()),
        },
    )
    max_parallel: int = field(
        default=1,
        metadata={
            "help": "Generations run at the same time (sampled ones take turns on the RNG).",
            "range": (1, 64, True, True, ()),
        },
    )
    max_tokens: int = field(
        default=512,
        metadata={
            "help": "The most tokens one answer may ask for (max_tokens above it is a 400).",
            "range": (1, None, True, True, ()),
        },
    )
    max_n: int = field(
        default=4, metadata={"help": "The most answers one request may ask for (n).", "range": (1, 64, True, True, ())}
    )
    max_request_bytes: int = field(
        default=1_000_000,
        metadata={"help": "The largest request body accepted (413 above it).", "range": (1024, None, True, True, ())},
    )
    dtype: str = field(
        default="auto", metadata={"help": "Weights dtype: auto (float32 without CUDA), float32, bfloat16, float16."}
    )
    cpu_threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    access_log: bool = field(default=False, metadata={"help": "Print one line per HTTP request."})


class Prepared(NamedTuple):
    """A server ready to run: the app, its bound socket, the engine, and its address."""

    app: object
    sock: socket.socket
    engine: object
    url: str


def check_host(host: str) -> str:
    """An IP address to listen on ('localhost' means 127.0.0.1); anything else is one clear line."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise UserError(
            f"host: {host!r} is not an IP address; expected e.g. 127.0.0.1 (this machine only, the default) "
            "or 0.0.0.0 (every interface)"
        ) from None


def check_votes_dir(path: str) -> Path:
    """votes_dir must be a directory that can be created or written (checked at start, written at the first vote)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"votes_dir: {p} exists and is not a directory; expected a directory for the arena's votes")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"votes_dir: {p}: cannot write there ({parent} is not a writable directory)")
    return p


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (uvicorn listens on it), or one line saying why not."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"port: {port} on {host}: {e.strerror}; expected a free port (or --port 0 for any)") from None
    sock.set_inheritable(True)
    return sock


def check_inputs(cfg: ServeConfig) -> None:
    """Everything that can be checked without loading a model: paths, adapters, host, the draft model's support."""
    from alignment.modeling import check_model_dir

    if not cfg.model:
        raise UserError("model: missing; expected a Hugging Face model directory (e.g. --model runs/tiny/dpo/merged)")
    check_model_dir(cfg.model, "model")
    if cfg.model2:
        check_model_dir(cfg.model2, "model2")
    if cfg.adapter2 and not cfg.model2:
        raise UserError("adapter2: given without model2; expected --model2 for the adapter to apply to")
    for key in ("adapter", "adapter2"):
        path = getattr(cfg, key)
        if path and not Path(path, "adapter_config.json").is_file():
            raise UserError(f"{key}: {path}: no adapter_config.json; expected a PEFT LoRA adapter directory")
    if cfg.draft_model:
        check_model_dir(cfg.draft_model, "draft_model")
    cfg.host = check_host(cfg.host)
    if cfg.model2:
        check_votes_dir(cfg.votes_dir)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"align serve needs {e.name}: install the serve extra (pip install -e '.[serve]')") from None


def prepare(cfg: ServeConfig) -> Prepared:
    """Check the inputs, compare tokenizers, bind the port, load the models: a server ready to run."""
    from alignment.modeling import context_length, load_model, load_tokenizer, same_tokenizer
    from alignment.sampling import stop_token_ids
    from alignment.serving.app import Limits, create_app
    from alignment.serving.arena import Arena
    from alignment.serving.engine import Engine, ServedModel

    check_inputs(cfg)
    paths = [(cfg.model, cfg.adapter, "model")] + ([(cfg.model2, cfg.adapter2, "model2")] if cfg.model2 else [])
    tokenizers = [load_tokenizer(p) for p, _, _ in paths]
    if len(tokenizers) == 2 and not same_tokenizer(*tokenizers):
        raise UserError(
            f"model2: {cfg.model2}: its tokenizer differs from model's ({cfg.model}); expected the same tokenizer, "
            "so that max_tokens and token counts mean the same on both sides of the arena"
        )
    draft_tok = load_tokenizer(cfg.draft_model) if cfg.draft_model else None
    if draft_tok is not None and not same_tokenizer(tokenizers[0], draft_tok):
        raise UserError(
            f"draft_model: {cfg.draft_model}: its tokenizer differs from model's; expected the same tokenizer"
        )
    for tok, (path, _, key) in zip(tokenizers, paths):
        if not tok.chat_template:
            print(
                f"note: {key} {path} has no chat template: /v1/chat/completions and the arena answer 400 for it; "
                "/v1/completions works",
                file=sys.stderr,
            )
    sock = bind(cfg.host, cfg.port)  # the last check: after it, only loading can fail

    try:
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        served, names = [], set()
        for tok, (path, adapter, _) in zip(tokenizers, paths):
            model = load_model(path, tokenizer=tok, adapter=adapter, dtype=cfg.dtype)
            name = str(path).rstrip("/") + (f"+{Path(adapter).name}" if adapter else "")
            name = name if name not in names else f"{name}#2"  # the same model twice: an arena sanity check
            names.add(name)
            served.append(ServedModel(name, str(path), model, tok, stop_token_ids(tok, model), context_length(model)))
        options = {}
        if cfg.draft_model:
            options["draft_model"] = load_model(cfg.draft_model, tokenizer=draft_tok, dtype=cfg.dtype)
        engine = Engine(served, max_pending=cfg.max_pending, max_parallel=cfg.max_parallel, generate_options=options)
        arena = Arena(cfg.votes_dir, [m.name for m in served]) if len(served) == 2 else None
        app = create_app(
            engine, arena, Limits(max_tokens=cfg.max_tokens, max_n=cfg.max_n, max_request_bytes=cfg.max_request_bytes)
        )
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    return Prepared(app, sock, engine, f"http://{f'[{host}]' if ':' in host else host}:{port}")


def main(cfg: ServeConfig) -> dict:
    """Serve until interrupted (Ctrl-C); returns the counters of what was served."""
    import uvicorn

    server = prepare(cfg)
    names = ", ".join(server.engine.models)
    print(
        f"serve: {names} at {server.url}/ (chat page{' and arena' if len(server.engine.models) == 2 else ''}), "
        f"OpenAI API at {server.url}/v1; Ctrl-C stops",
        file=sys.stderr,
    )
    if not ipaddress.ip_address(cfg.host).is_loopback:
        print(
            f"note: listening on {cfg.host}: other machines can reach this server, and it has no authentication",
            file=sys.stderr,
        )
    try:
        uvicorn.Server(
            uvicorn.Config(server.app, log_level="warning", access_log=cfg.access_log, timeout_graceful_shutdown=5)
        ).run(sockets=[server.sock])
    finally:
        server.engine.shutdown()
        server.sock.close()
    status = server.engine.status()
    votes = f"; arena votes in {cfg.votes_dir}/" if len(server.engine.models) == 2 else ""
    print(
        f"serve: answered {status['completed']} requests ({status['generated_tokens']} tokens), "
        f"refused {status['refused']} when busy{votes}",
        file=sys.stderr,
    )
    return status


@exit_on_user_error
def cli(argv=None) -> None:
    (cfg,) = parse_config([ServeConfig], argv)
    main(cfg)


if __name__ == "__main__":
    cli()
