"""Shared fixtures: a tiny tokenizer and a tiny Llama built in-process once per test session, fully offline."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

_WORDS = ("the cat dog bird sat ran saw a red blue green small big house tree river hill "
          "Alice Bob likes has is was and but then one two three four five six seven eight nine").split()


def synthetic_corpus(n_docs: int = 300, seed: int = 0) -> list[str]:
    """Deterministic toy documents (a few sentences each) for hermetic tokenizer/model fixtures."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "." for _ in range(rng.randint(2, 5))]
        docs.append(" ".join(sents) + f" {rng.randint(0, 999)} + {rng.randint(0, 99)}.")
    return docs


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """A .jsonl corpus of synthetic documents."""
    import json

    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_corpus()))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, corpus_file):
    """A 512-token byte-level BPE tokenizer trained in-process (special tokens and chat template included)."""
    from pretrain.tokenizer import TokenizerConfig, main

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    main(TokenizerConfig(files=[str(corpus_file)], vocab_size=512, output_dir=str(out), reference="none", model_max_length=256))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A randomly initialised 'test'-preset Llama exported as a Hugging Face directory (with tokenizer)."""
    from pretrain.export import ExportConfig, main

    out = tmp_path_factory.mktemp("model") / "tiny-llama"
    main(ExportConfig(tokenizer=str(tiny_tokenizer_dir), preset="test", output_dir=str(out), seed=0))
    return out


@pytest.fixture(scope="session")
def reward_dir(tiny_model_dir, tmp_path_factory):
    """A random LlamaForSequenceClassification (num_labels=1, pad_token_id set) with the tiny tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    cfg = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(cfg)
    out = tmp_path_factory.mktemp("rm") / "reward"
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def bnb_model_dir(tmp_path_factory, tiny_tokenizer):
    """The 'test' preset with an MLP width divisible by 32 (bitsandbytes' CPU 4-bit kernels need N % 32 == 0)."""
    import torch

    from pretrain.export import save_hf
    from pretrain.model import Llama, shape_from_preset

    torch.manual_seed(0)
    shape = shape_from_preset("test", len(tiny_tokenizer), intermediate_size=192)
    out = tmp_path_factory.mktemp("model") / "tiny-llama-bnb"
    save_hf(Llama(shape), tiny_tokenizer, out)
    return out
