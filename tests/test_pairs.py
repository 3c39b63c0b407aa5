"""`align pairs`: on-policy pairs are the best and worst of a policy's own samples, by checker then reward model."""

from __future__ import annotations

import json

import pytest

from _post_utils import one_thread  # noqa: F401  (autouse fixture)
from evals.preference import _prompt_and_completion, load_reward_model, reward_scores
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
    # the stored rewards are the reward model's scores of prompt + answer, recomputed independently here
    rm, tok = load_reward_model(str(reward_dir))
    prompts = [json.loads(x)["prompt"] for x in prompts_file.read_text().splitlines()]
    seqs = [sum(_prompt_and_completion(tok, prompts[s["prompt_index"]], [{"role": "assistant", "content": s["response"]}]), [])
            for s in samples]
    for s, r in zip(samples, reward_scores(rm, tok, seqs)):
        assert s["reward"] == pytest.approx(r, abs=1e-5)
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


def test_bad_input_is_one_line_exit_2_and_no_output(tiny_model_dir, reward_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi?"}]}) + "\n")
    out = tmp_path / "never"
    for argv, expected in ((["--checker", "tinyworld"], "bad.jsonl:1: checker tinyworld needs answer, kind"),
                           (["--num_samples", "1"], "num_samples: 1; expected at least 2"),
                           (["--checker", "oracle"], "checker: 'oracle'")):
        with pytest.raises(SystemExit) as e:
            cli(["--model_name_or_path", str(tiny_model_dir), "--reward_model", str(reward_dir), "--prompts_file", str(bad),
                 "--output_dir", str(out), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and expected in err[0], err
        assert not out.exists()
