"""Does a tiny model learn the tiny world in minutes? Pretrain the from-scratch 'tiny' Llama on the tinyworld corpus
for a fixed wall-clock budget, then score the multiple-choice test by log-likelihood (cloze and letter).

    python -m benchmarks.tinyworld_pretrain --seconds 180 --threads 1 --workdir /tmp/twbench

Prints accuracy, its standard error and the margin over chance (25%) in standard errors, overall and per kind
of fact. This is the design check behind issue 7 section 3 ("after pretraining, multiple-choice accuracy is
above chance by more than 2 standard errors"); the numbers go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import time
from pathlib import Path

import torch


def build(workdir: Path, seed: int, vocab: int, extra: list[str]):
    """Generate the data and train the tokenizer (skipped when already there)."""
    from alignment.tinyworld import TinyWorldConfig, main as gen
    from alignment.config import parse_config
    from pretrain.tokenizer import TokenizerConfig, main as tok_main

    data = workdir / "data"
    if not data.exists():
        (cfg,) = parse_config([TinyWorldConfig], ["--seed", str(seed), "--output", str(data), *extra])
        gen(cfg)
    tok_dir = workdir / "tokenizer"
    if not tok_dir.exists():
        tok_main(TokenizerConfig(files=[str(data / "corpus/train.jsonl")], vocab_size=vocab, output_dir=str(tok_dir), reference="none"))
    return data, tok_dir


def token_stream(tok, path: Path) -> torch.Tensor:
    from alignment.tokens import encode_document

    ids = []
    for line in path.read_text().splitlines():
        ids += encode_document(tok, json.loads(line)["text"])
    return torch.tensor(ids, dtype=torch.long)


def read_mc(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{"question": r["question"], "choices": [r[f"choice{i}"] for i in range(4)], "answer": int(r["answer"])} for r in csv.DictReader(f)]


def kind_of(q: str) -> str:
    if any(c.isdigit() for c in q):
        return "arithmetic"
    return "relation" if "best friend" in q else "person"


@torch.no_grad()
def score_mc(model, tok, rows: list[dict], dev: list[dict], scoring: str, shots: int) -> list[bool]:
    """lm-eval style: header, k dev shots, the question; argmax of the continuation log-likelihood."""
    from alignment.tokens import encode_text

    if scoring == "cloze":
        head = "The following are questions (with answers) about tinyworld.\n\n"
        fmt = lambda r: f"Question: {r['question']}\nAnswer:"  # noqa: E731
        conts = lambda r: [" " + c for c in r["choices"]]  # noqa: E731
        gold = lambda r: " " + r["choices"][r["answer"]]  # noqa: E731
    else:
        head = "The following are multiple choice questions (with answers) about tinyworld.\n\n"
        fmt = lambda r: r["question"] + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", r["choices"])) + "\nAnswer:"  # noqa: E731
        conts = lambda r: [" A", " B", " C", " D"]  # noqa: E731
        gold = lambda r: " " + "ABCD"[r["answer"]]  # noqa: E731
    ctx_shots = "".join(fmt(d) + gold(d) + "\n\n" for d in dev[:shots])
    out = []
    for r in rows:
        ctx = [tok.eos_token_id] + encode_text(tok, head + ctx_shots + fmt(r))
        lls = []
        for c in conts(r):
            cont = encode_text(tok, c)
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(ids)[0, len(ctx) - 1: -1].float(), -1)  # (len(cont), V)
            lls.append(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item())
        out.append(max(range(4), key=lls.__getitem__) == r["answer"])
    return out


PROBES = {"town": "{n}'s home town is", "pet": "{n}'s pet is a", "color": "{n}'s favorite color is", "job": "{n}'s job is",
          "friend": "{n}'s best friend is", "sum": "{a} plus {b} is"}


@torch.no_grad()
def probe(model, tok, data: Path) -> list[bool]:
    """Does the model know each eval fact in statement form? Same four choices as the test, a statement prefix."""
    from alignment.tokens import encode_text

    qa = [json.loads(line) for line in (data / "qa/test.jsonl").read_text().splitlines()]
    rows = read_mc(data / "mmlu/test/tinyworld_test.csv")
    out = []
    for rec, r in zip(qa, rows):
        a, _, b = rec["entity"].partition("+")
        ctx = [tok.eos_token_id] + encode_text(tok, PROBES[rec["attribute"]].format(n=rec["entity"], a=a, b=b))
        lls = []
        for c in r["choices"]:
            cont = encode_text(tok, " " + c)
            logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0, len(ctx) - 1: -1].float(), -1)
            lls.append(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item())
        out.append(max(range(4), key=lls.__getitem__) == r["answer"])
    return out


def report(name: str, correct: list[bool], rows: list[dict]) -> dict:
    n = len(correct)
    acc = sum(correct) / n
    se = math.sqrt(0.25 * 0.75 / n)  # standard error of a chance-level guesser (the null hypothesis)
    by_kind = {}
    for c, r in zip(correct, rows):
        by_kind.setdefault(kind_of(r["question"]), []).append(c)
    kinds = "  ".join(f"{k} {sum(v) / len(v):.2f} (n={len(v)})" for k, v in sorted(by_kind.items()))
    print(f"{name:16s} acc {acc:.3f}  n={n}  chance 0.25 + {(acc - 0.25) / se:+.1f} SE   [{kinds}]")
    return {"acc": acc, "n": n, "z_over_chance": (acc - 0.25) / se, "by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/twbench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--gen", default="", help="extra tinyworld config overrides, one string: \"--num_people 24\"")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from pretrain.model import Llama, shape_from_preset

    work = Path(args.workdir)
    data, tok_dir = build(work, args.seed, args.vocab, args.gen.split())
    tok = AutoTokenizer.from_pretrained(tok_dir)
    train = token_stream(tok, data / "corpus/train.jsonl")
    held = token_stream(tok, data / "corpus/heldout.jsonl")
    print(f"corpus {len(train)} tokens, heldout {len(held)} tokens, vocab {len(tok)}")

    torch.manual_seed(args.seed)
    model = Llama(shape_from_preset(args.preset, len(tok), max_position_embeddings=max(512, args.block)))
    print(f"model {model.num_parameters() / 1e6:.2f}M params ({model.num_parameters(True) / 1e6:.2f}M non-embedding)")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = random.Random(args.seed)
    B, T = args.batch, args.block
    t0, step, tokens = time.time(), 0, 0
    while (elapsed := time.time() - t0) < args.seconds:
        frac = elapsed / args.seconds
        lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))  # warmup, cosine on time
        for g in opt.param_groups:
            g["lr"] = lr
        starts = [rng.randrange(len(train) - T - 1) for _ in range(B)]
        x = torch.stack([train[s: s + T] for s in starts])  # (B, T)
        y = torch.stack([train[s + 1: s + T + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += B * T
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {tokens / (time.time() - t0):.0f} tok/s", flush=True)
    train_s = time.time() - t0
    model.eval()
    with torch.no_grad():
        n = (len(held) - 1) // T * T
        _, hl = model(held[:n].view(-1, T), held[1: n + 1].view(-1, T))
    print(f"trained {step} steps, {tokens} tokens ({tokens / len(train):.1f} epochs) in {train_s:.0f}s; heldout loss {hl.item():.3f}")
    test = read_mc(data / "mmlu/test/tinyworld_test.csv")
    dev = read_mc(data / "mmlu/dev/tinyworld_dev.csv")
    torch.save(model.state_dict(), work / "model.pt")
    results = {"statement_probe": report("statement probe", probe(model, tok, data), test)}
    # the same questions on train facts (quizzed in the corpus): is the question format itself learned?
    from alignment.tinyworld import mc_choices

    qrng = random.Random(1)
    train_rows = []
    for rec in (json.loads(line) for line in (data / "rl/prompts.jsonl").read_text().splitlines()):
        choices, ans = mc_choices(rec, qrng)
        train_rows.append({"question": rec["prompt"][0]["content"], "choices": choices, "answer": ans})
    results["train_facts_cloze"] = report("train-fact cloze", score_mc(model, tok, train_rows, dev, "cloze", 0), train_rows)
    for scoring in ("cloze", "letter"):
        for shots in (0, 5):
            results[f"{scoring}_{shots}shot"] = report(f"{scoring} {shots}-shot", score_mc(model, tok, test, dev, scoring, shots), test)
    (work / "result.json").write_text(json.dumps({"args": vars(args), "steps": step, "tokens": tokens, "train_s": train_s,
                                                  "heldout_loss": hl.item(), **results}, indent=1))


if __name__ == "__main__":
    main()
