"""The FastAPI application of `align serve`: OpenAI-compatible endpoints, the arena, and the chat page.

Endpoints: POST /v1/chat/completions and POST /v1/completions (server-sent events with `"stream": true`), GET
/v1/models, GET /health, POST /tokenize (the ids a prompt becomes), the arena (POST /arena/battles, POST
/arena/battles/{id}/{A|B}, POST /arena/battles/{id}/vote, GET /arena/tally) and the page at /.

Every error is a JSON body in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with `param` naming the
field at fault: malformed JSON and bad field types or values 400, unknown model 404, a body over the size cap 413, an
arena action out of order 409, the admission cap reached 503 (with Retry-After). Message contents are encoded with
`alignment.tokens` (a "<|im_end|>" typed by a user stays text, never the control token).
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..sampling import SamplingParams
from ..tokens import ROLES, encode_chat, encode_text
from .arena import Arena, ArenaError
from .engine import Busy, Engine, Job, ServedModel

PAGE = Path(__file__).with_name("web") / "index.html"
SEED_MAX = 2**32 - 1
DRAIN_FACTOR = 8  # an oversized body is read and dropped up to this many times the limit, so its client sees the 413
# fields accepted and ignored (they change nothing about the answer), and fields accepted only at their default value
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
DEFAULT_ONLY = {
    "logprobs": (False,),
    "top_logprobs": (0,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "echo": (False,),
    "suffix": ("",),
    "best_of": (1,),
}
SAMPLING_FIELDS = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
}
CHAT_FIELDS = {"model", "messages", "stream", "stream_options"} | SAMPLING_FIELDS
COMPLETION_FIELDS = {"model", "prompt", "stream", "stream_options"} | SAMPLING_FIELDS
ARENA_FIELDS = {"messages", "models"} | SAMPLING_FIELDS - {"n"}


@dataclass
class Limits:
    """What one request may ask for."""

    max_tokens: int = 512  # tokens one answer may generate
    max_n: int = 4  # answers per request
    max_request_bytes: int = 1_000_000  # request body size
    max_stop: int = 4  # stop strings (OpenAI's limit)


class ApiError(Exception):
    """An error answered as OpenAI's JSON error body; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        """The JSON error response."""
        kind = (
            "invalid_request_error"
            if self.status < 500
            else "server_error"
            if self.status != 503
            else "overloaded_error"
        )
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(
            {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}},
            status_code=self.status,
            headers=headers,
        )


# ------------------------------------------------------------------------------------------------- request fields


def _json_kind(v) -> str:
    """The JSON name of a value's type, for error messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    return "an array" if isinstance(v, list) else "an object"


def _show(v) -> str:
    return json.dumps(v, ensure_ascii=False)[:60]


def number(body: dict, key: str, default, lo: float, hi: float | None, lo_open: bool = False):
    """A finite JSON number in [lo, hi] (lo excluded with lo_open), or the default when absent or null."""
    v = body.get(key)
    if v is None:
        return default
    rng = f"{'>' if lo_open else '>='} {lo}" + ("" if hi is None else f" and <= {hi}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"{key}: {_show(v)} is {_json_kind(v)}; expected a number {rng}", key, "invalid_type")
    if not math.isfinite(v) or v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
        raise ApiError(400, f"{key}: {v}; expected a number {rng}", key, "invalid_value")
    return float(v)


def integer(body: dict, key: str, default, lo: int, hi: int | None, hint: str = ""):
    """A JSON integer in [lo, hi] (2.0 counts as 2), or the default when absent or null."""
    v = body.get(key)
    if v is None:
        return default
    rng = f">= {lo}" + ("" if hi is None else f" and <= {hi}") + hint
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ApiError(400, f"{key}: {_show(v)} is {_json_kind(v)}; expected an integer {rng}", key, "invalid_type")
    if v < lo or (hi is not None and v > hi):
        raise ApiError(400, f"{key}: {int(v)}; expected an integer {rng}", key, "invalid_value")
    return int(v)


def boolean(body: dict, key: str, default: bool) -> bool:
    """A JSON boolean, or the default when absent or null."""
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"{key}: {_show(v)} is {_json_kind(v)}; expected true or false", key, "invalid_type")
    return v


def _same(v, d) -> bool:
    """JSON equality where 0 and 0.0 are the same but false and 0 are not."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (v, d))
    return v == d if numbers else type(v) is type(d) and v == d


