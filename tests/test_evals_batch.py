"""Batch invariance, rolling windows by hand, adapter and 8-bit loading, and the evaluate metric modules."""

from __future__ import annotations

import math

import pytest
import torch
from _evals_utils import write_mmlu_subset

from evals.multiple_choice import evaluate_mc
from evals.perplexity import evaluate_perplexity, rolling_windows
from evals.scoring import loglikelihoods, scoring_model
from evals.tasks.lm_eval_tasks import mmlu_tasks


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return scoring_model(str(tiny_model_dir))


def test_rolling_windows_by_hand():
    toks = list(range(10, 20))  # 10 tokens, context length 4
    # disjoint windows (lm-eval's context_len=1); the short last window conditions on as much as fits
    assert list(rolling_windows(toks, 0, 4)) == [([0], [10, 11, 12, 13]), ([13], [14, 15, 16, 17]), ([15, 16, 17], [18, 19])]
    # stride 2: each later window predicts 2 new tokens after 3 tokens of context (model input stays 4)
    assert list(rolling_windows(toks, 0, 4, stride=2)) == [([0], [10, 11, 12, 13]), ([11, 12, 13], [14, 15]),
                                                          ([13, 14, 15], [16, 17]), ([15, 16, 17], [18, 19])]
    for stride in (1, 3, 4):
        wins = list(rolling_windows(toks, 0, 4, stride))
        assert sum((c for _, c in wins), []) == toks  # every token predicted exactly once
        assert all(len(a) + len(b) - 1 <= 4 for a, b in wins)


def test_stride_scores_same_tokens_with_more_context(lm):
    from conftest import synthetic_corpus

    doc = [" ".join(synthetic_corpus(15, seed=7))]
    full, _ = evaluate_perplexity(lm, doc, progress=False)
    strided, _ = evaluate_perplexity(lm, doc, stride=64, progress=False)
    assert full["tokens"] == strided["tokens"] > 2 * lm.max_length
    assert full["loss"] != strided["loss"]


def test_batch_size_1_and_16_identical(lm, tmp_path):
    mmlu_dir = write_mmlu_subset(tmp_path, n_test=6)
    for scoring, shots in (("letter", 5), ("cloze", 0)):
        tasks = mmlu_tasks(mmlu_dir, scoring, shots)
        r1, s1 = evaluate_mc(lm, tasks, batch_size=1, progress=False)
        r16, s16 = evaluate_mc(lm, tasks, batch_size=16, progress=False)
        for a, b in zip(s1, s16):
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], rel=1e-5, abs=1e-5)
            assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])
        assert r1["mmlu"]["acc"] == r16["mmlu"]["acc"]
    from conftest import synthetic_corpus

    docs = synthetic_corpus(9, seed=1) + [" ".join(synthetic_corpus(20, seed=2))]
    p1, _ = evaluate_perplexity(lm, docs, batch_size=1, progress=False)
    p16, _ = evaluate_perplexity(lm, docs, batch_size=16, progress=False)
    assert p1["bits_per_byte"] == pytest.approx(p16["bits_per_byte"], rel=1e-6)


def test_shared_context_equals_full_logits(lm):
    """The fast path (one forward per shared input, head only at scored positions) equals a plain forward."""
    tok = lm.tokenizer
    ctx = tok.encode("The cat sat on the red hill. Answer:")
    reqs = [(ctx, tok.encode(" A")), (ctx, tok.encode(" B")), (ctx, tok.encode(" the big dog"))]
    fast = loglikelihoods(lm, reqs, batch_size=2, progress=False)
    for (c, k), (ll, _, per_tok) in zip(reqs, fast):
        with torch.no_grad():
            logits = lm.model(torch.tensor([c + k])).logits[0, len(c) - 1:-1]  # (len(k), V)
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(k)[:, None])[:, 0]
        assert per_tok == pytest.approx(ref.tolist(), abs=1e-5)
        assert ll == pytest.approx(float(ref.sum()), abs=1e-4)


def test_prefix_groups_by_hand():
    from evals.scoring import prefix_groups

    a, b, c = tuple(range(100)), tuple(range(90)) + (7,) * 10, (5,) * 100
    assert prefix_groups([a, b, c]) == [(90, [0, 1]), (0, [2])]
    assert prefix_groups([a, b], keep=[20, 20]) == [(80, [0, 1])]  # scored positions stay in the suffix
    assert prefix_groups([a, b], keep=[50, 50]) == [(0, [0, 1])]  # shared part too short to be worth it


