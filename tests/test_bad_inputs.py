"""Every stage, every class of bad input: exit status 2, one line naming the place and what was expected, no traceback,
and nothing written: the case's directory (with a previous result the stage was asked to replace) is byte-identical
before and after.

Each case runs `align <stage> ...` in this process (as the console script does, through alignment.cli.main) inside its
own directory, which holds a finished previous output (`out/`, written by the suite) and the case's own bad files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from _post_utils import one_thread, pref_rows, sft_rows  # noqa: F401
from alignment.cli import main as align


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir, corpus_file):
    """Read-only inputs shared by the cases: a model, a reward model with statistics, data files, packed shards."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pretrain.data import PrepareConfig
    from pretrain.data import main as prepare

    d = tmp_path_factory.mktemp("inputs")
    rm = d / "rm"
    torch.manual_seed(1)
    m = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    m.config.pad_token_id = tok.pad_token_id
    m.save_pretrained(rm)
    tok.save_pretrained(rm)
    (rm / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0, "n": 4}))
    other = d / "rm_other_tok"
    shutil.copytree(rm, other)
    t2 = AutoTokenizer.from_pretrained(other)
    t2.add_tokens(["zebra-crossing"])
    t2.save_pretrained(other)
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows(16)))
    (d / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref_rows(16)))
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Hi {i}?"}], "answer": "5",
                                                         "kind": "arithmetic", "entity": "2+3", "attribute": "sum"}) + "\n" for i in range(8)))
    (d / "mmlu" / "test").mkdir(parents=True)
    (d / "mmlu" / "test" / "x_test.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nQ?,a,b,c,d,1\n")
    prepare(PrepareConfig(output_dir=str(d / "packed"), tokenizer=str(tiny_tokenizer_dir), files=[str(corpus_file)], num_proc=1,
                          min_words=3, dedup_near=False, val_fraction=0.1))
    from evals.harness import EvalConfig, main as evaluate

    evaluate(EvalConfig(model=str(tiny_model_dir), tasks=["perplexity"], perplexity_files=[str(corpus_file)], limit=3,
                        output=str(d / "reports" / "a.json"), progress=False))
    return {"model": tiny_model_dir, "tok": tiny_tokenizer_dir, "rm": rm, "rm_other": other, "corpus": corpus_file, "d": d}


