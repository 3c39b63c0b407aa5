"""`align eval` end to end, reports, `align compare` (noise marks, refusals, --force) and bad input."""

from __future__ import annotations

import json

import pytest
from _evals_utils import write_mmlu_subset

from evals import compare, harness
from evals.report import SCHEMA_VERSION


@pytest.fixture(scope="module")
def mmlu_dir(tmp_path_factory):
    return write_mmlu_subset(tmp_path_factory.mktemp("mmlu"), n_test=6)


@pytest.fixture(scope="module")
def report_a(tiny_model_dir, mmlu_dir, tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("eval") / "a.json"
    harness.cli(["--model", str(tiny_model_dir), "--tasks", "perplexity,mmlu", "--perplexity_files", str(corpus_file),
                 "--mmlu_dir", str(mmlu_dir), "--limit", "5", "--num_fewshot", "1", "--output", str(out),
                 "--log_samples", "true", "--progress", "false"])
    return out


def _error(capsys, fn, argv) -> str:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_eval_writes_versioned_report(report_a):
    rep = json.loads(report_a.read_text())
    assert rep["schema_version"] == SCHEMA_VERSION and rep["git_commit"] and rep["date"] and rep["wall_time_s"] > 0
    assert len(rep["model"]["hash"]) == 16 and len(rep["model"]["tokenizer_hash"]) == 16
    mmlu = rep["results"]["mmlu"]
    assert (mmlu["n"], mmlu["num_fewshot"], mmlu["scoring"], mmlu["version"]) == (10, 1, "letter", "1.0")
    assert 0 <= mmlu["acc"] <= 1 and mmlu["acc_stderr"] > 0
    per_subject = [rep["results"][f"mmlu_{s}"]["acc"] for s in ("astronomy", "high_school_us_history")]
    assert mmlu["acc_macro"] == pytest.approx(sum(per_subject) / 2)
    assert mmlu["acc_centered"] == pytest.approx((mmlu["acc"] - 0.25) / 0.75)
    ppl = rep["results"]["perplexity"]
    assert ppl["bits_per_byte"] > 0 and ppl["word_perplexity"] > ppl["byte_perplexity"] > 1
    assert rep["config"]["limit"] == 5 and rep["seed"] == 0
    samples = report_a.with_suffix(".samples.jsonl").read_text().splitlines()
    assert len(samples) == 5 + 10
    assert report_a.with_suffix(".md").read_text().startswith("# Eval report")
    assert report_a.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def _variant(src, dst, edits: dict):
    rep = json.loads(src.read_text())
    for (task, key), value in edits.items():
        rep["results"][task][key] = value
    dst.write_text(json.dumps(rep))
    return dst


def test_compare_marks_noise_and_real_deltas(report_a, tmp_path, capsys):
    acc = json.loads(report_a.read_text())["results"]["mmlu"]["acc"]
    b = _variant(report_a, tmp_path / "b.json", {("mmlu", "acc"): acc + 0.01, ("mmlu", "acc_stderr"): 0.05,
                                                 ("mmlu_astronomy", "acc"): 0.99, ("mmlu_astronomy", "acc_stderr"): 0.001})
    out = tmp_path / "cmp.md"
    compare.cli([str(report_a), str(b), "--output", str(out)])
    md = out.read_text()
    row = next(line for line in md.splitlines() if line.startswith("| mmlu | acc |"))
    assert "(+0.0100 ~)" in row  # within 2 standard errors: noise
    row = next(line for line in md.splitlines() if line.startswith("| mmlu_astronomy | acc |"))
    assert "~" not in row.split("|")[-2]  # far outside: a real delta
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("key,value", [("n", 999), ("num_fewshot", 5), ("version", "2.0"), ("scoring", "cloze")])
def test_compare_refuses_different_protocols(report_a, tmp_path, capsys, key, value):
    b = _variant(report_a, tmp_path / "b.json", {("mmlu", key): value})
    assert key in _error(capsys, compare.cli, [str(report_a), str(b), "--output", str(tmp_path / "c.md")])
    assert not (tmp_path / "c.md").exists()
    compare.cli([str(report_a), str(b), "--output", str(tmp_path / "c.md"), "--force", "true"])
    assert "Forced comparison" in (tmp_path / "c.md").read_text()


def test_compare_refuses_perplexity_across_tokenizers_and_old_schema(report_a, tmp_path, capsys):
    rep = json.loads(report_a.read_text())
    rep["model"]["tokenizer_hash"] = "0" * 16
    (tmp_path / "t.json").write_text(json.dumps(rep))
    assert "tokenizer" in _error(capsys, compare.cli, [str(report_a), str(tmp_path / "t.json")])
    rep["schema_version"] = 0
    (tmp_path / "old.json").write_text(json.dumps(rep))
    msg = _error(capsys, compare.cli, [str(report_a), str(tmp_path / "old.json")])
    assert "old.json" in msg and "schema version 0" in msg


def test_bad_input_one_line_exit_2(tiny_model_dir, tiny_tokenizer_dir, mmlu_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    base = ["--model", str(tiny_model_dir), "--output", str(out), "--progress", "false"]
    bad = tmp_path / "bad_test.csv"
    bad.write_text("question,choice0,choice1,choice2,answer\nWhat?,a,b,c,0\n")
    assert "bad_test.csv:2: mmlu: fields found: answer, choice0, choice1, choice2, question; expected one of the layouts" in _error(capsys, harness.cli, base + ["--tasks", "mmlu", "--mmlu_test_files", str(bad)])
    bad.write_text("What?,a,b,c,d,E\n")  # original MMLU layout: no header, letter answers
    assert "bad_test.csv:1: answer 'E'" in _error(capsys, harness.cli, base + ["--tasks", "mmlu", "--mmlu_test_files", str(bad)])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty.txt" in _error(capsys, harness.cli, base + ["--tasks", "perplexity", "--perplexity_files", str(empty)])
    assert "nope_test.csv: task file not found" in _error(capsys, harness.cli, base + ["--tasks", "mmlu", "--mmlu_test_files", str(tmp_path / "nope_test.csv")])
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((tiny_model_dir / f).read_bytes())
    assert "no tokenizer files" in _error(capsys, harness.cli, ["--model", str(no_tok), "--output", str(out), "--tasks", "mmlu",
                                                                "--mmlu_dir", str(mmlu_dir)])
    assert "unknown task 'mmlux'" in _error(capsys, harness.cli, base + ["--tasks", "mmlux"])
    assert not out.exists()


def test_input_formats_agree(tmp_path):
    """Original MMLU CSV, header CSV with index answers and cais/mmlu JSONL give the same documents."""
    from evals.taskdata import load_task
    from evals.taskspec import load_spec

    for d in ("orig", "hdr", "cais"):
        (tmp_path / d).mkdir()
    (tmp_path / "orig" / "math_test.csv").write_text('"What is 1+1?",1,2,3,4,B\n"Pick x",x,y,z,w,A\n')
    (tmp_path / "hdr" / "math_test.csv").write_text('question,choice0,choice1,choice2,choice3,answer\n"What is 1+1?",1,2,3,4,1\n"Pick x",x,y,z,w,0\n')
    (tmp_path / "cais" / "all.jsonl").write_text(json.dumps({"question": "What is 1+1?", "subject": "math", "choices": ["1", "2", "3", "4"], "answer": 1})
                                                 + "\n" + json.dumps({"question": "Pick x", "subject": "math", "choices": list("xyzw"), "answer": 0}) + "\n")
    spec = load_spec("mmlu")
    docs = [load_task(spec, task_data={"mmlu": {"test": [str(f)]}})[0].docs
            for f in (tmp_path / "orig" / "math_test.csv", tmp_path / "hdr" / "math_test.csv", tmp_path / "cais" / "all.jsonl")]
    keep = ("question", "choices", "answer", "subject")
    a, b, c = ([{k: d[k] for k in keep} for d in ds] for ds in docs)
    assert a == b == c
    assert a[0] == {"question": "What is 1+1?", "choices": ["1", "2", "3", "4"], "answer": 1, "subject": "math"}