def check_fields(body: dict, allowed: set[str]) -> None:
    """Refuse a field this server does not know, or one it cannot honour at a non-default value."""
    for k, v in body.items():
        if k in allowed or k in IGNORED:
            continue
        if k in DEFAULT_ONLY:
            if v is None or any(_same(v, d) for d in DEFAULT_ONLY[k]):
                continue
            raise ApiError(400, f"{k}: {_show(v)}; not supported by this server (expected it unset)", k, "unsupported")
        raise ApiError(400, f"{k}: unknown field; expected some of {', '.join(sorted(allowed))}", k, "unknown_field")


def parse_messages(value, key: str = "messages") -> list[dict]:
    """OpenAI chat messages -> [{role, content}] (developer counts as system; text content parts are joined)."""
    if not isinstance(value, list) or not value:
        raise ApiError(
            400,
            f"{key}: {_show(value)} is {_json_kind(value)}; expected a non-empty array of {{role, content}} objects",
            key,
            "invalid_type",
        )
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise ApiError(
                400,
                f"{where}: {_show(m)} is {_json_kind(m)}; expected an object with role and content",
                where,
                "invalid_type",
            )
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ApiError(
                400,
                f"{where}.{sorted(extra)[0]}: not supported by this server; expected role and content",
                f"{where}.{sorted(extra)[0]}",
            )
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise ApiError(
                400,
                f"{where}.role: {_show(m.get('role'))}; expected one of {', '.join(ROLES)}",
                f"{where}.role",
                "invalid_value",
            )
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise ApiError(
                        400,
                        f"{where}.content[{j}]: {_show(p)}; this server reads text parts only "
                        '({"type": "text", "text": ...})',
                        f"{where}.content[{j}]",
                        "unsupported",
                    )
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(
                400,
                f"{where}.content: {_show(content)} is {_json_kind(content)}; expected a string",
                f"{where}.content",
                "invalid_type",
            )
        out.append({"role": role, "content": content})
    return out


