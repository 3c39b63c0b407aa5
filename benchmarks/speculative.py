"""Speculative decoding on a CPU: a 7.5M-parameter target and a ~25x smaller draft, both trained by the suite on the
same real text; tokens/s of plain and speculative decoding side by side, identical greedy text, acceptance rates.

    PYTHONPATH=. python benchmarks/speculative.py              # builds the models under runs/spec once, then measures
    PYTHONPATH=. python benchmarks/speculative.py --prompts 4 --max_new_tokens 64   # a quicker measurement

Build (each step skipped when its output exists; every command nice'd, one torch thread):
1. `align tokenizer` (2048 tokens) and `align prepare` on the recipes/shakespeare corpus (Shakespeare, Austen,
   Carroll, Milton from ../shared/data/pretrain);
2. the target: `align pretrain`, the '10m' preset (7.48M parameters), 500 steps of 8 x 256 tokens;
3. the draft: `align pretrain`, 1 layer of width 96 (0.30M parameters, 25x smaller), 500 steps on the same data;
4. two distilled drafts: `align distill` from that draft, KL to the target's logits on its own continuations of 1600
   corpus prefixes (90% of each batch) and on corpus windows: greedy continuations for greedy decoding
   (runs/spec/draft_greedy), continuations sampled at T=0.8 for sampling (runs/spec/draft_sampled).

Measure (prompts: the first 24 tokens of paragraphs of Julius Caesar and Chesterton's Father Brown, texts no model
saw; max_new_tokens each; every method runs on every prompt before the next prompt, so load changes hit all alike):
- the old cache-less loop (pretrain/model.py `Llama.generate`), transformers' `generate` and alignment.sampling's
  `generate` (the same call), all greedy;
- transformers' assisted generation (`assistant_model=`) with the greedy-distilled draft;
- alignment.sampling's speculative decoding with each draft and several draft lengths, greedy and sampled.
Wall time and this process's CPU time are both reported: on a shared machine other processes' load inflates wall
time unevenly, while CPU time (one torch thread) counts only the work done. Prints a markdown table (copied into
docs/benchmarks.md) and writes runs/spec/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "runs" / "spec"
DATA = ROOT.parent / "shared" / "data" / "pretrain"
DRAFTS = {"pretrained": "draft", "distilled for greedy": "draft_greedy", "distilled for sampling": "draft_sampled"}


def run(cmd: list[str]) -> None:
    """One `align` command, nice'd, with one torch thread (several times faster than two on a busy 2-core box)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(["nice", "-n", "15", sys.executable, "-m", "alignment.cli", *cmd], check=True, cwd=ROOT, env=env)
    print(f"  ({time.time() - t0:.0f}s)", flush=True)


def build() -> None:
    """The tokenizer, data, target, draft and distilled draft (skipping what exists)."""
    s = str(SPEC)
    if not (SPEC / "tokenizer").is_dir():
        run(["tokenizer", "--config", "recipes/shakespeare/tokenizer.yaml", "--vocab_size", "2048",
             "--output_dir", f"{s}/tokenizer"])
    if not (SPEC / "packed").is_dir():
        run(["prepare", "--config", "recipes/shakespeare/prepare.yaml", "--tokenizer", f"{s}/tokenizer",
             "--output_dir", f"{s}/packed", "--num_proc", "1"])
    common = ["--config", "recipes/shakespeare/pretrain.yaml", "--data_dir", f"{s}/packed", "--tokenizer",
              f"{s}/tokenizer", "--max_steps", "500", "--eval_interval", "250", "--save_interval", "100",
              "--num_samples", "1"]
    if not (SPEC / "target").is_dir():
        run(["pretrain", *common, "--output_dir", f"{s}/target_pretrain", "--export_dir", f"{s}/target"])
    if not (SPEC / "draft").is_dir():
        run(["pretrain", *common, "--preset", "10m", "--hidden_size", "96", "--num_hidden_layers", "1",
             "--intermediate_size", "256", "--num_attention_heads", "4", "--num_key_value_heads", "2", "--lr", "3e-3",
             "--output_dir", f"{s}/draft_pretrain", "--export_dir", f"{s}/draft"])
    # the target's greedy continuations teach the draft what greedy decoding will ask of it, its samples at T=0.8
    # what sampling will: one distilled draft for each
    for name, temperature in (("draft_greedy", "0"), ("draft_sampled", "0.8")):
        if not (SPEC / name).is_dir():
            run(["distill", "--target", f"{s}/target", "--init", f"{s}/draft", "--output_dir", f"{s}/{name}",
                 "--corpus", str(DATA / "tinyshakespeare.txt"), str(DATA / "gutenberg" / "austen-emma.txt"),
                 str(DATA / "gutenberg" / "carroll-alice.txt"), "--txt_split", "paragraph", "--raw_prompts", "1600",
                 "--prefix_tokens", "24", "--sample_tokens", "104", "--sample_temperature", temperature, "--loss", "kl",
                 "--sample_fraction", "0.9", "--seq_len", "128", "--batch_size", "16", "--max_steps", "600",
                 "--lr", "2e-3", "--warmup_steps", "30", "--cpu_threads", "1"])


