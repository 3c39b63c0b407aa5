"""`align memory`: hand-derived terms of the estimator, a fake-tensor trace of a tiny training step, every recipe."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alignment import memory as mem
from alignment.errors import UserError
from recipes import memory as cmd

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
GiB = mem.GiB

# a small untied Llama: V=1000, H=64, I=176, 2 layers, 4 query heads and 2 key/value heads of 16
SMALL = {
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def small():
    return mem.shape_from_config(SMALL)


def test_parameter_count_and_weights(small):
    # per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 + 3 * 64*176 = 46080; norms 2*64 per layer + 64; embed + head
    assert small.linear_params == 2 * 46080
    assert small.small_params == 2 * 128 + 64
    assert small.params() == 92160 + 320 + 64000 + 64000
    assert small.params("reward") == 92160 + 320 + 64000 + 64  # a 1-output score head instead of lm_head
    bf16 = mem.weight_terms(small, mem.precision("bfloat16", small))
    assert sum(t.bytes for t in bf16) == 2 * 220480
    assert mem.precision("auto", small).weight == "bfloat16"  # dtype auto = the checkpoint's torch_dtype


def test_quantized_weights(small):
    nf4 = mem.weight_terms(small, mem.precision("bfloat16", small, "nf4-dq"))
    # 0.5 byte/weight + an 8-bit absmax per 64 weights + an fp32 scale per 256 blocks; the rest fp32 after
    # prepare_model_for_kbit_training
    assert nf4[0].bytes == pytest.approx(92160 * (0.5 + 1 / 64 + 4 / 16384))
    assert nf4[1].bytes == (320 + 128000) * 4
    int8 = mem.weight_terms(small, mem.precision("bfloat16", small, "int8"))
    rows = 2 * (64 + 32 + 32 + 64 + 176 + 176 + 64)  # one fp32 scale per output row
    assert int8[0].bytes == 92160 + 4 * rows


def test_lora_count_and_adamw_states(small):
    lora = mem.Lora(8, mem.LORA_TARGETS, 0.0, 4)
    # r * (in + out): q 8*128, k 8*96, v 8*96, o 8*128, gate/up/down 8*240 each; two layers
    assert lora.params(small) == 2 * (1024 + 768 + 768 + 1024 + 3 * 1920) == 18688
    assert mem.optimizer_bytes(18688, 4, "adamw_torch_fused") == 2 * 18688 * 4
    assert mem.optimizer_bytes(18688, 4, "adamw_bnb_8bit") == pytest.approx(2 * 18688, rel=0.01)
    est = mem.estimate(
        "sft", {"model_name_or_path": "x", "use_peft": True, "lora_r": 8, "dtype": "bfloat16"}, {"policy": small}
    )
    opt = [t for t in est.resident if t.kind == "optimizer"]
    assert opt[0].bytes == 2 * 18688 * 4  # peft keeps adapters in fp32 on a bf16 base: fp32 moments


def test_logits_and_kv_cache(small):
    prec = mem.precision("bfloat16", small)
    # TRL's fused head: one (min(N, 4096) x 32768) tile in compute dtype, whatever the vocabulary
    tile = mem.fused_head_terms(small, prec, 4 * 128, head_trains=False)[0]
    assert tile.bytes == 512 * 32768 * 2
    # our PPO: (B, T, V) logits in bf16 + 12 bytes x B x R x V of fp32 log-softmax and its gradients
    full = mem.full_logits_terms(small, prec, 2, 100, 20, train=True)[0]
    assert full.bytes == 2 * 100 * 1000 * 2 + 12 * 2 * 20 * 1000
    # keys and values: layers x kv_dim x B x T x (2 + 2) bytes
    assert mem.kv_cache_bytes(small, prec, 3, 50) == 2 * 32 * 3 * 50 * 4
    # a quantized model's hidden states are fp32 (its embeddings were upcast): RoPE'd keys and values in fp32
    assert mem.kv_cache_bytes(small, mem.precision("bfloat16", small, "nf4-dq"), 3, 50) == 2 * 32 * 3 * 50 * 8


def test_parse_size():
    assert mem.parse_size("20GB") == 20 * GiB
    assert mem.parse_size("1.5 GiB") == int(1.5 * GiB)
    assert mem.parse_size("24000MB") == 24000 * mem.MiB
    assert mem.parse_size("16") == 16 * GiB
    for bad in ("lots", "0GB", "-3GB", "12 parsecs"):
        with pytest.raises(UserError):
            mem.parse_size(bad)


def test_sharding_divides_weights_grads_and_states(small):
    s = {"model_name_or_path": "x", "dtype": "bfloat16"}
    one = mem.estimate("sft", s, {"policy": small})
    fsdp = mem.estimate("sft", s, {"policy": small}, num_processes=4, sharding="fsdp")
    w1 = sum(t.bytes for t in one.resident if t.kind == "weights")
    w4 = sum(t.bytes for t in fsdp.resident if t.kind == "weights" and "gathered" not in t.label)
    assert w4 == pytest.approx(w1 / 4)
    ddp = mem.estimate("sft", s, {"policy": small}, num_processes=4, sharding="none")
    assert any("DDP gradient buckets" in t.label for p in ddp.phases for t in p.terms)


def test_stage_defaults_match_the_config_classes():
    """The defaults the estimator assumes for missing keys are those of the classes the stages parse."""
    import dataclasses

    from trl import GRPOConfig, RLOOConfig

    from alignment.compat import DPOConfig, ModelConfig, RewardConfig, SFTConfig
    from alignment.modeling import LORA_TARGETS
    from alignment.ppo import PPOHyper
    from evals.harness import EvalConfig
    from pretrain.train import PretrainConfig
    from recipes.pairs import PairsConfig
    from recipes.ppo import PPOStageConfig
    from recipes.chat import ChatConfig
    from recipes.distill import DistillConfig
    from recipes.generate import GenerateConfig
    from recipes.reward import RewardScriptArguments
    from recipes.serve import ServeConfig

    def defaults(*classes):
        out = {}
        for c in classes:
            for f in dataclasses.fields(c):
                out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        return out

    real = {
        "sft": defaults(SFTConfig, ModelConfig),
        "dpo": defaults(DPOConfig, ModelConfig),
        "reward": defaults(RewardConfig, ModelConfig, RewardScriptArguments),
        "rloo": defaults(RLOOConfig, ModelConfig),
        "grpo": defaults(GRPOConfig, ModelConfig),
        "ppo": defaults(PPOHyper, PPOStageConfig, ModelConfig),
        "pairs": defaults(PairsConfig),
        "eval": defaults(EvalConfig),
        "pretrain": defaults(PretrainConfig),
        "serve": defaults(ServeConfig),
        "generate": defaults(GenerateConfig),
        "chat": defaults(ChatConfig),
        "distill": defaults(DistillConfig),
    }
    online = {"reward_load_in_8bit", "reward_batch_size"}  # alignment.rewards.OnlineRLArguments
    for stage, ours in mem.STAGE_DEFAULTS.items():
        for key, value in ours.items():
            if stage in ("rloo", "grpo") and key in online:
                from alignment.rewards import OnlineRLArguments

                assert getattr(OnlineRLArguments(), key) == value, (stage, key)
                continue
            assert key in real[stage], f"{stage}: {key} is not a config key of the stage"
            assert real[stage][key] == value, (
                f"{stage}: {key} defaults to {real[stage][key]!r}, estimator assumes {value!r}"
            )
    assert tuple(LORA_TARGETS) == mem.LORA_TARGETS


# ------------------------------------------------------------------------------------------------------------------
# estimate against a fake-tensor trace


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fake_tensor_trace_within_ten_percent(lora):
    """A tiny Llama's real SFT step (TRL fused head, AdamW, peft LoRA) traced on fake tensors: estimate within 10%."""
    import torch

    from benchmarks.memory_trace import trace_trl_train

    torch.set_num_threads(1)
    shape = mem.ModelShape("llama", 512, 128, 352, 2, 4, 2, 32, tie_word_embeddings=True)
    s = {
        "model_name_or_path": "x",
        "dtype": "bfloat16",
        "use_peft": lora,
        "gradient_checkpointing": False,
        "per_device_train_batch_size": 4,
        "max_length": 64,
    }
    traced = trace_trl_train("sft", s, {"policy": shape})
    est = mem.estimate("sft", s, {"policy": shape})
    assert traced["total"] > 0
    assert 0.9 <= est.allocated / traced["total"] <= 1.1, (est.allocated, traced)
    # weights exactly, up to the rotary inv_freq buffer
    assert traced["weights"] == pytest.approx(
        sum(t.bytes for t in est.resident if t.kind in ("weights", "lora")), abs=256
    )


