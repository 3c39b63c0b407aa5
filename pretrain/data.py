"""Prepare a pretraining corpus: clean, filter, deduplicate, decontaminate, tokenize and pack into token shards.

    align prepare --config recipes/tiny/prepare.yaml
    align prepare --config recipes/shakespeare/prepare.yaml --files '["../shared/data/pretrain/tinyshakespeare.txt"]'

Documents flow through the steps below; the report counts how many each step removed:

1. clean      Unicode normalization (NFC by default), control characters removed, line endings unified.
2. filter     Gopher-style quality rules: word count, mean word length, symbol-to-word ratio, fraction of
              duplicated lines, fraction of words with a letter. The first rule a document fails is counted.
3. dedup      exact (hash of lower-cased, whitespace-collapsed text), then near-duplicates (MinHash LSH from
              `datasketch` over word shingles, Jaccard threshold from the config).
4. decontam   drop documents sharing a word 13-gram with any evaluation file named in the config.
5. split      by document with a seeded shuffle (or the val split read from `val_files`).
6. pack       tokenize in parallel with `datasets.map` through the special-token-safe `encode_document`
              (end-of-text appended), then write `<split>_NNN.bin` (np.memmap, uint16 when the vocabulary
              fits, else uint32) and `meta.json` (tokenizer hash, counts) and `report.json`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignment.config import parse_config, save_config
from alignment.errors import UserError, exit_on_user_error
from alignment.io import atomic_dir, check_output_dir
from alignment.data import expand_paths, iter_documents, read_file_rows

# C0/C1 control characters except tab and newline, plus zero-width and BOM characters that only hide text
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]")
_WORD_RE = re.compile(r"\w+")
_SYMBOLS = ("#", "...", "\u2026")  # Gopher counts hash marks and ellipses per word


@dataclass
class PrepareConfig:
    """Corpus preparation: sources, cleaning and filter thresholds, deduplication, decontamination, packing."""

    output_dir: str = field(default="runs/tiny/packed", metadata={"help": "Where shards, meta.json and report.json are written."})
    tokenizer: str = field(default="runs/tiny/tokenizer", metadata={"help": "Tokenizer directory (from `align tokenizer`)."})
    files: list[str] = field(default_factory=list, metadata={"help": "Local .txt/.jsonl/.json/.parquet files, globs or directories."})
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` hub name read after the files."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Hub dataset split."})
    text_column: str = field(default="text", metadata={"help": "Text field of .jsonl/.json/.parquet rows and hub rows."})
    txt_split: str = field(default="paragraph", metadata={"help": "How .txt files split into documents: file, paragraph, line, or a separator "
                                                                  "string."})
    val_files: list[str] = field(default_factory=list, metadata={"help": "Files whose documents form the val split (default: a seeded fraction of "
                                                                         "the documents)."})
    val_fraction: float = field(default=0.05, metadata={"help": "Fraction of documents held out for validation when val_files is empty."})
    seed: int = field(default=0, metadata={"help": "Seed of the document split."})
    normalization: str = field(default="NFC", metadata={"help": "Unicode normalization form: NFC, NFKC, NFD, NFKD or none."})
    min_words: int = field(default=5, metadata={"help": "Drop documents with fewer words."})
    max_words: int = field(default=200_000, metadata={"help": "Drop documents with more words."})
    min_mean_word_length: float = field(default=2.0, metadata={"help": "Drop documents whose mean word length is below this."})
    max_mean_word_length: float = field(default=12.0, metadata={"help": "Drop documents whose mean word length is above this."})
    max_symbol_ratio: float = field(default=0.1, metadata={"help": "Drop documents with more '#' and ellipses per word than this."})
    max_duplicate_line_fraction: float = field(default=0.3, metadata={"help": "Drop documents whose fraction of repeated lines exceeds this."})
    min_alpha_word_fraction: float = field(default=0.0, metadata={"help": "Drop documents where fewer words contain a letter (Gopher: 0.8; 0 = "
                                                                          "off)."})
    dedup_exact: bool = field(default=True, metadata={"help": "Remove exact duplicates (after lower-casing and collapsing whitespace)."})
    dedup_near: bool = field(default=True, metadata={"help": "Remove near-duplicates with MinHash LSH."})
    near_threshold: float = field(default=0.8, metadata={"help": "Estimated Jaccard similarity above which a document is a near-duplicate."})
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations."})
    shingle_words: int = field(default=5, metadata={"help": "Words per shingle for MinHash."})
    decontaminate_files: list[str] = field(default_factory=list, metadata={"help": "Evaluation files (.csv MMLU-style, .jsonl, .txt, globs or dirs) "
                                                                                   "whose n-grams training must not contain."})
    decontaminate_ngram: int = field(default=13, metadata={"help": "Word n-gram length for decontamination."})
    num_proc: int = field(default=2, metadata={"help": "Worker processes for tokenization."})
    shard_tokens: int = field(default=100_000_000, metadata={"help": "Maximum tokens per shard file."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output directory."})


# ---------------------------------------------------------------------------------------------- cleaning, filters

def clean_text(text: str, normalization: str = "NFC") -> str:
    """Normalize Unicode, unify line endings, remove control characters and trailing spaces."""
    if normalization.upper() != "NONE":
        text = unicodedata.normalize(normalization.upper(), text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def quality_failure(text: str, cfg: PrepareConfig) -> str | None:
    """The name of the first quality rule the document fails, or None when it passes them all."""
    words = text.split()
    n = len(words)
    if n < cfg.min_words:
        return "min_words"
    if n > cfg.max_words:
        return "max_words"
    mean_len = sum(map(len, words)) / n
    if mean_len < cfg.min_mean_word_length:
        return "min_mean_word_length"
    if mean_len > cfg.max_mean_word_length:
        return "max_mean_word_length"
    if sum(text.count(s) for s in _SYMBOLS) / n > cfg.max_symbol_ratio:
        return "max_symbol_ratio"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > cfg.max_duplicate_line_fraction:
        return "max_duplicate_line_fraction"
    if cfg.min_alpha_word_fraction > 0 and sum(any(c.isalpha() for c in w) for w in words) / n < cfg.min_alpha_word_fraction:
        return "min_alpha_word_fraction"
    return None


# ---------------------------------------------------------------------------------------------- deduplication

def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def exact_key(text: str) -> str:
    """Hash of the lower-cased, whitespace-collapsed text: formatting-only copies collide."""
    return hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def near_duplicates(docs: list[str], threshold: float, num_perm: int, shingle_words: int) -> set[int]:
    """Indices of documents that are near-duplicates of an earlier kept document (MinHash LSH)."""
    from datasketch import MinHash, MinHashLSH
    from tqdm.auto import tqdm

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    dropped: set[int] = set()
    for i, text in enumerate(tqdm(docs, desc="near-dedup", mininterval=2, disable=len(docs) < 5000)):
        w = _words(text)
        shingles = {" ".join(w[j:j + shingle_words]) for j in range(max(1, len(w) - shingle_words + 1))}
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in shingles])
        if lsh.query(m):
            dropped.add(i)
        else:
            lsh.insert(i, m)
    return dropped


# ---------------------------------------------------------------------------------------------- decontamination

def eval_texts(patterns: list[str]) -> list[str]:
    """Texts of evaluation files: a CSV row's cells (an MMLU-style question and choices; the answer index left out),
    every string of a JSON-lines row, or .txt paragraphs."""
    texts: list[str] = []
    for path in expand_paths(patterns, suffixes=(".csv", ".jsonl", ".jsonl.gz", ".txt"), key="decontaminate_files"):
        if path.name.endswith((".csv", ".jsonl", ".jsonl.gz")):
            is_csv = path.name.endswith(".csv")
            for row in read_file_rows(path):
                data = {k: v for k, v in row.data.items() if k != "answer"} if is_csv else row.data
                texts.append(" ".join(_strings(data)))
        else:
            texts += list(iter_documents([str(path)], txt_split="paragraph", key="decontaminate_files"))
    return texts


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def ngram_set(texts: list[str], n: int) -> set[tuple[str, ...]]:
    """All word n-grams (lower-cased) of the texts; texts shorter than n words contribute none."""
    grams: set[tuple[str, ...]] = set()
    for t in texts:
        w = _words(t)
        grams.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return grams


def is_contaminated(text: str, grams: set, n: int) -> bool:
    """True when the document contains any of the evaluation n-grams."""
    w = _words(text)
    return any(tuple(w[i:i + n]) in grams for i in range(len(w) - n + 1))


# ---------------------------------------------------------------------------------------------- tokenize, pack

_TOKENIZERS: dict = {}


def _tokenize_batch(batch, tokenizer_dir: str):
    """datasets.map worker: encode each document safely and append end-of-text (tokenizer cached per process)."""
    from alignment.tokens import encode_document

    if tokenizer_dir not in _TOKENIZERS:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.model_max_length = 1 << 62  # documents are packed, not fed whole: silence the length warning
        _TOKENIZERS[tokenizer_dir] = tok
    tok = _TOKENIZERS[tokenizer_dir]
    ids = [encode_document(tok, t) for t in batch["text"]]
    return {"ids": ids, "n": [len(x) for x in ids]}


def token_dtype(vocab_size: int):
    """uint16 when every id fits, else uint32."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def pack_split(docs: list[str], name: str, out_dir: Path, cfg: PrepareConfig, dtype) -> dict:
    """Tokenize `docs` in parallel and write them as consecutive token shards; returns the split's meta."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": docs})
    # a worker costs a second or two to start: only worth it for corpora of some size
    num_proc = cfg.num_proc if cfg.num_proc > 1 and len(docs) >= 200 * cfg.num_proc else None
    ds = ds.map(_tokenize_batch, batched=True, batch_size=256, num_proc=num_proc, remove_columns=["text"],
                fn_kwargs={"tokenizer_dir": str(cfg.tokenizer)}, desc=f"tokenize {name}")
    lengths = np.asarray(ds["n"], dtype=np.int64)
    total = int(lengths.sum())
    shards, written, k = [], 0, 0
    mm, pos, shard_len = None, 0, 0
    for batch in ds.iter(batch_size=1024):
        arr = np.fromiter((t for ids in batch["ids"] for t in ids), dtype=dtype)
        while len(arr):
            if mm is None or pos == shard_len:
                if mm is not None:
                    mm.flush()
                shard_len = min(cfg.shard_tokens, total - written)
                fname = f"{name}_{k:03d}.bin"
                mm = np.memmap(out_dir / fname, dtype=dtype, mode="w+", shape=(shard_len,))
                shards.append({"file": fname, "tokens": shard_len})
                k, pos = k + 1, 0
            take = min(len(arr), shard_len - pos)
            mm[pos:pos + take] = arr[:take]
            pos, written, arr = pos + take, written + take, arr[take:]
    if mm is not None:
        mm.flush()
        del mm
    return {"documents": len(docs), "tokens": total, "bytes": sum(len(d.encode("utf-8")) for d in docs), "shards": shards}


# ---------------------------------------------------------------------------------------------- the stage

def _read(cfg: PrepareConfig, files: list[str], with_hub: bool) -> list[str]:
    return list(iter_documents(files, cfg.dataset_name if with_hub else None, cfg.dataset_config, cfg.dataset_split,
                               cfg.text_column, cfg.txt_split, key="val_files" if not with_hub else "files"))


def main(cfg: PrepareConfig) -> dict:
    """Run the pipeline and write the packed corpus atomically; returns the report."""
    from tqdm.auto import tqdm

    from alignment.tokens import tokenizer_hash

    t0 = time.time()
    check_output_dir(cfg.output_dir, cfg.overwrite)
    if not Path(cfg.tokenizer, "tokenizer.json").is_file():
        raise UserError(f"tokenizer: {cfg.tokenizer}: no tokenizer.json; expected a directory from `align tokenizer`")
    if cfg.normalization.upper() not in ("NFC", "NFKC", "NFD", "NFKD", "NONE"):
        raise UserError(f"normalization: {cfg.normalization!r}; expected NFC, NFKC, NFD, NFKD or none")
    if not cfg.files and not cfg.dataset_name:
        raise UserError("files: no corpus given; expected local files (files: [...]) or a dataset_name")
    if not cfg.val_files and not 0 < cfg.val_fraction < 1:
        raise UserError(f"val_fraction: {cfg.val_fraction}; expected a number between 0 and 1 (or val_files)")
    if not 0 < cfg.near_threshold <= 1:
        raise UserError(f"near_threshold: {cfg.near_threshold}; expected a number in (0, 1]")

    # read: val documents first, so that a training copy of a val document is the one deduplication removes
    val_raw = _read(cfg, cfg.val_files, with_hub=False) if cfg.val_files else []
    train_raw = _read(cfg, cfg.files, with_hub=True)
    raw = val_raw + train_raw
    is_val = [True] * len(val_raw) + [False] * len(train_raw)
    report: dict = {"documents_in": len(raw), "removed": {}}
    removed = report["removed"]

    def keep(mask_fn, name, docs, flags):
        kept_docs, kept_flags, n = [], [], 0
        for d, v in zip(docs, flags):
            if mask_fn(d):
                kept_docs.append(d)
                kept_flags.append(v)
            else:
                n += 1
        removed[name] = n
        return kept_docs, kept_flags

    docs = [clean_text(d, cfg.normalization) for d in raw]
    docs, is_val = keep(lambda d: bool(d.strip()), "empty_after_cleaning", docs, is_val)

    failures = [quality_failure(d, cfg) for d in docs]
    for rule in ("min_words", "max_words", "min_mean_word_length", "max_mean_word_length", "max_symbol_ratio",
                 "max_duplicate_line_fraction", "min_alpha_word_fraction"):
        removed[f"filter_{rule}"] = failures.count(rule)
    docs, is_val = [d for d, f in zip(docs, failures) if f is None], [v for v, f in zip(is_val, failures) if f is None]

    if cfg.dedup_exact:
        seen: set[str] = set()

        def first_copy(d):
            k = exact_key(d)
            if k in seen:
                return False
            seen.add(k)
            return True

        docs, is_val = keep(first_copy, "exact_duplicates", docs, is_val)
    if cfg.dedup_near and docs:
        near = near_duplicates(docs, cfg.near_threshold, cfg.num_perm, cfg.shingle_words)
        removed["near_duplicates"] = len(near)
        docs, is_val = [d for i, d in enumerate(docs) if i not in near], [v for i, v in enumerate(is_val) if i not in near]
    if cfg.decontaminate_files:
        texts = eval_texts(cfg.decontaminate_files)
        grams = ngram_set(texts, cfg.decontaminate_ngram)
        report["decontamination"] = {"eval_texts": len(texts), "ngrams": len(grams), "n": cfg.decontaminate_ngram}
        # only training documents are dropped: val text is what we measure on, not what we learn from
        flags = [v or not is_contaminated(d, grams, cfg.decontaminate_ngram) for d, v in
                 zip(tqdm(docs, desc="decontaminate", mininterval=2, disable=len(docs) < 5000), is_val)]
        removed["contaminated"] = flags.count(False)
        docs, is_val = [d for d, f in zip(docs, flags) if f], [v for v, f in zip(is_val, flags) if f]

    if cfg.val_files:
        train_docs = [d for d, v in zip(docs, is_val) if not v]
        val_docs = [d for d, v in zip(docs, is_val) if v]
    else:
        order = list(range(len(docs)))
        random.Random(cfg.seed).shuffle(order)
        n_val = max(1, round(len(docs) * cfg.val_fraction)) if len(docs) > 1 else 0
        val_docs = [docs[i] for i in sorted(order[:n_val])]
        train_docs = [docs[i] for i in sorted(order[n_val:])]
    if not train_docs:
        raise UserError(f"files: every training document was removed (of {len(raw)}: {', '.join(f'{k} {v}' for k, v in removed.items() if v)}); "
                        "expected some documents to pass the filters (loosen min_words and the other thresholds?)")
    if not val_docs:
        raise UserError("val split: no validation documents are left; expected val_files with text or more documents")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    dtype = token_dtype(len(tok))
    with atomic_dir(cfg.output_dir, cfg.overwrite, stage="prepare") as tmp:
        splits = {"train": pack_split(train_docs, "train", tmp, cfg, dtype), "val": pack_split(val_docs, "val", tmp, cfg, dtype)}
        meta = {
            "format": "packed-tokens/1",
            "tokenizer": str(cfg.tokenizer),
            "tokenizer_hash": tokenizer_hash(cfg.tokenizer),
            "vocab_size": len(tok),
            "eot_id": tok.eos_token_id,
            "dtype": np.dtype(dtype).name,
            "splits": splits,
        }
        report.update({"documents_out": len(train_docs) + len(val_docs),
                       "splits": {k: {x: v[x] for x in ("documents", "tokens", "bytes")} for k, v in splits.items()},
                       "seconds": round(time.time() - t0, 1)})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        save_config(tmp, cfg)
    print(format_report(report, cfg.output_dir))
    return report


def format_report(report: dict, out: str) -> str:
    """The prep report as a printed table."""
    rows = [("documents in", report["documents_in"])] + [(k.replace("_", " "), -v) for k, v in report["removed"].items()]
    rows.append(("documents out", report["documents_out"]))
    for name, s in report["splits"].items():
        rows.append((f"{name}: documents / tokens / bytes", f"{s['documents']} / {s['tokens']} / {s['bytes']}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"prepare: {out} in {report['seconds']}s"]
    lines += [f"  {k:<{width}}  {v:>10}" if isinstance(v, int) else f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


@exit_on_user_error
def cli(argv=None) -> None:
    (cfg,) = parse_config([PrepareConfig], argv)
    main(cfg)


if __name__ == "__main__":
    cli()
