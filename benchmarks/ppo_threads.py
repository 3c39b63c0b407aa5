"""Seconds per PPO update on CPU with 1 thread vs torch's default, side by side in one run.

    python benchmarks/ppo_threads.py [--preset tiny] [--updates 3]

Builds a throwaway tokenizer, a random model of the preset and a LoRA policy, then times `PPO.update()` (rollout
of 16 prompts x 32 tokens, reference and value passes, 2 PPO epochs) under each thread count. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(tmp: Path, preset: str):
    from conftest import synthetic_corpus
    from pretrain.export import ExportConfig, main as export
    from pretrain.tokenizer import TokenizerConfig, main as train_tok

    (tmp / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_corpus(2000)))
    train_tok(TokenizerConfig(files=[str(tmp / "c.jsonl")], vocab_size=2048, output_dir=str(tmp / "tok"), reference="none", model_max_length=512))
    export(ExportConfig(tokenizer=str(tmp / "tok"), preset=preset, output_dir=str(tmp / "model"), seed=0))
    return tmp / "model"


def time_updates(model_dir: Path, threads: int, updates: int) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.data import Row, encode_prompts
    from alignment.ppo import PPO, PPOHyper, ValueHead

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    hp = PPOHyper(rollout_batch_size=16, mini_batch_size=8, num_ppo_epochs=2, response_length=32)
    rows = [Row({"prompt": [{"role": "user", "content": f"Where is the cat {i}?"}]}, f"prompts:{i}") for i in range(32)]
    prompts = encode_prompts(tok, rows, base.config.max_position_embeddings, hp.response_length)
    score = lambda rows, completions: torch.tensor([len(c.token_ids) / 10 for c in completions])  # noqa: E731  (a cheap stand-in reward)
    ppo = PPO(policy, ValueHead(base.config.hidden_size), tok, score, prompts, hp, [tok.eos_token_id])
    ppo.update()  # warm-up
    t = time.perf_counter()
    for _ in range(updates):
        ppo.update()
    return (time.perf_counter() - t) / updates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--updates", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    default = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as d:
        model_dir = build(Path(d), a.preset)
        rows = [(n, time_updates(model_dir, n, a.updates)) for n in sorted({1, default})]
    base = rows[0][1]
    print(f"\nPPO update, preset {a.preset}, 16 prompts x 32 tokens, 2 epochs ({a.updates} timed updates)")
    print("threads  s/update  vs 1 thread")
    for n, s in rows:
        print(f"{n:>7}  {s:8.2f}  {s / base:10.2f}x")


if __name__ == "__main__":
    main()
