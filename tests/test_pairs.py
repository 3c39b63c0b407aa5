"""`align pairs`: on-policy pairs are the best and worst of a policy's own samples, by checker then reward model."""

from __future__ import annotations

import json

import pytest

from _post_utils import one_thread  # noqa: F401  (autouse fixture)
from alignment.rewards import RewardModel
from alignment.tokens import encode_prompt, reply_ids
from recipes.pairs import PairsConfig, cli, main, pick_pairs


def test_pick_pairs_pairs_best_with_worst_and_respects_margin_and_checker():
    scores = [(0, 1.0), (0, 3.0), (0, -2.0), (0, 0.5)]
    assert pick_pairs(scores, 1, 0.0) == [(1, 2)]
    assert pick_pairs(scores, 2, 0.0) == [(1, 2), (0, 3)]
    assert pick_pairs(scores, 2, 1.0) == [(1, 2)]  # the second pair differs by 0.5 only
    assert pick_pairs([(0, 1.0), (0, 1.0)], 1, 0.0) == []  # a tie gives no pair
    # a correct answer beats every incorrect one, whatever the reward; the margin applies within a group only
    assert pick_pairs([(1, -5.0), (0, 4.0), (0, 3.9)], 1, 10.0) == [(0, 2)]


@pytest.fixture()
def prompts_file(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": q}], "answer": a, "kind": "arithmetic", "entity": e, "attribute": "sum"}
            for q, a, e in (("What is 2 plus 3?", "5", "2+3"), ("What is 1 plus 1?", "2", "1+1"), ("What is 4 plus 4?", "8", "4+4"))]
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _cfg(model, reward, prompts, out, **kw):
    return PairsConfig(model_name_or_path=str(model), reward_model=str(reward) if reward else None, prompts_file=str(prompts),
                       output_dir=str(out), num_samples=4, max_new_tokens=6, seed=3, **kw)


def test_pairs_are_the_best_and_worst_samples_by_reward(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    out = tmp_path / "pairs"
    summary = main(_cfg(tiny_model_dir, reward_dir, prompts_file, out, pairs_per_prompt=2))
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert summary["pairs"] == len(pairs) >= 3 and summary["samples"] == len(samples) == 12
    # the stored rewards are the reward model's raw scores of prompt + answer (ending at <|im_end|>), recomputed
    # here one sequence at a time, without padding
    import torch

    rm = RewardModel(str(reward_dir))
    tok = rm.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [json.loads(x)["prompt"] for x in prompts_file.read_text().splitlines()]
    for s in samples:
        p = encode_prompt(tok, prompts[s["prompt_index"]])
        seq = p + reply_ids(tok, p, prompts[s["prompt_index"]], s["response"])
        assert seq[-1] == end  # the score is read at the end-of-turn token
        with torch.no_grad():
            expected = float(rm.model(torch.tensor([seq])).logits[0, 0])
        assert s["reward"] == pytest.approx(expected, abs=1e-5)
    for p in pairs:
        i = prompts.index(p["prompt"])
        rewards = sorted(s["reward"] for s in samples if s["prompt_index"] == i and s["response"].strip())
        assert p["chosen_score"][1] > p["rejected_score"][1]
        assert p["chosen_score"][1] in rewards[-2:] and p["rejected_score"][1] in rewards[:2]
        assert p["chosen"][0]["content"] != p["rejected"][0]["content"]
    # the same seed gives the same pairs
    main(_cfg(tiny_model_dir, reward_dir, prompts_file, tmp_path / "again", pairs_per_prompt=2))
    assert (tmp_path / "again" / "pairs.jsonl").read_bytes() == (out / "pairs.jsonl").read_bytes()


def test_checker_ranks_before_the_reward(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    out = tmp_path / "checked"
    main(_cfg(tiny_model_dir, reward_dir, prompts_file, out, checker="tinyworld"))
    for p in (json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()):
        assert p["chosen_score"] >= p["rejected_score"] and p["chosen_score"] != p["rejected_score"]
        assert p["rejected_score"][0] == 0  # a random model's sums are wrong: nothing correct is ever rejected


def test_checker_result_orders_the_pair(tiny_model_dir, reward_dir, tmp_path):
    """A correct sample is chosen over every incorrect one, whatever the reward model says: with the reward model
    alone the pair for this prompt is the reward's best and worst; with the checker the correct answer wins."""

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "Say the number."}], "answer": "5",
                                   "kind": "arithmetic", "entity": "2+3", "attribute": "sum"}) + "\n")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["the 5.", "the cat.", "a 7.", "one big 5 tree."]  # samples 0 and 3 are correct (last number is 5)
    fake = [[c for c in tok.encode(t)] for t in texts]

    import alignment.sampling as sampling
    from alignment.sampling import FINISH_STOP, Completion

    def fixed(model, tokenizer, prompts, params, **kw):
        return [[Completion(ids, t, FINISH_STOP, 0) for ids, t in zip(fake, texts)] for _ in prompts]

    orig = sampling.generate
    sampling.generate = fixed
    try:
        main(_cfg(tiny_model_dir, reward_dir, prompts, tmp_path / "rm_only"))
        main(_cfg(tiny_model_dir, reward_dir, prompts, tmp_path / "checked", checker="tinyworld"))
    finally:
        sampling.generate = orig
    rm = RewardModel(str(reward_dir))
    r = rm.score([[{"role": "user", "content": "Say the number."}]] * 4, texts).tolist()
    by_reward = sorted(range(4), key=lambda j: r[j])
    only = json.loads((tmp_path / "rm_only" / "pairs.jsonl").read_text().splitlines()[0])
    assert (only["chosen"][0]["content"], only["rejected"][0]["content"]) == (texts[by_reward[-1]], texts[by_reward[0]])
    checked = json.loads((tmp_path / "checked" / "pairs.jsonl").read_text().splitlines()[0])
    best_correct = max((0, 3), key=lambda j: r[j])
    worst_wrong = min((1, 2), key=lambda j: r[j])
    assert (checked["chosen"][0]["content"], checked["rejected"][0]["content"]) == (texts[best_correct], texts[worst_wrong])
    assert checked["chosen_score"][0] == 1 and checked["rejected_score"][0] == 0


def test_bad_input_is_one_line_exit_2_and_no_output(tiny_model_dir, reward_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi?"}]}) + "\n")
    out = tmp_path / "never"
    for argv, expected in ((["--checker", "tinyworld"], "bad.jsonl:1: checker tinyworld needs answer, kind"),
                           (["--num_samples", "1"], "num_samples: 1; expected a number >= 2"),
                           (["--checker", "oracle"], "checker: 'oracle'")):
        with pytest.raises(SystemExit) as e:
            cli(["--model_name_or_path", str(tiny_model_dir), "--reward_model", str(reward_dir), "--prompts_file", str(bad),
                 "--output_dir", str(out), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and expected in err[0], err
        assert not out.exists()
