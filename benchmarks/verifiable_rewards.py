"""Verifiable-reward RL on the tiny world: does answer accuracy on held-out facts rise over SFT?

    PYTHONPATH=. python benchmarks/verifiable_rewards.py --sft runs/tiny/sft/merged --data runs/tiny/data --out runs/bench/rl

Runs each setting below from the same SFT model (the tiny recipe's grpo.yaml / ppo.yaml with overrides), then scores
greedy answers with the tiny world's checker on the training questions (rl/prompts.jsonl, which RL sees) and on the
held-out questions (qa/test.jsonl, which nothing trains on), and writes results.json and curves.png (the checker
reward per logged step). Each setting is one `align grpo` / `align ppo` command and two `align eval` commands, so a row
of the table can be reproduced by hand. The held-out difference from SFT is paired over the same 80 questions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# name -> (stage, overrides of recipes/tiny/<stage>.yaml)
SETTINGS = {
    "grpo lora lr5e-4 30x(4x8)": ("grpo", ["--num_generations", "8", "--per_device_train_batch_size", "32", "--learning_rate", "5e-4",
                                           "--beta", "0.05", "--max_steps", "30"]),
    "grpo lora lr1e-3 60x(4x8)": ("grpo", ["--num_generations", "8", "--per_device_train_batch_size", "32", "--learning_rate", "1e-3",
                                           "--beta", "0.05", "--max_steps", "60"]),
    "grpo lora lr5e-4 30x(4x16) [recipe]": ("grpo", []),
    "grpo lora lr1e-3 80x(4x16) beta 0": ("grpo", ["--learning_rate", "1e-3", "--beta", "0", "--max_steps", "80"]),
    "grpo full lr1e-4 40x(4x16)": ("grpo", ["--use_peft", "false", "--learning_rate", "1e-4", "--max_steps", "40"]),
    "grpo lora, partial reward 0.3": ("grpo", ["--rewards", "tinyworld:0.3", "ends_at_end_of_turn"]),
    "ppo lora, checker reward": ("ppo", ["--rewards", "tinyworld", "ends_at_end_of_turn"]),
}


def align(*args, log: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "a") as f:
        r = subprocess.run([sys.executable, "-m", "alignment.cli", *map(str, args)], stdout=f, stderr=f, env=env)
    if r.returncode:
        sys.exit(f"align {args[0]} failed; see {log}")


def answers(model: str, questions: Path, out: Path, log: Path) -> list[float]:
    align("eval", "--model", model, "--tasks", "answers", "--answer_files", questions, "--output", out, "--log_samples", "true",
          "--progress", "false", log=log)
    recs = [json.loads(x) for x in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    return [float(r["correct"]) for r in sorted(recs, key=lambda r: r["doc_id"]) if r.get("task") == "answers"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft", default="runs/tiny/sft/merged")
    ap.add_argument("--data", default="runs/tiny/data")
    ap.add_argument("--out", default="runs/bench/rl")
    ap.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    a = ap.parse_args()
    from evals.report import paired_delta

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    data = Path(a.data)
    results = {"sft": {"train": answers(a.sft, data / "rl/prompts.jsonl", out / "sft_train.json", log),
                       "heldout": answers(a.sft, data / "qa/test.jsonl", out / "sft_heldout.json", log)}}
    for name, (stage, extra) in SETTINGS.items():
        if a.only and name not in a.only.split(","):
            continue
        d = out / name.replace(" ", "_").replace("/", "-")
        align(stage, "--config", f"recipes/tiny/{stage}.yaml", "--model_name_or_path", a.sft, "--prompts", data / "rl/prompts.jsonl",
              "--output_dir", d, "--overwrite", "true", *extra, log=log)
        s = json.loads((d / "summary.json").read_text())
        curve = [c.get("rewards/tinyworld/mean") for c in s.get("curve", [])] or \
                [m.get("rewards/tinyworld/mean") for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
        results[name] = {"train": answers(str(d / "merged"), data / "rl/prompts.jsonl", d / "train.json", log),
                         "heldout": answers(str(d / "merged"), data / "qa/test.jsonl", d / "heldout.json", log), "curve": curve}
    rows = []
    for name, r in results.items():
        delta, se = paired_delta(results["sft"]["heldout"], r["heldout"]) if name != "sft" else (0.0, 0.0)
        rows.append({"setting": name, "train_acc": sum(r["train"]) / len(r["train"]), "heldout_acc": sum(r["heldout"]) / len(r["heldout"]),
                     "heldout_delta": delta, "heldout_delta_se": se})
        print(f"{name:40s} train {rows[-1]['train_acc']:.3f}  held-out {rows[-1]['heldout_acc']:.3f}  Δ {delta:+.3f} ± {se:.3f}")
    (out / "results.json").write_text(json.dumps({"rows": rows, "curves": {k: v.get("curve") for k, v in results.items()}}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, r in results.items():
        if r.get("curve"):
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], label=name, lw=1)
    ax.set(xlabel="logged step", ylabel="checker reward (training questions, sampled)", title="verifiable-reward RL on the tiny world")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


if __name__ == "__main__":
    main()