# ------------------------------------------------------------------------------------------------------------------
# the command on the recipes


def run(argv, capsys):
    out = cmd.cli(argv)
    return out, capsys.readouterr().out


def stage_yamls():
    return sorted(p for p in RECIPES.rglob("*.yaml") if p.parent.name != "accelerate" and cmd.stage_from_header(p))


@pytest.mark.parametrize("card,gb", [("gpu16", 16), ("gpu24", 24)])
def test_gpu_recipes_fit_their_card(card, gb, capsys):
    """Every stage of the chain fits its card by the estimate, and the YAML header states that estimate."""
    paths = sorted((RECIPES / card).rglob("*.yaml"))  # gpu16/qwen7b: the 7B class on 16 GB
    assert {cmd.stage_from_header(p) for p in paths} >= {"sft", "reward", "dpo", "ppo", "rloo", "grpo", "eval"}
    for path in paths:
        out, text = run(["--config", str(path)], capsys)
        assert out["peak"] <= gb * GiB, f"{path}: estimated {out['peak'] / GiB:.2f} GB does not fit a {gb} GB card"
        assert f"{gb} GB card: fits" in text
        header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        m = re.search(r"align memory estimate: ([0-9.]+) GB peak per GPU \(an estimate", header)
        assert m, f"{path}: the header should state the `align memory` estimate"
        assert float(m.group(1)) == pytest.approx(out["peak"] / GiB, abs=0.051), f"{path}: header estimate is stale"


