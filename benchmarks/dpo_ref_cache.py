"""DPO reference log-prob cache: wall time of a run that computes them vs. one that reuses them (another beta).

    PYTHONPATH=. python benchmarks/dpo_ref_cache.py --preset tiny --pairs 400 --steps 5

Builds a throwaway tokenizer + model (from-scratch preset, random init) and toy preference pairs in a temp dir, then
runs `recipes/dpo.py` twice with the same data and model: beta 0.1 (cache miss) and beta 0.5 with loss_type ipo
(cache hit). Prints both times and the time spent in reference forward passes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import json

    import torch

    from _post_utils import pref_rows, write_jsonl
    from alignment.compat import DPOConfig, DPOTrainer, ModelConfig
    from conftest import synthetic_corpus
    from pretrain.export import ExportConfig
    from pretrain.export import main as export
    from pretrain.tokenizer import TokenizerConfig
    from pretrain.tokenizer import main as train_tokenizer
    from alignment.config import StageConfig
    from recipes.dpo import DPOScriptArguments
    from recipes.dpo import main as dpo

    torch.set_num_threads(a.threads)
    ref_seconds = {"t": 0.0}
    original = DPOTrainer.compute_ref_log_probs

    def timed(self, *args, **kw):
        t = time.perf_counter()
        out = original(self, *args, **kw)
        ref_seconds["t"] += time.perf_counter() - t
        return out

    DPOTrainer.compute_ref_log_probs = timed
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_corpus(500)))
        train_tokenizer(TokenizerConfig(files=[str(d / "c.jsonl")], vocab_size=1024, output_dir=str(d / "tok"), reference="none"))
        export(ExportConfig(tokenizer=str(d / "tok"), preset=a.preset, output_dir=str(d / "model"), seed=0))
        train = write_jsonl(d / "train.jsonl", pref_rows(a.pairs, 0))
        test = write_jsonl(d / "test.jsonl", pref_rows(max(8, a.pairs // 10), 1))
        rows = []
        for name, beta, loss in (("computed", 0.1, "sigmoid"), ("cached", 0.5, "ipo")):
            ref_seconds["t"] = 0.0
            t0 = time.perf_counter()
            s = dpo(StageConfig(DPOScriptArguments(train_data=[train], eval_data=[test], ref_cache_dir=str(d / "cache")),
                     DPOConfig(output_dir=str(d / name), use_cpu=True, bf16=False, report_to="none", disable_tqdm=True,
                               max_steps=a.steps, per_device_train_batch_size=8, max_length=64, beta=beta, loss_type=[loss],
                               save_strategy="no"),
                     ModelConfig(model_name_or_path=str(d / "model"), use_peft=True, lora_r=8, lora_alpha=16)))
            rows.append((name, time.perf_counter() - t0, ref_seconds["t"], s["ref_cache_hits"]))
    print(f"\nDPO, preset {a.preset}, {a.pairs} train pairs, {a.steps} steps, {a.threads} thread(s)")
    print(f"{'reference log-probs':<20} {'run (s)':>8} {'ref forward (s)':>16}  cache hits")
    for name, total, ref, hits in rows:
        print(f"{name:<20} {total:8.1f} {ref:16.1f}  {hits}")
    print(f"ratio computed/cached run time: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
