"""`align pretrain`: learning, exact resume after SIGKILL, 2-process DDP parity, export, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from alignment.errors import UserError
from pretrain.data import PrepareConfig
from pretrain.data import main as prepare
from pretrain.train import PretrainConfig, lr_at, main
from tests.conftest import synthetic_corpus


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("packed")
    src = d / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_corpus(400, seed=5)))
    prepare(PrepareConfig(output_dir=str(d / "out"), tokenizer=str(tiny_tokenizer_dir), files=[str(src)], num_proc=1,
                          min_words=3, dedup_near=False, val_fraction=0.1))
    return d / "out"


def _cfg(packed, tokenizer, out, **kw) -> PretrainConfig:
    base = dict(data_dir=str(packed), tokenizer=str(tokenizer), output_dir=str(out), export_dir=None, preset="test",
                seq_len=32, batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3, eval_interval=0, eval_batches=2,
                num_samples=0, save_interval=0, log_interval=1)
    base.update(kw)
    return PretrainConfig(**base)


def _argv(cfg: PretrainConfig) -> list[str]:
    out = []
    for k, v in vars(cfg).items():
        if v is None:
            v = "none"
        if v == [] or k in ("report_to",):
            continue
        out += [f"--{k}", str(v)]
    return out


def _losses(out) -> dict[int, float]:
    rows = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl")) if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _final_weights(out) -> dict:
    from pretrain.checkpoint import list_checkpoints

    return torch.load(list_checkpoints(os.path.join(out, "ckpt"))[-1], map_location="cpu", weights_only=False)["model"]


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = PretrainConfig(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, cfg) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert lr_at(14, cfg) == pytest.approx(0.1) and lr_at(20, cfg) == pytest.approx(0.1)


def test_training_lowers_loss_and_exports_loadable_model(packed, tiny_tokenizer_dir, tmp_path):
    cfg = _cfg(packed, tiny_tokenizer_dir, tmp_path / "run", export_dir=str(tmp_path / "base"), max_steps=20,
               eval_interval=10, num_samples=1, sample_tokens=8, save_interval=10, keep_checkpoints=2, report_to=["tensorboard"])
    summary = main(cfg)
    losses = _losses(cfg.output_dir)
    assert sorted(losses) == list(range(1, 21))
    assert losses[1] > 6.0  # ~ln(vocab) at init
    assert summary["loss"] < losses[1] - 1.0 and summary["val_loss"] < losses[1] - 0.8
    assert 0 < summary["val_bpb"] < summary["val_loss"]  # several bytes per token
    assert sorted(p.name for p in (tmp_path / "run" / "ckpt").iterdir()) == ["step_0000010.pt", "step_0000020.pt"]  # keep 2
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    ckpt = torch.load(tmp_path / "run" / "ckpt" / "step_0000020.pt", weights_only=False)
    assert {"model", "shape", "optimizer", "scheduler", "rng", "data", "step", "config"} <= set(ckpt)
    assert ckpt["data"]["samples_seen"] == 20 * 4
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    x = torch.randint(0, 400, (2, 16))
    from pretrain.checkpoint import load_model_checkpoint

    ours = load_model_checkpoint(tmp_path / "run" / "ckpt" / "step_0000020.pt")
    torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-4, atol=1e-4)


def test_sigkill_then_resume_is_bitwise_identical(packed, tiny_tokenizer_dir, tmp_path):
    steps = 20
    ref = _cfg(packed, tiny_tokenizer_dir, tmp_path / "ref", max_steps=steps, save_interval=4)
    main(ref)
    killed = _cfg(packed, tiny_tokenizer_dir, tmp_path / "killed", max_steps=steps, save_interval=4)
    cmd = [sys.executable, "-m", "alignment.cli", "pretrain", *_argv(killed)]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    first = tmp_path / ".killed.partial" / "ckpt" / "step_0000004.pt"  # a run works in a partial sibling
    while not first.exists() and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from pretrain.checkpoint import list_checkpoints

    left = list_checkpoints(tmp_path / ".killed.partial" / "ckpt")
    assert left and int(left[-1].stem.split("_")[1]) < steps, "the run should have been killed mid-way"
    assert not (tmp_path / "killed").exists()  # nothing in place until the run finishes
    r = subprocess.run(cmd, capture_output=True, text=True)  # the same command again: it resumes by itself
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming at step" in r.stdout + r.stderr
    a, b = _final_weights(ref.output_dir), _final_weights(killed.output_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(ref.output_dir) == _losses(killed.output_dir)  # every step's loss, bitwise


def test_two_processes_ddp_and_fsdp_match_one_with_same_global_batch(packed, tiny_tokenizer_dir, tmp_path):
    one = _cfg(packed, tiny_tokenizer_dir, tmp_path / "one", batch_size=2, grad_accum=2, max_steps=5, save_interval=5)
    main(one)
    two = _cfg(packed, tiny_tokenizer_dir, tmp_path / "two", batch_size=2, grad_accum=1, max_steps=5, save_interval=5)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "alignment.cli", "pretrain", *_argv(two)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    l1, l2 = _losses(one.output_dir), _losses(two.output_dir)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4, 5]
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=1e-5)
    assert l1[5] < l1[1]
    a, b = _final_weights(one.output_dir), _final_weights(two.output_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # FSDP2 (parameters, gradients and optimizer state sharded over the 2 processes): the same curve and weights,
    # and its checkpoint is a full state dict that loads without FSDP
    fsdp = _cfg(packed, tiny_tokenizer_dir, tmp_path / "fsdp", batch_size=2, grad_accum=1, max_steps=5, save_interval=5, fsdp=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "alignment.cli", "pretrain", *_argv(fsdp)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    l3 = _losses(fsdp.output_dir)
    assert all(l3[s] == pytest.approx(l1[s], rel=1e-5) for s in l1)
    c = _final_weights(fsdp.output_dir)
    assert c.keys() == a.keys()
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_one_line_errors(packed, tiny_tokenizer_dir, tmp_path):
    # shards made with another tokenizer
    other = tmp_path / "other_tok"
    shutil.copytree(tiny_tokenizer_dir, other)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text() + "\n")
    with pytest.raises(UserError, match="packed with another tokenizer"):
        main(_cfg(packed, other, tmp_path / "a"))
    # sequence length above the model's positions ('test' preset: 256)
    with pytest.raises(UserError, match="seq_len: 512 is longer than the model's max_position_embeddings 256"):
        main(_cfg(packed, tiny_tokenizer_dir, tmp_path / "b", seq_len=512))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    run = tmp_path / "run"
    main(_cfg(packed, tiny_tokenizer_dir, run, max_steps=4, save_interval=2))
    # an existing run is not silently overwritten
    with pytest.raises(UserError, match=r"output directory exists \(a finished run\); pass --overwrite true"):
        main(_cfg(packed, tiny_tokenizer_dir, run, max_steps=4))
    # --resume with an incompatible config
    with pytest.raises(UserError, match=r"resume: .* was made with seq_len=32 but the config gives seq_len=16"):
        main(_cfg(packed, tiny_tokenizer_dir, run, max_steps=8, seq_len=16, resume=True))
    assert not (tmp_path / ".run.partial").exists()  # refused before anything was written
    # a truncated checkpoint, through the command line: one line, exit 2
    last = run / "ckpt" / "step_0000004.pt"
    last.write_bytes(last.read_bytes()[:1000])
    cfg = _cfg(packed, tiny_tokenizer_dir, run, max_steps=8, resume=True)
    r = subprocess.run([sys.executable, "-m", "alignment.cli", "pretrain", *_argv(cfg)], capture_output=True, text=True)
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert err == [f"error: {last}: corrupted or truncated checkpoint (RuntimeError); delete it or resume from an older one"] or \
        (len(err) == 1 and err[0].startswith(f"error: {last}: corrupted or truncated checkpoint"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(packed, tiny_tokenizer_dir, tmp_path):
    cfg = _cfg(packed, tiny_tokenizer_dir, tmp_path / "nan", max_steps=40, save_interval=2, lr=1e6, warmup_steps=0, grad_clip=0)
    with pytest.raises(UserError, match=r"step \d+: (loss|gradient norm) is (nan|inf).*Last good checkpoint: .*step_\d+\.pt"):
        main(cfg)
    from pretrain.checkpoint import list_checkpoints, load_checkpoint

    good = load_checkpoint(list_checkpoints(tmp_path / ".nan.partial" / "ckpt")[-1])
    assert all(torch.isfinite(v).all() for v in good["model"].values())


def test_val_bits_per_byte_of_a_uniform_model_is_hand_computable(packed, tiny_tokenizer):
    """A model with constant logits costs ln(V) nats on every token; bpb = text tokens * ln(V) / ln 2 / their bytes."""
    import contextlib
    import math

    import numpy as np

    from pretrain.train import PackedTokens, evaluate, read_meta, token_bytes

    V = len(tiny_tokenizer)
    cfg = PretrainConfig(seq_len=32, batch_size=4, eval_batches=3)
    val = PackedTokens(packed, read_meta(str(packed)), "val", cfg.seq_len)
    uniform = torch.nn.Module()
    uniform.forward = lambda x: torch.zeros(*x.shape, V)
    ev = evaluate(uniform, val, token_bytes(tiny_tokenizer), cfg, 0, 1, torch.device("cpu"), contextlib.nullcontext())
    assert ev["val_loss"] == pytest.approx(math.log(V), rel=1e-6)  # cross-entropy runs in fp32
    idx = np.linspace(0, val.n - 1, min(val.n, 12)).round().astype(int)
    targets = np.concatenate([val.window(i)[1:] for i in idx])
    specials = set(tiny_tokenizer.all_special_ids)
    text = [t for t in targets.tolist() if t not in specials]
    n_bytes = sum(len(tiny_tokenizer.convert_ids_to_tokens(t)) for t in text)  # byte-level: one char per byte
    assert ev["val_bpb"] == pytest.approx(len(text) * math.log(V) / math.log(2) / n_bytes, rel=1e-6)
    # and a byte count that matches the decoded text exactly
    assert n_bytes == len(tiny_tokenizer.decode(text).encode("utf-8"))