def prompts(tok, n: int, length: int = 24) -> list[list[int]]:
    """The first `length` tokens of long paragraphs from two books no model trained on, alternating."""
    from alignment.tokens import encode_text

    books = [DATA / "gutenberg" / "shakespeare-caesar.txt", DATA / "gutenberg" / "chesterton-brown.txt"]
    paras = []
    for b in books:
        text = b.read_bytes().decode("latin-1")  # both files are Latin-1, not UTF-8
        paras.append([" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) >= 40])
    out = []
    for i in range(n):
        para = paras[i % 2][10 + 7 * (i // 2)]
        out.append(encode_text(tok, para)[:length])
    return out


def measure(a) -> dict:
    """Every method on every prompt, interleaved; returns the results table."""
    import torch

    from alignment.modeling import count_parameters, load_model, load_tokenizer
    from alignment.sampling import SamplingParams, SpeculativeStats, generate, generation_config, pad_id, stop_token_ids
    from pretrain.export import load_hf

    torch.set_num_threads(a.threads)
    tok = load_tokenizer(SPEC / "target")
    target = load_model(SPEC / "target", tokenizer=tok)
    drafts = {name: load_model(SPEC / d, tokenizer=tok) for name, d in DRAFTS.items()}
    old = load_hf(SPEC / "target").eval()
    n_target, n_draft = count_parameters(target)[1], count_parameters(drafts["pretrained"])[1]
    ps = prompts(tok, a.prompts)
    stops = stop_token_ids(tok, target)
    greedy = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=0, seed=0)
    sampled = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=0)

    def ours(params, draft=None, k=4, schedule="constant"):
        def fn(p, i):
            stats = SpeculativeStats()
            seeded = SamplingParams(**{**params.__dict__, "seed": params.seed + i})
            (c,), = generate(target, tok, [p], seeded, draft_model=draft, num_draft_tokens=k, draft_schedule=schedule,
                             stats=stats)
            return c.token_ids, stats
        return fn

    def hf_plain(p, i):
        ids = torch.tensor([p])
        gen = generation_config(greedy, stops, pad_id(tok))
        out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        return _cut(out[0, len(p):].tolist(), stops), None

    def hf_assisted(k):
        d = drafts["distilled for greedy"]

        def fn(p, i):
            d.generation_config.num_assistant_tokens = k
            d.generation_config.num_assistant_tokens_schedule = "constant"
            d.generation_config.assistant_confidence_threshold = 0.0  # draft k tokens every round, as ours does
            ids = torch.tensor([p])
            gen = generation_config(greedy, stops, pad_id(tok))
            out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                                  assistant_model=d)
            return _cut(out[0, len(p):].tolist(), stops), None
        return fn

    def old_loop(p, i):
        with torch.no_grad():
            out = old.generate(torch.tensor([p]), a.max_new_tokens, temperature=0, eos_token_id=tok.eos_token_id)
        return _cut(out[0, len(p):].tolist(), stops), None

    methods = {
        "greedy: old loop without KV cache (pretrain/model.py)": old_loop,
        "greedy: transformers generate, KV cache": hf_plain,
        "greedy: alignment.sampling.generate, KV cache": ours(greedy),
    }
    assisted = f"greedy: transformers assisted generation, distilled for greedy draft, k={a.assisted_k}"
    methods[assisted] = hf_assisted(a.assisted_k)
    for name in ("pretrained", "distilled for greedy"):
        for k in a.draft_lengths:
            methods[f"greedy: speculative, {name} draft, k={k}"] = ours(greedy, drafts[name], k)
        methods[f"greedy: speculative, {name} draft, adaptive from k=3"] = ours(greedy, drafts[name], 3, "adaptive")
    methods[f"greedy: speculative, distilled for sampling draft, k={a.sample_k}"] = ours(
        greedy, drafts["distilled for sampling"], a.sample_k)
    methods[f"sampled T={a.temperature}: alignment.sampling.generate, KV cache"] = ours(sampled)
    for name in ("pretrained", "distilled for sampling", "distilled for greedy"):
        name_k = f"sampled T={a.temperature}: speculative, {name} draft, k={a.sample_k}"
        methods[name_k] = ours(sampled, drafts[name], a.sample_k)

    results = {m: {"seconds": 0.0, "cpu_seconds": 0.0, "tokens": 0, "outputs": [], "stats": SpeculativeStats()}
               for m in methods}
    for r in range(a.repeats):
        for i, p in enumerate(ps):
            for m, fn in methods.items():
                t0, c0 = time.perf_counter(), time.process_time()
                ids, stats = fn(p, i)
                results[m]["seconds"] += time.perf_counter() - t0
                results[m]["cpu_seconds"] += time.process_time() - c0
                results[m]["tokens"] += len(ids)
                if r == 0:
                    results[m]["outputs"].append(ids)
                if stats is not None:
                    for f in ("drafted", "accepted", "target_passes", "tokens"):
                        setattr(results[m]["stats"], f, getattr(results[m]["stats"], f) + getattr(stats, f))
            print(f"round {r + 1}/{a.repeats}, prompt {i + 1}/{len(ps)} done", file=sys.stderr, flush=True)

    reference = results["greedy: transformers generate, KV cache"]
    sampled_ref = results[f"sampled T={a.temperature}: alignment.sampling.generate, KV cache"]
    rows = []
    for m, r in results.items():
        is_greedy = m.startswith("greedy")
        ref = reference if is_greedy else sampled_ref
        rate, cpu_rate = r["tokens"] / r["seconds"], r["tokens"] / r["cpu_seconds"]
        same = sum(a_ == b_ for a_, b_ in zip(r["outputs"], reference["outputs"])) if is_greedy else None
        st = r["stats"]
        rows.append({"method": m, "tokens": r["tokens"], "seconds": round(r["seconds"], 2),
                     "cpu_seconds": round(r["cpu_seconds"], 2), "tokens_per_s": round(rate, 1),
                     "speedup": round(rate / (ref["tokens"] / ref["seconds"]), 2),
                     "tokens_per_cpu_s": round(cpu_rate, 1),
                     "cpu_speedup": round(cpu_rate / (ref["tokens"] / ref["cpu_seconds"]), 2),
                     "identical_to_plain_greedy": f"{same}/{len(ps)}" if same is not None else "",
                     "acceptance_rate": round(st.acceptance_rate, 3) if st.drafted else None,
                     "tokens_per_target_pass": round(st.tokens_per_pass, 2) if st.target_passes else None})
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": a.machine, "threads": a.threads, "prompts": len(ps),
               "max_new_tokens": a.max_new_tokens, "repeats": a.repeats, "target_parameters": n_target,
               "draft_parameters": n_draft,
               "parameter_ratio": round(n_target / n_draft, 1), "rows": rows}
    for name, d in DRAFTS.items():
        f = SPEC / d / "summary.json"
        if f.is_file():
            summary[f"{name}_draft_summary"] = json.loads(f.read_text())
    return summary