def test_chain_names_the_earlier_outputs():
    """Later stages load what earlier stages write; the PPO policy and reward model are the chain's own sizes."""
    for card in ("gpu16", "gpu24"):
        read = {p.stem: cmd.read_yaml(p) for p in (RECIPES / card).glob("*.yaml")}
        sft_out = read["sft"]["output_dir"] + "/merged"
        for stage in ("reward", "dpo", "ppo", "rloo", "grpo"):
            assert read[stage]["model_name_or_path"] == sft_out, (card, stage)
        for stage in ("ppo", "rloo", "grpo"):
            assert read[stage]["reward_model"] == read["reward"]["output_dir"] + "/merged", (card, stage)
        policy = cmd.shapes_for("ppo", read["ppo"], RECIPES / card / "ppo.yaml")
        sft = cmd.shapes_for("sft", read["sft"], RECIPES / card / "sft.yaml")["policy"]
        assert policy["policy"].params() == policy["reward"].params("causal") == sft.params()


def test_over_budget_prints_verdict_and_fix(capsys):
    path = RECIPES / "gpu16" / "sft.yaml"
    _, text = run(
        [
            "--config",
            str(path),
            "--load_in_4bit",
            "false",
            "--use_peft",
            "false",
            "--per_device_train_batch_size",
            "16",
            "--gpu_memory",
            "20GB",
        ],
        capsys,
    )
    assert "16 GB card: does NOT fit" in text and "20 GB (--gpu_memory)" in text
    assert "fits with --" in text
    with pytest.raises(UserError, match="exceeds"):
        mem.preflight(
            "sft",
            {**cmd.read_yaml(path), "model_name_or_path": "Qwen/Qwen2.5-3B", "load_in_4bit": False, "use_peft": False},
            8 * GiB,
        )
    mem.preflight("sft", {**cmd.read_yaml(path), "model_name_or_path": "Qwen/Qwen2.5-3B"}, 80 * GiB)


