"""recipes/dpo.py in-process on the tiny test model: reference cache reuse, adapter-disabled reference, 8/4-bit, resume."""

from __future__ import annotations

import pytest
import torch

from _post_utils import Interrupt, interrupt_after, lora_kwargs, one_thread, pref_rows, training_kwargs, write_jsonl  # noqa: F401
from alignment.compat import DPOConfig, DPOTrainer, ModelConfig
from alignment.errors import UserError
from recipes.dpo import DPOScriptArguments, completion_logps, main


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo_data")
    return write_jsonl(d / "train.jsonl", pref_rows(96, seed=0)), write_jsonl(d / "test.jsonl", pref_rows(24, seed=1))


def run_dpo(model, data, out, cache, model_kw=None, **train):
    cfg = (DPOScriptArguments(train_data=[data[0]], eval_data=[data[1]], ref_cache_dir=str(cache)),
           DPOConfig(**training_kwargs(out, **train)),
           ModelConfig(**(model_kw or lora_kwargs(model))))
    return main(cfg)


def count_ref_forwards(monkeypatch) -> dict:
    """Count calls of TRL's reference log-prob computation (one per batch)."""
    calls = {"n": 0}
    original = DPOTrainer.compute_ref_log_probs

    def counted(self, *a, **k):
        calls["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", counted)
    return calls


def test_reference_logps_are_cached_and_reused_across_beta_and_loss_type(tiny_model_dir, pref_data, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alignment.data import tokenize_preference
    from alignment.modeling import load_tokenizer
    from alignment.data import load_preference_pairs as load_pairs

    cache = tmp_path / "cache"
    calls = count_ref_forwards(monkeypatch)
    first = run_dpo(tiny_model_dir, pref_data, tmp_path / "sigmoid", cache, max_steps=8, beta=0.1, loss_type=["sigmoid"])
    assert calls["n"] > 0 and first["ref_cache_misses"] == ["train", "eval"] and len(list(cache.glob("*.pt"))) == 2
    assert first["changed_tensors"] == first["trainable_tensors"]
    assert first["eval_implicit_reward_accuracy"] >= 0.75, first  # the policy moved towards chosen replies

    calls["n"] = 0
    second = run_dpo(tiny_model_dir, pref_data, tmp_path / "ipo", cache, max_steps=2, beta=0.5, loss_type=["ipo"])
    assert calls["n"] == 0 and second["ref_cache_hits"] == ["train", "eval"] and not second["ref_cache_misses"]
    assert second["train_loss"] != first["train_loss"]

    # the cached reference is the input model itself (LoRA adapter disabled), computed independently here
    blob = torch.load(next(cache.glob("eval-*.pt")), weights_only=True)
    tok = load_tokenizer(tiny_model_dir)
    pairs, wheres = load_pairs([pref_data[1]], "test", 0, "error", "e")
    rows = tokenize_preference(tok, pairs, 64, "truncate", "e", wheres)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref_c, ref_r = completion_logps(base, rows, tok.pad_token_id)
    torch.testing.assert_close(blob["ref_chosen_logps"].float(), ref_c, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(blob["ref_rejected_logps"].float(), ref_r, atol=1e-4, rtol=1e-4)
    # ...and the trained adapter does move the policy away from it
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "sigmoid" / "adapter")
    pol_c, _ = completion_logps(policy, rows, tok.pad_token_id)
    assert (pol_c - ref_c).abs().max() > 1e-2

    # another model (or tokenizer, or data) is another key: recomputed, not reused
    calls["n"] = 0
    third = run_dpo(tmp_path / "sigmoid" / "merged", pref_data, tmp_path / "from-dpo", cache, max_steps=1)
    assert calls["n"] > 0 and third["ref_cache_misses"] == ["train", "eval"]


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantized_lora_dpo_runs_and_merges(bnb_model_dir, pref_data, tmp_path, quant):
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"dpo-{quant}"
    s = run_dpo(bnb_model_dir, pref_data, out, tmp_path / "cache", model_kw=lora_kwargs(bnb_model_dir, quant), max_steps=3)
    assert s["changed_tensors"] == s["trainable_tensors"] == 2 * 7 * 2
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.model.layers[1].mlp.down_proj.weight.dtype == torch.float32 and (out / "adapter" / "adapter_config.json").is_file()


def test_full_finetuning_dpo_uses_the_initial_model_as_reference(tiny_model_dir, pref_data, tmp_path):
    s = run_dpo(tiny_model_dir, pref_data, tmp_path / "full", tmp_path / "cache", model_kw=lora_kwargs(tiny_model_dir, use_peft=False),
                max_steps=4, learning_rate=1e-3)
    assert s["adapter"] is None and s["changed_tensors"] == s["trainable_tensors"] == 20  # every tensor of the model
    assert s["eval_implicit_reward_accuracy"] > 0.5


def test_interrupted_dpo_resumes(tiny_model_dir, pref_data, tmp_path, monkeypatch):
    out = tmp_path / "dpo-resume"
    interrupt_after(monkeypatch, DPOTrainer, 3)
    with pytest.raises(Interrupt):
        run_dpo(tiny_model_dir, pref_data, out, tmp_path / "cache", max_steps=5, save_steps=2)
    calls = interrupt_after(monkeypatch, DPOTrainer, None)
    s = run_dpo(tiny_model_dir, pref_data, out, tmp_path / "cache", max_steps=5, save_steps=2)
    assert s["resumed_from"].endswith("checkpoint-2") and s["steps"] == 5 and calls["n"] == 3
    assert s["ref_cache_hits"] == ["train", "eval"]  # the interrupted run had already cached the reference


def test_bad_loss_type_and_missing_model(tiny_model_dir, pref_data, tmp_path):
    with pytest.raises(UserError, match="loss_type: 'sigmoidd' is not a TRL DPO loss"):
        run_dpo(tiny_model_dir, pref_data, tmp_path / "o", tmp_path / "c", loss_type=["sigmoidd"])
    with pytest.raises(UserError, match="model directory not found"):
        run_dpo(tmp_path / "nope", pref_data, tmp_path / "o", tmp_path / "c")
    assert not (tmp_path / "o").exists()
