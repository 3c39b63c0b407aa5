"""Post-training data: read rows from files or the hub, turn each format into conversations, validate, tokenize.

Sources are strings `PATH_OR_HUB_NAME[@WEIGHT]`: a local .json/.jsonl/.parquet/.csv file (optionally .gz), a
directory of such files, or a `datasets` hub name (its split comes from the stage config). A mixture is a list of
sources; WEIGHT is the fraction of that source's rows to use (0.5 = a seeded half, 2 = every row twice).

Row formats, detected per row:
- conversational `{"messages": [{"role", "content"}, ...]}`
- prompt/completion `{"prompt": str | [msgs], "completion": str | [msgs]}`
- alpaca `{"instruction", "input", "output"}`
- hh-rlhf `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}` (shared prompt + final turn)
- preference `{"prompt", "chosen", "rejected"}` as text or as conversations (TRL's conversational format).

Everything becomes chat messages and is tokenized with `alignment.tokens.encode_chat`, so a literal "<|im_end|>"
in the data stays text. Every row is validated; a bad row is a UserError naming the file and row (or, with
`invalid_rows="skip"`, counted and skipped: real datasets such as hh-rlhf contain a few broken pairs).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .tokens import encode_chat, validate_messages

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
INVALID_ROWS = ("error", "skip")
TOO_LONG = ("truncate", "drop", "error")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclass
class Source:
    """One entry of a mixture: where the rows come from and the fraction of them to use."""

    path: str
    weight: float = 1.0


@dataclass
class Row:
    """A raw row and the place it came from (for error messages)."""

    data: dict
    where: str


def parse_source(spec: str) -> Source:
    """Parse `PATH_OR_NAME[@WEIGHT]`."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"data source {spec!r}: expected a file path or hub dataset name, optionally with @WEIGHT")
    path, sep, weight = spec.rpartition("@")
    if not sep:
        return Source(spec)
    try:
        w = float(weight)
    except ValueError:
        raise UserError(f"data source {spec!r}: weight {weight!r} after '@' is not a number") from None
    if w <= 0:
        raise UserError(f"data source {spec!r}: weight must be > 0")
    return Source(path, w)


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _base_suffix(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix.lower()


def _read_local(path: Path) -> list[dict]:
    suffix = _base_suffix(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        source = gzip.open(path, "rb") if path.name.endswith(".gz") else str(path)
        return pq.read_table(source).to_pylist()
    with _open_text(path) as f:
        text = f.read()
    if suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        # CSV cells are strings; a cell holding a JSON list (e.g. messages) is decoded
        for r in rows:
            for k, v in r.items():
                if isinstance(v, str) and v.startswith("[{"):
                    try:
                        r[k] = json.loads(v)
                    except json.JSONDecodeError:
                        pass
        return rows
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return data
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {i}: not valid JSON ({e.msg})") from None
    return rows


def _is_local_data_file(p: Path) -> bool:
    return p.is_file() and _base_suffix(p) in LOCAL_SUFFIXES


def read_rows(spec: str, split: str = "train") -> list[Row]:
    """All rows of one source (file, directory of files, or hub dataset name), each tagged with its place."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if _is_local_data_file(f))
        if not files:
            raise UserError(f"{spec}: directory has no {'/'.join(LOCAL_SUFFIXES)} files (optionally .gz)")
    elif p.is_file():
        if _base_suffix(p) not in LOCAL_SUFFIXES:
            raise UserError(f"{spec}: unsupported file type; expected one of {', '.join(LOCAL_SUFFIXES)} (optionally .gz)")
        files = [p]
    elif _base_suffix(p) in LOCAL_SUFFIXES or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"{spec}: data file not found")
    else:
        return _read_hub(spec, split)
    out = []
    for f in files:
        rows = _read_local(f)
        if not isinstance(rows, list):
            raise UserError(f"{f}: expected a list of rows (JSON array, JSON lines, parquet or CSV)")
        out += [Row(r, f"{f}: row {i}") for i, r in enumerate(rows, 1)]
    return out


def _read_hub(name: str, split: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split: all user-fixable
        raise UserError(f"{name}: could not load hub dataset split {split!r} ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return [Row(dict(r), f"{name}[{split}]: row {i}") for i, r in enumerate(ds, 1)]


def load_mixture(specs: list[str] | str, split: str = "train", seed: int = 0) -> list[Row]:
    """Rows of a weighted mixture of sources (weight = fraction of each source's rows; seeded)."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise UserError("data: no sources given; expected at least one file or hub dataset name")
    rng = random.Random(seed)
    out: list[Row] = []
    for spec in specs:
        src = parse_source(spec)
        rows = read_rows(src.path, split)
        if not rows:
            raise UserError(f"{src.path}: no rows")
        whole, frac = divmod(src.weight, 1.0)
        picked = rows * int(whole)
        k = round(frac * len(rows))
        if k:
            picked += [rows[i] for i in sorted(rng.sample(range(len(rows)), k))]
        out += picked
    return out


# ---------------------------------------------------------------------------------------------------- formats


def detect_format(row: dict) -> str:
    """One of: messages, prompt_completion, alpaca, hh, preference; 'unknown' otherwise."""
    if not isinstance(row, dict):
        return "unknown"
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if {"chosen", "rejected"} <= keys:
        if "prompt" not in keys and isinstance(row["chosen"], str) and row["chosen"].lstrip("\n").startswith("Human:"):
            return "hh"
        return "preference"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    return "unknown"


def _as_messages(value, default_role: str, where: str) -> list[dict]:
    """A string becomes one message with `default_role`; a list is validated as messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    return validate_messages(value, where)


def parse_hh(text: str, where: str) -> list[dict]:
    """Split an hh-rlhf dialogue `\\n\\nHuman: ...\\n\\nAssistant: ...` into user/assistant messages."""
    if not isinstance(text, str):
        raise UserError(f"{where}: expected a dialogue string")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise UserError(f"{where}: expected a dialogue starting with '\\n\\nHuman:'")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return msgs


def read_jsonl(path: str | Path) -> list[tuple[int, object]]:
    """(line number, parsed value) of a .jsonl or .jsonl.gz file's non-blank lines; one clear error per problem."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: file not found")
    raw = gzip.open(p, "rt", encoding="utf-8").read() if p.name.endswith(".gz") else p.read_text(encoding="utf-8")
    rows = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if line.strip():
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{i}: invalid JSON ({e.msg})") from None
    if not rows:
        raise UserError(f"{p}: no rows in the file")
    return rows


def read_prompt_rows(path: str | Path, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, row) of prompt rows; each row's "prompt" is a validated message list or a string, other fields kept.

    A row has "prompt" (messages or a string), or is an hh-rlhf row whose "chosen" dialogue, without its final
    assistant turn, is the prompt (so hh-rlhf files serve as RL and win-rate prompts)."""
    rows = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        if isinstance(row, dict) and "prompt" in row:
            p = row["prompt"]
            prompt = validate_messages(p, f"{where}: prompt") if isinstance(p, list) else str(p)
        elif isinstance(row, dict) and isinstance(row.get("chosen"), str):
            prompt = parse_hh(row["chosen"], f"{where}: chosen")
            while prompt and prompt[-1]["role"] == "assistant":
                prompt = prompt[:-1]
        else:
            raise UserError(f"{where}: expected a 'prompt' (messages or a string) or an hh-rlhf 'chosen' dialogue")
        if not prompt:
            raise UserError(f"{where}: empty prompt")
        rows.append((i, {**row, "prompt": prompt}))
        if limit and len(rows) >= limit:
            break
    return rows


def sft_messages(row: Row) -> list[dict]:
    """A conversation for SFT from a messages / prompt-completion / alpaca row; must contain an assistant turn."""
    d, where = row.data, row.where
    fmt = detect_format(d)
    if fmt == "messages":
        msgs = validate_messages(d["messages"], f"{where}: messages")
    elif fmt == "prompt_completion":
        msgs = _as_messages(d["prompt"], "user", f"{where}: prompt") + _as_messages(d["completion"], "assistant", f"{where}: completion")
    elif fmt == "alpaca":
        for k in ("instruction", "output"):
            if not isinstance(d[k], str):
                raise UserError(f"{where}: {k} must be a string")
        inp = d.get("input") or ""
        if not isinstance(inp, str):
            raise UserError(f"{where}: input must be a string")
        prompt = d["instruction"].strip() + (f"\n\n{inp.strip()}" if inp.strip() else "")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": d["output"]}]
    else:
        raise UserError(f"{where}: unrecognised row with keys {sorted(d) if isinstance(d, dict) else type(d).__name__}; "
                        "expected messages, prompt/completion or instruction/input/output")
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{where}: no assistant message; expected at least one to train on")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise UserError(f"{where}: message {i}: empty assistant completion")
    return msgs


def preference_pair(row: Row) -> dict:
    """{"prompt": [msgs], "chosen": [assistant msg], "rejected": [assistant msg]} from any preference format."""
    d, where = row.data, row.where
    fmt = detect_format(d)
    if fmt == "hh":
        chosen = parse_hh(d["chosen"], f"{where}: chosen")
        rejected = parse_hh(d["rejected"], f"{where}: rejected")
        if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise UserError(f"{where}: chosen and rejected dialogues share no prompt; expected the same turns before a final Assistant turn")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    elif fmt == "preference":
        if "prompt" in d:
            prompt = _as_messages(d["prompt"], "user", f"{where}: prompt")
            chosen = _as_messages(d["chosen"], "assistant", f"{where}: chosen")
            rejected = _as_messages(d["rejected"], "assistant", f"{where}: rejected")
        else:  # implicit prompt: two full conversations that differ only at the end
            full_c = _as_messages(d["chosen"], "assistant", f"{where}: chosen")
            full_r = _as_messages(d["rejected"], "assistant", f"{where}: rejected")
            if full_c[:-1] != full_r[:-1] or len(full_c) < 2:
                raise UserError(f"{where}: chosen and rejected share no prompt; expected the same messages before the last one")
            prompt, chosen, rejected = full_c[:-1], full_c[-1:], full_r[-1:]
    else:
        raise UserError(f"{where}: unrecognised preference row with keys {sorted(d) if isinstance(d, dict) else type(d).__name__}; "
                        "expected prompt/chosen/rejected or hh-rlhf chosen/rejected dialogues")
    if not prompt:
        raise UserError(f"{where}: empty prompt")
    for name, c in (("chosen", chosen), ("rejected", rejected)):
        if len(c) != 1 or c[0]["role"] != "assistant":
            raise UserError(f"{where}: {name} must be one assistant message")
        if not c[0]["content"].strip():
            raise UserError(f"{where}: {name} is an empty completion")
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise UserError(f"{where}: chosen equals rejected; expected two different completions")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def convert_rows(rows: list[Row], convert, invalid_rows: str = "error", label: str = "data") -> list:
    """Apply `convert` to every row; a bad row raises, or is skipped and counted when invalid_rows='skip'."""
    if invalid_rows not in INVALID_ROWS:
        raise UserError(f"config: invalid_rows {invalid_rows!r}; expected one of {', '.join(INVALID_ROWS)}")
    out, skipped = [], []
    for r in rows:
        try:
            out.append(convert(r))
        except UserError as e:
            if invalid_rows == "error":
                raise
            skipped.append(str(e))
    if skipped:
        print(f"{label}: skipped {len(skipped)} invalid row(s) of {len(rows)} (invalid_rows=skip); first: {skipped[0]}", file=sys.stderr)
    if not out:
        raise UserError(f"{label}: no valid rows left")
    return out


# ---------------------------------------------------------------------------------------------------- tokenize


def _check_too_long(too_long: str) -> None:
    if too_long not in TOO_LONG:
        raise UserError(f"config: too_long {too_long!r}; expected one of {', '.join(TOO_LONG)}")


def tokenize_sft(tokenizer, conversations: list[list[dict]], max_length: int | None, too_long: str = "truncate",
                 label: str = "sft", wheres: list[str] | None = None) -> list[dict]:
    """{"input_ids", "assistant_masks"} per conversation; over-long ones truncated (kept start), dropped or an error."""
    _check_too_long(too_long)
    out, n_long, n_dropped = [], 0, 0
    for i, msgs in enumerate(conversations):
        enc = encode_chat(tokenizer, msgs)
        ids, mask = enc["input_ids"], enc["assistant_masks"]
        if max_length and len(ids) > max_length:
            n_long += 1
            if too_long == "error":
                where = wheres[i] if wheres else f"{label}: example {i}"
                raise UserError(f"{where}: {len(ids)} tokens > max_length {max_length}; set too_long: truncate or raise max_length")
            if too_long == "drop":
                n_dropped += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask):  # the prompt alone fills max_length: nothing left to learn from
                n_dropped += 1
                continue
        out.append({"input_ids": ids, "assistant_masks": mask})
    if n_long:
        print(f"{label}: {n_long} of {len(conversations)} sequences longer than max_length={max_length}: "
              f"{n_long - n_dropped if too_long == 'truncate' else 0} truncated, {n_dropped} dropped", file=sys.stderr)
    if not out:
        raise UserError(f"{label}: no examples left after applying max_length={max_length}")
    return out


def _completion_ids(tokenizer, prompt_ids: list[int], prompt: list[dict], completion: list[dict], where: str) -> list[int]:
    full = encode_chat(tokenizer, prompt + completion)["input_ids"]
    if full[: len(prompt_ids)] != prompt_ids:
        raise UserError(f"{where}: the chat template renders the prompt differently alone and before a reply; "
                        "expected the generation prompt to be a prefix of the conversation")
    ids = full[len(prompt_ids):]
    # stop right after the end-of-turn token: the template's trailing newline is not part of the reply
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end in ids:
        ids = ids[: len(ids) - ids[::-1].index(im_end)]
    return ids


def tokenize_preference(tokenizer, pairs: list[dict], max_length: int | None, too_long: str = "truncate",
                        label: str = "preference", wheres: list[str] | None = None) -> list[dict]:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} per pair; over-long pairs keep the end of the prompt."""
    _check_too_long(too_long)
    out, n_long, n_dropped = [], 0, 0
    for i, p in enumerate(pairs):
        where = wheres[i] if wheres else f"{label}: pair {i}"
        prompt_ids = encode_chat(tokenizer, p["prompt"], add_generation_prompt=True)["input_ids"]
        chosen = _completion_ids(tokenizer, prompt_ids, p["prompt"], p["chosen"], where)
        rejected = _completion_ids(tokenizer, prompt_ids, p["prompt"], p["rejected"], where)
        longest = len(prompt_ids) + max(len(chosen), len(rejected))
        if max_length and longest > max_length:
            n_long += 1
            if too_long == "error":
                raise UserError(f"{where}: {longest} tokens > max_length {max_length}; set too_long: truncate or raise max_length")
            if too_long == "drop":
                n_dropped += 1
                continue
            # keep at least half the budget for the prompt's end (the question), the rest for the replies' start
            keep_prompt = min(len(prompt_ids), max(max_length // 2, max_length - max(len(chosen), len(rejected))))
            budget = max_length - keep_prompt
            prompt_ids, chosen, rejected = prompt_ids[len(prompt_ids) - keep_prompt:], chosen[:budget], rejected[:budget]
            if chosen == rejected:  # they differed only after the cut: no preference signal left
                n_dropped += 1
                continue
        out.append({"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected})
    if n_long:
        print(f"{label}: {n_long} of {len(pairs)} pairs longer than max_length={max_length}: "
              f"{n_long - n_dropped if too_long == 'truncate' else 0} truncated, {n_dropped} dropped", file=sys.stderr)
    if not out:
        raise UserError(f"{label}: no pairs left after applying max_length={max_length}")
    return out


def fingerprint(rows: list[dict]) -> str:
    """A content hash of tokenized rows (keys caches of per-example model outputs)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split into (train, held-out) with `fraction` of items held out (at least one when fraction > 0)."""
    if not 0 <= fraction < 1:
        raise UserError(f"config: eval_fraction {fraction}; expected a number in [0, 1)")
    if fraction == 0:
        return items, []
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n = max(1, round(fraction * len(items)))
    held = set(idx[:n])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
