"""Train a small Llama quickly on the shared text, for eval benchmarks and parity numbers on a non-random model.

    python -m benchmarks.small_model --out runs/bench/small --minutes 6

A plain loop (AdamW, cosine LR, random 512-token windows of one token stream): a 4096-token BPE tokenizer and
the 'tiny' preset on TinyStories + Gutenberg text. It is not the pretraining stage (pretrain/train.py), only a
quick way to get a model whose log-likelihoods are not noise.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/small")
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from alignment.tokens import encode_document
    from pretrain.export import save_hf
    from pretrain.model import Llama, shape_from_preset
    from pretrain.tokenizer import TokenizerConfig
    from pretrain.tokenizer import main as train_tokenizer

    out = Path(args.out)
    files = [str(SHARED / "pretrain" / "tinystories_sample.txt")] + sorted(str(p) for p in (SHARED / "pretrain" / "gutenberg").glob("*.txt"))
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(TokenizerConfig(files=files, vocab_size=4096, output_dir=str(tok_dir), reference="none",
                                        txt_split="paragraph", max_train_chars=6_000_000, model_max_length=512, overwrite=True))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = (SHARED / "pretrain" / "tinystories_sample.txt").read_text().split("<|endoftext|>")
    text += [p for f in files[1:] for p in Path(f).read_text(encoding="latin-1").split("\n\n")]
    ids = torch.tensor([i for d in text if d.strip() for i in encode_document(tok, d.strip())], dtype=torch.long)
    print(f"small_model: {len(ids) / 1e6:.1f}M tokens")
    torch.manual_seed(args.seed)
    model = Llama(shape_from_preset(args.preset, len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    t0, step, budget = time.time(), 0, args.minutes * 60
    while (elapsed := time.time() - t0) < budget:
        lr = 3e-3 * (min(1.0, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,))
        x = torch.stack([ids[s:s + args.seq] for s in starts])  # (B, T)
        y = torch.stack([ids[s + 1:s + args.seq + 1] for s in starts])
        _, loss = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {elapsed:.0f}s", flush=True)
        step += 1
    save_hf(model, tok, out / "model")
    print(f"small_model: {step} steps, final loss {loss.item():.3f} -> {out / 'model'}")
    return out / "model"


if __name__ == "__main__":
    main()
