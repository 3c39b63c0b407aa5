"""Data: the one reader of rows and documents, every row format to conversations, validation, safe tokenization.

Sources are strings `PATH_OR_HUB_NAME[@WEIGHT]`: a local .json/.jsonl/.parquet/.csv file (optionally .gz), a
directory of such files, or a `datasets` hub name (its split comes from the stage config). A mixture is a list of
sources; WEIGHT is the fraction of that source's rows to use (0.5 = a seeded half, 2 = every row twice).
`read_rows` is the one place files are opened and parsed: every problem (missing file, not gzip, not UTF-8, bad JSON
on a line, a corrupt parquet, a CSV row with more fields than its header) is one UserError naming file and line.
Documents for pretraining and perplexity (`iter_documents`) add .txt files and read the rest through `read_rows`.

Row formats, detected per row:
- conversational `{"messages": [{"role", "content"}, ...]}`
- prompt/completion `{"prompt": str | [msgs], "completion": str | [msgs]}`
- alpaca `{"instruction", "input", "output"}`
- hh-rlhf `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}` (shared prompt + final turn)
- preference `{"prompt", "chosen", "rejected"}` as text or as conversations (TRL's conversational format)
- prompt rows `{"prompt": str | [msgs], ...}` (RL, pairs, win rate), or hh-rlhf rows whose dialogue is the prompt.

Everything becomes chat messages and is tokenized with `alignment.tokens.encode_chat`, so a literal "<|im_end|>"
in the data stays text. Every row is validated; a bad row is a UserError naming the file and row (or, with
`invalid_rows="skip"`, counted and skipped: real datasets such as hh-rlhf contain a few broken pairs).
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .tokens import encode_chat, encode_prompt, reply_ids, validate_messages

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".txt.gz", ".csv.gz")
INVALID_ROWS = ("error", "skip")
TOO_LONG = ("truncate", "drop", "error")
_EXTRA = "\x00extra"  # csv.DictReader's key for fields beyond the header
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclass
class Source:
    """One entry of a mixture: where the rows come from and the fraction of them to use."""

    path: str
    weight: float = 1.0


@dataclass
class Row:
    """A raw row and the place it came from (for error messages): `file:line` for JSON lines, `file: row N` else."""

    data: dict
    where: str


def parse_source(spec: str) -> Source:
    """Parse `PATH_OR_NAME[@WEIGHT]`; WEIGHT is a finite number > 0."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"data source {spec!r}: expected a file path or hub dataset name, optionally with @WEIGHT")
    path, sep, weight = spec.rpartition("@")
    if not sep:
        return Source(spec)
    try:
        w = float(weight)
    except ValueError:
        raise UserError(f"data source {spec!r}: weight {weight!r} after '@' is not a number") from None
    if not math.isfinite(w) or w <= 0:
        raise UserError(f"data source {spec!r}: weight {weight}; expected a finite number > 0")
    return Source(path, w)


# ---------------------------------------------------------------------------------------------------- reading