def _cut(ids: list[int], stops: list[int]) -> list[int]:
    """Tokens up to and including the first stop token (what alignment.sampling's Completion keeps)."""
    for j, t in enumerate(ids):
        if t in stops:
            return ids[: j + 1]
    return ids


def table(summary: dict) -> str:
    """The results as a markdown table."""
    lines = [f"target {summary['target_parameters'] / 1e6:.2f}M parameters, draft "
             f"{summary['draft_parameters'] / 1e6:.2f}M ({summary['parameter_ratio']}x smaller); {summary['prompts']} "
             f"prompts x {summary['max_new_tokens']} new tokens, {summary['repeats']} round(s), {summary['threads']} "
             f"torch thread(s), {summary['machine']}, {summary['date']}", "",
             "| method | tokens/s (wall) | speedup | tokens per CPU second | speedup | identical to plain greedy | "
             "acceptance rate | tokens per target pass |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['method']} | {r['tokens_per_s']} | {r['speedup']}x | {r['tokens_per_cpu_s']} | "
                     f"{r['cpu_speedup']}x | {r['identical_to_plain_greedy']} | "
                     f"{'' if r['acceptance_rate'] is None else r['acceptance_rate']} | "
                     f"{'' if r['tokens_per_target_pass'] is None else r['tokens_per_target_pass']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--draft_lengths", type=int, nargs="+", default=[2, 3, 5])
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--sample_k", type=int, default=3)
    ap.add_argument("--assisted_k", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--machine", default="2-core AVX2 CPU, 24 GB, no GPU")
    ap.add_argument("--measure-only", action="store_true", help="Do not build missing models.")
    a = ap.parse_args()
    if not a.measure_only:
        build()
    summary = measure(a)
    (SPEC / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))


if __name__ == "__main__":
    main()
