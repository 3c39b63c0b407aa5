"""The PPO loop on tiny models: learning from a programmatic reward, exact resume, the `align ppo` stage, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from alignment.ppo import PPO, PPOHyper, ValueHead, encode_prompts

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


def count_target(prompts, texts, response, mask):
    """Programmatic reward: how many response tokens fall in TARGET."""
    hit = ((response >= TARGET.start) & (response < TARGET.stop)).float()
    return (hit * mask).sum(1)


def build_ppo(model_dir, hp: PPOHyper, n_prompts: int = 32) -> PPO:
    """A LoRA policy + value head on the policy trunk, the target-token reward and a few chat prompts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(hp.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    rows = [(i, [{"role": "user", "content": f"say something {i}"}]) for i in range(n_prompts)]
    prompts = encode_prompts(tok, rows, base.config.max_position_embeddings, hp.response_length, "prompts")
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    return PPO(policy, ValueHead(base.config.hidden_size), tok, count_target, prompts, hp, stop)


HP = dict(rollout_batch_size=16, mini_batch_size=8, num_ppo_epochs=4, response_length=8, learning_rate=3e-3,
          kl_coef=0.01, missing_eos_penalty=0.0)


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