def read_text(path: str | Path) -> str:
    """The text of a file (.gz decompressed), as UTF-8; a file that is not gzip or not UTF-8 is one clear error."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: file not found")
    try:
        raw = gzip.open(p, "rb").read() if p.name.endswith(".gz") else p.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{p}: not a readable gzip file ({type(e).__name__}); expected gzip-compressed text") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{p}: line {line}: undecodable bytes at byte {e.start}; expected UTF-8 text") from None


def _base_suffix(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix.lower()


def _read_csv(p: Path, text: str, fieldnames: list[str] | None) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text), fieldnames=fieldnames, restkey=_EXTRA)
    rows = []
    try:
        for r in reader:
            line = reader.line_num
            if _EXTRA in r:
                raise UserError(f"{p}:{line}: {len(r) - 1 + len(r[_EXTRA])} fields, more than the "
                                f"{len(reader.fieldnames)} of the header; expected one value per column")
            if any(v is None for v in r.values()):
                raise UserError(f"{p}:{line}: fewer fields than the {len(reader.fieldnames)} of the header; expected one value per column")
            for k, v in r.items():  # a cell holding a JSON list (e.g. messages) is decoded
                if isinstance(v, str) and v.startswith("[{"):
                    try:
                        r[k] = json.loads(v)
                    except json.JSONDecodeError:
                        pass
            rows.append(Row(r, f"{p}:{line}"))
    except csv.Error as e:
        raise UserError(f"{p}:{reader.line_num}: not valid CSV ({e})") from None
    return rows


def read_file_rows(path: str | Path, fieldnames: list[str] | None = None) -> list[Row]:
    """Rows of one local .json / .jsonl / .parquet / .csv file (optionally .gz), each tagged with its place.

    `fieldnames` reads a CSV without a header row (e.g. the original MMLU files)."""
    p = Path(path)
    suffix = _base_suffix(p)
    if suffix not in LOCAL_SUFFIXES:
        raise UserError(f"{p}: unsupported file type; expected one of {', '.join(LOCAL_SUFFIXES)} (optionally .gz)")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not p.is_file():
            raise UserError(f"{p}: file not found")
        try:
            source = gzip.open(p, "rb") if p.name.endswith(".gz") else str(p)
            table = pq.read_table(source).to_pylist()
        except (pa.ArrowException, OSError, EOFError, zlib.error) as e:
            raise UserError(f"{p}: not a readable parquet file ({' '.join(str(e).split())[:120]})") from None
        return [Row(r, f"{p}: row {i}") for i, r in enumerate(table, 1)]
    text = read_text(p)
    if suffix == ".csv":
        return _read_csv(p, text, fieldnames)
    if suffix == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{p}: expected a JSON array of rows (or JSON lines), got a {type(data).__name__}")
        return [Row(r, f"{p}: row {i}") for i, r in enumerate(data, 1)]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(Row(json.loads(line), f"{p}:{i}"))
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{i}: not valid JSON ({e.msg})") from None
    return rows


def _is_local_data_file(p: Path) -> bool:
    return p.is_file() and _base_suffix(p) in LOCAL_SUFFIXES


def looks_local(spec: str) -> bool:
    """A path-like string (a suffix we read, ./ or / or ~, or more than one slash) rather than a hub `org/name`."""
    return _base_suffix(Path(spec)) in LOCAL_SUFFIXES + (".txt",) or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def read_rows(spec: str, split: str = "train", fieldnames: list[str] | None = None, config: str | None = None) -> list[Row]:
    """All rows of one source (file, directory of files, or hub dataset name with its `config`), each tagged with its place."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if _is_local_data_file(f))
        if not files:
            raise UserError(f"{spec}: directory has no {'/'.join(LOCAL_SUFFIXES)} files (optionally .gz)")
    elif p.is_file():
        files = [p]
    elif looks_local(spec):
        raise UserError(f"{spec}: data file not found")
    else:
        return _read_hub(spec, split, config)
    out = []
    for f in files:
        out += read_file_rows(f, fieldnames)
    return out


def _read_hub(name: str, split: str, config: str | None = None) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, unknown split: all user-fixable
        offline = " (HF_HUB_OFFLINE is set: only cached datasets load)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise UserError(f"{name}: not a local file and could not load hub dataset split {split!r}{offline} "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
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


def expand_paths(patterns: list[str], suffixes: tuple[str, ...] = TEXT_SUFFIXES, key: str = "") -> list[Path]:
    """Expand globs and directories into a sorted list of files with one of `suffixes`; a pattern matching nothing
    is an error (prefixed with the config `key` that named it, when given)."""
    where = f"{key}: " if key else ""
    if isinstance(patterns, str):
        raise UserError(f"{where}{patterns!r}: expected a list of files, globs or directories")
    files: list[Path] = []
    for pat in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        if not matches:
            raise UserError(f"{where}{pat}: no such file (expected {'/'.join(suffixes)} files, globs or directories)")
        for m in map(Path, matches):
            if m.is_dir():
                files += sorted(f for f in m.rglob("*") if f.is_file() and f.name.endswith(suffixes))
            else:
                files.append(m)
    for f in files:
        if not f.name.endswith(suffixes):
            raise UserError(f"{where}{f}: unsupported file type; expected one of {', '.join(suffixes)}")
    return files


