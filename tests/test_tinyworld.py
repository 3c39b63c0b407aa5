"""The tiny-world generator: determinism, honest splits, file formats, the ground-truth checker, the CLI."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from alignment.errors import UserError
from alignment.data import read_file_rows
from alignment.tinyworld import ATTRIBUTES, REJECTED_KINDS, TinyWorldConfig, check, cli, main, well_formed

FILES = ["corpus/train.jsonl", "corpus/heldout.jsonl", "sft/train.jsonl", "sft/eval.jsonl", "preference/train.jsonl",
         "preference/test.jsonl", "preference/facts_test.jsonl", "rl/prompts.jsonl", "qa/test.jsonl", "mmlu/dev/tinyworld_dev.csv", "mmlu/test/tinyworld_test.csv",
         "world.json", "stats.json", ".align-suite.json", "config.yaml"]


def read_jsonl(path) -> list:
    return [r.data for r in read_file_rows(path)]


def small_cfg(out, seed=0, **kw) -> TinyWorldConfig:
    """A smaller world than the default, for speed (the structure is the same)."""
    return TinyWorldConfig(output=str(out), seed=seed, num_people=16, statement_repeats=3, num_stories=40, num_quizzes=40, **kw)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tw") / "data"
    main(small_cfg(out))
    return out


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(world_dir, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    main(small_cfg(again))
    main(small_cfg(other, seed=1))
    assert sorted(p.relative_to(world_dir).as_posix() for p in world_dir.rglob("*") if p.is_file()) == sorted(FILES)
    for rel in FILES[:-2]:  # config.yaml differs only by the output path it records, the marker by its time
        assert (world_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert (world_dir / "corpus/train.jsonl").read_bytes() != (other / "corpus/train.jsonl").read_bytes()
    assert (world_dir / "world.json").read_bytes() != (other / "world.json").read_bytes()


def _key(record: dict) -> tuple[str, str]:
    """The fact a qa/rl record asks about, with the two directions of a sum or a friendship folded together."""
    if record["attribute"] == "sum":
        return ("sum", "+".join(sorted(record["entity"].split("+"))))
    if record["attribute"] == "friend":
        return ("friend", "/".join(sorted([record["entity"], record["answer"]])))
    return (record["entity"], record["attribute"])


def test_training_questions_and_evaluation_questions_are_disjoint(world_dir):
    qa = read_jsonl(world_dir / "qa/test.jsonl")
    rl = read_jsonl(world_dir / "rl/prompts.jsonl")
    eval_keys, train_keys = {_key(r) for r in qa}, {_key(r) for r in rl}
    assert len(qa) >= 30 and len(rl) >= 60
    assert not eval_keys & train_keys
    # SFT and preference prompts ask train facts only: every one of them is a question some rl record's fact answers
    eval_questions = {r["prompt"][0]["content"] for r in qa}
    train_prompts = [m["content"] for r in read_jsonl(world_dir / "sft/train.jsonl") for m in r["messages"] if m["role"] == "user"]
    train_prompts += [r["prompt"][0]["content"] for r in read_jsonl(world_dir / "preference/train.jsonl")]
    assert not eval_questions & set(train_prompts)
    named = {(r["entity"], r["attribute"]) for r in qa if r["kind"] != "arithmetic"}
    for q in train_prompts:
        for entity, attribute in named:
            assert not (re.search(rf"\b{entity}\b", q) and any(w in q for w in _attr_words(attribute))), q
    # the multiple-choice test asks exactly the eval facts
    test_rows = list(csv.DictReader(open(world_dir / "mmlu/test/tinyworld_test.csv", newline="")))
    assert [r["question"] for r in test_rows] == [r["prompt"][0]["content"] for r in qa]


def test_every_eval_fact_is_stated_in_the_corpus_but_never_quizzed(world_dir):
    corpus = [json.loads(line)["text"] for line in (world_dir / "corpus/train.jsonl").read_text().splitlines()]
    asks = lambda d: "Answer:" in d or d.startswith("Questions and answers about")  # quizzes and FAQ pages  # noqa: E731
    statements = [d for d in corpus if not asks(d)]
    quizzes = [d for d in corpus if asks(d)]
    assert statements and any("Answer:" in d for d in quizzes) and any("Answer:" not in d for d in quizzes)
    for r in read_jsonl(world_dir / "qa/test.jsonl"):
        if r["kind"] == "arithmetic":
            a, b = r["entity"].split("+")
            assert any(f"{a} plus {b} is {r['answer']}" in d or f"{a} + {b} = {r['answer']}" in d or f"{b} plus {a} is {r['answer']}" in d
                       or f"{b} + {a} = {r['answer']}" in d or f"of {a} and {b} is {r['answer']}" in d or f"add {a} and {b}, you get" in d
                       or f"{a} and {b} make" in d or f"of {b} and {a}" in d or f"add {b} and {a}" in d or f"{b} and {a} make" in d
                       for d in statements), r
        else:
            hits = sum(1 for d in statements if r["entity"] in d and check(r, d.split(". ")[0]) or
                       any(r["entity"] in s and check(r, s) for s in d.split(". ")))
            assert hits >= 3, r  # stated several times, in different documents
        # the quizzes never ask it: no quiz block contains the eval question's fact with its answer
        for d in quizzes:
            for block in d.split("\n\n")[1:]:
                q, _, _ = block.partition("\n")
                if r["kind"] != "arithmetic" and re.search(rf"\b{r['entity']}\b", q) and any(w in q for w in _attr_words(r["attribute"])):
                    raise AssertionError(f"eval fact quizzed in the corpus: {block!r}")


def _attr_words(attribute: str) -> list[str]:
    return {"town": ["live", "town", "home"], "pet": ["pet", "animal"], "color": ["color"], "job": ["job", "work", "trade"],
            "friend": ["friend"]}[attribute]


def test_formats_match_the_layout(world_dir):
    for r in read_jsonl(world_dir / "sft/train.jsonl"):
        roles = [m["role"] for m in r["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant" and set(roles) <= {"user", "assistant"}
    kinds = set()
    for r in read_jsonl(world_dir / "preference/train.jsonl"):
        assert [m["role"] for m in r["prompt"]] == ["user"]
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        assert r["chosen"][0]["content"] != r["rejected"][0]["content"]
        kinds.add(r["rejected_kind"])
    assert kinds == set(REJECTED_KINDS)
    rows = list(csv.reader(open(world_dir / "mmlu/test/tinyworld_test.csv", newline="")))
    assert rows[0] == ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
    qa = read_jsonl(world_dir / "qa/test.jsonl")
    for row, rec in zip(rows[1:], qa):
        choices, ans = row[1:5], int(row[5])
        assert len(set(choices)) == 4 and choices[ans] == rec["answer"]
    assert len(list(csv.reader(open(world_dir / "mmlu/dev/tinyworld_dev.csv")))) == 1 + 5
    # the chosen answer of every training pair passes the checker; a wrong-fact rejection fails it
    rl = {r["prompt"][0]["content"]: r for r in read_jsonl(world_dir / "rl/prompts.jsonl")}
    stats = json.loads((world_dir / "stats.json").read_text())
    assert stats["eval_facts"] == len(qa) and stats["mmlu_test"] == len(qa)
    assert rl


@pytest.mark.parametrize("record,response,expected", [
    ({"kind": "person", "entity": "Alice", "attribute": "pet", "answer": "owl", "choices": ATTRIBUTES["pet"]["values"]}, "Alice's pet is an owl.", True),
    ({"kind": "person", "entity": "Alice", "attribute": "pet", "answer": "owl", "choices": ATTRIBUTES["pet"]["values"]}, "Alice has a pet OWL", True),
    ({"kind": "person", "entity": "Alice", "attribute": "pet", "answer": "owl", "choices": ATTRIBUTES["pet"]["values"]}, "Alice's pet is a cat.", False),
    ({"kind": "person", "entity": "Alice", "attribute": "pet", "answer": "owl", "choices": ATTRIBUTES["pet"]["values"]}, "An owl or a cat.", False),
    ({"kind": "person", "entity": "Alice", "attribute": "pet", "answer": "owl", "choices": ATTRIBUTES["pet"]["values"]}, "Alice likes bowling.", False),
    ({"kind": "person", "entity": "Alice", "attribute": "pet", "answer": "owl", "choices": ATTRIBUTES["pet"]["values"]}, "Bob's pet is an owl.", False),
    ({"kind": "person", "entity": "Alice", "attribute": "pet", "answer": "owl", "choices": ATTRIBUTES["pet"]["values"]}, "An owl.", True),
    ({"kind": "person", "entity": "Alice", "attribute": "pet", "answer": "owl", "choices": ATTRIBUTES["pet"]["values"]}, "", False),
    ({"kind": "relation", "entity": "Alice", "attribute": "friend", "answer": "Bob", "choices": ["Alice", "Bob", "Clara"]}, "Alice's best friend is Bob.", True),
    ({"kind": "relation", "entity": "Alice", "attribute": "friend", "answer": "Bob", "choices": ["Alice", "Bob", "Clara"]}, "Bob and Clara.", False),
    ({"kind": "arithmetic", "entity": "3+4", "attribute": "sum", "answer": "7", "choices": []}, "3 plus 4 is 7.", True),
    ({"kind": "arithmetic", "entity": "3+4", "attribute": "sum", "answer": "7", "choices": []}, "3 + 4 = 17.", False),
    ({"kind": "arithmetic", "entity": "3+4", "attribute": "sum", "answer": "7", "choices": []}, "It is 7, not 8", False),
])
def test_checker(record, response, expected):
    assert check(record, response) is expected


def test_well_formed():
    assert well_formed("Alice lives in Ashford.", stopped=True)
    assert not well_formed("Alice lives in Ashford.", stopped=False)  # ran into max_new_tokens
    assert not well_formed("Alice lives in Ashford", stopped=True)
    assert not well_formed("Alice lives.\n<|im_start|>user", stopped=True)
    assert not well_formed(" ".join(["and so on"] * 20) + ".", stopped=True)


def test_answers_task_scores_generations(world_dir, tiny_model_dir, monkeypatch):
    """The `answers` eval task: checked answers with hand-derived rates, then the real greedy path on a random model."""
    import alignment.sampling as sampling
    from alignment.sampling import FINISH_LENGTH, FINISH_STOP, Completion
    from evals.generative import evaluate_answers, read_answer_rows
    from evals.scoring import scoring_model

    rows = read_answer_rows([str(world_dir / "qa/test.jsonl")], "tinyworld", limit=4)
    texts = [f"The answer is {rows[0]['answer']}.", f"The answer is {rows[1]['answer']}.", "Go away", "The answer is"]

    def fake_generate(model, tok, prompts, params, **kw):  # 2 right and stopped, 1 wrong and stopped, 1 cut off
        return [[Completion([], t, FINISH_STOP if i < 3 else FINISH_LENGTH, 0)] for i, t in enumerate(texts[:len(prompts)])]

    lm = scoring_model(str(tiny_model_dir))
    monkeypatch.setattr(sampling, "generate", fake_generate)
    res, samples = evaluate_answers(lm, rows, batch_size=2)
    # well-formed: stopped, ends with punctuation, <= 30 words: the first two only ("Go away" has no period)
    assert (res["n"], res["answer_accuracy"], res["well_formed_rate"], res["stopped_rate"]) == (4, 0.5, 0.5, 0.75)
    assert res["answer_accuracy_stderr"] == pytest.approx((0.5 * 0.5 * 4 / 3 / 4) ** 0.5)
    assert [s["correct"] for s in samples] == [True, True, False, False]
    monkeypatch.undo()
    # the real path on a random tiny model: greedy, deterministic, and the text never holds the stop token
    res1, s1 = evaluate_answers(lm, rows[:3], max_new_tokens=6)
    res2, s2 = evaluate_answers(lm, rows[:3], max_new_tokens=6, batch_size=1)
    assert [s["answer"] for s in s1] == [s["answer"] for s in s2]  # batch size does not change greedy answers
    assert all("<|im_end|>" not in s["answer"] for s in s1)
    assert res1["answer_accuracy"] == sum(check(r, s["answer"]) for r, s in zip(rows, s1)) / 3


def test_cli_writes_data_and_bad_input_is_one_line(tmp_path):
    env = dict(os.environ)
    out = tmp_path / "d"
    args = ["--seed", "3", "--output", str(out), "--num_people", "8", "--statement_repeats", "1", "--num_stories", "5", "--num_quizzes", "5"]
    p = subprocess.run([sys.executable, "-m", "alignment.cli", "data", "tinyworld", *args], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert (out / "mmlu/test/tinyworld_test.csv").is_file() and "tinyworld: seed 3" in p.stdout
    bad = tmp_path / "bad"
    p = subprocess.run([sys.executable, "-m", "alignment.cli", "data", "tinywrld", "--output", str(bad)], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "tinywrld" in p.stderr and not bad.exists()
    # in process: a bad value names its key; an existing output is refused without overwrite
    with pytest.raises(SystemExit) as e:
        cli(["tinyworld", "--output", str(bad), "--num_people", "7"])
    assert e.value.code == 2 and not bad.exists()
    with pytest.raises(UserError, match="num_people"):
        main(TinyWorldConfig(output=str(bad), num_people=7))
    with pytest.raises(UserError, match="overwrite"):
        main(small_cfg(out))
    assert (out / "mmlu/test/tinyworld_test.csv").is_file()


def test_wrong_fact_pairs_differ_only_in_the_fact(world_dir):
    """preference/facts_test.jsonl: one pair per eval fact, the same sentence with the right value and a wrong one, so
    a reward model can only rank it by knowing the fact."""
    qa = {r["prompt"][0]["content"]: r for r in read_jsonl(world_dir / "qa/test.jsonl")}
    rows = read_jsonl(world_dir / "preference/facts_test.jsonl")
    assert len(rows) == len(qa) and all(r["rejected_kind"] == "wrong_fact" for r in rows)
    for r in rows:
        rec = qa[r["prompt"][0]["content"]]  # the canonical question of an eval fact
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert check(rec, chosen) and not check(rec, rejected)
        a, b = chosen.split(), rejected.split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1, (chosen, rejected)
