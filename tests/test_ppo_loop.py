"""The PPO loop on tiny models: learning from a programmatic reward, exact resume, the `align ppo` stage, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from _post_utils import one_thread  # noqa: F401  (autouse: tiny models run fastest on one thread)
from alignment.data import Row, encode_prompts
from alignment.ppo import PPO, PPOHyper, ValueHead

TARGET = range(100, 164)  # token ids the programmatic reward pays for: 1/8 of the 512-token vocabulary


@pytest.fixture(scope="module")
def steerable_model_dir(tmp_path_factory, tiny_model_dir):
    """The random 'test' Llama with embeddings scaled x4.

    At the default init (std 0.02, tied head after RMSNorm) logits span ~0.2, so no hidden state can move
    probability mass and LoRA has nothing to learn; x4 gives a model whose output LoRA can steer."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("steerable") / "model"
    shutil.copytree(tiny_model_dir, out)
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(4.0)
    m.save_pretrained(out)
    return out


def count_target(rows, completions):
    """Programmatic reward: how many response tokens fall in TARGET."""
    return torch.tensor([float(sum(t in TARGET for t in c.token_ids)) for c in completions])


def build_ppo(model_dir, hp: PPOHyper, n_prompts: int = 32) -> PPO:
    """A LoRA policy + value head on the policy trunk, the target-token reward and a few chat prompts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(hp.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    rows = [Row({"prompt": [{"role": "user", "content": f"say something {i}"}]}, f"prompts:{i}") for i in range(n_prompts)]
    prompts = encode_prompts(tok, rows, base.config.max_position_embeddings, hp.response_length)
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    return PPO(policy, ValueHead(base.config.hidden_size), tok, count_target, prompts, hp, stop)


HP = dict(rollout_batch_size=16, mini_batch_size=8, num_ppo_epochs=4, response_length=8, learning_rate=3e-3, kl_coef=0.01)


def test_reward_rises_while_kl_stays_bounded(steerable_model_dir):
    """30 updates: mean target-token count rises well above its start (~1 of 8 tokens) and KL stays < 10 nats."""
    ppo = build_ppo(steerable_model_dir, PPOHyper(**HP))
    frozen = {n: p.detach().clone() for n, p in ppo.policy.named_parameters() if not p.requires_grad}
    hist = [ppo.update() for _ in range(30)]
    first = sum(h["objective/scores"] for h in hist[:5]) / 5
    last = sum(h["objective/scores"] for h in hist[-10:]) / 10
    assert last > first + 0.3, (first, last)
    assert max(h["objective/kl"] for h in hist) < 10.0
    assert all(0.0 <= h["policy/clipfrac_avg"] <= 1.0 for h in hist)
    for key in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/scores", "policy/approxkl_avg",
                "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio", "val/clipfrac_avg"):
        assert key in hist[-1]
    # the base weights (the reference) never move: only the adapter and the value head learn
    for n, p in ppo.policy.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_resume_gives_the_same_next_update(steerable_model_dir, tmp_path):
    """2 updates + checkpoint + a fresh process state restored from it = the 3rd update of an uninterrupted run."""
    hp = PPOHyper(**{**HP, "kl_controller": "adaptive", "kl_target": 0.5, "kl_horizon": 100})
    a = build_ppo(steerable_model_dir, hp)
    for _ in range(2):
        a.update()
    a.save_checkpoint(tmp_path / "ckpt")
    m3 = a.update()
    b = build_ppo(steerable_model_dir, hp)  # different RNG position and fresh weights until the checkpoint loads
    torch.manual_seed(1234)
    b.load_checkpoint(tmp_path / "ckpt")
    assert b.step == 2 and b.kl_ctl.value == a.history[2]["kl_coef"]
    n3 = b.update()
    assert a.history[2]["kl_coef"] != hp.kl_coef  # the adaptive controller moved, so restoring it mattered
    for k in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "kl_coef"):
        assert n3[k] == m3[k], k
    sa, sb = a.trainable_state(), b.trainable_state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# -- the `align ppo` stage -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_model_dir):
    """A random 1-label reward model on the same tokenizer, with reward_stats.json beside its weights."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm") / "merged"
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0, "n": 10}))
    return out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rl") / "prompts.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Where is the cat {i}?"}], "answer": "house"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stage_argv(model_dir, reward_dir, prompts, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8",
            "--reward_model", str(reward_dir), "--prompts", str(prompts), "--output_dir", str(out),
            "--rollout_batch_size", "4", "--mini_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--num_ppo_epochs", "1", "--response_length", "6", "--eval_prompts", "3", "--num_updates", "2",
            "--save_steps", "1", *extra]


