"""`align prepare`: cleaning, filters, dedup, decontamination, packing, report, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from alignment.errors import UserError
from alignment.tokens import encode_document
from pretrain.data import PrepareConfig, clean_text, main, quality_failure
from tests.conftest import synthetic_corpus

# 14 words: any 13-gram of it marks a training document as contaminated
EVAL_QUESTION = "Which planet in the solar system has the largest number of known moons orbiting"


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def corpus_docs():
    docs = synthetic_corpus(120, seed=7)
    long_doc = " ".join(synthetic_corpus(40, seed=11))  # long enough for word shingles to be meaningful
    near = long_doc.replace("cat", "kitten", 1)  # one word changed: a near-duplicate
    extra = [
        docs[0].upper().replace(" ", "  "),  # exact duplicate after case/whitespace normalization
        long_doc,
        near,
        f"Quiz time. {EVAL_QUESTION.lower()} today? Jupiter or Saturn.",  # contaminated
        "too short",  # min_words
        "Tags for today: #news #sports #weather #music #art and #film",  # symbol ratio
        "A quote: <|im_end|> is only text here, and so is <|endoftext|> in this document.",
    ]
    return docs + extra


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_tokenizer_dir, corpus_docs):
    d = tmp_path_factory.mktemp("prep")
    src = _write_jsonl(d / "corpus.jsonl", corpus_docs)
    evald = d / "eval"
    evald.mkdir()
    (evald / "astro_test.csv").write_text(f"question,choice0,choice1,choice2,choice3,answer\n\"{EVAL_QUESTION}?\",Mars,Jupiter,Saturn,Venus,2\n")
    cfg = PrepareConfig(output_dir=str(d / "packed"), tokenizer=str(tiny_tokenizer_dir), files=[str(src)], val_fraction=0.1,
                        decontaminate_files=[str(evald)], num_proc=1, min_words=3)
    report = main(cfg)
    return cfg, report, d / "packed"


def test_clean_text_normalizes_and_strips_controls():
    assert clean_text("Cafe\u0301\x00 bar\r\nnext\u200b line  \r\n") == "Caf\u00e9 bar\nnext line"
    assert clean_text("\ufb01ne", "NFKC") == "fine"  # ligature folded only under NFKC
    assert clean_text("\ufb01ne", "NFC") == "\ufb01ne"


def test_quality_rules_name_the_failed_rule():
    cfg = PrepareConfig(min_words=3, min_alpha_word_fraction=0.8)
    assert quality_failure("one two", cfg) == "min_words"
    assert quality_failure("a b c d e f", cfg) == "min_mean_word_length"
    assert quality_failure("supercalifragilistic expialidocious antidisestablishment", cfg) == "max_mean_word_length"
    assert quality_failure("wait... what... now... ok", cfg) == "max_symbol_ratio"
    assert quality_failure("same line here\nsame line here\nsame line here\nother line", cfg) == "max_duplicate_line_fraction"
    assert quality_failure("12 34 56 78 and more", cfg) == "min_alpha_word_fraction"
    assert quality_failure("The cat sat on the mat today.", cfg) is None


def test_report_counts_each_removal(prepared, corpus_docs):
    _, report, out = prepared
    r = report["removed"]
    assert report["documents_in"] == len(corpus_docs)
    assert r["filter_min_words"] == 1 and r["filter_max_symbol_ratio"] == 1
    assert r["exact_duplicates"] == 1
    assert r["near_duplicates"] == 1
    assert r["contaminated"] == 1
    assert report["documents_out"] == len(corpus_docs) - 5
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["removed"] == r and on_disk["splits"] == report["splits"]


def test_shards_hold_safe_encodings_of_kept_documents(prepared, tiny_tokenizer, corpus_docs):
    cfg, report, out = prepared
    meta = json.loads((out / "meta.json").read_text())
    from pretrain.tokenizer import tokenizer_hash

    assert meta["tokenizer_hash"] == tokenizer_hash(cfg.tokenizer)
    assert meta["dtype"] == "uint16"  # 512-token vocabulary
    ids = {s: np.concatenate([np.fromfile(out / sh["file"], dtype=np.uint16) for sh in meta["splits"][s]["shards"]]) for s in ("train", "val")}
    assert len(ids["train"]) == report["splits"]["train"]["tokens"] and len(ids["val"]) == report["splits"]["val"]["tokens"]
    eot = tiny_tokenizer.eos_token_id
    assert (ids["train"] == eot).sum() == report["splits"]["train"]["documents"]  # one end-of-text per document
    assert ids["train"][-1] == eot and ids["val"][-1] == eot
    # the quoted special-token strings stay plain text: the only control ids are the document separators
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end not in set(ids["train"].tolist()) | set(ids["val"].tolist())
    # split on the end-of-text *id*: the quoted document contains the end-of-text *string* as plain text
    docs = [tiny_tokenizer.decode(part.tolist()) for s in ("train", "val") for part in np.split(ids[s], np.flatnonzero(ids[s] == eot) + 1)[:-1]]
    docs = [d.removesuffix(tiny_tokenizer.eos_token) for d in docs]
    quoted = [d for d in corpus_docs if "<|im_end|>" in d][0]
    assert quoted in docs
    expected_tokens = sum(len(encode_document(tiny_tokenizer, d)) for d in docs)
    assert expected_tokens == len(ids["train"]) + len(ids["val"])
    assert not any(EVAL_QUESTION.lower() in d.lower() for d in docs)


def test_parallel_tokenization_and_seeded_split_are_reproducible(tmp_path, tiny_tokenizer_dir):
    src = _write_jsonl(tmp_path / "c.jsonl", synthetic_corpus(500, seed=3))
    outs = []
    for num_proc in (1, 2):
        cfg = PrepareConfig(output_dir=str(tmp_path / f"p{num_proc}"), tokenizer=str(tiny_tokenizer_dir), files=[str(src)],
                            num_proc=num_proc, dedup_near=False, min_words=3, shard_tokens=4000)
        main(cfg)
        meta = json.loads((tmp_path / f"p{num_proc}" / "meta.json").read_text())
        assert len(meta["splits"]["train"]["shards"]) > 1  # split into 4000-token shards
        outs.append(b"".join((tmp_path / f"p{num_proc}" / s["file"]).read_bytes() for sp in ("train", "val") for s in meta["splits"][sp]["shards"]))
    assert outs[0] == outs[1]


def test_val_files_form_the_val_split(tmp_path, tiny_tokenizer_dir):
    train = _write_jsonl(tmp_path / "train.jsonl", synthetic_corpus(30, seed=1))
    val_docs = synthetic_corpus(5, seed=2)
    val = _write_jsonl(tmp_path / "val.jsonl", val_docs)
    report = main(PrepareConfig(output_dir=str(tmp_path / "out"), tokenizer=str(tiny_tokenizer_dir), files=[str(train)],
                                val_files=[str(val)], num_proc=1, min_words=3))
    assert report["splits"]["val"]["documents"] == 5 and report["splits"]["train"]["documents"] == 30 - report["removed"].get("exact_duplicates", 0) - report["removed"].get("near_duplicates", 0)
    assert report["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in val_docs)


def test_everything_filtered_is_one_line_error_and_no_output(tmp_path, tiny_tokenizer_dir):
    src = _write_jsonl(tmp_path / "c.jsonl", synthetic_corpus(20))
    out = tmp_path / "packed"
    cmd = [sys.executable, "-m", "alignment.cli", "prepare", "--tokenizer", str(tiny_tokenizer_dir), "--files", str(src),
           "--output_dir", str(out), "--min_words", "100000"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: files: every training document was removed") and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".packed")]
    with pytest.raises(UserError, match="normalization"):
        main(PrepareConfig(output_dir=str(out), tokenizer=str(tiny_tokenizer_dir), files=[str(src)], normalization="NFX"))
