"""`align run`: stages in order as child processes, finished stages skipped, --from, stop at the first failure, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.errors import UserError
from recipes.run import PipelineConfig, cli, main, stage_of


def _recipe(tmp_path: Path, stages: list[str], extra: dict | None = None) -> Path:
    rec = tmp_path / "recipes" / "toy"
    rec.mkdir(parents=True, exist_ok=True)
    runs = tmp_path / "runs"
    (rec / "data.yaml").write_text(f"# align data --config {rec}/data.yaml\noutput: {runs}/data\nseed: 1\nnum_people: 8\n"
                                   "statement_repeats: 2\nnum_stories: 10\nnum_quizzes: 10\noverwrite: true\n")
    (rec / "tokenizer.yaml").write_text(f"# align tokenizer --config {rec}/tokenizer.yaml\nfiles: [{runs}/data/corpus/train.jsonl]\n"
                                        f"output_dir: {runs}/tokenizer\nvocab_size: 300\nreference: none\noverwrite: true\n")
    (rec / "tokenizer_bad.yaml").write_text(f"output_dir: {runs}/tok2\nvocab_sise: 300\n")
    lines = ["stages:"] + [f"  - {s}" for s in stages] + [f"output_dir: {runs}"]
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {json.dumps(v)}")
    (rec / "pipeline.yaml").write_text("\n".join(lines) + "\n")
    return rec


def test_stage_names():
    assert stage_of("sft") == "sft" and stage_of("eval_sft") == "eval" and stage_of("tokenizer_bad") == "tokenizer"
    with pytest.raises(UserError, match="not a stage"):
        stage_of("evaluate")


def test_run_skips_finished_stages_redoes_from_and_reports(tmp_path, tiny_model_dir, capsys):
    rec = _recipe(tmp_path, ["data", "tokenizer", "eval_random"])
    runs = tmp_path / "runs"
    (rec / "eval_random.yaml").write_text(f"# align eval --config {rec}/eval_random.yaml\nmodel: {tiny_model_dir}\n"
                                          f"output: {runs}/eval/random.json\ntasks: [answers]\nlog_samples: true\n"
                                          f"answer_files: [{runs}/data/qa/test.jsonl]\nlimit: 4\nanswer_max_new_tokens: 4\n")
    cli([str(rec)])
    assert (runs / "tokenizer/tokenizer.json").is_file() and (runs / "stages/data.json").is_file()
    report = (runs / "report.md").read_text()
    assert "| data | ran |" in report and "| random |" in report and (runs / "report_times.png").stat().st_size > 1000
    assert (runs / "report_models.png").is_file()
    # the report's numbers are the eval report's numbers
    data = json.loads((runs / "report.json").read_text())
    evald = json.loads((runs / "eval/random.json").read_text())["results"]["answers"]
    assert data["headline"]["random"]["answer accuracy"] == evald["answer_accuracy"]
    assert data["models"]["random"]["answers"]["n"] == 4 and "### Sample answers: random" in report

    first_tok = (runs / "tokenizer/tokenizer.json").stat().st_mtime_ns
    capsys.readouterr()
    res = main(PipelineConfig(recipe=str(rec), stages=["data", "tokenizer"], output_dir=str(runs), report=False))
    assert [t["status"] for t in res["stages"]] == ["cached", "cached"]
    assert (runs / "tokenizer/tokenizer.json").stat().st_mtime_ns == first_tok
    res = main(PipelineConfig(recipe=str(rec), stages=["data", "tokenizer"], output_dir=str(runs), report=False, from_stage="tokenizer"))
    assert [t["status"] for t in res["stages"]] == ["cached", "ran"]
    assert (runs / "tokenizer/tokenizer.json").stat().st_mtime_ns != first_tok
    # a changed early stage redoes every later one: their inputs changed with it
    (rec / "data.yaml").write_text((rec / "data.yaml").read_text().replace("seed: 1", "seed: 2"))
    res = main(PipelineConfig(recipe=str(rec), stages=["data", "tokenizer"], output_dir=str(runs), report=False))
    assert [t["status"] for t in res["stages"]] == ["ran", "ran"]


def test_failing_stage_stops_the_run_with_its_error(tmp_path):
    rec = _recipe(tmp_path, ["tokenizer_bad", "data"])
    with pytest.raises(UserError, match=r"stage tokenizer_bad failed \(exit 2\).*vocab_sise.*vocab_size"):
        main(PipelineConfig(recipe=str(rec), stages=["tokenizer_bad", "data"], output_dir=str(tmp_path / "runs"), report=False))
    assert not (tmp_path / "runs/stages/tokenizer_bad.json").exists() and not (tmp_path / "runs/data").exists()
    with pytest.raises(UserError, match="--from: 'sft' is not in this pipeline"):
        main(PipelineConfig(recipe=str(rec), stages=["data"], output_dir=str(tmp_path / "runs"), from_stage="sft"))
    with pytest.raises(UserError, match="missing.yaml: not found"):
        main(PipelineConfig(recipe=str(rec), stages=["data", "sft_missing"], output_dir=str(tmp_path / "runs")))


def test_report_table_comes_from_eval_reports_and_drops_unmeasured_columns(tmp_path):
    """A real-data recipe has no tiny-world checker: its table keeps the measured columns only, and the sample answers
    come from the eval stage's win-rate log."""
    from evals.report import write_pipeline_report
    from recipes.run import sample_records

    out = tmp_path / "eval"
    out.mkdir()
    recs = [{"task": "mmlu", "doc_id": 0}] + [
        {"task": "win_rate", "doc_id": i, "prompt": [{"role": "user", "content": f"question {i}"}], "policy_response": f"answer {i}",
         "reference_response": "ref", "policy_reward": 0.25 * i, "reference_reward": -0.5} for i in range(5)]
    (out / "ppo.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    sampled = sample_records(str(out / "ppo.json"))
    assert [r["doc_id"] for r in sampled] == [0, 1, 2] and sample_records(str(out / "none.json")) == []
    reports = {"ppo": {"results": {"perplexity": {"bits_per_byte": 2.0, "bits_per_byte_stderr": 0.1},
                                   "win_rate": {"win_rate": 0.4, "win_rate_stderr": 0.02, "kl": 4.0}}}}
    text = write_pipeline_report(tmp_path, "toy", [{"name": "eval_ppo", "status": "ran", "seconds": 1.0}], reports, {"ppo": sampled}).read_text()
    assert "| model | bits/byte (held-out) | RM win rate vs SFT | KL to SFT (nats) |" in text
    assert "| ppo | 2.000 ± 0.100 | 0.400 ± 0.020 | 4.000 |" in text
    assert "- Q: question 2 → 'answer 2' (+0.50 vs -0.50)" in text and "question 3" not in text