def iter_file_documents(path: Path, text_column: str = "text", txt_split: str = "file") -> Iterator[str]:
    """Documents of one file. txt_split for .txt: 'file' (whole file), 'paragraph' (blank lines), 'line', or a
    separator line such as '<|endoftext|>' (TinyStories style). Row files give their `text_column`."""
    if path.name.endswith((".txt", ".txt.gz")):
        text = read_text(path)
        if txt_split == "file":
            docs = [text]
        elif txt_split == "paragraph":
            docs = text.split("\n\n")
        elif txt_split == "line":
            docs = text.split("\n")
        else:
            docs = [d.strip("\n") for d in text.split(txt_split)]
        yield from (d for d in docs if d.strip())
        return
    for row in read_file_rows(path):
        if not isinstance(row.data, dict) or not isinstance(row.data.get(text_column), str):
            raise UserError(f"{row.where}: expected an object with a string '{text_column}' field")
        yield row.data[text_column]


def iter_hub_documents(name: str, config: str | None, split: str, text_column: str) -> Iterator[str]:
    """Documents of a `datasets` hub dataset (streamed) or a local dataset directory/script."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # offline, missing, or malformed: one line for the user
        raise UserError(f"dataset {name!r}: could not load split {split!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for i, row in enumerate(ds):
        v = row.get(text_column)
        if not isinstance(v, str):
            raise UserError(f"dataset {name!r} row {i}: expected a string '{text_column}' column")
        yield v


def iter_documents(files: list[str] | None = None, dataset_name: str | None = None, dataset_config: str | None = None,
                   dataset_split: str = "train", text_column: str = "text", txt_split: str = "file",
                   key: str = "files") -> Iterator[str]:
    """All documents of the configured sources, files first, then the hub dataset."""
    for path in expand_paths(files or [], key=key):
        yield from iter_file_documents(path, text_column, txt_split)
    if dataset_name:
        yield from iter_hub_documents(dataset_name, dataset_config, dataset_split, text_column)


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


def read_prompt_rows(path: str, limit: int | None = None, split: str = "train") -> list[Row]:
    """Prompt rows (RL, on-policy pairs, win rate, `align generate`) with row.data["prompt"] validated: a non-empty
    string or a message list; other fields kept. A "messages" conversation or an hh-rlhf "chosen" dialogue, without
    its final assistant turns, is the prompt. A .txt file holds one prompt per non-empty line."""
    if str(path).endswith((".txt", ".txt.gz")):
        rows = [Row({"prompt": line}, f"{path}:{i}") for i, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]
        if not rows:
            raise UserError(f"{path}: no prompt rows; expected one prompt per line")
        return rows[:limit] if limit else rows
    rows = []
    for row in read_rows(path, split):
        d, where = row.data, row.where
        if isinstance(d, dict) and "messages" in d and "prompt" not in d:
            prompt = validate_messages(d["messages"], f"{where}: messages")
            while prompt and prompt[-1]["role"] == "assistant":
                prompt = prompt[:-1]
            if not prompt or prompt[-1]["role"] != "user":
                raise UserError(f"{where}: messages have no user turn before the assistant's; expected a prompt")
        elif isinstance(d, dict) and "prompt" in d:
            p = d["prompt"]
            if isinstance(p, list):
                prompt = validate_messages(p, f"{where}: prompt")
            elif isinstance(p, str) and p.strip():
                prompt = p
            else:
                raise UserError(f"{where}: prompt is {'empty' if isinstance(p, str) else type(p).__name__}; "
                                "expected a non-empty string or a list of messages")
        elif isinstance(d, dict) and isinstance(d.get("chosen"), str):
            prompt = parse_hh(d["chosen"], f"{where}: chosen")
            while prompt and prompt[-1]["role"] == "assistant":
                prompt = prompt[:-1]
            if not prompt:
                raise UserError(f"{where}: the dialogue has no turn before the assistant's; expected a prompt")
        else:
            raise UserError(f"{where}: expected a 'prompt' (messages or a string), 'messages', or an hh-rlhf 'chosen' dialogue")
        rows.append(Row({**d, "prompt": prompt}, where))
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"{path}: no prompt rows")
    return rows


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def encode_prompts(tokenizer, rows: list[Row], context: int, response_length: int, long_prompts: str = "error") -> list[dict]:
    """The prompt rows with "prompt" as messages and "input_ids" added, rendered with the chat template and the generation
    prompt (special-token safe). A prompt that leaves no room for response_length tokens in the context is an error
    naming its row, or with long_prompts="skip" is dropped and counted."""
    if long_prompts not in ("error", "skip"):
        raise UserError(f"long_prompts: {long_prompts!r}; expected 'error' or 'skip'")
    if response_length >= context:
        raise UserError(f"response_length: {response_length} leaves no room for a prompt in the model context of {context} tokens")
    out, skipped = [], 0
    for r in rows:
        msgs = as_messages(r.data["prompt"])
        ids = encode_prompt(tokenizer, msgs)
        if len(ids) + response_length > context:
            if long_prompts == "skip":
                skipped += 1
                continue
            raise UserError(f"{r.where}: prompt is {len(ids)} tokens; with response_length {response_length} that exceeds "
                            f"the model context of {context} tokens (or set long_prompts: skip)")
        out.append({**r.data, "prompt": msgs, "input_ids": ids})
    if skipped:
        print(f"prompts: skipped {skipped} of {len(rows)} too long for the context", file=sys.stderr)
    if not out:
        raise UserError(f"prompts: no prompt fits the context of {context} tokens with response_length {response_length}")
    return out


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
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    meta = {k: v for k, v in d.items() if k not in ("prompt", "chosen", "rejected") and isinstance(v, (str, int, float, bool))}
    if meta:  # the row's other plain fields (e.g. tinyworld's rejected_kind), for per-group reports
        pair["meta"] = meta
    return pair


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


def prompt_columns(prompts: list[dict]) -> list[dict]:
    """Encoded prompt rows as dataset rows for TRL's online trainers: the prompt messages and the other fields every row
    has with plain values (the answer a checker reads, ...), which TRL hands to reward functions as columns."""
    def plain(v):
        return isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v))

    common = set.intersection(*(set(p) for p in prompts)) - {"prompt", "input_ids"}
    keep = sorted(k for k in common if all(plain(p[k]) for p in prompts))
    return [{"prompt": p["prompt"], **{k: p[k] for k in keep}} for p in prompts]


def load_conversations(specs, split: str, seed: int, invalid_rows: str, label: str) -> tuple[list, list[str]]:
    """Rows of a mixture -> validated chat conversations for SFT, and the place each came from."""
    rows = load_mixture(specs, split=split, seed=seed)
    kept = convert_rows(rows, lambda r: (sft_messages(r), r.where), invalid_rows, label)
    return [c for c, _ in kept], [w for _, w in kept]


def load_preference_pairs(specs, split: str, seed: int, invalid_rows: str, label: str) -> tuple[list, list[str]]:
    """Rows of a mixture -> validated conversational preference pairs, and the place each came from."""
    rows = load_mixture(specs, split=split, seed=seed)
    kept = convert_rows(rows, lambda r: (preference_pair(r), r.where), invalid_rows, label)
    return [p for p, _ in kept], [w for _, w in kept]


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


def tokenize_preference(tokenizer, pairs: list[dict], max_length: int | None, too_long: str = "truncate",
                        label: str = "preference", wheres: list[str] | None = None) -> list[dict]:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} per pair; over-long pairs keep the end of the prompt."""
    _check_too_long(too_long)
    out, n_long, n_dropped = [], 0, 0
    for i, p in enumerate(pairs):
        where = wheres[i] if wheres else f"{label}: pair {i}"
        prompt_ids = encode_prompt(tokenizer, p["prompt"])
        chosen = reply_ids(tokenizer, prompt_ids, p["prompt"], p["chosen"][0]["content"], where)
        rejected = reply_ids(tokenizer, prompt_ids, p["prompt"], p["rejected"][0]["content"], where)
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
        out.append({"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected, **({"group": p["group"]} if "group" in p else {})})
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
