"""Reward functions for the online RL stages: hand-derived values, the spec syntax, user functions and their errors."""

from __future__ import annotations

import pytest

from alignment.errors import UserError
from alignment.rewards import (build_rewards, extract_answer, parse_reward_spec, total_reward, trl_reward_functions)
from alignment.sampling import FINISH_LENGTH, FINISH_STOP, Completion

ALICE = {"prompt": [{"role": "user", "content": "What is Alice's pet?"}], "answer": "cat", "kind": "person", "entity": "Alice",
         "attribute": "pet", "choices": ["cat", "dog", "hen"]}
SUM = {"prompt": [{"role": "user", "content": "What is 3 plus 4?"}], "answer": "7", "kind": "arithmetic", "entity": "3+4",
       "attribute": "sum", "choices": [str(i) for i in range(2, 19)]}


def comp(text: str, stopped: bool = True) -> Completion:
    return Completion([], text, FINISH_STOP if stopped else FINISH_LENGTH, 0)


def values(spec: str, rows, texts, stopped=None):
    (f,) = build_rewards([spec], None, missing_eos_penalty=1.0)
    stopped = stopped or [True] * len(texts)
    return f(rows, [comp(t, s) for t, s in zip(texts, stopped)]), f.weight


def test_tinyworld_checker_reward():
    got, w = values("tinyworld", [ALICE] * 4 + [SUM] * 2,
                    ["Alice's pet is a cat.", "Alice has a dog.", "A cat or a dog.", "Bob's pet is a cat.", "3 plus 4 is 7.", "It is 8."])
    assert got == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0] and w == 1.0


def test_exact_match_uses_gsm8k_extraction():
    rows = [{"prompt": "q", "answer": "Natalia sold 48/2 = 24 clips.\n#### 72"}] * 6
    texts = ["She sold 72 clips in all.\n#### 72", "#### 1,072", "so the answer is 72.", "72 then 71", "#### 72.0", "it costs $72."]
    got, _ = values("exact_match", rows, texts)
    # lm-eval's gsm8k flexible-extract: the last number ("1,072" -> 1072 after dropping commas; "$72." -> 72 after dropping
    # $ and the final period); "72.0" is not "72" (it compares strings)
    assert got == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert extract_answer("We get $1,234.", "flexible") == "$1,234." and extract_answer("no digits here") is None
    assert extract_answer("3 and 5", "strict") is None and extract_answer("so #### 12", "strict") == "12"
    got, _ = values("exact_match:gold", [{"prompt": "q", "gold": 5}], ["it is 5"])
    assert got == [1.0]
    with pytest.raises(UserError, match="exact_match needs the field 'gold'"):
        values("exact_match:gold", [{"prompt": "q"}], ["5"])


def test_format_rewards_and_weights():
    got, w = values("ends_at_end_of_turn", [ALICE] * 2, ["done.", "cut off"], stopped=[True, False])
    assert got == [0.0, -1.0] and w == 1.0  # the missing_eos_penalty is its weight
    (f,) = build_rewards(["ends_at_end_of_turn"], None, missing_eos_penalty=0.5)
    assert f.weight == 0.5
    got, w = values("length:2:4@0.25", [ALICE] * 3, ["one", "one two three", "one two three four five"])
    assert got == [-1.0, 0.0, -1.0] and w == 0.25
    fs = build_rewards(["tinyworld@2", "ends_at_end_of_turn@3"], None, 1.0)
    total, means = total_reward(fs, [ALICE, ALICE], [comp("Alice's pet is a cat."), comp("A dog", stopped=False)])
    assert total.tolist() == [2.0, -3.0] and means == {"tinyworld": 0.5, "ends_at_end_of_turn": -0.5}


def test_spec_errors():
    assert parse_reward_spec("python:r.py:f@0.5") == ("python", ["r.py", "f"], 0.5)
    for bad, msg in (("oracle", "rewards: 'oracle'; expected one of"), ("length:5:2", "expected one of"), ("tinyworld@x", "is not a number"),
                     ("model", "model needs reward_model")):
        with pytest.raises(UserError, match=msg):
            build_rewards([bad], None, 1.0)
    with pytest.raises(UserError, match="each reward may appear once"):
        build_rewards(["tinyworld", "tinyworld@2"], None, 1.0)
    with pytest.raises(UserError, match="tinyworld needs answer and kind"):
        build_rewards(["tinyworld"], None, 1.0)[0]([{"prompt": "q"}], [comp("x")])


def test_user_python_function_and_its_errors(tmp_path):
    (tmp_path / "mine.py").write_text(
        "def brevity(prompts, completions, answer=None, **fields):\n"
        "    return [1.0 / (1 + len(c.split())) for c in completions]\n"
        "def raises(prompts, completions, **fields):\n"
        "    raise ValueError('no way')\n"
        "def text(prompts, completions, **fields):\n"
        "    return ['high' for _ in completions]\n"
        "def short(prompts, completions, **fields):\n"
        "    return [1.0]\n")
    got, _ = values(f"python:{tmp_path / 'mine.py'}:brevity", [ALICE] * 2, ["a b c", "a"])
    assert got == [0.25, 0.5]
    for name, msg in (("raises", r"raises \(from .*mine.py\) raised ValueError: no way"),
                      ("text", r"returned 'high' for sample 0 \('x'\); expected a finite number"),
                      ("short", "returned list; expected a list of 2 numbers"),
                      ("missing", "defines no function 'missing'")):
        with pytest.raises(UserError, match=msg):
            values(f"python:{tmp_path / 'mine.py'}:{name}", [ALICE] * 2, ["x", "y"])
    with pytest.raises(UserError, match="is not a .py file"):
        build_rewards([f"python:{tmp_path / 'none.py'}:f"], None, 1.0)


def test_trl_wrappers_rebuild_completions_and_pass_columns(tiny_tokenizer):
    """TRL calls f(prompts, completions, completion_ids, **columns): our wrapper decodes the ids up to the stop token and
    rebuilds the prompt rows from the columns, so the checker sees the row's answer."""
    fs = build_rewards(["tinyworld", "ends_at_end_of_turn"], None, 1.0)
    wrapped = trl_reward_functions(fs, tiny_tokenizer)
    assert [w.__name__ for w in wrapped] == ["tinyworld", "ends_at_end_of_turn"]
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [tiny_tokenizer.encode("3 plus 4 is 7.", add_special_tokens=False) + [end], tiny_tokenizer.encode("it is 8", add_special_tokens=False)]
    cols = {k: [SUM[k], SUM[k]] for k in ("answer", "kind", "entity", "attribute", "choices")}
    prompts = [SUM["prompt"], SUM["prompt"]]
    assert wrapped[0](prompts, ["", ""], ids, trainer_state=None, **cols) == [1.0, 0.0]
    assert wrapped[1](prompts, ["", ""], ids, **cols) == [0.0, -1.0]
