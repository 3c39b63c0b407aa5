"""Task specs (evals/tasks/*.yaml) equal lm-evaluation-harness 0.4.13 running its OWN task YAML on the same items.

Every built-in task reads small files written here in a public layout (original ARC JSONL, hub parquet, HellaSwag
JSONL with [title] markers, PIQA's X.jsonl + X-labels.lst, TruthfulQA's mc_task.json, WinoGrande and GSM8K JSONL)
through --data_dir; lm-eval reads the same items in the hub layout through its own YAML (include: of the file in the
installed package). Per item: log-likelihoods, predictions, generated text and extracted answers; per task: every
metric and its standard error. 0-shot and few-shot, with and without the chat template, batch-size invariant.
"""

from __future__ import annotations

import math

import pytest
import torch
from _evals_utils import LM_EVAL_TASKS, write_public_layouts

from evals.generative import apply_filter, evaluate_generate_until, exact_match
from evals.multiple_choice import evaluate_mc
from evals.scoring import scoring_model
from evals.taskdata import load_task
from evals.taskspec import load_spec

MAX_GEN = 12  # generated tokens per gsm8k answer (the test model's context is 256)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Our files (public layouts) under root, and lm-eval's own task YAMLs over the same items (hub layout)."""
    from evals.tasks.lm_eval_tasks import write_lm_eval_task

    root = tmp_path_factory.mktemp("public")
    hub = write_public_layouts(root)
    yaml_dir = tmp_path_factory.mktemp("lm_eval_tasks")
    names = {t: write_lm_eval_task(t, hub[t], yaml_dir) for t in LM_EVAL_TASKS}
    return root, yaml_dir, names


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny random Llama with its weights scaled up, so greedy answers vary (special tokens and end of text
    included) instead of repeating one token; its generation_config sets no max_new_tokens (lm-eval would let that
    override the task's max_gen_toks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path_factory.mktemp("sharp") / "model"
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(16)
    m.generation_config = GenerationConfig(bos_token_id=m.config.bos_token_id, eos_token_id=m.generation_config.eos_token_id,
                                           pad_token_id=m.config.pad_token_id)
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm(model_dir):
    return scoring_model(str(model_dir))


@pytest.fixture(scope="module")
def hflm(model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)


def ours(lm, root, shots, chat, multiturn, batch_size):
    tasks = [t for name in LM_EVAL_TASKS for t in load_task(load_spec(name), data_dir=str(root), num_fewshot=shots)]
    mc, mc_samples = evaluate_mc(lm, [t for t in tasks if t.spec.output_type == "multiple_choice"], chat, multiturn, batch_size,
                                 progress=False)
    gen, gen_samples = evaluate_generate_until(lm, [t for t in tasks if t.spec.output_type == "generate_until"], chat, multiturn,
                                               batch_size, max_gen_toks=MAX_GEN, progress=False)
    return {**mc, **gen}, mc_samples + gen_samples


def theirs(hflm, yaml_dir, names, shots, chat, multiturn):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=hflm, tasks=list(names.values()), num_fewshot=shots, apply_chat_template=chat,
                                   fewshot_as_multiturn=multiturn, gen_kwargs=f"max_gen_toks={MAX_GEN}", log_samples=True,
                                   bootstrap_iters=1, task_manager=TaskManager(include_path=str(yaml_dir), include_defaults=False))


@pytest.mark.parametrize("shots,chat,multiturn", [(0, False, True), (2, False, True), (2, True, True), (1, True, False)],
                         ids=["0shot", "2shot", "2shot-chat", "1shot-chat-singleturn"])