@pytest.mark.parametrize("path", stage_yamls(), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_stage_yaml_gets_a_breakdown(path, capsys):
    # recipes/mmlu scores a model the user names (--model); here a shipped hub config stands in for it
    extra = ["--model", "Qwen/Qwen2.5-1.5B"] if path.parent.name == "mmlu" else []
    out, text = run(["--config", str(path)] + extra, capsys)
    if out["stage"] in cmd.CPU_STAGES:
        assert "runs on the CPU" in text
        return
    assert "peak per process (estimate)" in text and "an estimate from config.json" in text
    assert out["peak"] > mem.CUDA_CONTEXT


def test_recipe_chain_to_a_pretraining_preset(tmp_path, monkeypatch):
    """runs/tiny/sft/merged does not exist yet: it is followed back to the tiny preset and the tokenizer YAML."""
    monkeypatch.chdir(tmp_path)  # where no runs/ exists
    a = cmd.parse_args(["--config", str(RECIPES / "tiny" / "dpo.yaml")])
    shape = cmd.shapes_for(a.stage, a.settings, a.config)["policy"]
    assert (shape.vocab_size, shape.hidden_size, shape.num_hidden_layers) == (1024, 192, 4)


def test_accelerate_configs_set_processes_and_sharding():
    from accelerate.commands.config.config_args import load_config_from_file

    expect = {"ddp": "none", "fsdp": "fsdp", "deepspeed_zero3": "zero3"}
    for name, sharding in expect.items():
        path = RECIPES / "accelerate" / f"{name}.yaml"
        assert load_config_from_file(str(path)).num_processes == 2
        assert cmd.accelerate_setup(path) == (2, sharding)


# ------------------------------------------------------------------------------------------------------------------
# bad input: one line, exit status 2


def bad(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cmd.cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    yaml_path = tmp_path / "sft.yaml"
    yaml_path.write_text(f"# align sft --config {yaml_path}\nmodel_name_or_path: {model}\n")
    assert "not a supported architecture" in bad(["--config", str(yaml_path)], capsys)

    nomodel = tmp_path / "dpo.yaml"
    nomodel.write_text("# align dpo --config dpo.yaml\nbeta: 0.1\n")
    assert "model_name_or_path" in bad(["--config", str(nomodel)], capsys)

    good = RECIPES / "gpu16" / "sft.yaml"
    assert "is not a size" in bad(["--config", str(good), "--gpu_memory", "lots"], capsys)
    assert "config file not found" in bad(["--config", str(tmp_path / "missing.yaml")], capsys)
    assert "--sharding" in bad(["--config", str(good), "--sharding", "tensor"], capsys)
    nostage = tmp_path / "x.yaml"
    nostage.write_text("# some comment\nmodel_name_or_path: Qwen/Qwen2.5-3B\n")
    assert "--stage" in bad(["--config", str(nostage)], capsys)


def test_training_stages_check_memory_before_they_start(monkeypatch):
    """On a CUDA device (faked here: 6 GB free) the parsed config of a training stage is checked against the free
    memory: the 3B QLoRA SFT recipe (estimated ~10 GB) stops with one line; --skip_memory_check true lets it through."""
    from alignment.compat import ModelConfig, SFTConfig
    from alignment.config import parse_stage_config
    from recipes.sft import SFTScriptArguments

    monkeypatch.setattr(mem, "device_free_bytes", lambda: 6 * GiB)
    argv = ["--config", str(RECIPES / "gpu16" / "sft.yaml"), "--output_dir", "unused"]
    with pytest.raises(UserError, match=r"sft: estimated peak .* exceeds the 6.00 GB free on the device"):
        parse_stage_config(SFTScriptArguments, SFTConfig, ModelConfig, argv)
    cfg = parse_stage_config(SFTScriptArguments, SFTConfig, ModelConfig, argv + ["--skip_memory_check", "true"])
    assert cfg.model.model_name_or_path == "Qwen/Qwen2.5-3B"
    monkeypatch.setattr(mem, "device_free_bytes", lambda: 40 * GiB)
    parse_stage_config(SFTScriptArguments, SFTConfig, ModelConfig, argv)  # fits: no error
