"""Our task scoring vs lm-evaluation-harness 0.4.13 on the same model and items: speed ratio and agreement, one run.

    python -m benchmarks.bench_eval --make_model runs/bench/rand --out runs/bench/eval.json \\
        --mmlu_dir ../shared/data/eval/mmlu --gsm8k_dir ~/data/grade_school_math/data \\
        --runs mmlu:0,mmlu:5,arc_challenge:0,arc_challenge:5,hellaswag:0,piqa:0,truthfulqa_mc2:0,winogrande:0,gsm8k:5

Both sides get an already-loaded model (load time excluded, reported once separately) and read the task files
themselves: ours through the task specs (evals/tasks/*.yaml), lm-eval through its OWN task YAMLs pointed at the same
files (evals/tasks/lm_eval_tasks.py), same batch size, fp32. The two run alternately, `--repeats` times, and each
keeps its best time (the box is shared, so the minimum is the honest cost). Reported per task and shot count: wall
times, the ratio, items whose prediction differs (must be 0), the largest log-likelihood difference and the metrics of
both. MMLU reads its local directory; GSM8K the original grade-school-math JSONL when given (else generated items);
the other tasks read generated items in the hub layout, with realistic lengths (words drawn from TinyStories).
`--make_model DIR` first writes a random Llama (the 'tiny' preset, 2048 context) with a 4096-token BPE tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_model(out: Path, preset: str = "tiny", context: int = 2048) -> Path:
    """A random Llama of a preset with a 4096-token BPE tokenizer trained on the shared TinyStories text; its
    generation_config carries no max_new_tokens (lm-eval would let that cap its answers)."""
    from transformers import GenerationConfig

    from pretrain.export import ExportConfig
    from pretrain.export import main as export
    from pretrain.tokenizer import TokenizerConfig
    from pretrain.tokenizer import main as train_tokenizer

    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        train_tokenizer(TokenizerConfig(files=[str(SHARED / "pretrain" / "tinystories_sample.txt")], vocab_size=4096,
                                        output_dir=str(tok), reference="none", txt_split="paragraph",
                                        model_max_length=context, overwrite=True))
    model = out / "model"
    if not (model / "config.json").is_file():
        export(ExportConfig(tokenizer=str(tok), preset=preset, max_position_embeddings=context, output_dir=str(model),
                            seed=0, overwrite=True))
        gen = GenerationConfig.from_pretrained(model)
        GenerationConfig(bos_token_id=gen.bos_token_id, eos_token_id=gen.eos_token_id,
                         pad_token_id=gen.pad_token_id).save_pretrained(model)
    return model


def _text_source(seed: int):
    words = (SHARED / "pretrain" / "tinystories_sample.txt").read_text().replace("<|endoftext|>", " ").split()
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        n = rng.randint(lo, hi)
        i = rng.randrange(len(words) - n)
        return " ".join(words[i:i + n])

    return rng, text


def generated_items(task: str, n: int, n_train: int, seed: int = 0) -> dict[str, list[dict]]:
    """Items in the hub layout of `task` with the lengths of the real sets (question, context and answer words)."""
    rng, text = _text_source(seed)

    def one(i):
        if task.startswith("arc"):
            labels = list("ABCD") if rng.random() < 0.9 else list("ABCDE")
            return {"id": f"q{i}", "question": text(15, 30) + "?", "answerKey": rng.choice(labels),
                    "choices": {"text": [text(2, 7) for _ in labels], "label": labels}}
        if task == "hellaswag":
            return {"ind": i, "activity_label": text(1, 3).title(), "ctx_a": text(20, 35), "ctx_b": text(4, 10),
                    "endings": [text(12, 25) for _ in range(4)], "label": str(rng.randint(0, 3))}
        if task == "piqa":
            return {"goal": text(6, 15) + "?", "sol1": text(10, 30), "sol2": text(10, 30), "label": rng.randint(0, 1)}
        if task.startswith("truthfulqa"):
            k1, k2 = rng.randint(4, 6), rng.randint(5, 9)
            labels = [1] * rng.randint(1, k2 - 1)
            return {"question": text(8, 16) + "?",
                    "mc1_targets": {"choices": [text(5, 12) for _ in range(k1)], "labels": [1] + [0] * (k1 - 1)},
                    "mc2_targets": {"choices": [text(5, 12) for _ in range(k2)],
                                    "labels": labels + [0] * (k2 - len(labels))}}
        if task == "winogrande":
            o1, o2 = text(1, 2), text(1, 2)
            return {"qID": f"w{i}", "sentence": f"{text(8, 14)} _ {text(6, 12)}.", "option1": o1, "option2": o2,
                    "answer": rng.choice(["1", "2"])}
        if task == "gsm8k":
            a = rng.randint(2, 99)
            return {"question": text(30, 60) + "?", "answer": f"{text(30, 60)}\n#### {a}"}
        raise ValueError(task)

    eval_split = "test" if task.startswith("arc") or task == "gsm8k" else "validation"
    out = {eval_split: [one(i) for i in range(n)]}
    if not task.startswith("truthfulqa"):
        out["train"] = [one(n + i) for i in range(n_train)]
    return out


def agreement(task: str, samples: list[dict], theirs: list[dict], generative: bool) -> tuple[int, float]:
    """Items whose prediction (or generated text) differs, and the largest log-likelihood difference."""
    differ, max_d = 0, 0.0
    if generative:
        got = sorted((s for s in theirs if s["filter"] == "strict-match"), key=lambda s: s["doc_id"])
        for a, b in zip(samples, got):
            differ += int(a["response"] != b["resps"][0][0])
        return differ, 0.0
    got = sorted(theirs, key=lambda s: s["doc_id"])
    for a, b in zip(samples, got):
        lls = [x[0] for x in b["filtered_resps"]]
        max_d = max(max_d, max(abs(x - y) for x, y in zip(a["loglikelihoods"], lls)))
        differ += int(max(range(len(lls)), key=lambda j: lls[j]) != a["pred"])
    return differ, max_d


def run_one(lm, hflm, task: str, shots: int, data: dict, batch_size: int, limit: int | None, repeats: int, work: Path,
            lm_eval_batch_size: int) -> dict:
    """Time ours and lm-eval alternately on one task and shot count; returns the table row."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evals.generative import evaluate_generate_until
    from evals.multiple_choice import evaluate_mc
    from evals.tasks.lm_eval_tasks import write_lm_eval_task, write_mc_tasks
    from evals.taskdata import load_task
    from evals.taskspec import load_spec

    spec = load_spec("mmlu" if task == "mmlu" else task)
    yaml_dir = work / f"{task}_{shots}"
    if task == "mmlu":
        spec.task = "mmlu"
        task_data = {"mmlu": {None: data["mmlu_dir"]}}
        subjects = load_task(spec, task_data=task_data, num_fewshot=max(shots, 1))  # every row, with the dev rows
        names = write_mc_tasks(subjects, yaml_dir, "letter")  # all rows: both sides read them all, then apply limit
    else:
        task_data = {task: {split: str(f) for split, f in data[task]["ours"].items()}}
        names = [write_lm_eval_task(task, data[task]["hub"], yaml_dir)]
    t_ours = t_lm = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        tasks = load_task(spec, task_data=task_data, num_fewshot=shots, limit=limit)
        if spec.output_type == "generate_until":
            ours, samples = evaluate_generate_until(lm, tasks, batch_size=batch_size, progress=False)
        else:
            ours, samples = evaluate_mc(lm, tasks, batch_size=batch_size, progress=False)
        t_ours = min(t_ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        manager = TaskManager(include_path=str(yaml_dir), include_defaults=False)
        res = lm_eval.simple_evaluate(model=hflm, tasks=names, num_fewshot=shots, batch_size=lm_eval_batch_size,
                                      log_samples=True, limit=limit, task_manager=manager, bootstrap_iters=0)
        t_lm = min(t_lm, time.perf_counter() - t0)
    differ, max_d, n = 0, 0.0, 0
    for t, name in zip(tasks, names):
        mine = [s for s in samples if s["task"] == t.name]
        d, m = agreement(task, mine, res["samples"][name], spec.output_type == "generate_until")
        differ, max_d, n = differ + d, max(max_d, m), n + len(mine)
    metric = "exact_match_flexible_extract" if task == "gsm8k" else "acc"
    key = "exact_match,flexible-extract" if task == "gsm8k" else "acc,none"
    head = ours.get(spec.task, next(iter(ours.values())))
    if task == "mmlu":
        theirs_metric = sum(res["results"][nm][key] * len(t.docs) for nm, t in zip(names, tasks)) / n
    else:
        theirs_metric = res["results"][names[0]][key]
    return {"task": task, "num_fewshot": shots, "n": n, "batch_size": [batch_size, lm_eval_batch_size],
            "ours_s": round(t_ours, 2), "lm_eval_s": round(t_lm, 2),
            "speedup": round(t_lm / t_ours, 2), "items_differ": differ, "max_abs_ll_diff": max_d,
            "metric": metric, "ours": head[metric], "lm_eval": theirs_metric}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="A model directory (or use --make_model).")
    ap.add_argument("--make_model", default=None, help="Write a random 'tiny' Llama (4096-token tokenizer) here first.")
    ap.add_argument("--mmlu_dir", default=str(SHARED / "eval" / "mmlu"))
    ap.add_argument("--gsm8k_dir", default=None, help="grade_school_math/data of openai/grade-school-math "
                    "(train.jsonl, test.jsonl).")
    ap.add_argument("--runs", default="mmlu:0,mmlu:5,arc_challenge:0,arc_challenge:5,hellaswag:0,piqa:0,"
                    "truthfulqa_mc2:0,winogrande:0,gsm8k:5")
    ap.add_argument("--n", type=int, default=200, help="Generated items per multiple-choice task.")
    ap.add_argument("--n_gsm8k", type=int, default=32, help="GSM8K items.")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--lm_eval_batch_size", type=int, default=None, help="lm-eval's batch size (default: --batch_size; "
                    "its CLI's own default is 1).")
    ap.add_argument("--mmlu_limit", type=int, default=None, help="MMLU items per subject.")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from lm_eval.models.huggingface import HFLM

    from evals.scoring import scoring_model

    model = str(make_model(Path(args.make_model)) if args.make_model else args.model)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    lm = scoring_model(model)
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    lm_bs = args.lm_eval_batch_size or args.batch_size
    hflm = HFLM(pretrained=model, dtype="float32", device=str(next(lm.model.parameters()).device), batch_size=lm_bs)
    load_lm = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        data: dict = {"mmlu_dir": args.mmlu_dir}
        for task in dict.fromkeys(r.split(":")[0] for r in args.runs.split(",")):
            if task == "mmlu":
                continue
            if task == "gsm8k" and args.gsm8k_dir:
                from alignment.data import read_file_rows

                hub = {s: [r.data for r in read_file_rows(Path(args.gsm8k_dir, f"{s}.jsonl"))]
                       for s in ("train", "test")}
                hub["test"] = hub["test"][:args.n_gsm8k]
            else:
                hub = generated_items(task, args.n_gsm8k if task == "gsm8k" else args.n, 100)
            files = {}
            for split, items in hub.items():
                files[split] = work / "data" / f"{task}_{split}.jsonl"
                files[split].parent.mkdir(parents=True, exist_ok=True)
                files[split].write_text("".join(json.dumps(r) + "\n" for r in items))
            data[task] = {"hub": hub, "ours": files}
        for run in args.runs.split(","):
            task, shots = run.split(":")
            r = run_one(lm, hflm, task, int(shots), data, args.batch_size, args.mmlu_limit if task == "mmlu" else None,
                        args.repeats, work, lm_bs)
            rows.append(r)
            print(f"{task:15s} {shots}-shot n={r['n']}: ours {r['ours_s']:.1f}s  lm-eval {r['lm_eval_s']:.1f}s  "
                  f"speedup {r['speedup']:.2f}x  items differ {r['items_differ']}  "
                  f"max|dll| {r['max_abs_ll_diff']:.1e}  "
                  f"{r['metric']} ours {r['ours']:.4f} "
                  f"lm-eval {r['lm_eval']:.4f}", flush=True)
    print(f"model load: ours {load_ours:.1f}s, lm-eval {load_lm:.1f}s")
    if args.out:
        from alignment.io import atomic_write_json

        atomic_write_json(args.out, {"model": model, "threads": torch.get_num_threads(),
                                     "load_s": {"ours": load_ours, "lm_eval": load_lm}, "results": rows})
    return rows


if __name__ == "__main__":
    main()