def test_stage_writes_outputs_and_is_reproducible(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    """Two updates through `align ppo`: adapter + merged (loadable, differs from the SFT model), logs, curves,
    summary; the same seed gives the same metrics and weights (CPU); a finished output needs --overwrite."""
    from transformers import AutoModelForCausalLM

    from recipes.ppo import cli

    out = tmp_path / "ppo"
    s = cli(stage_argv(tiny_model_dir, reward_dir, prompts_file, out))
    for name in ("adapter/adapter_config.json", "merged/config.json", "merged/tokenizer.json", "value_head.safetensors",
                 "metrics.jsonl", "summary.json", "config.yaml", "checkpoints/step_000001/state.json", "checkpoints/step_000002/optimizer.pt"):
        assert (out / name).exists(), name
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert s["updates"] == 2 and s["eval_after"]["n"] == 3 and 0.0 <= s["eval_after"]["win_rate"] <= 1.0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    diffs = [not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values())]
    assert any(diffs)  # LoRA updates were merged in
    first = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit):  # a finished run is replaced only when asked
        cli(stage_argv(tiny_model_dir, reward_dir, prompts_file, out))
    assert (out / "metrics.jsonl").read_text() == first
    again = tmp_path / "ppo2"
    cli(stage_argv(tiny_model_dir, reward_dir, prompts_file, again))
    assert (again / "metrics.jsonl").read_text() == first  # same seed, same machine: the same run
    assert (again / "merged" / "model.safetensors").read_bytes() == (out / "merged" / "model.safetensors").read_bytes()


def _fails(argv, capsys, match: str, out):
    from recipes.ppo import cli

    with pytest.raises(SystemExit) as e:
        cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert err[-1].startswith("error: ") and match in err[-1], err[-1]
    assert not out.exists()  # nothing half-written


def test_bad_input_is_one_line_exit_2(tiny_model_dir, reward_dir, prompts_file, tmp_path, capsys):
    """Negative kl_coef; reward model without stats; reward tokenizer differing from the policy's; prompt too long."""
    from transformers import AutoTokenizer

    out = tmp_path / "ppo"
    _fails(stage_argv(tiny_model_dir, reward_dir, prompts_file, out, "--kl_coef", "-0.1"), capsys, "kl_coef", out)

    no_stats = tmp_path / "rm_nostats"
    shutil.copytree(reward_dir, no_stats)
    (no_stats / "reward_stats.json").unlink()
    _fails(stage_argv(tiny_model_dir, no_stats, prompts_file, out), capsys, "normalize_reward: false", out)

    other_tok = tmp_path / "rm_othertok"
    shutil.copytree(reward_dir, other_tok)
    tok = AutoTokenizer.from_pretrained(other_tok)
    tok.add_tokens(["zebra-crossing"])
    tok.save_pretrained(other_tok)
    _fails(stage_argv(tiny_model_dir, other_tok, prompts_file, out), capsys, "tokenizer differs", out)

    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "the cat sat " * 200}]}) + "\n")
    _fails(stage_argv(tiny_model_dir, reward_dir, long_prompts, out), capsys, "exceeds the model context", out)


@pytest.mark.parametrize("stage", ["rloo", "grpo"])
def test_trl_online_stages(stage, tiny_model_dir, reward_dir, prompts_file, tmp_path):
    """`align rloo` / `align grpo`: two TRL steps with our reward model and a user's reward function that records what
    it was given. TRL's logged mean of each reward equals the mean of the values our functions returned (names, weights
    and columns reach TRL), the row field `answer` reaches the function, and the merged weights moved."""
    import importlib

    from transformers import AutoModelForCausalLM

    (tmp_path / "mine.py").write_text(
        "import json\n"
        "def n_words(prompts, completions, answer=None, **fields):\n"
        f"    with open({str(tmp_path / 'calls.jsonl')!r}, 'a') as f:\n"
        "        f.write(json.dumps({'answer': answer, 'values': [len(c.split()) / 10 for c in completions]}) + '\\n')\n"
        "    return [len(c.split()) / 10 for c in completions]\n")
    out = tmp_path / stage
    s = importlib.import_module(f"recipes.{stage}").cli([
        "--model_name_or_path", str(tiny_model_dir), "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8",
        "--reward_model", str(reward_dir), "--prompts", str(prompts_file), "--output_dir", str(out),
        "--rewards", "model", f"python:{tmp_path / 'mine.py'}:n_words@0.5", "ends_at_end_of_turn",
        "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "6",
        "--max_steps", "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no"])
    assert s["steps"] == 2 and s["last_log"] is not None
    log = s["last_log"]
    assert {"rewards/model/mean", "rewards/n_words/mean", "rewards/ends_at_end_of_turn/mean"} <= set(log), sorted(log)
    calls = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert all(a == "house" for c in calls for a in c["answer"])  # the prompt rows' field arrived as a column
    assert float(log["rewards/n_words/mean"]) == pytest.approx(sum(calls[-1]["values"]) / len(calls[-1]["values"]), abs=1e-4)
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "summary.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values()))


def test_separate_value_model_trains_its_own_trunk(steerable_model_dir):
    """value_model = a separate trunk: one update moves the trunk and head, and the loss reaches only them via vf."""
    from transformers import AutoModel

    ppo = build_ppo(steerable_model_dir, PPOHyper(**{**HP, "num_ppo_epochs": 1}), n_prompts=16)
    trunk = AutoModel.from_pretrained(steerable_model_dir, dtype=torch.float32)
    ppo.value_head = ValueHead(trunk.config.hidden_size, trunk)
    ppo.params += [p for p in ppo.value_head.parameters()]
    ppo.optimizer = torch.optim.AdamW(ppo.params, lr=1e-3)
    before = trunk.layers[0].mlp.up_proj.weight.detach().clone()
    m = ppo.update()
    assert m["loss/value_avg"] > 0
    assert not torch.equal(before, trunk.layers[0].mlp.up_proj.weight)
