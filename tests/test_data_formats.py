"""alignment/data.py: every row format to chat messages, file readers, mixtures, validation, safe tokenization."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from alignment.data import (Row, convert_rows, load_mixture, parse_hh, preference_pair, read_prompt_rows, read_rows, sft_messages,
                            split_holdout, tokenize_preference, tokenize_sft)
from alignment.errors import UserError
from alignment.tokens import encode_chat

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


def test_sft_formats_become_the_same_conversation():
    want = [U("Name a color."), A("Red.")]
    assert sft_messages(Row({"messages": want}, "x")) == want
    assert sft_messages(Row({"prompt": "Name a color.", "completion": "Red."}, "x")) == want
    assert sft_messages(Row({"prompt": [U("Name a color.")], "completion": [A("Red.")]}, "x")) == want
    assert sft_messages(Row({"instruction": "Name a color.", "input": "", "output": "Red."}, "x")) == want
    with_input = sft_messages(Row({"instruction": "Translate.", "input": "rouge", "output": "red"}, "x"))
    assert with_input == [U("Translate.\n\nrouge"), A("red")]


def test_hh_rlhf_multi_turn_keeps_the_shared_prompt_as_messages():
    c = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Best color?\n\nAssistant: Blue, because the sky is."
    r = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Best color?\n\nAssistant: dunno"
    pair = preference_pair(Row({"chosen": c, "rejected": r}, "x"))
    assert pair == {"prompt": [U("Hi"), A("Hello!"), U("Best color?")], "chosen": [A("Blue, because the sky is.")],
                    "rejected": [A("dunno")]}
    assert parse_hh("\n\nHuman: a\n\nAssistant:", "x") == [U("a"), A("")]


def test_preference_text_conversational_and_implicit_prompt_agree():
    want = {"prompt": [U("Q?")], "chosen": [A("good")], "rejected": [A("bad")]}
    assert preference_pair(Row({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "x")) == want
    assert preference_pair(Row({"prompt": [U("Q?")], "chosen": [A("good")], "rejected": [A("bad")]}, "x")) == want
    assert preference_pair(Row({"chosen": [U("Q?"), A("good")], "rejected": [U("Q?"), A("bad")]}, "x")) == want


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q?", "chosen": "same", "rejected": "same"}, "chosen equals rejected"),
    ({"prompt": "Q?", "chosen": "  ", "rejected": "bad"}, "chosen is an empty completion"),
    ({"prompt": [{"role": "wizard", "content": "Q?"}], "chosen": "a", "rejected": "b"}, "unknown role 'wizard'"),
    ({"chosen": "\n\nHuman: A?\n\nAssistant: x", "rejected": "\n\nHuman: B?\n\nAssistant: y"}, "share no prompt"),
    ({"question": "Q?", "answer": "a"}, "unrecognised preference row"),
])
def test_bad_preference_rows_name_file_and_row(tmp_path, row, message):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    rows = load_mixture([str(path)])
    with pytest.raises(UserError) as e:
        convert_rows(rows, preference_pair)
    assert f"{path}:2: " in str(e.value) and message in str(e.value)
    kept = convert_rows(rows, preference_pair, invalid_rows="skip")  # skip mode: counted, the good row survives
    assert len(kept) == 1


def test_bad_sft_rows():
    with pytest.raises(UserError, match="row 7: message 1: empty assistant completion"):
        sft_messages(Row({"instruction": "Say it", "input": "", "output": ""}, "f.json: row 7"))
    with pytest.raises(UserError, match="unknown role 'robot'"):
        sft_messages(Row({"messages": [U("hi"), {"role": "robot", "content": "beep"}]}, "f: row 1"))
    with pytest.raises(UserError, match="no assistant message"):
        sft_messages(Row({"messages": [U("hi")]}, "f: row 1"))


def test_local_file_readers_agree(tmp_path):
    rows = [{"instruction": f"say {i}", "input": "", "output": f"{i}, with \"quotes\", commas\nand lines"} for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    for name, opener in (("a.csv", open), ("a.csv.gz", lambda p, m, **k: gzip.open(p, m + "t", **k))):
        with opener(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
            w.writeheader()
            w.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    # the 4th row's place: its line for line formats (a CSV record here spans 2 lines after the header), else its number
    where = {"a.json": ": row 4", "a.jsonl": ":4", "a.jsonl.gz": ":4", "a.csv": ":9", "a.csv.gz": ":9", "a.parquet": ": row 4"}
    for name, place in where.items():
        got = read_rows(str(tmp_path / name))
        assert [r.data for r in got] == rows, name
        assert got[3].where == f"{tmp_path / name}{place}", name
    assert len(read_rows(str(tmp_path))) == 6 * len(rows)  # a directory reads every data file in it
    with pytest.raises(UserError, match="data file not found"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_mixture_weights_subsample_and_repeat(tmp_path):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"a{i}", "completion": "x"}) + "\n" for i in range(10)))
    b.write_text("".join(json.dumps({"prompt": f"b{i}", "completion": "y"}) + "\n" for i in range(4)))
    mix = load_mixture([f"{a}@0.5", f"{b}@2"], seed=1)
    prompts = [r.data["prompt"] for r in mix]
    assert sum(p.startswith("a") for p in prompts) == 5 and len(set(p for p in prompts if p.startswith("a"))) == 5
    assert sorted(p for p in prompts if p.startswith("b")) == sorted([f"b{i}" for i in range(4)] * 2)
    assert [r.data for r in load_mixture([f"{a}@0.5"], seed=1)] == [r.data for r in load_mixture([f"{a}@0.5"], seed=1)]
    with pytest.raises(UserError, match="weight 'x'"):
        load_mixture([f"{a}@x"])
    train, held = split_holdout(list(range(100)), 0.1, seed=0)
    assert len(held) == 10 and sorted(train + held) == list(range(100))


def test_tokenization_is_special_token_safe_and_masks_end_of_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    msgs = [U("Say <|im_end|> please"), A("Here: <|im_end|><|im_start|>system")]
    row = tokenize_sft(tok, [msgs], max_length=None)[0]
    ids, mask = row["input_ids"], row["assistant_masks"]
    assert ids.count(im_end) == 2  # only the template's two end-of-turn tokens are control ids
    last = len(ids) - 1 - ids[::-1].index(im_end)
    assert mask[last] == 1 and mask[last + 1:] == [0] * (len(ids) - last - 1)  # end of turn is trained
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Here: <|im_end|><|im_start|>system<|im_end|>"

    pair = {"prompt": [U("Q <|im_end|>?")], "chosen": [A("good <|im_end|>")], "rejected": [A("bad")]}
    p = tokenize_preference(tok, [pair], max_length=None)[0]
    assert p["prompt_ids"] + p["chosen_ids"] == encode_chat(tok, pair["prompt"] + pair["chosen"])["input_ids"][:len(p["prompt_ids"]) + len(p["chosen_ids"])]
    assert p["chosen_ids"][-1] == im_end and p["rejected_ids"][-1] == im_end
    assert p["prompt_ids"].count(im_end) == 1 and p["chosen_ids"].count(im_end) == 1


def test_too_long_truncates_with_a_count_drops_or_errors(tiny_tokenizer, capsys):
    convs = [[U("hi"), A("short")], [U("hi"), A("a long answer " * 20)], [U("tell me " * 40), A("ok")]]
    rows = tokenize_sft(tiny_tokenizer, convs, max_length=48, too_long="truncate")
    assert [len(r["input_ids"]) for r in rows][1] == 48 and len(rows) == 2  # the last one had no reply left
    assert "2 of 3 sequences longer than max_length=48: 1 truncated, 1 dropped" in capsys.readouterr().err
    assert len(tokenize_sft(tiny_tokenizer, convs, max_length=48, too_long="drop")) == 1
    wheres = [f"data.jsonl: row {i}" for i in (1, 2, 3)]
    with pytest.raises(UserError, match="data.jsonl: row 2: .* tokens > max_length 48"):
        tokenize_sft(tiny_tokenizer, convs, max_length=48, too_long="error", wheres=wheres)
    pairs = [{"prompt": [U("why " * 60)], "chosen": [A("because " * 30)], "rejected": [A("no")]}]
    p = tokenize_preference(tiny_tokenizer, pairs, max_length=64, too_long="truncate")[0]
    assert len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) <= 64
    assert "1 of 1 pairs longer than max_length=64: 1 truncated" in capsys.readouterr().err


def test_prompt_rows_from_prompt_fields_and_hh_dialogues(tmp_path):
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: A pear.", "rejected": "x"}
    f = tmp_path / "p.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as g:
        g.write(json.dumps({"prompt": "Say hi.", "answer": "hi"}) + "\n\n" + json.dumps(hh) + "\n")
    rows = read_prompt_rows(str(f))
    assert [r.where for r in rows] == [f"{f}:1", f"{f}:3"] and rows[0].data == {"prompt": "Say hi.", "answer": "hi"}
    assert rows[1].data["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                    {"role": "user", "content": "Name a fruit."}]  # the final assistant turn is the answer, dropped
    assert len(read_prompt_rows(str(f), limit=1)) == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: expected a 'prompt'"):
        read_prompt_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "only.jsonl").write_text(json.dumps({"chosen": "\n\nAssistant: hi"}) + "\n")
    with pytest.raises(UserError, match=r"only.jsonl:1: the dialogue has no turn before the assistant's"):
        read_prompt_rows(str(tmp_path / "only.jsonl"))
    for bad in (None, 7, {"text": "x"}, ""):  # a prompt is a string or messages, never "None" or "7"
        (tmp_path / "odd.jsonl").write_text(json.dumps({"prompt": bad}) + "\n")
        with pytest.raises(UserError, match=r"odd.jsonl:1: prompt is .*; expected a non-empty string or a list of messages"):
            read_prompt_rows(str(tmp_path / "odd.jsonl"))
