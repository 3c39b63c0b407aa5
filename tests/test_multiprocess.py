"""Two processes (gloo on CPU) train as one with the same global batch: sft, reward, dpo and ppo.

The two-process runs are what a user launches on two GPUs with the shipped DDP config (`accelerate launch
--config_file recipes/accelerate/ddp.yaml -m alignment.cli <stage> ...`), here all four stages in one launch
(tests/_multiprocess_driver.py) since every launch costs seconds of imports. Each test runs its stage once in this
process and compares the loss (PPO: every logged metric) of each step and the final trainable weights.

One process: per-device batch 4 x gradient accumulation 2; two processes: batch 4 each, no accumulation. The
Trainer hands out consecutive per-device batches of one seeded order, process i taking the i-th of every group of 2,
so each step sees the same 8 samples. PPO's batch sizes are global, the same in both runs. LoRA dropout is 0 (its
masks depend on the process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _post_utils import one_thread, pref_rows, sft_rows, write_jsonl  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"]


def trainer_argv(model, out, **kw) -> list[str]:
    """A Trainer stage's flags for 3 logged steps, checkpointed at the end."""
    args = {"model_name_or_path": model, "output_dir": out, "max_steps": 3, "save_steps": 3, "logging_steps": 1,
            "learning_rate": 1e-3, "lr_scheduler_type": "constant", "max_length": 64, "seed": 0, "report_to": "none",
            "disable_tqdm": "true", "per_device_train_batch_size": 4, **kw}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir):
    """Data for each stage, a random 1-label reward model with reward_stats.json, and the stages' flags (one process
    adds `--gradient_accumulation_steps 2` to sft and dpo)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(d / "rm")
    tok.save_pretrained(d / "rm")
    (d / "rm" / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0, "n": 10}))
    prompts = [{"prompt": [{"role": "user", "content": f"Where is the cat {i}? " + "Say. " * (i % 4)}]} for i in range(12)]
    sft = write_jsonl(d / "sft.jsonl", sft_rows(48))
    train, test = write_jsonl(d / "pref.jsonl", pref_rows(48)), write_jsonl(d / "pref_test.jsonl", pref_rows(8, seed=1))
    return {
        "sft": lambda out: trainer_argv(tiny_model_dir, out, train_data=sft),
        "reward": lambda out: trainer_argv(tiny_model_dir, out, train_data=train, eval_data=test, min_eval_accuracy=0,
                                           min_eval_improvement=-1) + LORA,
        "dpo": lambda out: trainer_argv(tiny_model_dir, out, train_data=train, eval_data=test, ref_cache_dir=out.parent / f"{out.name}-cache") + LORA,
        "ppo": lambda out: ["--model_name_or_path", str(tiny_model_dir), *LORA, "--reward_model", str(d / "rm"),
                            "--prompts", write_jsonl(d / "prompts.jsonl", prompts), "--output_dir", str(out),
                            "--rollout_batch_size", "4", "--mini_batch_size", "2", "--num_ppo_epochs", "2", "--response_length", "6",
                            "--eval_prompts", "3", "--num_updates", "3", "--learning_rate", "3e-3", "--temperature", "1.5"],
    }


@pytest.fixture(scope="module")
def two(inputs, tmp_path_factory):
    """The outputs of sft, reward, dpo and ppo run by two processes through recipes/accelerate/ddp.yaml."""
    out = tmp_path_factory.mktemp("two")
    plan = out / "plan.json"
    plan.write_text(json.dumps([[stage] + inputs[stage](out / stage) for stage in ("sft", "reward", "dpo", "ppo")]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/ddp.yaml",
           "--main_process_port", "0", "tests/_multiprocess_driver.py", str(plan)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def run_one(stage: str, inputs, out: Path, *extra: str) -> None:
    from alignment.cli import main

    main([stage] + inputs[stage](out) + list(extra))


def trainer_losses(out: Path) -> list[float]:
    """The logged loss of every step (logging_steps 1), from the last checkpoint's trainer state."""
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return [h["loss"] for h in json.loads((last / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_sft_two_processes_equal_one(inputs, two, tiny_model_dir, tmp_path):
    """Full fine-tuning: the same 3 losses and the same weights, every tensor; only the main process wrote."""
    one = tmp_path / "sft"
    run_one("sft", inputs, one, "--gradient_accumulation_steps", "2")
    l1, l2 = trainer_losses(one), trainer_losses(two / "sft")
    assert len(l1) == 3 and l1[2] < l1[0]
    assert l2 == pytest.approx(l1, rel=1e-5)
    w1, w2 = load_file(one / "merged" / "model.safetensors"), load_file(two / "sft" / "merged" / "model.safetensors")
    assert_same_weights(w1, w2)
    init = load_file(tiny_model_dir / "model.safetensors")
    assert all(not torch.equal(w1[k], init[k]) for k in init)  # every tensor trained: the equality is not trivial
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in (two / "sft").iterdir())
    assert not [p.name for p in two.iterdir() if p.name.startswith(".")]  # no partial or temp directory left
    assert summary(two / "sft")["train_loss"] == pytest.approx(summary(one)["train_loss"], rel=1e-5)


def test_reward_two_processes_equal_one(inputs, two, tmp_path):
    """LoRA reward model: the same losses, adapter (with the score head), held-out accuracies and reward statistics."""
    one = tmp_path / "reward"
    run_one("reward", inputs, one, "--gradient_accumulation_steps", "2")
    l1, l2 = trainer_losses(one), trainer_losses(two / "reward")
    assert len(l1) == 3 and l1[2] < l1[0]
    assert l2 == pytest.approx(l1, rel=1e-5)
    assert_same_weights(load_file(one / "adapter" / "adapter_model.safetensors"),
                        load_file(two / "reward" / "adapter" / "adapter_model.safetensors"))
    h1, h2 = (json.loads((d / "health.json").read_text()) for d in (one, two / "reward"))
    assert h2 == h1 and h1["eval_accuracy"] > h1["eval_accuracy_before"]  # accuracies: counts of pairs over 8
    r1, r2 = (json.loads((d / "merged" / "reward_stats.json").read_text()) for d in (one, two / "reward"))
    assert r2 == pytest.approx(r1, rel=1e-4) and r1["n"] == 2 * 48


def test_dpo_two_processes_equal_one(inputs, two, tmp_path):
    """LoRA DPO: the reference pass split over the processes and cached once by the main process; the same losses,
    adapter and held-out accuracies."""
    one = tmp_path / "dpo"
    run_one("dpo", inputs, one, "--gradient_accumulation_steps", "2")
    l1, l2 = trainer_losses(one), trainer_losses(two / "dpo")
    assert len(l1) == 3 and l1[2] < l1[0]
    assert l2 == pytest.approx(l1, rel=1e-5)
    assert_same_weights(load_file(one / "adapter" / "adapter_model.safetensors"),
                        load_file(two / "dpo" / "adapter" / "adapter_model.safetensors"))
    c1, c2 = ({f.name.split("-")[0]: torch.load(f, weights_only=True) for f in d.glob("*.pt")}
              for d in (tmp_path / "dpo-cache", two / "dpo-cache"))
    assert sorted(c1) == sorted(c2) == ["eval", "train"]  # one file per split
    for split in c1:  # the same log-probs in the same row order
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            torch.testing.assert_close(c1[split][key], c2[split][key], rtol=1e-5, atol=1e-5)
    s1, s2 = summary(one), summary(two / "dpo")
    assert s2["eval_implicit_reward_accuracy"] == s1["eval_implicit_reward_accuracy"]
    assert s2["ref_cache_misses"] == s1["ref_cache_misses"] == ["train", "eval"]


def test_ppo_two_processes_equal_one(inputs, two, tmp_path):
    """Three PPO updates (4 episodes each, minibatches of 2, 2 epochs): every logged metric, the adapter, the value head
    and the held-out evaluation agree, and the processes drew the same responses (lengths, end-of-turn counts)."""
    one = tmp_path / "ppo"
    run_one("ppo", inputs, one)
    m1, m2 = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two / "ppo"))
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):
        assert b["val/response_length"] == a["val/response_length"] and b["val/num_eos_tokens"] == a["val/num_eos_tokens"]
        for k, v in a.items():
            assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (a["step"], k)
    assert len({m["objective/scores"] for m in m1}) == 3  # the batches differ, so agreeing on each is not luck
    a1 = load_file(one / "adapter" / "adapter_model.safetensors")
    assert_same_weights(a1, load_file(two / "ppo" / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 1e-3 for k, v in a1.items())  # LoRA B starts at 0: it trained
    assert_same_weights(load_file(one / "value_head.safetensors"), load_file(two / "ppo" / "value_head.safetensors"))
    assert summary(two / "ppo")["eval_after"] == pytest.approx(summary(one)["eval_after"], rel=1e-4, abs=1e-6)