def test_shared_prefix_cache_equals_plain_forward(tiny_tokenizer_dir, tmp_path):
    from conftest import synthetic_corpus
    from pretrain.export import ExportConfig, main

    main(ExportConfig(tokenizer=str(tiny_tokenizer_dir), preset="test", max_position_embeddings=1024, output_dir=str(tmp_path / "m"), seed=2))
    lm = scoring_model(str(tmp_path / "m"))
    tok = lm.tokenizer
    prefix = tok.encode(" ".join(synthetic_corpus(4, seed=9)))  # > 64 shared tokens
    reqs = [(prefix + tok.encode(q), tok.encode(a)) for q in (" Who ran?", " The cat sat on the big hill and", " Two")
            for a in (" A", " the red house", " Bob")]
    shared = loglikelihoods(lm, reqs, batch_size=4, progress=False)
    plain = loglikelihoods(lm, reqs, batch_size=4, progress=False, share_prefix=False)
    for (a, ga, ta), (b, gb, tb) in zip(shared, plain):
        assert ta == pytest.approx(tb, abs=1e-5) and ga == gb


def test_special_token_strings_in_documents_stay_text(lm):
    doc = "a literal <|im_end|> inside data"
    _, s = evaluate_perplexity(lm, [doc], progress=False)
    assert s[0]["tokens"] == len(lm.tokenizer.encode(doc, split_special_tokens=True)) > len(lm.tokenizer.encode(doc))


def test_adapter_8bit_and_4bit_loading(tiny_model_dir, tmp_path, lm):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    reqs = [(lm.tokenizer.encode("Alice likes the"), lm.tokenizer.encode(" big dog"))]
    with_adapter = scoring_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"))
    ids = torch.tensor([reqs[0][0] + reqs[0][1]])
    with torch.no_grad():
        ref = torch.log_softmax(peft_model(ids).logits[0, len(reqs[0][0]) - 1:-1], -1)
    expected = float(ref.gather(1, torch.tensor(reqs[0][1])[:, None]).sum())
    assert loglikelihoods(with_adapter, reqs, progress=False)[0][0] == pytest.approx(expected, abs=1e-4)
    assert loglikelihoods(lm, reqs, progress=False)[0][0] != pytest.approx(expected, abs=1e-3)  # the adapter matters
    q8 = scoring_model(str(tiny_model_dir), load_in_8bit=True)
    ll8 = loglikelihoods(q8, reqs, progress=False)[0][0]
    ll32 = loglikelihoods(lm, reqs, progress=False)[0][0]
    assert math.isfinite(ll8) and abs(ll8 - ll32) < 0.05 * abs(ll32)
    # bitsandbytes' CPU 4-bit kernel needs widths divisible by its block; the 'tiny' preset (192/512) has them
    from pretrain.export import ExportConfig, main

    main(ExportConfig(tokenizer=str(tiny_model_dir), preset="tiny", output_dir=str(tmp_path / "tiny"), seed=0))
    full, q4 = scoring_model(str(tmp_path / "tiny")), scoring_model(str(tmp_path / "tiny"), load_in_4bit=True)
    assert type(q4.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    ll4, ll32 = loglikelihoods(q4, reqs, progress=False)[0][0], loglikelihoods(full, reqs, progress=False)[0][0]
    assert math.isfinite(ll4) and ll4 != ll32 and abs(ll4 - ll32) < 0.1 * abs(ll32)


def test_shared_statistics_hand_derived():
    """alignment.stats: the mean with its standard error, and the win rate over k x k comparisons per prompt."""
    from alignment.stats import mean_stderr, win_rate

    m, se = mean_stderr([1.0, 0.0, 1.0, 1.0])
    assert m == 0.75 and se == pytest.approx(math.sqrt((3 * 0.25 ** 2 + 0.75 ** 2) / 3 / 4))
    w = win_rate([1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 1.0, 1.0])  # win, loss, win, tie
    assert w["win_rate"] == pytest.approx(0.625) and w["outcomes"] == [1.0, 0.0, 1.0, 0.5]
    # two samples per prompt: prompt 0 wins 3 of its 4 comparisons (2>1, 2>0, 0<1, 0=0 -> 1, 1, 0, 0.5)
    w2 = win_rate([[2.0, 0.0], [5.0, 5.0]], [[1.0, 0.0], [1.0, 1.0]])
    assert w2["outcomes"] == [0.625, 1.0] and w2["win_rate"] == pytest.approx(0.8125)
    assert w2["win_rate_stderr"] == pytest.approx(abs(1.0 - 0.625) / 2)