def snapshot(root: Path) -> dict:
    """Every file under root with the hash of its bytes (directories included, so an empty new one shows)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def previous_result(case: Path) -> Path:
    """A finished output the suite wrote earlier (marked), which a failed run must leave as it was."""
    out = case / "out"
    out.mkdir()
    (out / ".align-suite.json").write_text('{"stage": "earlier"}\n')
    (out / "result.txt").write_text("finished work\n")
    return out


def write(case: Path, name: str, content) -> str:
    """A bad input file inside the case directory: bytes, text, or rows (a list, written as JSON lines)."""
    p = case / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, list):
        p.write_text("".join(json.dumps(r) + "\n" for r in content))
    else:
        p.write_text(content)
    return str(p)


def crafted_pickle(case: Path, name: str) -> str:
    """A .pt file that would run a shell command if unpickled."""
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {case}/pwned",))

    p = case / name
    torch.save({"model": Payload(), "shape": {}}, p)
    return str(p)


def user_tokenizer_dir(case: Path) -> str:
    d = case / "notok"
    d.mkdir()
    (d / "readme.txt").write_text("no tokenizer here")
    return str(d)


def garbage_model(case: Path, text: str = "{not json") -> str:
    d = case / "garbage_model"
    d.mkdir()
    (d / "config.json").write_text(text)
    return str(d)


U = lambda t: {"role": "user", "content": t}  # noqa: E731
A = lambda t: {"role": "assistant", "content": t}  # noqa: E731

# (case id, stage, argv builder (case dir, inputs, out) -> argv, expected text in the one error line)
# Paths the builder writes live inside the case dir; `out` is the previous result.
CASES = [
    # -- config files and the command line, any stage
    ("config-missing", "tokenizer", lambda c, i, o: ["--config", str(c / "nope.yaml")], "nope.yaml: config file not found"),
    ("config-not-utf8", "tokenizer", lambda c, i, o: ["--config", write(c, "c.yaml", b"vocab_size: 300\n\xff\xfe")], "c.yaml: undecodable bytes"),
    ("config-invalid-yaml", "tokenizer", lambda c, i, o: ["--config", write(c, "c.yaml", "a: [1, 2\n")], "c.yaml: not valid YAML"),
    ("config-a-list", "tokenizer", lambda c, i, o: ["--config", write(c, "c.yaml", "- a\n- b\n")], "expected a YAML mapping of config keys, got a list"),
    ("config-env-key", "tokenizer", lambda c, i, o: ["--config", write(c, "c.yaml", "env:\n  HF_HUB_OFFLINE: '0'\n")],
     "env: a config may not set environment variables"),
    ("config-unknown-key", "tokenizer", lambda c, i, o: ["--config", write(c, "c.yaml", "vocab_sise: 300\n")], "unknown key 'vocab_sise'; did you mean 'vocab_size'"),
    ("cli-unknown-key", "tokenizer", lambda c, i, o: ["--vocab_sise", "300"], "command line: unknown key 'vocab_sise'"),
    ("files-a-string", "tokenizer", lambda c, i, o: ["--config", write(c, "c.yaml", f"files: {i['corpus']}\noutput_dir: {o}\n")],
     "files: '"),
    ("vocab-a-list", "tokenizer", lambda c, i, o: ["--config", write(c, "c.yaml", f"files: [{i['corpus']}]\nvocab_size: [1, 2]\n")],
     "vocab_size: [1, 2] is a list; expected int"),
    ("overwrite-an-int", "tokenizer", lambda c, i, o: ["--config", write(c, "c.yaml", f"files: [{i['corpus']}]\noutput_dir: {o}\noverwrite: 2\n")],
     "overwrite: 2 is a int; expected bool"),
    ("int-a-float-yaml", "pretrain", lambda c, i, o: ["--config", write(c, "c.yaml", "max_steps: 2.5\n")], "max_steps: 2.5 is a float; expected int"),
    ("int-a-float-cli", "pretrain", lambda c, i, o: ["--max_steps", "2.5"], "--max_steps/--max-steps: invalid int value: '2.5'"),
    ("unknown-stage", "tokeniser", lambda c, i, o: [], "unknown stage 'tokeniser'; did you mean 'tokenizer'"),
    # -- data
    ("tinyworld-4-people", "data", lambda c, i, o: ["--num_people", "4", "--output", str(o), "--overwrite", "true"],
     "num_people: 4; expected an even number from 6"),
    ("tinyworld-odd-people", "data", lambda c, i, o: ["--num_people", "7", "--output", str(o), "--overwrite", "true"], "num_people: 7"),
    ("tinyworld-fraction", "data", lambda c, i, o: ["--eval_fraction", "1.5", "--output", str(o), "--overwrite", "true"],
     "eval_fraction: 1.5; expected a number >= 0 and <= 1"),
    ("tinyworld-family", "data", lambda c, i, o: ["galaxy", "--output", str(o)], "unknown dataset family 'galaxy'"),
    ("tinyworld-seed", "data", lambda c, i, o: ["--seed", "-1", "--output", str(o), "--overwrite", "true"], "seed: -1; expected a number >= 0"),
    ("tinyworld-not-ours", "data", lambda c, i, o: ["--output", str(c / "mine"), "--overwrite", "true"],
     "was not written by this suite"),
    # -- tokenizer
    ("tok-vocab-small", "tokenizer", lambda c, i, o: ["--files", str(i["corpus"]), "--vocab_size", "100", "--output_dir", str(o), "--overwrite", "true"],
     "vocab_size: 100 is too small"),
    ("tok-files-missing", "tokenizer", lambda c, i, o: ["--files", str(c / "none.txt"), "--output_dir", str(o), "--overwrite", "true"],
     "none.txt: no such file"),
    ("tok-not-utf8", "tokenizer", lambda c, i, o: ["--files", write(c, "t.txt", b"good line\n\xff\xfe bad\n"), "--output_dir", str(o), "--overwrite", "true"],
     "t.txt: line 2: undecodable bytes"),
    ("tok-not-gzip", "tokenizer", lambda c, i, o: ["--files", write(c, "t.jsonl.gz", b"plain text, not gzip"), "--output_dir", str(o), "--overwrite", "true"],
     "t.jsonl.gz: not a readable gzip file"),
    ("tok-empty", "tokenizer", lambda c, i, o: ["--files", write(c, "t.txt", "\n\n"), "--output_dir", str(o), "--overwrite", "true"],
     "the corpus is empty"),
    ("tok-bad-jsonl", "tokenizer", lambda c, i, o: ["--files", write(c, "t.jsonl", '{"text": "a"}\n{oops\n'), "--output_dir", str(o), "--overwrite", "true"],
     "t.jsonl:2: not valid JSON"),
    ("tok-no-text-field", "tokenizer", lambda c, i, o: ["--files", write(c, "t.jsonl", [{"body": "a"}]), "--output_dir", str(o), "--overwrite", "true"],
     "t.jsonl:1: expected an object with a string 'text' field"),
    ("tok-output-under-a-file", "tokenizer", lambda c, i, o: ["--files", str(i["corpus"]), "--output_dir", str(o / "result.txt" / "tok")],
     "cannot write"),
    # -- prepare
    ("prep-no-tokenizer", "prepare", lambda c, i, o: ["--tokenizer", user_tokenizer_dir(c), "--files", str(i["corpus"]), "--output_dir", str(o),
                                                     "--overwrite", "true"], "no tokenizer.json"),
    ("prep-normalization", "prepare", lambda c, i, o: ["--tokenizer", str(i["tok"]), "--files", str(i["corpus"]), "--normalization", "XYZ",
                                                      "--output_dir", str(o), "--overwrite", "true"], "normalization: 'XYZ'"),
    ("prep-decontam-extra-field", "prepare", lambda c, i, o: ["--tokenizer", str(i["tok"]), "--files", str(i["corpus"]), "--decontaminate_files",
                                                             write(c, "d.csv", "question,answer\nwhat,1\nwho,2,extra\n"), "--output_dir", str(o),
                                                             "--overwrite", "true"], "d.csv:3: 3 fields, more than the 2 of the header"),
    ("prep-val-fraction", "prepare", lambda c, i, o: ["--tokenizer", str(i["tok"]), "--files", str(i["corpus"]), "--val_fraction", "0",
                                                     "--output_dir", str(o), "--overwrite", "true"], "val_fraction: 0.0; expected a number between 0 and 1"),
    ("prep-threshold", "prepare", lambda c, i, o: ["--tokenizer", str(i["tok"]), "--files", str(i["corpus"]), "--near_threshold", "2",
                                                  "--output_dir", str(o), "--overwrite", "true"], "near_threshold: 2.0; expected a number >= 0 and <= 1"),
    ("prep-glob-nothing", "prepare", lambda c, i, o: ["--tokenizer", str(i["tok"]), "--files", str(c / "*.nothing"), "--output_dir", str(o),
                                                     "--overwrite", "true"], "no such file"),
    ("prep-corrupt-parquet", "prepare", lambda c, i, o: ["--tokenizer", str(i["tok"]), "--files", write(c, "x.parquet", b"PAR1 not really"),
                                                        "--output_dir", str(o), "--overwrite", "true"], "x.parquet: not a readable parquet file"),
    ("prep-num-proc", "prepare", lambda c, i, o: ["--tokenizer", str(i["tok"]), "--files", str(i["corpus"]), "--num_proc", "0",
                                                 "--output_dir", str(o), "--overwrite", "true"], "num_proc: 0; expected a number >= 1"),
    # -- pretrain
    ("pre-no-meta", "pretrain", lambda c, i, o: ["--data_dir", str(c), "--tokenizer", str(i["tok"]), "--output_dir", str(o), "--overwrite", "true",
                                                "--preset", "test", "--export_dir", "none"], "no meta.json"),
    ("pre-truncated-meta", "pretrain", lambda c, i, o: ["--data_dir", str(Path(write(c, "pk/meta.json", '{"splits": {"tra')).parent),
                                                       "--tokenizer", str(i["tok"]), "--output_dir", str(o), "--overwrite", "true", "--export_dir", "none"],
     "meta.json: truncated or not the meta.json"),
    ("pre-empty-meta", "pretrain", lambda c, i, o: ["--data_dir", str(Path(write(c, "pk/meta.json", "")).parent), "--tokenizer", str(i["tok"]),
                                                   "--output_dir", str(o), "--overwrite", "true", "--export_dir", "none"], "meta.json: truncated"),
    ("pre-log-interval-0", "pretrain", lambda c, i, o: ["--log_interval", "0"], "log_interval: 0; expected a number >= 1"),
    ("pre-eval-batches-0", "pretrain", lambda c, i, o: ["--eval_batches", "0"], "eval_batches: 0; expected a number >= 1"),
    ("pre-lr-negative", "pretrain", lambda c, i, o: ["--lr", "-1"], "lr: -1.0; expected a number > 0"),
    ("pre-seq-too-long", "pretrain", lambda c, i, o: ["--data_dir", str(i["d"] / "packed"), "--tokenizer", str(i["tok"]), "--preset", "test",
                                                     "--seq_len", "512", "--output_dir", str(o), "--overwrite", "true", "--export_dir", "none"],
     "seq_len: 512 is longer than the model's max_position_embeddings 256"),
    ("pre-other-tokenizer", "pretrain", lambda c, i, o: ["--data_dir", str(i["d"] / "packed"), "--tokenizer", _other_tokenizer(c, i), "--preset", "test",
                                                        "--output_dir", str(o), "--overwrite", "true", "--export_dir", "none", "--seq_len", "32"],
     "packed with another tokenizer"),
    ("pre-resume-pickle", "pretrain", lambda c, i, o: ["--data_dir", str(i["d"] / "packed"), "--tokenizer", str(i["tok"]), "--preset", "test",
                                                      "--seq_len", "32", "--resume_from", crafted_pickle(c, "evil.pt"), "--output_dir", str(o),
                                                      "--overwrite", "true", "--export_dir", "none"], "evil.pt: refused to load"),
    ("pre-resume-truncated", "pretrain", lambda c, i, o: ["--data_dir", str(i["d"] / "packed"), "--tokenizer", str(i["tok"]), "--preset", "test",
                                                         "--seq_len", "32", "--resume_from", write(c, "t.pt", b"PK\x03\x04 cut"), "--output_dir", str(o),
                                                         "--overwrite", "true", "--export_dir", "none"], "t.pt: corrupted or truncated checkpoint"),
    ("pre-dtype", "pretrain", lambda c, i, o: ["--dtype", "float16"], "dtype: 'float16'; expected auto, float32 or bfloat16"),
    ("pre-cuda", "pretrain", lambda c, i, o: ["--device", "cuda", "--data_dir", str(i["d"] / "packed"), "--tokenizer", str(i["tok"]),
                                             "--output_dir", str(o), "--overwrite", "true"], "device: cuda was asked for but no CUDA device"),
    ("pre-report-to", "pretrain", lambda c, i, o: ["--report_to", "mlflow"], "report_to: unknown tracker 'mlflow'"),
    ("pre-finished-no-overwrite", "pretrain", lambda c, i, o: ["--data_dir", str(i["d"] / "packed"), "--tokenizer", str(i["tok"]), "--preset", "test",
                                                              "--seq_len", "32", "--output_dir", str(o), "--export_dir", "none"],
     "output directory exists (a finished run); pass --overwrite true"),
    # -- export
    ("export-pickle", "export", lambda c, i, o: ["--tokenizer", str(i["tok"]), "--checkpoint", crafted_pickle(c, "e.pt"), "--output_dir", str(o),
                                                "--overwrite", "true"], "e.pt: refused to load"),
    ("export-random-bytes", "export", lambda c, i, o: ["--tokenizer", str(i["tok"]), "--checkpoint", write(c, "r.pt", b"\x00\x01 random"),
                                                      "--output_dir", str(o), "--overwrite", "true"], "r.pt: corrupted or truncated checkpoint"),
    ("export-preset", "export", lambda c, i, o: ["--tokenizer", str(i["tok"]), "--preset", "huge", "--output_dir", str(o), "--overwrite", "true"],
     "unknown model preset 'huge'"),
    ("export-no-tokenizer", "export", lambda c, i, o: ["--tokenizer", user_tokenizer_dir(c), "--output_dir", str(o), "--overwrite", "true"],
     "no tokenizer.json"),
    # -- sft
    ("sft-model-missing", "sft", lambda c, i, o: _sft(c, i, o, "--model_name_or_path", str(c / "nomodel")), "nomodel: model directory not found"),
    ("sft-model-garbage-config", "sft", lambda c, i, o: _sft(c, i, o, "--model_name_or_path", garbage_model(c)), "config.json: not valid JSON"),
    ("sft-model-config-no-type", "sft", lambda c, i, o: _sft(c, i, o, "--model_name_or_path", garbage_model(c, '{"hidden_size": 8}')),
     "config.json: no model_type"),
    ("sft-hub-offline", "sft", lambda c, i, o: _sft(c, i, o, "--model_name_or_path", "nobody-org/no-such-model"),
     "nobody-org/no-such-model: neither a local model directory nor a hub model that can be loaded: HF_HUB_OFFLINE=1"),
    ("sft-data-missing", "sft", lambda c, i, o: _sft(c, i, o, "--train_data", str(c / "no.jsonl")), "no.jsonl: data file not found"),
    ("sft-data-not-utf8", "sft", lambda c, i, o: _sft(c, i, o, "--train_data", write(c, "s.jsonl", b'{"messages": []}\n\xff\n')),
     "s.jsonl: line 2: undecodable bytes"),
    ("sft-data-not-gzip", "sft", lambda c, i, o: _sft(c, i, o, "--train_data", write(c, "s.jsonl.gz", b"not gzip")), "s.jsonl.gz: not a readable gzip file"),
    ("sft-data-parquet", "sft", lambda c, i, o: _sft(c, i, o, "--train_data", write(c, "s.parquet", b"garbage")), "s.parquet: not a readable parquet file"),
    ("sft-data-role", "sft", lambda c, i, o: _sft(c, i, o, "--train_data", write(c, "s.jsonl", [{"messages": [{"role": "wizard", "content": "x"}]}])),
     "s.jsonl:1: messages[0]: unknown role 'wizard'"),
    ("sft-prompt-null", "sft", lambda c, i, o: _sft(c, i, o, "--train_data", write(c, "s.jsonl", [{"prompt": None, "completion": "Hi."}])),
     "s.jsonl:1: prompt: expected a non-empty list of messages"),
    ("sft-prompt-number", "sft", lambda c, i, o: _sft(c, i, o, "--train_data", write(c, "s.jsonl", [{"prompt": 7, "completion": "Hi."}])),
     "s.jsonl:1: prompt: expected a non-empty list of messages"),
    ("sft-weight-inf", "sft", lambda c, i, o: _sft(c, i, o, "--train_data", f"{i['d'] / 'sft.jsonl'}@inf"), "weight inf; expected a finite number > 0"),
    ("sft-weight-nan", "sft", lambda c, i, o: _sft(c, i, o, "--train_data", f"{i['d'] / 'sft.jsonl'}@nan"), "weight nan; expected a finite number > 0"),
    ("sft-weight-negative", "sft", lambda c, i, o: _sft(c, i, o, "--train_data", f"{i['d'] / 'sft.jsonl'}@-1"), "weight -1; expected a finite number > 0"),
    ("sft-too-long", "sft", lambda c, i, o: _sft(c, i, o, "--too_long", "maybe"), "too_long 'maybe'"),
    ("sft-invalid-rows", "sft", lambda c, i, o: _sft(c, i, o, "--invalid_rows", "ignore"), "invalid_rows 'ignore'"),
    ("sft-lr-negative", "sft", lambda c, i, o: _sft(c, i, o, "--learning_rate", "-1"), "learning_rate: -1.0; expected a number > 0"),
    ("sft-batch-0", "sft", lambda c, i, o: _sft(c, i, o, "--per_device_train_batch_size", "0"), "per_device_train_batch_size: 0; expected a number >= 1"),
    ("sft-eval-fraction", "sft", lambda c, i, o: _sft(c, i, o, "--eval_fraction", "1.0"), "eval_fraction: 1.0; expected a number >= 0 and < 1"),
    ("sft-not-ours", "sft", lambda c, i, o: _sft(c, i, c / "mine"), "was not written by this suite"),
    ("sft-output-holds-input", "sft", lambda c, i, o: _sft(c, i, o, "--model_name_or_path", _model_in(o, i)),
     "contains the input"),
    ("sft-finished-no-overwrite", "sft", lambda c, i, o: [a for a in _sft(c, i, o) if a not in ("--overwrite", "true")],
     "output directory exists (a finished run)"),
    ("sft-csv-extra-field", "sft", lambda c, i, o: _sft(c, i, o, "--train_data", write(c, "s.csv", "prompt,completion\nHi,Hello\nA,B,C\n")),
     "s.csv:3: 3 fields, more than the 2 of the header"),
    ("sft-chat-template", "sft", lambda c, i, o: _sft(c, i, o, "--chat_template_path", write(c, "t.txt", "x")), "chat_template_path"),
    ("sft-max-steps-yaml", "sft", lambda c, i, o: ["--config", write(c, "c.yaml", "max_steps: 2.5\n")], "max_steps: 2.5 is a float; expected int"),
    # -- reward
    ("rm-no-heldout", "reward", lambda c, i, o: _rw(c, i, o, "--eval_fraction", "0"), "the health gate needs held-out pairs"),
    ("rm-chosen-equals", "reward", lambda c, i, o: _rw(c, i, o, "--train_data", write(c, "p.jsonl", [
        {"prompt": [U("Hi")], "chosen": [A("Same.")], "rejected": [A("Same.")]}])), "p.jsonl:1: chosen equals rejected"),
    ("rm-hh-no-prompt", "reward", lambda c, i, o: _rw(c, i, o, "--train_data", write(c, "p.jsonl", [
        {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: D"}])), "p.jsonl:1: chosen and rejected dialogues share no prompt"),
    ("rm-gate-range", "reward", lambda c, i, o: _rw(c, i, o, "--min_eval_accuracy", "1.5"), "min_eval_accuracy: 1.5; expected a number >= 0 and <= 1"),
    ("rm-prompt-number", "reward", lambda c, i, o: _rw(c, i, o, "--train_data", write(c, "p.jsonl", [{"prompt": 7, "chosen": "a", "rejected": "b"}])),
     "p.jsonl:1: prompt: expected a non-empty list of messages"),
    ("rm-max-length-0", "reward", lambda c, i, o: _rw(c, i, o, "--max_length", "0"), "max_length: 0; expected a number >= 1"),
    ("rm-unknown-format", "reward", lambda c, i, o: _rw(c, i, o, "--train_data", write(c, "p.jsonl", [{"question": "a", "answer": "b"}])),
     "p.jsonl:1: unrecognised preference row"),
    # -- dpo
    ("dpo-loss-type", "dpo", lambda c, i, o: _dpo(c, i, o, "--loss_type", "nope"), "loss_type: 'nope' is not a TRL DPO loss"),
    ("dpo-beta-negative", "dpo", lambda c, i, o: _dpo(c, i, o, "--beta", "-1"), "beta: -1.0; expected a number >= 0"),
    ("dpo-cache-a-file", "dpo", lambda c, i, o: _dpo(c, i, o, "--ref_cache_dir", write(c, "cachefile", "x")), "ref_cache_dir: "),
    ("dpo-sync-ref", "dpo", lambda c, i, o: _dpo(c, i, o, "--sync_ref_model", "true"), "sync_ref_model: not supported"),
    ("dpo-no-data", "dpo", lambda c, i, o: [a for a in _dpo(c, i, o) if a != str(i["d"] / "pref.jsonl") and a != "--train_data"],
     "train_data: expected at least one preference data source"),
    # -- ppo
    ("ppo-kl-negative", "ppo", lambda c, i, o: _ppo(c, i, o, "--kl_coef", "-0.1"), "kl_coef: -0.1; expected a number >= 0"),
    ("ppo-temperature-0", "ppo", lambda c, i, o: _ppo(c, i, o, "--temperature", "0"), "temperature: 0.0; expected a number > 0"),
    ("ppo-mini-batch-0", "ppo", lambda c, i, o: _ppo(c, i, o, "--mini_batch_size", "0"), "mini_batch_size: 0; expected a number >= 1"),
    ("ppo-threads-negative", "ppo", lambda c, i, o: _ppo(c, i, o, "--cpu_threads", "-1"), "cpu_threads: -1; expected a number >= 0"),
    ("ppo-batch-multiple", "ppo", lambda c, i, o: _ppo(c, i, o, "--rollout_batch_size", "5", "--mini_batch_size", "2"),
     "rollout_batch_size (5) must be a multiple of mini_batch_size (2)"),
    ("ppo-no-stats", "ppo", lambda c, i, o: _ppo(c, i, o, "--reward_model", str(_no_stats(c, i))), "reward_stats.json: missing"),
    ("ppo-other-tokenizer", "ppo", lambda c, i, o: _ppo(c, i, o, "--reward_model", str(i["rm_other"])), "its tokenizer differs from the policy's"),
    ("ppo-prompt-too-long", "ppo", lambda c, i, o: _ppo(c, i, o, "--prompts", write(c, "l.jsonl", [{"prompt": [U("the cat sat " * 200)]}])),
     "l.jsonl:1: prompt is"),
    ("ppo-prompt-null", "ppo", lambda c, i, o: _ppo(c, i, o, "--prompts", write(c, "n.jsonl", [{"prompt": None}])),
     "n.jsonl:1: prompt is NoneType; expected a non-empty string or a list of messages"),
    ("ppo-prompt-object", "ppo", lambda c, i, o: _ppo(c, i, o, "--prompts", write(c, "n.jsonl", [{"prompt": {"text": "hi"}}])),
     "n.jsonl:1: prompt is dict"),
    ("ppo-prompts-missing", "ppo", lambda c, i, o: _ppo(c, i, o, "--prompts", str(c / "none.jsonl")), "none.jsonl: data file not found"),
    ("ppo-value-model", "ppo", lambda c, i, o: _ppo(c, i, o, "--value_model", str(c / "nov")), "value_model: "),
    ("ppo-kl-estimator", "ppo", lambda c, i, o: _ppo(c, i, o, "--kl_estimator", "k2"), "kl_estimator: 'k2'"),
    ("ppo-report-to", "ppo", lambda c, i, o: _ppo(c, i, o, "--report_to", "mlflow"), "report_to: unknown tracker 'mlflow'"),
    ("ppo-response-length", "ppo", lambda c, i, o: _ppo(c, i, o, "--response_length", "300"), "response_length: 300 leaves no room"),
    # -- rloo / grpo
    ("rloo-beta-negative", "rloo", lambda c, i, o: _online(c, i, o, "--beta", "-1"), "beta: -1.0"),
    ("grpo-rm-missing", "grpo", lambda c, i, o: _online(c, i, o, "--reward_model", str(c / "norm")), "reward_model: "),
    ("grpo-prompt-number", "grpo", lambda c, i, o: _online(c, i, o, "--prompts", write(c, "n.jsonl", [{"prompt": 7}])), "n.jsonl:1: prompt is int"),
    ("rloo-max-prompts", "rloo", lambda c, i, o: _online(c, i, o, "--max_prompts", "-2"), "max_prompts: -2; expected a number >= 0"),
    # -- pairs
    ("pairs-checker-fields", "pairs", lambda c, i, o: _pairs(c, i, o, "--checker", "tinyworld", "--prompts_file", write(c, "p.jsonl", [{"prompt": "Hi?"}])),
     "p.jsonl:1: checker tinyworld needs answer, kind"),
    ("pairs-num-samples", "pairs", lambda c, i, o: _pairs(c, i, o, "--num_samples", "1"), "num_samples: 1; expected a number >= 2"),
    ("pairs-temperature", "pairs", lambda c, i, o: _pairs(c, i, o, "--temperature", "0"), "temperature: 0.0; expected a number > 0"),
    ("pairs-max-new-tokens", "pairs", lambda c, i, o: _pairs(c, i, o, "--max_new_tokens", "300"), "max_new_tokens: 300 leaves no room"),
    ("pairs-checker-name", "pairs", lambda c, i, o: _pairs(c, i, o, "--checker", "oracle"), "checker: 'oracle'"),
    # -- eval
    ("eval-output-suffix", "eval", lambda c, i, o: ["--model", str(i["model"]), "--output", str(c / "r.txt")], "must end in .json"),
    ("eval-output-a-dir", "eval", lambda c, i, o: ["--model", str(i["model"]), "--output", str(_dir(c, "r.json"))], "is a directory"),
    ("eval-task", "eval", lambda c, i, o: _ev(c, i, "--tasks", "everything"), "tasks: unknown task 'everything'"),
    ("eval-no-files", "eval", lambda c, i, o: _ev(c, i, "--tasks", "perplexity"), "perplexity: set perplexity_files"),
    ("eval-files-a-string", "eval", lambda c, i, o: ["--config", write(c, "e.yaml", f"model: {i['model']}\noutput: {c}/r.json\nperplexity_files: x.txt\n")],
     "perplexity_files: 'x.txt' is a str; expected list[str]"),
    ("eval-limit", "eval", lambda c, i, o: _ev(c, i, "--limit", "-1"), "limit: -1; expected a number >= 1"),
    ("eval-mmlu-not-utf8", "eval", lambda c, i, o: _ev(c, i, "--tasks", "mmlu", "--mmlu_test_files",
                                                       write(c, "m_test.csv", b"question,choice0,choice1,choice2,choice3,answer\nQ,a,b,c,d,\xff\n")),
     "m_test.csv: line 2: undecodable bytes"),
    ("eval-mmlu-label", "eval", lambda c, i, o: _ev(c, i, "--tasks", "mmlu", "--mmlu_test_files",
                                                    write(c, "m_test.csv", "question,choice0,choice1,choice2,choice3,answer\nQ,a,b,c,d,E\n")),
     "m_test.csv:2: answer 'E' is not one of"),
    ("eval-temperature", "eval", lambda c, i, o: _ev(c, i, "--temperature", "-1"), "temperature: -1.0; expected a number >= 0"),
    ("eval-num-samples", "eval", lambda c, i, o: _ev(c, i, "--num_samples", "0"), "num_samples: 0; expected a number >= 1"),
    ("eval-preference-no-rm", "eval", lambda c, i, o: _ev(c, i, "--tasks", "preference", "--preference_files", str(i["d"] / "pref.jsonl")),
     "preference: set reward_model"),
    ("eval-greedy-k", "eval", lambda c, i, o: _ev(c, i, "--tasks", "winrate", "--reward_model", str(i["rm"]), "--reference_model", str(i["model"]),
                                                  "--prompts_file", str(i["d"] / "prompts.jsonl"), "--temperature", "0", "--num_samples", "2"),
     "num_return_sequences: 2 with greedy decoding"),
    ("eval-new-tokens", "eval", lambda c, i, o: _ev(c, i, "--tasks", "winrate", "--reward_model", str(i["rm"]), "--reference_model", str(i["model"]),
                                                    "--prompts_file", str(i["d"] / "prompts.jsonl"), "--max_new_tokens", "256"),
     "max_new_tokens: 256 leaves no room"),
    ("eval-answers-fields", "eval", lambda c, i, o: _ev(c, i, "--tasks", "answers", "--answer_files", write(c, "q.jsonl", [{"prompt": "Hi?"}])),
     "q.jsonl:1: the tinyworld checker needs answer, kind"),
    ("eval-model-missing", "eval", lambda c, i, o: ["--model", str(c / "nomodel"), "--output", str(c / "r.json")], "nomodel: model directory not found"),
    ("eval-adapter", "eval", lambda c, i, o: _ev(c, i, "--adapter", str(_dir(c, "adapter"))), "no adapter_config.json"),
    ("eval-bad-jsonl", "eval", lambda c, i, o: _ev(c, i, "--tasks", "perplexity", "--perplexity_files", write(c, "x.jsonl", "{bad\n")),
     "x.jsonl:1: not valid JSON"),
    ("eval-task-layout", "eval", lambda c, i, o: _ev(c, i, "--tasks", "arc_easy", "--task_data", "arc_easy=" + write(c, "arc.jsonl", [{"q": "Why?", "a": 1}])),
     "arc.jsonl:1: arc_easy: fields found: a, q; expected one of the layouts: hub allenai/ai2_arc (question, choices.text"),
    ("eval-task-label", "eval", lambda c, i, o: _ev(c, i, "--tasks", "arc_easy", "--task_data", "arc_easy=" + write(c, "arc.jsonl", [_arc("E")])),
     "arc.jsonl:1: arc_easy doc_to_target: 'E' is not one of A, B, C, D"),
    ("eval-task-no-choices", "eval", lambda c, i, o: _ev(c, i, "--tasks", "arc_easy", "--task_data", "arc_easy=" + write(c, "arc.jsonl", [_arc("A", [])])),
     "arc.jsonl:1: arc_easy: no choices ([]); expected a non-empty list of strings"),
    ("eval-task-yaml-key", "eval", lambda c, i, o: _ev(c, i, "--tasks", write(c, "t.yaml", _TASK_YAML.replace("doc_to_text", "doc_to_txt"))),
     "t.yaml: unknown key 'doc_to_txt'; did you mean 'doc_to_text'?"),
    ("eval-task-yaml-missing", "eval", lambda c, i, o: _ev(c, i, "--tasks", write(c, "t.yaml", _TASK_YAML.replace("doc_to_target: gold\n", ""))),
     "t.yaml: missing doc_to_target"),
    ("eval-task-fewshot", "eval", lambda c, i, o: _ev(c, i, "--tasks", "arc_easy", "--num_fewshot", "5", "--task_data",
                                                      f"arc_easy.test={write(c, 'test.jsonl', [_arc('A')])},arc_easy.train={write(c, 'train.jsonl', [_arc('B')] * 2)}"),
     "arc_easy: num_fewshot=5 but the few-shot split 'train' has 2 documents; expected at most 2 shots"),
    ("eval-task-unknown", "eval", lambda c, i, o: _ev(c, i, "--tasks", "arc_hard"), "tasks: unknown task 'arc_hard'; expected any of perplexity"),
    # -- compare
    ("cmp-one-report", "compare", lambda c, i, o: [str(i["d"] / "reports" / "a.json")], "expected at least two report files"),
    ("cmp-malformed", "compare", lambda c, i, o: [str(i["d"] / "reports" / "a.json"), write(c, "b.json", "{oops"), "--output", str(c / "x.md")],
     "b.json: not a JSON report"),
    ("cmp-not-utf8", "compare", lambda c, i, o: [str(i["d"] / "reports" / "a.json"), write(c, "b.json", b'{"a": "\xff"}'), "--output", str(c / "x.md")],
     "b.json: undecodable bytes"),
    ("cmp-no-schema", "compare", lambda c, i, o: [str(i["d"] / "reports" / "a.json"), write(c, "b.json", '{"results": {}}'), "--output", str(c / "x.md")],
     "b.json: no schema_version"),
    ("cmp-results-shape", "compare", lambda c, i, o: [str(i["d"] / "reports" / "a.json"), _report(c, i, results={"perplexity": 3}),
                                                     "--output", str(c / "x.md")], "'results' must be a mapping of task name to a mapping"),
    ("cmp-other-data", "compare", lambda c, i, o: [str(i["d"] / "reports" / "a.json"), _report(c, i, data_hash="0" * 16),
                                                  "--output", str(c / "x.md")], "task perplexity: data_hash differs"),
    ("cmp-labels", "compare", lambda c, i, o: [str(i["d"] / "reports" / "a.json"), str(i["d"] / "reports" / "a.json"), "--labels", "one",
                                              "--output", str(c / "x.md")], "labels: expected 2 labels, got 1"),
    # -- serve: every check comes before a port is bound or a model loaded
    ("serve-no-model", "serve", lambda c, i, o: [], "model: missing; expected a Hugging Face model directory"),
    ("serve-model-missing", "serve", lambda c, i, o: ["--model", str(c / "nomodel")], "nomodel: model directory not found"),
    ("serve-model2-other-tokenizer", "serve", lambda c, i, o: ["--model", str(i["model"]), "--model2", str(i["rm_other"])],
     "its tokenizer differs from model's"),
    ("serve-port-range", "serve", lambda c, i, o: ["--model", str(i["model"]), "--port", "70000"],
     "port: 70000; expected a number >= 0 and <= 65535"),
    ("serve-port-negative", "serve", lambda c, i, o: ["--model", str(i["model"]), "--port", "-1"], "port: -1; expected a number >= 0"),
    ("serve-host-not-address", "serve", lambda c, i, o: ["--model", str(i["model"]), "--host", "my-laptop"],
     "host: 'my-laptop' is not an IP address"),
    ("serve-adapter", "serve", lambda c, i, o: ["--model", str(i["model"]), "--adapter", str(_dir(c, "adapter"))], "no adapter_config.json"),
    ("serve-votes-dir-a-file", "serve", lambda c, i, o: ["--model", str(i["model"]), "--model2", str(i["model"]), "--votes_dir",
                                                        write(c, "votes", "not a directory")], "exists and is not a directory"),
    ("serve-max-pending", "serve", lambda c, i, o: ["--model", str(i["model"]), "--max_pending", "0"], "max_pending: 0; expected a number >= 1"),
    # -- generate
    ("gen-missing-model", "generate", lambda c, i, o: _gen(c, i, o, "--model", str(c / "nope")), "nope: model directory not found"),
    ("gen-not-a-model", "generate", lambda c, i, o: _gen(c, i, o, "--model", str(c / "mine")), "mine: no config.json"),
    ("gen-adapter-other-base", "generate", lambda c, i, o: _gen(c, i, o, "--adapter", _other_adapter(c)), "was trained for another base model"),
    ("gen-draft-other-tokenizer", "generate", lambda c, i, o: _gen(c, i, o, "--draft_model", str(i["rm_other"])), "its tokenizer differs from the model's"),
    ("gen-draft-other-vocab", "generate", lambda c, i, o: _gen(c, i, o, "--draft_model", _other_vocab(c, i)), "vocab_size 999 differs from the model's"),
    ("gen-prompt-too-long", "generate", lambda c, i, o: _gen(c, i, o, "--prompt", "the cat sat " * 200, "--raw", "true"),
     "--prompt 1: prompt is"),
    ("gen-max-new-tokens-0", "generate", lambda c, i, o: _gen(c, i, o, "--max_new_tokens", "0"), "max_new_tokens: 0; expected a number >= 1"),
    ("gen-top-p-above-1", "generate", lambda c, i, o: _gen(c, i, o, "--top_p", "1.5"), "top_p: 1.5; expected a number > 0 and <= 1"),
    ("gen-top-p-0", "generate", lambda c, i, o: _gen(c, i, o, "--top_p", "0"), "top_p: 0.0; expected a number > 0 and <= 1"),
    ("gen-temperature-negative", "generate", lambda c, i, o: _gen(c, i, o, "--temperature", "-0.5"), "temperature: -0.5; expected a number >= 0"),
    ("gen-prompts-bad-json", "generate", lambda c, i, o: _gen(c, i, o, "--prompts_file", write(c, "p.jsonl", '{"prompt": "a"}\n{oops\n')),
     "p.jsonl:2: not valid JSON"),
    ("gen-prompts-no-prompt", "generate", lambda c, i, o: _gen(c, i, o, "--prompts_file", write(c, "p.jsonl", [{"question": "a"}])),
     "p.jsonl:1: expected a 'prompt'"),
    ("gen-prompts-not-utf8", "generate", lambda c, i, o: _gen(c, i, o, "--prompts_file", write(c, "p.txt", b"fine\n\xff\xfe\n")),
     "p.txt: line 2: undecodable bytes"),
    ("gen-no-prompt", "generate", lambda c, i, o: ["--model", str(i["model"]), "--output", str(o / "answers.jsonl")], "prompt: none given"),
    ("gen-output-not-jsonl", "generate", lambda c, i, o: _gen(c, i, o, "--output", str(o / "answers.txt")), "must end in .jsonl"),
    ("gen-output-exists", "generate", lambda c, i, o: _gen(c, i, o, "--output", write(c, "out/old.jsonl", "{}\n")), "old.jsonl exists; pass --overwrite"),
    ("gen-greedy-several", "generate", lambda c, i, o: _gen(c, i, o, "--temperature", "0", "--num_return_sequences", "2"),
     "with greedy decoding (temperature 0) would repeat one answer"),
    ("gen-draft-tokens-0", "generate", lambda c, i, o: _gen(c, i, o, "--draft_model", str(i["model"]), "--num_draft_tokens", "0"),
     "num_draft_tokens: 0; expected a number >= 1"),
    ("gen-draft-schedule", "generate", lambda c, i, o: _gen(c, i, o, "--draft_model", str(i["model"]), "--draft_schedule", "eager"),
     "draft_schedule: 'eager'"),
    ("gen-raw-messages", "generate", lambda c, i, o: _gen(c, i, o, "--raw", "true", "--prompts_file", str(i["d"] / "prompts.jsonl")),
     "a message list needs the chat template"),
    # -- chat
    ("chat-missing-model", "chat", lambda c, i, o: ["--model", str(c / "nope")], "nope: model directory not found"),
    ("chat-top-p", "chat", lambda c, i, o: ["--model", str(i["model"]), "--top_p", "2"], "top_p: 2.0; expected a number > 0 and <= 1"),
    ("chat-reply-longer-than-context", "chat", lambda c, i, o: ["--model", str(i["model"]), "--max_new_tokens", "300"],
     "max_new_tokens: 300 leaves no room for a prompt"),
    ("chat-draft-other-tokenizer", "chat", lambda c, i, o: ["--model", str(i["model"]), "--draft_model", str(i["rm_other"])], "its tokenizer differs"),
    ("chat-no-template", "chat", lambda c, i, o: ["--model", _no_template(c, i)], "its tokenizer has no chat template"),
    # -- distill
    ("distill-missing-target", "distill", lambda c, i, o: _distill(c, i, o, "--target", str(c / "nope")), "nope: model directory not found"),
    ("distill-no-data", "distill", lambda c, i, o: ["--target", str(i["model"]), "--output_dir", str(o), "--overwrite", "true"],
     "data: no prompts_file and no corpus"),
    ("distill-init-other-tokenizer", "distill", lambda c, i, o: _distill(c, i, o, "--init", str(i["rm_other"])), "its tokenizer differs from the target's"),
    ("distill-loss", "distill", lambda c, i, o: _distill(c, i, o, "--loss", "mse"), "loss: 'mse'; expected one of kl, ce, kl+ce"),
    ("distill-ce-without-outputs", "distill", lambda c, i, o: _distill(c, i, o, "--loss", "ce"), "loss: ce trains on the target's sampled tokens"),
    ("distill-shape", "distill", lambda c, i, o: _distill(c, i, o, "--hidden_size", "30"), "draft shape: hidden_size 30 is not divisible"),
    ("distill-seq-len", "distill", lambda c, i, o: _distill(c, i, o, "--seq_len", "512"), "seq_len: 512 is longer than the target's context"),
    ("distill-corpus-missing", "distill", lambda c, i, o: _distill(c, i, o, "--corpus", str(c / "none.txt")), "none.txt: no such file"),
    ("distill-bad-prompts", "distill", lambda c, i, o: _distill(c, i, o, "--prompts_file", write(c, "p.jsonl", "{oops\n")), "p.jsonl:1: not valid JSON"),
    ("distill-not-ours", "distill", lambda c, i, o: _distill(c, i, o, "--output_dir", str(c / "mine")), "was not written by this suite"),
    # -- memory
    ("mem-no-config", "memory", lambda c, i, o: ["--gpu_memory", "20GB"], "--config needs a stage YAML"),
    ("mem-config-missing", "memory", lambda c, i, o: ["--config", str(c / "none.yaml")], "none.yaml: config file not found"),
    ("mem-config-not-yaml", "memory", lambda c, i, o: ["--config", write(c, "x.yaml", "a: [1, 2\n")], "x.yaml: not valid YAML"),
    ("mem-no-stage", "memory", lambda c, i, o: ["--config", write(c, "x.yaml", "model_name_or_path: Qwen/Qwen2.5-3B\n")],
     "x.yaml: cannot tell the stage"),
    ("mem-unknown-stage", "memory", lambda c, i, o: ["--config", write(c, "x.yaml", "a: 1\n"), "--stage", "frobnicate"],
     "--stage: 'frobnicate'; expected one of"),
    ("mem-gpu-memory", "memory", lambda c, i, o: ["--config", "recipes/gpu16/sft.yaml", "--gpu_memory", "lots"], "gpu_memory"),
    ("mem-num-processes", "memory", lambda c, i, o: ["--config", "recipes/gpu16/sft.yaml", "--num_processes", "two"],
     "--num_processes: 'two'; expected a whole number"),
    ("mem-model-missing", "memory", lambda c, i, o: ["--config", "recipes/gpu16/sft.yaml", "--model_name_or_path", str(c / "nomodel")],
     "nomodel"),
    # -- run
    ("run-no-pipeline", "run", lambda c, i, o: [str(_dir(c, "recipe"))], "pipeline.yaml: not found"),
    ("run-unknown-stage", "run", lambda c, i, o: [_pipeline(c, "stages: [frobnicate]\n")], "'frobnicate' is not a stage"),
    ("run-stage-yaml-list", "run", lambda c, i, o: [_pipeline(c, "stages: [data]\n", {"data.yaml": "- a\n- b\n"})],
     "data.yaml: expected a YAML mapping of config keys, got a list"),
    ("run-stage-yaml-invalid", "run", lambda c, i, o: [_pipeline(c, "stages: [data]\n", {"data.yaml": "a: [1\n"})], "data.yaml: not a valid UTF-8 YAML file"),
    ("run-pipeline-env", "run", lambda c, i, o: [_pipeline(c, "stages: [data]\nenv:\n  PYTHONPATH: /tmp\n", {"data.yaml": "seed: 0\n"})],
     "env: a config may not set environment variables"),
    ("run-no-recipe-arg", "run", lambda c, i, o: ["--from", "sft"], "expected a recipe directory"),
]


def _other_tokenizer(case, i):
    d = case / "tok2"
    shutil.copytree(i["tok"], d)
    (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text() + "\n")
    return str(d)


def _model_in(out: Path, i) -> str:
    """The input model copied inside the output directory: a run must refuse to write over its own input."""
    dst = out / "model"
    shutil.copytree(i["model"], dst)
    return str(dst)


def _no_stats(case: Path, i) -> Path:
    d = case / "rm_nostats"
    shutil.copytree(i["rm"], d)
    (d / "reward_stats.json").unlink()
    return d


def _dir(case: Path, name: str) -> Path:
    d = case / name
    d.mkdir()
    return d


def _report(case: Path, i, results=None, data_hash=None) -> str:
    rep = json.loads((i["d"] / "reports" / "a.json").read_text())
    if results is not None:
        rep["results"] = results
    if data_hash is not None:
        rep["results"]["perplexity"]["data_hash"] = data_hash
    return write(case, "b.json", json.dumps(rep))


def _pipeline(case: Path, text: str, stages: dict | None = None) -> str:
    d = case / "recipe"
    d.mkdir(exist_ok=True)
    (d / "pipeline.yaml").write_text(text)
    for name, body in (stages or {}).items():
        (d / name).write_text(body)
    return str(d)


def _sft(case, i, out, *extra):
    args = {"--model_name_or_path": str(i["model"]), "--train_data": str(i["d"] / "sft.jsonl"), "--output_dir": str(out), "--overwrite": "true",
            "--max_steps": "2", "--report_to": "none"}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    return [x for kv in args.items() for x in kv]


def _rw(case, i, out, *extra):
    base = _sft(case, i, out, "--train_data", str(i["d"] / "pref.jsonl"), *extra)
    return base + ([] if "--eval_fraction" in extra else ["--eval_fraction", "0.25"])


def _dpo(case, i, out, *extra):
    return _sft(case, i, out, "--train_data", str(i["d"] / "pref.jsonl"), "--ref_cache_dir", str(case / "cache"), *extra)


def _ppo(case, i, out, *extra):
    args = {"--model_name_or_path": str(i["model"]), "--use_peft": "true", "--reward_model": str(i["rm"]), "--prompts": str(i["d"] / "prompts.jsonl"),
            "--output_dir": str(out), "--overwrite": "true", "--rollout_batch_size": "4", "--mini_batch_size": "2", "--num_updates": "1",
            "--response_length": "4", "--eval_prompts": "0"}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    return [x for kv in args.items() for x in kv]


def _online(case, i, out, *extra):
    args = {"--model_name_or_path": str(i["model"]), "--use_peft": "true", "--reward_model": str(i["rm"]), "--prompts": str(i["d"] / "prompts.jsonl"),
            "--output_dir": str(out), "--overwrite": "true", "--per_device_train_batch_size": "2", "--num_generations": "2",
            "--max_completion_length": "4", "--max_steps": "1", "--report_to": "none"}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    return [x for kv in args.items() for x in kv]


def _pairs(case, i, out, *extra):
    args = {"--model_name_or_path": str(i["model"]), "--reward_model": str(i["rm"]), "--prompts_file": str(i["d"] / "prompts.jsonl"),
            "--output_dir": str(out), "--overwrite": "true", "--num_samples": "2", "--max_new_tokens": "4"}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    return [x for kv in args.items() for x in kv]


def _arc(key, texts=("x", "y", "z", "w")):
    """One ARC question in the hub layout, answer `key`, labels A.. for the given choice texts."""
    return {"id": "q", "question": "Why?", "choices": {"text": list(texts), "label": list("ABCDE"[:len(texts)])}, "answerKey": key}


# a user's task spec that works (cases break one key of it)
_TASK_YAML = ("task: mine\nversion: 1\noutput_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\n"
              "doc_to_choice: options\ndoc_to_target: gold\nmetric_list: [{metric: acc}]\n")


def _ev(case, i, *extra):
    args = {"--model": str(i["model"]), "--output": str(case / "out" / "report.json"), "--limit": "2", "--progress": "false"}
    if "--tasks" not in extra:
        args.update({"--tasks": "perplexity", "--perplexity_files": str(i["corpus"])})
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    return [x for kv in args.items() for x in kv]


def _gen(case, i, out, *extra):
    args = {"--model": str(i["model"]), "--prompt": "What is 2 plus 3?", "--output": str(out / "answers.jsonl"), "--max_new_tokens": "4",
            "--progress": "false"}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    return [x for kv in args.items() for x in kv]


def _distill(case, i, out, *extra):
    args = {"--target": str(i["model"]), "--corpus": str(i["corpus"]), "--output_dir": str(out), "--overwrite": "true", "--max_steps": "1",
            "--seq_len": "32", "--batch_size": "2"}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    return [x for kv in args.items() for x in kv]


def _other_adapter(case: Path) -> str:
    """A LoRA adapter trained on a model of another width."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1))
    d = case / "adapter"
    get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(d)
    return str(d)


def _other_vocab(case: Path, i) -> str:
    """A model directory with the same tokenizer files but another vocabulary size."""
    d = case / "draft"
    shutil.copytree(i["model"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 999
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _no_template(case: Path, i) -> str:
    """The tiny model with its chat template removed."""
    d = case / "plain"
    shutil.copytree(i["model"], d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return str(d)


def test_there_are_at_least_100_cases_over_every_stage():
    from alignment.cli import STAGES

    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)
    covered = {c[1] for c in CASES}
    assert set(STAGES) <= covered, set(STAGES) - covered


@pytest.mark.parametrize("name,stage,build,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(name, stage, build, expected, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = tmp_path / "case"
    case.mkdir()
    out = previous_result(case)
    mine = case / "mine"  # a directory the suite did not make: never replaced, even with --overwrite
    mine.mkdir()
    (mine / "notes.txt").write_text("my own files\n")
    argv = build(case, inputs, out)
    before = snapshot(case)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        align([stage, *map(str, argv)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 2, err[-2000:]
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert expected in errors[0], errors[0]
    assert snapshot(case) == before, "the case directory changed"
    assert not (case / "pwned").exists()