def test_every_task_equals_lm_eval(lm, hflm, data, shots, chat, multiturn):
    root, yaml_dir, names = data
    mine, samples = ours(lm, root, shots, chat, multiturn, batch_size=3)
    res = theirs(hflm, yaml_dir, names, shots, chat, multiturn)
    for task, name in names.items():
        spec = load_spec(task)
        expect_shots = 0 if task.startswith("truthfulqa") else shots  # its spec fixes 0 shots; lm-eval ignores the request too
        assert mine[task]["num_fewshot"] == expect_shots and res["n-shot"][name] == expect_shots
        got = sorted(res["samples"][name], key=lambda s: (s["doc_id"], s["filter"]))
        mine_items = [s for s in samples if s["task"] == task]
        assert len(mine_items) == mine[task]["n"] == 10
        if spec.output_type == "multiple_choice":
            assert len(got) == 10
            for a, b in zip(mine_items, got):
                assert a["loglikelihoods"] == pytest.approx([x[0] for x in b["filtered_resps"]], rel=1e-5, abs=1e-4), (task, a["doc_id"])
                for m in spec.metric_list:
                    assert a[m["metric"]] == pytest.approx(b[m["metric"]], abs=1e-6), (task, a["doc_id"], m["metric"])
            metrics = {m["metric"]: m["metric"] for m in spec.metric_list}
        else:  # gsm8k: one lm-eval record per filter
            by_filter = {}
            for b in got:
                by_filter.setdefault(b["filter"], []).append(b)
            for a, strict, flexible in zip(mine_items, by_filter["strict-match"], by_filter["flexible-extract"]):
                assert a["response"] == strict["resps"][0][0], (a["doc_id"], a["response"], strict["resps"][0][0])
                assert (a["answer_strict_match"], a["answer_flexible_extract"]) == (strict["filtered_resps"][0], flexible["filtered_resps"][0])
                assert (a["exact_match_strict_match"], a["exact_match_flexible_extract"]) == (strict["exact_match"], flexible["exact_match"])
            metrics = {"exact_match_strict_match": "exact_match,strict-match", "exact_match_flexible_extract": "exact_match,flexible-extract"}
        for m, key in metrics.items():
            key = key if "," in key else f"{key},none"
            assert mine[task][m] == pytest.approx(res["results"][name][key], abs=1e-6), (task, m)  # mc2: a float mass
            se = res["results"][name][key.replace(",", "_stderr,", 1)]
            assert mine[task][f"{m}_stderr"] == pytest.approx(se, abs=1e-6) or (math.isnan(mine[task][f"{m}_stderr"]) and se in ("N/A", None))
        assert mine[task]["version"] == str(float(res["versions"][name]))


def test_batch_size_does_not_change_any_item(lm, data):
    root = data[0]
    a, sa = ours(lm, root, 2, False, True, batch_size=1)
    b, sb = ours(lm, root, 2, False, True, batch_size=16)
    assert len(sa) == len(sb) == 80
    for x, y in zip(sa, sb):  # predictions, generated text and extracted answers identical; log-likelihoods to rounding
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == (pytest.approx(y[k], rel=1e-5, abs=1e-5) if k in ("loglikelihoods", "acc") else y[k]), (x["task"], k)
    for t in a:
        for m in ("acc_norm", "exact_match_strict_match", "exact_match_flexible_extract") + (("acc",) if t != "truthfulqa_mc2" else ()):
            assert a[t].get(m) == b[t].get(m), (t, m)