def parse_stop(value, limit: int) -> list[str]:
    """`stop`: a string or an array of up to `limit` non-empty strings."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or not 1 <= len(stops) <= limit:
        raise ApiError(
            400,
            f"stop: {_show(value)}; expected a non-empty string or an array of 1 to {limit} of them",
            "stop",
            "invalid_type",
        )
    return stops


def parse_sampling(
    body: dict, limits: Limits, room: int, default_max_tokens: int | None, prompt_key: str = "messages"
) -> tuple[SamplingParams, list[str]]:
    """The sampling fields of a request -> SamplingParams and stop strings. `room` is what the context leaves after the
    prompt (`prompt_key`); max_tokens defaults to `default_max_tokens` (None: as much as the cap and the room allow)."""
    if room < 1:
        raise ApiError(
            400,
            f"{prompt_key}: the prompt fills the model's whole context; expected a shorter prompt",
            prompt_key,
            "context_length_exceeded",
        )
    temperature = number(body, "temperature", 1.0, 0, 2)
    n = integer(body, "n", 1, 1, limits.max_n)
    if n > 1 and temperature == 0:
        raise ApiError(
            400,
            f"n: {n} with temperature 0 (greedy) would repeat one answer; expected temperature > 0",
            "n",
            "invalid_value",
        )
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = integer(body, key, None, 1, limits.max_tokens, " (the server's max_tokens cap)")
    if max_tokens is None:
        max_tokens = min(default_max_tokens or limits.max_tokens, limits.max_tokens, room)
    elif max_tokens > room:
        raise ApiError(
            400,
            f"{key}: {max_tokens}; the prompt leaves room for {room} tokens in the model's context",
            key,
            "context_length_exceeded",
        )
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=number(body, "top_p", 1.0, 0, 1, lo_open=True),
        top_k=integer(body, "top_k", 0, 0, None),
        min_p=number(body, "min_p", 0.0, 0, 1),
        repetition_penalty=number(body, "repetition_penalty", 1.0, 0, None, lo_open=True),
        num_return_sequences=n,
        seed=integer(body, "seed", None, 0, SEED_MAX),
    )
    if params.min_p >= 1:
        raise ApiError(400, f"min_p: {params.min_p}; expected a number >= 0 and < 1", "min_p", "invalid_value")
    return params, parse_stop(body.get("stop"), limits.max_stop)


async def read_json(request: Request, limit: int) -> dict:
    """The request body as a JSON object, refused over `limit` bytes (413) or when it is not a JSON object (400).

    An oversized body is still read (and dropped) up to DRAIN_FACTOR x limit before the 413 goes out: most HTTP
    clients write the whole body before reading the answer, and would see a broken pipe instead of the error."""
    declared = request.headers.get("content-length")
    size = int(declared) if declared and declared.isdigit() else None
    too_large = ApiError(
        413,
        f"request body: {size or 'over ' + str(limit)} bytes; the limit is {limit} (max_request_bytes)",
        None,
        "request_too_large",
    )
    if size is not None and size > DRAIN_FACTOR * limit:
        raise too_large
    body, total = bytearray(), 0
    async for chunk in request.stream():
        total += len(chunk)
        if total <= limit:
            body += chunk
        elif total > DRAIN_FACTOR * limit:
            break
    if total > limit:
        raise too_large
    try:
        data = json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(
            400, f"request body: undecodable bytes at byte {e.start}; expected UTF-8 JSON", None, "invalid_json"
        ) from None
    except ValueError as e:
        raise ApiError(
            400, f"request body: not valid JSON ({e}); expected a JSON object", None, "invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body: {_json_kind(data)}; expected a JSON object", None, "invalid_json")
    return data


# ------------------------------------------------------------------------------------------------- responses


def sse(obj) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, answers) -> dict:
    """OpenAI's usage object (the prompt counted once, however many answers)."""
    completion = sum(a.tokens for a in answers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def create_app(engine: Engine, arena: Arena | None = None, limits: Limits | None = None) -> FastAPI:
    """The FastAPI application over `engine` (and `arena` for the arena endpoints)."""
    limits = limits or Limits()
    app = FastAPI(title="align serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.arena, app.state.limits = engine, arena, limits
    page = PAGE.read_text(encoding="utf-8")
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(ArenaError)
    async def _arena_error(request: Request, e: ArenaError):
        return ApiError(e.status, str(e), e.param, "arena").response()

    @app.exception_handler(UserError)
    async def _user_error(request: Request, e: UserError):  # e.g. a model without a chat template
        return ApiError(400, str(e), None, "invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return ApiError(e.status_code, msg, None, "not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception):
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error").response()

    def served(body: dict, key: str = "model") -> ServedModel:
        name = body.get(key)
        if name is None:
            raise ApiError(400, f"{key}: missing; expected a model id from GET /v1/models", key, "missing")
        if not isinstance(name, str):
            raise ApiError(
                400,
                f"{key}: {_show(name)} is {_json_kind(name)}; expected a model id from GET /v1/models",
                key,
                "invalid_type",
            )
        if name not in engine.models:
            raise ApiError(
                404,
                f"{key}: {name!r} is not served here; expected one of {', '.join(engine.models)}",
                key,
                "model_not_found",
            )
        return engine.models[name]

    def check_n(params: SamplingParams) -> None:
        if params.num_return_sequences > 1 and engine.generate_options.get("draft_model") is not None:
            raise ApiError(
                400,
                f"n: {params.num_return_sequences}; with a draft model (speculative decoding) the server "
                "generates one answer per request",
                "n",
                "invalid_value",
            )

    def submit(model: ServedModel, ids: list[int], params: SamplingParams, stops: list[str], queue=None) -> Job:
        loop = asyncio.get_running_loop()

        def on_text(i: int, delta: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (i, delta))

        try:
            job = engine.submit(model, ids, params, stops, on_text if queue is not None else None)
        except Busy as e:
            raise ApiError(503, str(e), None, "server_busy") from None
        if queue is not None:  # the end marker comes after every delta: both go through the loop's FIFO
            job.future.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, None))
        return job

    async def deltas(job: Job, queue: asyncio.Queue):
        """(index, text) as the generation streams them; ends when the generation ends."""
        while (item := await queue.get()) is not None:
            yield item

    def stream_response(
        job: Job, queue: asyncio.Queue, chunk, n: int, prompt_tokens: int, include_usage: bool, first=None, on_done=None
    ) -> StreamingResponse:
        """Server-sent events: the chunks of the deltas, one closing chunk per answer, usage if asked, [DONE]."""

        async def events():
            try:
                if first is not None:
                    for i in range(n):
                        yield sse(chunk(i, first, None))
                async for i, text in deltas(job, queue):
                    yield sse(chunk(i, text, None))
                try:
                    answers = job.future.result()
                except Exception as e:  # the generation failed: say so in the stream, the server keeps serving
                    if on_done:
                        on_done(None)
                    yield sse(
                        {
                            "error": {
                                "message": f"generation failed: {type(e).__name__}: {e}",
                                "type": "server_error",
                                "param": None,
                                "code": "internal_error",
                            }
                        }
                    )
                    return
                if on_done:
                    on_done(answers)
                for a in answers:
                    yield sse(chunk(a.index, None, a.finish_reason))
                if include_usage:
                    yield sse({**chunk(0, None, None), "choices": [], "usage": usage(prompt_tokens, answers)})
                yield "data: [DONE]\n\n"
            finally:
                if not job.future.done():  # the client went away: stop generating for it
                    job.cancel()
                    if on_done:
                        on_done(None)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    def stream_options(body: dict) -> bool:
        opts = body.get("stream_options")
        if opts is None:
            return False
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"}:
            raise ApiError(
                400,
                f'stream_options: {_show(opts)}; expected {{"include_usage": true|false}}',
                "stream_options",
                "invalid_type",
            )
        return boolean(opts, "include_usage", False)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "models": list(engine.models),
            "arena": arena is not None and len(engine.models) >= 2,
            **engine.status(),
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": started, "owned_by": "align-suite"} for m in engine.models
            ],
        }

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        m = served({"model": name})
        return {
            "id": m.name,
            "object": "model",
            "created": started,
            "owned_by": "align-suite",
            "context_length": m.context,
        }

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request, limits.max_request_bytes)
        check_fields(body, {"model", "messages", "prompt"})
        m = served(body)
        if ("messages" in body) == ("prompt" in body):
            raise ApiError(400, "request body: expected either messages (chat) or prompt (text)", "messages", "missing")
        ids = (
            encode_chat(m.tokenizer, parse_messages(body["messages"]), add_generation_prompt=True)["input_ids"]
            if "messages" in body
            else encode_text(m.tokenizer, _prompt_text(body))
        )
        return {"model": m.name, "tokens": ids, "count": len(ids), "max_model_len": m.context}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, limits.max_request_bytes)
        check_fields(body, CHAT_FIELDS)
        m = served(body)
        messages = parse_messages(body.get("messages"))
        stream = boolean(body, "stream", False)
        include_usage = stream_options(body)
        ids = encode_chat(m.tokenizer, messages, add_generation_prompt=True)["input_ids"]
        params, stops = parse_sampling(body, limits, m.context - len(ids), None)
        check_n(params)
        cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def chunk(i, text, finish):
            delta = {} if text is None else text if isinstance(text, dict) else {"content": text}
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": m.name,
                "system_fingerprint": None,
                "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        if stream:
            queue = asyncio.Queue()
            job = submit(m, ids, params, stops, queue)
            return stream_response(
                job,
                queue,
                chunk,
                params.num_return_sequences,
                len(ids),
                include_usage,
                first={"role": "assistant", "content": ""},
            )
        job = submit(m, ids, params, stops)
        answers = await asyncio.wrap_future(job.future)
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": m.name,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": a.index,
                    "message": {"role": "assistant", "content": a.text},
                    "logprobs": None,
                    "finish_reason": a.finish_reason,
                }
                for a in answers
            ],
            "usage": usage(len(ids), answers),
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, limits.max_request_bytes)
        check_fields(body, COMPLETION_FIELDS)
        m = served(body)
        ids = encode_text(m.tokenizer, _prompt_text(body))
        if not ids:
            raise ApiError(400, "prompt: empty; expected some text to continue", "prompt", "invalid_value")
        stream = boolean(body, "stream", False)
        include_usage = stream_options(body)
        # max_tokens defaults to 16 here, as in OpenAI's completions
        params, stops = parse_sampling(body, limits, m.context - len(ids), 16, "prompt")
        check_n(params)
        cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

        def chunk(i, text, finish):
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": m.name,
                "system_fingerprint": None,
                "choices": [{"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}],
            }

        if stream:
            queue = asyncio.Queue()
            job = submit(m, ids, params, stops, queue)
            return stream_response(job, queue, chunk, params.num_return_sequences, len(ids), include_usage)
        job = submit(m, ids, params, stops)
        answers = await asyncio.wrap_future(job.future)
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": m.name,
            "system_fingerprint": None,
            "choices": [
                {"index": a.index, "text": a.text, "logprobs": None, "finish_reason": a.finish_reason} for a in answers
            ],
            "usage": usage(len(ids), answers),
        }

    # ------------------------------------------------------------------------------------------ arena

    def need_arena() -> Arena:
        if arena is None or len(engine.models) < 2:
            raise ApiError(
                400,
                "arena: this server has one model; expected two (align serve --model A --model2 B)",
                None,
                "arena_off",
            )
        return arena

    @app.post("/arena/battles")
    async def new_battle(request: Request):
        ar = need_arena()
        body = await read_json(request, limits.max_request_bytes)
        check_fields(body, ARENA_FIELDS)
        names = body.get("models", list(engine.models)[:2])
        if not (isinstance(names, list) and len(names) == 2):
            raise ApiError(400, f"models: {_show(names)}; expected an array of two model ids", "models", "invalid_type")
        pair = [served({"models": n}, "models") for n in names]
        messages = parse_messages(body.get("messages"))
        ids = [encode_chat(p.tokenizer, messages, add_generation_prompt=True)["input_ids"] for p in pair]
        params, stops = parse_sampling(body, limits, min(p.context - len(i) for p, i in zip(pair, ids)), None)
        settings = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "seed": params.seed,
            "stop": stops,
        }
        battle = ar.new_battle(messages, settings, (pair[0].name, pair[1].name))
        return {"battle": battle.id, "sides": ["A", "B"]}

    @app.post("/arena/battles/{battle_id}/vote")
    async def vote(battle_id: str, request: Request):
        ar = need_arena()
        body = await read_json(request, limits.max_request_bytes)
        check_fields(body, {"vote"})
        return await asyncio.to_thread(ar.vote, battle_id, body.get("vote"))

    @app.post("/arena/battles/{battle_id}/{side}")
    async def battle_side(battle_id: str, side: str):
        ar = need_arena()
        battle, s = ar.start_side(battle_id, side)
        m = engine.models.get(s.model)
        if m is None:
            s.state = "failed"
            raise ApiError(404, f"battle {battle_id}: its model is no longer served", None, "model_not_found")
        ids = encode_chat(m.tokenizer, battle.messages, add_generation_prompt=True)["input_ids"]
        st = battle.settings
        params = SamplingParams(
            max_new_tokens=st["max_tokens"], temperature=st["temperature"], top_p=st["top_p"], seed=st["seed"]
        )
        queue = asyncio.Queue()
        try:
            job = submit(m, ids, params, st["stop"], queue)
        except ApiError:
            s.state = "new"  # refused before it started: the page may ask again
            raise
        cid, created = f"arena-{battle_id}-{side}", int(time.time())

        def chunk(i, text, finish):
            delta = {} if text is None else text if isinstance(text, dict) else {"content": text}
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": f"model {side}",
                "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        def on_done(answers):
            if answers is None:
                s.state = "stopped" if job.cancelled.is_set() else "failed"
            else:
                s.text, s.finish_reason, s.tokens, s.state = (
                    answers[0].text,
                    answers[0].finish_reason,
                    answers[0].tokens,
                    "done",
                )

        return stream_response(
            job, queue, chunk, 1, len(ids), False, first={"role": "assistant", "content": ""}, on_done=on_done
        )

    @app.get("/arena/tally")
    async def tally():
        ar = need_arena()
        return await asyncio.to_thread(ar.tally)

    return app


def _prompt_text(body: dict) -> str:
    """`prompt` of a completion request: a string, or an array holding one string."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str):
        raise ApiError(
            400,
            f"prompt: {_show(p)} is {_json_kind(p)}; expected a string (one prompt per request)",
            "prompt",
            "invalid_type" if p is not None else "missing",
        )
    return p
