"""recipes/sft.py in-process on the tiny test model: learning, stopping at end of turn, LoRA 8/4-bit, resume, bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from _post_utils import Interrupt, interrupt_after, lora_kwargs, one_thread, sft_rows, training_kwargs, write_jsonl  # noqa: F401
from alignment.compat import ModelConfig, SFTConfig
from alignment.errors import UserError
from recipes.sft import SFTScriptArguments, main


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_data")
    return write_jsonl(d / "train.jsonl", sft_rows(200, seed=0)), write_jsonl(d / "eval.jsonl", sft_rows(24, seed=1))


def run_sft(model, data, out, script=None, model_kw=None, **train):
    train_file, eval_file = data
    cfg = (SFTScriptArguments(train_data=[train_file], eval_data=[eval_file], **(script or {})),
           SFTConfig(**training_kwargs(out, **train)),
           ModelConfig(**(model_kw or lora_kwargs(model, use_peft=False))))
    return main(cfg)


def test_full_sft_learns_and_stops_at_end_of_turn(tiny_model_dir, sft_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.tokens import encode_chat

    out = tmp_path / "sft"
    s = run_sft(tiny_model_dir, sft_data, out, max_steps=60)
    assert s["changed_tensors"] == s["trainable_tensors"] > 0 and s["adapter"] is None
    assert s["eval_loss"] < 1.5  # from ~6.1 (= ln 447, uniform) at init
    merged = out / "merged"
    assert (out / "config.yaml").is_file() and not list(tmp_path.glob(".sft*"))  # no partial or temp left behind
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    stopped = 0
    for name in ("Alice", "Bob", "Carol"):
        ids = encode_chat(tok, [{"role": "user", "content": f"What color does {name} like?"}], add_generation_prompt=True)["input_ids"]
        gen = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        stopped += im_end in gen and "likes" in tok.decode(gen)
    assert stopped == 3  # the end-of-turn token was inside the loss mask: the model learned to stop


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_lora_quantized_sft_saves_adapter_and_exact_merge(bnb_model_dir, sft_data, tmp_path, quant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"sft-{quant}"
    s = run_sft(bnb_model_dir, sft_data, out, model_kw=lora_kwargs(bnb_model_dir, quant), max_steps=3)
    assert s["changed_tensors"] == s["trainable_tensors"] == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    assert s["trainable_params"] < s["total_params"] / 4
    x = torch.randint(4, 400, (2, 12))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # plain, unquantized weights
    base = AutoModelForCausalLM.from_pretrained(bnb_model_dir)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    torch.testing.assert_close(merged(x).logits, with_adapter(x).logits, atol=1e-4, rtol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(bnb_model_dir).eval()
    assert (merged(x).logits - plain(x).logits).abs().max() > 1e-4  # the merge is not a no-op


def test_interrupted_sft_resumes_from_last_checkpoint(tiny_model_dir, sft_data, tmp_path, monkeypatch):
    from alignment.compat import SFTTrainer

    out = tmp_path / "sft-resume"
    interrupt_after(monkeypatch, SFTTrainer, 4)
    with pytest.raises(Interrupt):
        run_sft(tiny_model_dir, sft_data, out, max_steps=6, save_steps=2, model_kw=lora_kwargs(tiny_model_dir))
    assert (tmp_path / ".sft-resume.partial" / "checkpoint-4").is_dir() and not out.exists()  # nothing in place yet
    calls = interrupt_after(monkeypatch, SFTTrainer, None)
    s = run_sft(tiny_model_dir, sft_data, out, max_steps=6, save_steps=2, model_kw=lora_kwargs(tiny_model_dir))
    assert s["resumed_from"].endswith("checkpoint-4") and s["steps"] == 6 and calls["n"] == 2
    assert not (tmp_path / ".sft-resume.partial").exists()
    with pytest.raises(UserError, match="output directory exists \\(a finished run\\); pass --overwrite true"):
        run_sft(tiny_model_dir, sft_data, out, max_steps=6)


def test_cli_bad_input_is_one_line_exit_2_without_output(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "never"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "alignment.cli", "sft", "--model_name_or_path", str(tmp_path / "missing"),
                        "--train_data", sft_data[0], "--output_dir", str(out)], capture_output=True, text=True, env=env)
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1 and "missing: model directory not found" in err[0], r.stderr[-2000:]
    assert not out.exists()


def test_unknown_role_in_data_names_the_row(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", sft_rows(3) + [{"messages": [{"role": "narrator", "content": "x"}]}])
    with pytest.raises(UserError, match=r"bad.jsonl:4: messages\[0\]: unknown role 'narrator'"):
        run_sft(tiny_model_dir, (bad, bad), tmp_path / "o")
    assert not (tmp_path / "o").exists()
