"""Shared helpers for the post-training tests (SFT, reward, DPO): toy data files and CPU configs for a few steps."""

from __future__ import annotations

import json
import random

import pytest
import torch

NAMES = ["Alice", "Bob", "Carol", "Dan"]
COLORS = ["red", "blue", "green"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on this shared 2-core box, 2 threads make tiny matmuls ~50x slower (spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_jsonl(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Toy conversations with short, fixed-shape answers (a tiny model learns them, and to stop, in ~60 steps)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, color = rng.choice(NAMES), rng.choice(COLORS)
        rows.append({"messages": [{"role": "user", "content": f"What color does {name} like?"},
                                  {"role": "assistant", "content": f"{name} likes {color}."}]})
    return rows


def pref_rows(n: int, seed: int = 0) -> list[dict]:
    """Toy conversational preference pairs: a well-formed answer is preferred over a degenerate one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, color = rng.choice(NAMES), rng.choice(COLORS)
        bad = rng.choice(["I do not know.", "no no no no", f"{name} {name} {name}"])
        rows.append({"prompt": [{"role": "user", "content": f"What color does {name} like?"}],
                     "chosen": [{"role": "assistant", "content": f"{name} likes {color}."}],
                     "rejected": [{"role": "assistant", "content": bad}]})
    return rows


def training_kwargs(output_dir, **overrides) -> dict:
    """TrainingArguments for a few CPU steps with no reporting and no progress bars."""
    kw = dict(output_dir=str(output_dir), use_cpu=True, bf16=False, report_to="none", disable_tqdm=True,
              per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=3e-3, max_steps=6,
              save_steps=1000, logging_steps=1000, max_length=64, seed=0, lr_scheduler_type="constant",
              dataloader_num_workers=0)
    kw.update(overrides)
    return kw


def lora_kwargs(model_path, quant: str | None = None, use_peft: bool = True) -> dict:
    """ModelConfig kwargs: LoRA r=8 without dropout, optionally 8-bit or 4-bit."""
    return dict(model_name_or_path=str(model_path), use_peft=use_peft, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                load_in_8bit=quant == "8bit", load_in_4bit=quant == "4bit")


class Interrupt(Exception):
    """Raised by a patched training step to simulate a run killed mid-way."""


def interrupt_after(monkeypatch, trainer_cls, n_steps: int) -> dict:
    """Patch trainer_cls.training_step to raise Interrupt on call n_steps+1; returns the call counter."""
    calls = {"n": 0}
    monkeypatch.undo()  # drop an earlier patch of this test, so we wrap the real training_step
    original = trainer_cls.training_step

    def step(self, *a, **k):
        calls["n"] += 1
        if n_steps is not None and calls["n"] > n_steps:
            raise Interrupt(f"interrupted after {n_steps} steps")
        return original(self, *a, **k)

    monkeypatch.setattr(trainer_cls, "training_step", step)
    return calls
