"""Reward-model accuracy (padding-independent scoring), DPO implicit-reward accuracy, win rate and KL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alignment.modeling import reward_scores
from alignment.rewards import RewardModel
from alignment.tokens import encode_prompt, reply_ids
from evals.preference import evaluate_dpo_accuracy, evaluate_reward_accuracy, evaluate_win_rate, read_pairs, read_prompts
from evals.scoring import loglikelihoods, scoring_model


@pytest.fixture(scope="module")
def other_policy(tiny_tokenizer_dir, tmp_path_factory):
    from pretrain.export import ExportConfig, main

    out = tmp_path_factory.mktemp("pol") / "policy"
    main(ExportConfig(tokenizer=str(tiny_tokenizer_dir), preset="test", output_dir=str(out), seed=5))
    return out


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"How many {w}?"}], "chosen": [{"role": "assistant", "content": f"Three {w}."}],
             "rejected": [{"role": "assistant", "content": "I do not know what you mean at all."}]} for w in ("cats", "dogs", "hills")]
    rows.append({"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
                 "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."})  # hh-rlhf full-text dialogue
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_reward_scores_ignore_padding_and_dedup(reward_dir):
    rm = RewardModel(str(reward_dir))
    tok = rm.tokenizer
    seqs = [tok.encode("the cat sat"), tok.encode("Alice likes the big red house and the river"), tok.encode("one"), tok.encode("the cat sat")]
    batched = reward_scores(rm.model, seqs, rm.pad, batch_size=3).tolist()
    with torch.no_grad():
        single = [float(rm.model(torch.tensor([s])).logits[0, 0]) for s in seqs]  # no padding at all
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(np.round(batched, 4))) == 3 and batched[0] == batched[3]  # identical sequences tie exactly


def test_reward_accuracy(reward_dir, pairs_file):
    pairs = read_pairs(str(pairs_file))
    hh = pairs[3]  # an hh-rlhf dialogue becomes a conversation: the shared turns, then the two last replies
    assert hh == {"prompt": [{"role": "user", "content": "Hi there"}], "chosen": [{"role": "assistant", "content": "Hello! How can I help?"}],
                  "rejected": [{"role": "assistant", "content": "Go away."}]}
    res, samples = evaluate_reward_accuracy(str(reward_dir), pairs, batch_size=2)
    margins = np.array([s["chosen_reward"] - s["rejected_reward"] for s in samples])
    assert res["n"] == 4 and res["acc"] == pytest.approx(float((margins > 0).mean()))
    assert res["margin"] == pytest.approx(float(margins.mean()))
    # the score of a reply is read at its end-of-turn token (one sequence, no padding)
    rm = RewardModel(str(reward_dir))
    p = encode_prompt(rm.tokenizer, hh["prompt"])
    seq = p + reply_ids(rm.tokenizer, p, hh["prompt"], "Go away.")
    assert seq[-1] == rm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        assert samples[3]["rejected_reward"] == pytest.approx(float(rm.model(torch.tensor([seq])).logits[0, 0]), abs=1e-5)


def test_dpo_accuracy(tiny_model_dir, other_policy, pairs_file):
    pairs = read_pairs(str(pairs_file))
    same, _ = evaluate_dpo_accuracy(str(tiny_model_dir), str(tiny_model_dir), pairs)
    assert same["margin"] == 0 and same["acc"] == 0  # identical models: no implicit reward
    res, samples = evaluate_dpo_accuracy(str(other_policy), str(tiny_model_dir), pairs, beta=0.5)
    pol, ref = scoring_model(str(other_policy)), scoring_model(str(tiny_model_dir))
    p = encode_prompt(pol.tokenizer, pairs[0]["prompt"])
    c = reply_ids(pol.tokenizer, p, pairs[0]["prompt"], pairs[0]["chosen"][0]["content"])
    expected = 0.5 * (loglikelihoods(pol, [(p, c)], progress=False)[0][0] - loglikelihoods(ref, [(p, c)], progress=False)[0][0])
    assert samples[0]["chosen_reward"] == pytest.approx(expected, abs=1e-4)


def test_win_rate_and_kl(tiny_model_dir, other_policy, reward_dir, tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "answer": "x"}) + "\n"
                                              for q in ("Who has the cat?", "Count to three.", "Where is the hill?")))
    prompts = read_prompts(str(tmp_path / "p.jsonl"))
    tie, _ = evaluate_win_rate(str(tiny_model_dir), str(tiny_model_dir), str(reward_dir), prompts, max_new_tokens=8, seed=3)
    assert tie["win_rate"] == 0.5 and tie["kl"] == pytest.approx(0.0, abs=1e-6)  # same model, same seeds: same samples
    res, samples = evaluate_win_rate(str(other_policy), str(tiny_model_dir), str(reward_dir), prompts, max_new_tokens=8, seed=3)
    assert len(samples) == 3 and any(s["policy_response"] != s["reference_response"] for s in samples)
    outcome = [1.0 if s["policy_reward"] > s["reference_reward"] else 0.0 if s["policy_reward"] < s["reference_reward"] else 0.5 for s in samples]
    assert res["win_rate"] == pytest.approx(np.mean(outcome))
    assert res["win_rate_ci95"][0] <= res["win_rate"] <= res["win_rate_ci95"][1]
    assert res["kl"] != 0 and np.isfinite(res["kl"])


def test_win_rate_with_several_samples_per_prompt(tiny_model_dir, other_policy, reward_dir, tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "answer": "x"}) + "\n"
                                              for q in ("Who has the cat?", "Count to three.", "Where is the hill?")))
    prompts = read_prompts(str(tmp_path / "p.jsonl"))
    tie, _ = evaluate_win_rate(str(tiny_model_dir), str(tiny_model_dir), str(reward_dir), prompts, max_new_tokens=8, seed=3, num_samples=3)
    # same model, same seeds: the k samples match, so each prompt's k*k comparisons are symmetric around a half
    assert tie["win_rate"] == pytest.approx(0.5) and tie["kl"] == pytest.approx(0.0, abs=1e-6) and tie["num_samples"] == 3
    res, samples = evaluate_win_rate(str(other_policy), str(tiny_model_dir), str(reward_dir), prompts, max_new_tokens=8, seed=3, num_samples=3)
    assert len(samples) == 3 and all(len(s["policy_rewards"]) == len(s["reference_rewards"]) == 3 for s in samples)
    # each prompt's outcome recomputed by hand from its 3 x 3 rewards
    per_prompt = [np.mean([1.0 if a > b else 0.0 if a < b else 0.5 for a in s["policy_rewards"] for b in s["reference_rewards"]])
                  for s in samples]
    assert [s["outcome"] for s in samples] == pytest.approx(per_prompt)
    assert res["win_rate"] == pytest.approx(np.mean(per_prompt))
    assert res["win_rate_stderr"] == pytest.approx(np.std(per_prompt, ddof=1) / np.sqrt(3))
    assert samples[0]["policy_response"] == samples[0]["policy_responses"][0]
    # seeded: the same call samples the same responses and gives the same number
    again, again_samples = evaluate_win_rate(str(other_policy), str(tiny_model_dir), str(reward_dir), prompts, max_new_tokens=8, seed=3,
                                    num_samples=3)
    assert [s["policy_responses"] for s in again_samples] == [s["policy_responses"] for s in samples]
    assert again["win_rate"] == res["win_rate"]


def test_reward_scores_keep_the_end_of_sequences_longer_than_the_reward_model_context(reward_dir):
    rm = RewardModel(str(reward_dir))
    ctx = rm.model.config.max_position_embeddings
    long_prompt = [{"role": "user", "content": "the cat sat on the hill " * ctx}]
    seq = rm.sequences([long_prompt], ["Yes."])[0]
    assert len(seq) > ctx
    got = rm.score([long_prompt], ["Yes."]).tolist()
    with torch.no_grad():
        assert got[0] == pytest.approx(float(rm.model(torch.tensor([seq[-ctx:]])).logits[0, 0]), abs=1e-5)
    assert np.isfinite(got[0])
