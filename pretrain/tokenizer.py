"""Train a byte-level BPE tokenizer with reserved special tokens and a chat template.

    align tokenizer --config recipes/tiny/tokenizer.yaml
    python -m pretrain.tokenizer --config recipes/tiny/tokenizer.yaml --vocab_size 8192

Special tokens are reserved when the tokenizer is trained (ids 0..N-1), never added later: end of text, padding,
ChatML role markers and a block of reserved tokens for future use. The output directory is a plain
`PreTrainedTokenizerFast` directory plus `compression.json`: bytes per token on held-out text next to a reference
tokenizer (sentencepiece BPE) trained on the same text at the same vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignment.config import parse_config, save_config
from alignment.errors import UserError, exit_on_user_error
from alignment.io import atomic_dir, check_output_dir
from alignment.data import iter_documents
from alignment.tokens import encode_text, tokenizer_hash

EOT, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"

# ChatML with {% generation %} markers around what the assistant must learn to say, end-of-turn included,
# so TRL's assistant_only_loss (and our encode_chat mask) trains the model to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role ' + message['role'] + '; expected system, user or assistant') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def special_tokens(num_reserved: int) -> list[str]:
    """The special tokens in id order: end of text, padding, role markers, then <|reserved_i|>."""
    return [EOT, PAD, IM_START, IM_END] + [f"<|reserved_{i}|>" for i in range(num_reserved)]


@dataclass
class TokenizerConfig:
    """Byte-level BPE tokenizer training."""

    output_dir: str = field(default="runs/tokenizer", metadata={"help": "Where the tokenizer directory is written."})
    files: list[str] = field(default_factory=list, metadata={"help": "Local .txt/.jsonl/.json/.parquet files, globs or directories."})
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` hub name (streamed) used after the files."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Hub dataset split."})
    text_column: str = field(default="text", metadata={"help": "Text field of .jsonl/.json/.parquet rows and hub rows."})
    txt_split: str = field(default="file", metadata={"help": "How .txt files split into documents: file, paragraph, line, or a separator string."})
    vocab_size: int = field(default=4096, metadata={"help": "Total vocabulary size, special tokens included."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair frequency for a merge."})
    num_reserved_tokens: int = field(default=16, metadata={"help": "How many <|reserved_i|> tokens to set aside for later use."})
    split_digits: bool = field(default=True, metadata={"help": "Split numbers into single digits before BPE (helps arithmetic)."})
    model_max_length: int = field(default=512, metadata={"help": "Saved as the tokenizer's model_max_length."})
    heldout_fraction: float = field(default=0.05, metadata={"help": "Fraction of text held out for the compression report."})
    max_train_chars: int = field(default=0, metadata={"help": "Stop reading training text after this many characters (0 = all)."})
    reference: str = field(default="sentencepiece", metadata={"help": "Reference tokenizer for the compression report: sentencepiece or none."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output directory."})


def split_heldout(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic held-out split: every doc whose hash falls under `fraction` when there are many documents,
    otherwise the last `fraction` of each document's lines."""
    if fraction <= 0:
        return docs, []
    if len(docs) >= 20:
        bucket = lambda d: int(hashlib.sha1(d.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF  # noqa: E731
        train = [d for d in docs if bucket(d) >= fraction]
        held = [d for d in docs if bucket(d) < fraction]
        if train and held:
            return train, held
    train, held = [], []
    for d in docs:
        lines = d.split("\n")
        k = max(1, int(len(lines) * (1 - fraction))) if len(lines) > 1 else len(lines)
        train.append("\n".join(lines[:k]))
        if lines[k:]:
            held.append("\n".join(lines[k:]))
    return train, held


def build_tokenizer(docs: list[str], cfg: TokenizerConfig):
    """Train the byte-level BPE on `docs` and wrap it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens(cfg.num_reserved_tokens)
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if cfg.split_digits else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,  # ids 0..len(specials)-1, reserved at training time
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes, no <unk>
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(docs, trainer, length=len(docs))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,  # documents are separated (and lm-eval's rolling windows prefixed) by end of text
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=specials[2:],
        model_max_length=cfg.model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def bytes_per_token(encode, lines: list[str]) -> tuple[float, int, int]:
    """(bytes/token, bytes, tokens) of encoding each non-empty line separately."""
    n_bytes = n_tok = 0
    for line in lines:
        if line:
            n_bytes += len(line.encode("utf-8"))
            n_tok += len(encode(line))
    return (n_bytes / n_tok if n_tok else 0.0), n_bytes, n_tok


def reference_sentencepiece(train_docs: list[str], vocab_size: int, workdir: Path):
    """Train a sentencepiece BPE (byte fallback) at the same vocabulary size; returns its encode or a reason."""
    try:
        import sentencepiece as spm
    except ImportError:
        return None, "sentencepiece is not installed (pip install sentencepiece)"
    lines = [ln for d in train_docs for ln in d.split("\n") if ln.strip()]
    prefix = workdir / "reference_sp"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, minloglevel=2, num_threads=2,
            max_sentence_length=1 << 16,
        )
    except RuntimeError as e:
        return None, f"sentencepiece could not train at this size ({str(e).splitlines()[-1]})"
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    for ext in (".model", ".vocab"):
        Path(str(prefix) + ext).unlink(missing_ok=True)
    return sp.encode, None


def main(cfg: TokenizerConfig) -> dict:
    """Train, report compression, save; returns the compression report."""
    t0 = time.time()
    check_output_dir(cfg.output_dir, cfg.overwrite)
    n_special = 4 + cfg.num_reserved_tokens
    if cfg.vocab_size < 256 + n_special:
        raise UserError(f"vocab_size: {cfg.vocab_size} is too small; expected at least 256 bytes + {n_special} special tokens = {256 + n_special}")
    if not cfg.files and not cfg.dataset_name:
        raise UserError("files: no corpus given; expected local files (files: [...]) or a dataset_name")

    docs, chars = [], 0
    for d in iter_documents(cfg.files, cfg.dataset_name, cfg.dataset_config, cfg.dataset_split, cfg.text_column, cfg.txt_split):
        docs.append(d)
        chars += len(d)
        if cfg.max_train_chars and chars >= cfg.max_train_chars:
            break
    if not any(d.strip() for d in docs):
        raise UserError(f"{', '.join(cfg.files) or cfg.dataset_name}: the corpus is empty; expected some text")
    train_docs, held_docs = split_heldout(docs, cfg.heldout_fraction)

    tok = build_tokenizer(train_docs, cfg)
    if len(tok) < cfg.vocab_size:
        print(f"note: the corpus supports only {len(tok)} tokens (asked for {cfg.vocab_size}); BPE ran out of pairs to merge", file=sys.stderr)
    held_lines = [ln for d in held_docs for ln in d.split("\n")]
    ours, n_bytes, n_tok = bytes_per_token(lambda s: encode_text(tok, s), held_lines)
    report = {
        "vocab_size": len(tok),
        "heldout_bytes": n_bytes,
        "ours": {"kind": "byte-level BPE (tokenizers)", "bytes_per_token": round(ours, 4), "tokens": n_tok},
        "special_tokens": special_tokens(cfg.num_reserved_tokens),
    }
    with atomic_dir(cfg.output_dir, cfg.overwrite, stage="tokenizer") as tmp:
        if cfg.reference == "sentencepiece" and held_lines:
            encode_ref, why = reference_sentencepiece(train_docs, cfg.vocab_size, tmp)
            if encode_ref:
                ref, _, ref_tok = bytes_per_token(encode_ref, held_lines)
                report["reference"] = {"kind": "sentencepiece BPE (byte fallback)", "bytes_per_token": round(ref, 4), "tokens": ref_tok}
                report["ratio_ours_over_reference"] = round(ours / ref, 4) if ref else None
            else:
                report["reference"] = {"kind": "sentencepiece BPE", "unavailable": why}
        tok.save_pretrained(tmp)
        # name the class every loader knows (transformers 4.x, vLLM, lm-eval) rather than the v5 backend name
        tc_path = tmp / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc["chat_control_tokens"] = [IM_START, IM_END, EOT, PAD]
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
        report["tokenizer_hash"] = tokenizer_hash(tmp)
        (tmp / "compression.json").write_text(json.dumps(report, indent=2) + "\n")
        save_config(tmp, cfg)
    ref = report.get("reference", {})
    ref_txt = (f"  reference ({ref.get('kind')}): {ref['bytes_per_token']:.3f} bytes/token" if "bytes_per_token" in ref
               else f"  reference: {ref.get('unavailable', 'none')}")
    print(f"tokenizer: vocab {len(tok)}, {len(train_docs)} training documents, held-out {n_bytes} bytes "
          f"-> {ours:.3f} bytes/token;{ref_txt}; saved to {cfg.output_dir} in {time.time() - t0:.1f}s")
    return report


@exit_on_user_error
def cli(argv=None) -> None:
    (cfg,) = parse_config([TokenizerConfig], argv)
    main(cfg)


if __name__ == "__main__":
    cli()
