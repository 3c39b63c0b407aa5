"""recipes/reward.py in-process on the tiny test model: learning, health gate, padding-side scoring, stats, 8/4-bit, resume."""

from __future__ import annotations

import json

import pytest
import torch

from _post_utils import Interrupt, interrupt_after, lora_kwargs, one_thread, pref_rows, training_kwargs, write_jsonl  # noqa: F401
from alignment.compat import ModelConfig, RewardConfig
from alignment.errors import UserError
from recipes.reward import RewardScriptArguments, main


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref_data")
    return write_jsonl(d / "train.jsonl", pref_rows(160, seed=0)), write_jsonl(d / "test.jsonl", pref_rows(32, seed=1))


NO_GATE = {"min_eval_accuracy": 0.0, "min_eval_improvement": -1.0}  # for tests of mechanics (resume, 8/4-bit), not learning


def run_reward(model, data, out, script=None, model_kw=None, **train):
    cfg = (RewardScriptArguments(train_data=[data[0]], eval_data=[data[1]], **(script or {})),
           RewardConfig(**training_kwargs(out, **train)),
           ModelConfig(**(model_kw or lora_kwargs(model))))
    return main(cfg)


def test_reward_learns_passes_gate_and_writes_stats(tiny_model_dir, pref_data, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignment.modeling import reward_scores
    from alignment.data import load_preference_pairs
    from recipes.reward import to_reward_rows

    out = tmp_path / "rm"
    s = run_reward(tiny_model_dir, pref_data, out, script={"min_eval_accuracy": 0.9, "min_eval_improvement": 0.15}, max_steps=30)
    assert s["eval_accuracy"] >= 0.9 and s["eval_accuracy"] > s["eval_accuracy_before"] + 0.15 and s["passed"]
    assert s["changed_tensors"] == s["trainable_tensors"]
    merged = out / "merged"
    stats = json.loads((merged / "reward_stats.json").read_text())
    assert stats["n"] == 2 * 160 and stats == s["reward_stats"]
    # the merged plain model reproduces the statistics (score head + merged LoRA made it into merged/)
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    assert model.config.pad_token_id == tok.pad_token_id and model.config.num_labels == 1
    pairs, wheres = load_preference_pairs([pref_data[0]], "train", 0, "error", "t")
    rows = to_reward_rows(tok, pairs, wheres, 64, "truncate", "t")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert all(r["chosen_ids"][-1] == end and r["rejected_ids"][-1] == end for r in rows)  # the score is read at end of turn
    scores = torch.cat([reward_scores(model, [r["chosen_ids"] for r in rows], tok.pad_token_id),
                        reward_scores(model, [r["rejected_ids"] for r in rows], tok.pad_token_id)])
    assert abs(scores.mean().item() - stats["mean"]) < 1e-3 and abs(scores.std().item() - stats["std"]) < 1e-3
    assert json.loads((out / "health.json").read_text())["passed"] is True


def test_score_is_read_at_last_real_token_whatever_the_padding(tiny_model_dir):
    from alignment.modeling import load_model, load_tokenizer, reward_scores

    torch.manual_seed(0)
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, ModelConfig(model_name_or_path=str(tiny_model_dir)), "reward", tok).eval()
    seqs = [list(range(10, 10 + n)) for n in (3, 11, 7, 1)]
    alone = torch.stack([reward_scores(model, [s], tok.pad_token_id)[0] for s in seqs])
    batched = reward_scores(model, seqs, tok.pad_token_id, batch_size=4)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert alone.std() > 1e-3  # different sequences score differently: the check above can fail
    # the model's own pooling (as used by TRL's right-padded training batches) picks the same token
    ids = torch.full((len(seqs), 11), tok.pad_token_id)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s)
    with torch.no_grad():
        trl_style = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits[:, 0]
    torch.testing.assert_close(trl_style, alone, atol=1e-5, rtol=1e-5)


def test_health_gates_fail_clearly_and_leave_the_previous_output(tiny_model_dir, pref_data, tmp_path):
    """An absolute bar and an improvement bar: a failing run names the bar and leaves the previous result as it was."""
    out = tmp_path / "rm-bad"
    out.mkdir()
    (out / ".align-suite.json").write_text("{}")
    (out / "keep.txt").write_text("the previous result")
    with pytest.raises(UserError, match=r"held-out pairwise accuracy .* < min_eval_accuracy 0.99; .*rm-bad left as it was"):
        run_reward(tiny_model_dir, pref_data, out, script={"min_eval_accuracy": 0.99, "overwrite": True}, max_steps=1)
    with pytest.raises(UserError, match=r"is not above the untrained model's .* \+ min_eval_improvement 0.9"):
        run_reward(tiny_model_dir, pref_data, out, script={"min_eval_accuracy": 0.0, "min_eval_improvement": 0.9, "overwrite": True},
                   max_steps=1)
    assert sorted(p.name for p in out.iterdir()) == [".align-suite.json", "keep.txt"]
    assert not (tmp_path / ".rm-bad.partial").exists()  # no checkpoints of a rejected run left behind


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantized_lora_reward_runs_and_merges(bnb_model_dir, pref_data, tmp_path, quant):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / f"rm-{quant}"
    s = run_reward(bnb_model_dir, pref_data, out, script=NO_GATE, model_kw=lora_kwargs(bnb_model_dir, quant), max_steps=3)
    assert s["changed_tensors"] == s["trainable_tensors"] == 2 * 7 * 2 + 1  # LoRA A/B + the score head
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    base = AutoModelForSequenceClassification.from_pretrained(bnb_model_dir, num_labels=1)
    adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    x = torch.randint(4, 400, (2, 9))
    torch.testing.assert_close(merged(x).logits, adapter(x).logits, atol=1e-4, rtol=1e-4)


def test_interrupted_reward_resumes(tiny_model_dir, pref_data, tmp_path, monkeypatch):
    from alignment.compat import RewardTrainer

    out = tmp_path / "rm-resume"
    interrupt_after(monkeypatch, RewardTrainer, 3)
    with pytest.raises(Interrupt):
        run_reward(tiny_model_dir, pref_data, out, script=NO_GATE, max_steps=5, save_steps=3)
    assert not out.exists()  # nothing in place until the run finishes
    calls = interrupt_after(monkeypatch, RewardTrainer, None)
    s = run_reward(tiny_model_dir, pref_data, out, script=NO_GATE, max_steps=5, save_steps=3)
    assert s["resumed_from"].endswith("checkpoint-3") and s["steps"] == 5 and calls["n"] == 2


def test_chosen_equal_to_rejected_is_an_error(tiny_model_dir, tmp_path):
    rows = pref_rows(4)
    rows[2]["rejected"] = rows[2]["chosen"]
    bad = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(UserError, match="pairs.jsonl:3: chosen equals rejected"):
        run_reward(tiny_model_dir, (bad, bad), tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_replies_cut_before_end_of_turn_are_dropped_and_counted(tiny_tokenizer, capsys):
    from recipes.reward import to_reward_rows

    pairs = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello there. " * n}],
              "rejected": [{"role": "assistant", "content": "No."}]} for n in (1, 40)]
    rows = to_reward_rows(tiny_tokenizer, pairs, ["p:1", "p:2"], 48, "truncate", "train_data")
    assert len(rows) == 1 and "dropped 1 of 2 pairs whose reply was cut before <|im_end|>" in capsys.readouterr().err
    with pytest.raises(UserError, match="every pair was cut before its end of turn"):
        to_reward_rows(tiny_tokenizer, pairs[1:], ["p:2"], 48, "truncate", "train_data")