def test_filters_and_exact_match_equal_lm_eval():
    """gsm8k's answer extraction and exact match on hand-made answers, against lm-eval's own filter and metric code."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    spec = load_spec("gsm8k")
    responses = ["so 5 + 3 = 8.\n#### 8", "The answer is $1,234.", "#### -7 and then #### 9", "nothing here", "3.5 apples, 12 pears",
                 "#### 1,200.", " 42", "-", "$$ 10.0 $", "#### 3\n#### 4"]
    gold = "Some working <<2*3=6>>6\n#### 1,200"
    kw = {k: v for k, v in spec.metric_list[0].items() if k not in ("metric", "aggregation", "higher_is_better")}
    for f in spec.filter_list:
        regex = f["filter"][0]
        theirs_filter = RegexFilter(regex["regex_pattern"], regex.get("group_select", 0))
        extracted = [x[0] for x in theirs_filter.apply([[r] for r in responses], [None] * len(responses))]
        mine = [apply_filter(f["filter"], r) for r in responses]
        assert mine == extracted, f["name"]
        for r in mine:
            assert exact_match(r, gold, **kw) == exact_match_hf_evaluate([r], [gold], **kw)["exact_match"]
    assert apply_filter(spec.filter_list[0]["filter"], "#### 1,200.") == "1,200."
    assert exact_match("1,200.", gold, **kw) == 1.0 and exact_match("nope", gold, **kw) == 0.0


def test_layouts_give_the_same_documents(tmp_path, data):
    """The original layouts read to the hub layout's fields: ARC JSONL (question.stem) = hub rows, PIQA .jsonl + .lst =
    rows with label, TruthfulQA mc_task.json = hub multiple_choice rows."""
    import json

    root = data[0]
    hub = write_public_layouts(tmp_path / "again")  # same seed: the same items
    for task, split in (("arc_challenge", "test"), ("piqa", "validation"), ("truthfulqa_mc2", "validation")):
        spec = load_spec(task)
        (t,) = load_task(spec, data_dir=str(root))
        keys = hub[task][split][0].keys()
        assert [{k: d[k] for k in keys} for d in t.docs] == hub[task][split], task
        d = tmp_path / task
        d.mkdir()
        (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hub[task][split]))
        (h,) = load_task(spec, task_data={task: {spec.eval_split: str(d / "rows.jsonl")}})
        assert [{k: x[k] for k in keys} for x in h.docs] == hub[task][split], task


def test_fewshot_draws_follow_lm_eval():
    """The default sampler: one Random(1234) per task, in document order; n + 1 drawn and the scored document dropped
    when shots come from the scored split (hellaswag, piqa, winogrande: fewshot_split and test_split both unset)."""
    import random

    from evals.taskdata import FewshotSampler

    pool = [{"i": i} for i in range(10)]
    rnd = random.Random(1234)
    s = FewshotSampler(pool, "default", exclude_eval_doc=False)
    assert [s.sample(3, {"i": 99}) for _ in range(3)] == [rnd.sample(pool, 3) for _ in range(3)]
    s = FewshotSampler(pool, "default", exclude_eval_doc=True)
    rnd = random.Random(1234)
    for doc in pool[:4]:
        assert s.sample(2, doc) == [x for x in rnd.sample(pool, 3) if x != doc][:2]
    assert FewshotSampler(pool, "first_n", exclude_eval_doc=True).sample(3, pool[1]) == [pool[0], pool[2], pool[3]]
    assert load_spec("hellaswag").exclude_eval_doc and not load_spec("arc_easy").exclude_eval_doc and not load_spec("gsm8k").exclude_eval_doc


def test_user_task_yaml_end_to_end(tmp_path, model_dir):
    """A user's own task: a YAML beside their file (data_files relative to it), run by `align eval --tasks my.yaml`."""
    import json

    from evals import harness

    rows = [{"q": f"Is {w} blue?", "options": ["yes", "no", "maybe"], "gold": i % 3} for i, w in enumerate(["sky", "grass", "sea", "sun"])]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mine.yaml").write_text(
        "task: colours\nversion: 0.1\noutput_type: multiple_choice\ndata_files: {test: [mine.jsonl]}\ntest_split: test\n"
        "layouts: [{name: my rows, requires: [q, options, gold]}]\n"
        "doc_to_text: 'Q: {{q}}\\nA:'\ndoc_to_choice: options\ndoc_to_target: gold\nmetric_list: [{metric: acc}, {metric: acc_norm}]\n")
    out = tmp_path / "r.json"
    harness.cli(["--model", str(model_dir), "--tasks", f"{tmp_path / 'mine.yaml'}", "--output", str(out), "--progress", "false"])
    rep = json.loads(out.read_text())["results"]["colours"]
    assert (rep["n"], rep["version"], rep["num_fewshot"]) == (4, "0.1", 0) and 0 <= rep["acc_norm"] <= 1 and len(rep["data_hash"]) == 16
    # compare shows every metric of every task, and refuses a report on other items
    from evals.compare import compare

    other = json.loads(out.read_text())
    rows, problems = compare([other, other], ["a", "b"])
    assert [(r["task"], r["metric"]) for r in rows] == [("colours", m) for m in ("acc", "acc_norm", "acc_centered")] and not problems
    other["results"]["colours"]["data_hash"] = "0" * 16
    with pytest.raises(Exception, match="data_hash differs"):
        compare([json.loads(out.read_text()), other], ["a", "b"])


def test_hub_model_name_from_the_local_cache_offline(tmp_path, model_dir, data):
    """`align eval --model org/name` with the model only in the Hugging Face cache (huggingface_hub's layout:
    models--org--name/snapshots/<commit>/ + refs/main) loads offline; the report names the model as given."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny-llama"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "r.json"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "alignment.cli", "eval", "--model", "someorg/tiny-llama", "--tasks", "arc_easy,piqa",
                        "--data_dir", str(data[0]), "--limit", "3", "--output", str(out), "--progress", "false"],
                       env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["model"]["path"] == "someorg/tiny-llama" and len(rep["model"]["hash"]) == 16
    assert rep["results"]["arc_easy"]["n"] == rep["results"]["piqa"]["n"] == 3
