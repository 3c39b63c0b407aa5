"""Parity with lm-evaluation-harness 0.4.13 (run offline on local task YAMLs): perplexity and MMLU, item by item."""

from __future__ import annotations

import math

import pytest
from _evals_utils import run_lm_eval, write_mmlu_subset

from evals.multiple_choice import evaluate_mc
from evals.perplexity import evaluate_perplexity
from evals.scoring import scoring_model
from evals.tasks.lm_eval_tasks import mmlu_tasks, write_mc_tasks, write_perplexity_task


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return scoring_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def long_model_dir(tiny_tokenizer_dir, tmp_path_factory):
    """The 'test' preset with a 2048-token context: 5-shot prompts fit, so the few-shot prefix is shared."""
    from pretrain.export import ExportConfig, main

    out = tmp_path_factory.mktemp("long") / "model"
    main(ExportConfig(tokenizer=str(tiny_tokenizer_dir), preset="test", max_position_embeddings=2048, output_dir=str(out), seed=1))
    return out


@pytest.fixture(scope="module")
def mmlu_dir(tmp_path_factory):
    return write_mmlu_subset(tmp_path_factory.mktemp("mmlu"), n_test=6)


def test_perplexity_equals_lm_eval_rolling(lm, tiny_model_dir, tmp_path):
    from conftest import synthetic_corpus

    docs = synthetic_corpus(6, seed=3)
    docs.append(" ".join(synthetic_corpus(40, seed=4)))  # ~1000+ tokens: several rolling windows of 256
    docs.append("Ünïcode bytes — count as several bytes each.")
    assert len(lm.tokenizer.encode(docs[-2])) > 3 * lm.max_length
    ours, samples = evaluate_perplexity(lm, docs, batch_size=3, progress=False)
    name = write_perplexity_task(docs, tmp_path)
    res = run_lm_eval(tiny_model_dir, tmp_path, [name])
    theirs = res["results"][name]
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isclose(ours[m], theirs[f"{m},none"], rel_tol=1e-4), (m, ours[m], theirs[f"{m},none"])
    # per document: lm-eval logs (loglikelihood, words) for word_perplexity
    per_doc = {s["doc_id"]: s["filtered_resps"][0] for s in res["samples"][name]}
    for s in samples:
        ll = per_doc[s["doc_id"]]
        ll = ll[0] if isinstance(ll, (list, tuple)) else ll
        assert math.isclose(s["loglikelihood"], ll, rel_tol=1e-4), (s["doc_id"], s["loglikelihood"], ll)


@pytest.mark.parametrize("scoring,shots,chat", [("letter", 0, False), ("letter", 5, False), ("cloze", 0, False),
                                                ("cloze", 5, False), ("letter", 2, True)])
def test_mmlu_items_equal_lm_eval(lm, tiny_model_dir, mmlu_dir, tmp_path, scoring, shots, chat):
    tasks = mmlu_tasks(mmlu_dir, scoring, shots)
    ours, samples = evaluate_mc(lm, tasks, chat, batch_size=8, progress=False)
    names = write_mc_tasks(tasks, tmp_path, scoring)
    res = run_lm_eval(tiny_model_dir, tmp_path, names, num_fewshot=shots, apply_chat_template=chat)
    for task, name in zip(tasks, names):
        theirs = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        mine = [s for s in samples if s["task"] == task.name]
        assert len(mine) == len(theirs) == 6
        for a, b in zip(mine, theirs):
            lls = [x[0] for x in b["filtered_resps"]]
            assert a["loglikelihoods"] == pytest.approx(lls, rel=1e-5, abs=1e-4), (name, a["doc_id"])
            assert a["acc"] == b["acc"]
            if scoring == "cloze":
                assert a["acc_norm"] == b["acc_norm"]
        assert ours[task.name]["acc"] == pytest.approx(res["results"][name]["acc,none"], abs=1e-12)
        if scoring == "cloze":
            assert ours[task.name]["acc_norm"] == pytest.approx(res["results"][name]["acc_norm,none"], abs=1e-12)


def test_mmlu_shared_fewshot_prefix_equals_lm_eval(long_model_dir, mmlu_dir, tmp_path):
    from evals.scoring import prefix_groups

    lm = scoring_model(str(long_model_dir))
    tasks = mmlu_tasks(mmlu_dir, "letter", 5)
    ours, samples = evaluate_mc(lm, tasks, batch_size=4, progress=False)
    # the fast path is really taken: one prefix group per subject
    from evals.taskspec import plain_text

    ctxs = [tuple(lm.tokenizer.encode(plain_text(t.spec.turns(d, s)[0]))) for t in tasks for d, s in zip(t.docs, t.shots)]
    assert sorted(len(m) for p, m in prefix_groups(ctxs) if p) == [6, 6]
    names = write_mc_tasks(tasks, tmp_path, "letter")
    res = run_lm_eval(long_model_dir, tmp_path, names, num_fewshot=5)
    for task, name in zip(tasks, names):
        theirs = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        mine = [s for s in samples if s["task"] == task.name]
        for a, b in zip(mine, theirs):
            assert a["loglikelihoods"] == pytest.approx([x[0] for x in b["filtered_resps"]], rel=1e-5, abs=1e-4)
            assert a["acc"] == b["acc"]
