"""PPO math against values derived by hand (each docstring shows the derivation)."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.errors import UserError
from alignment.ppo import AdaptiveKLController, FixedKLController, gae, kl_controller, kl_estimate, policy_loss, value_loss, whiten
from alignment.rewards import reward_stats
from alignment.sampling import truncate_at_stop


def test_gae_hand_derived():
    """gamma=1, lam=0.5.
    Row 0: r=[0,0,1], V=[0.5,0.2,0.4]
      t=2: delta = 1 + 0 - 0.4 = 0.6              A2 = 0.6
      t=1: delta = 0 + 0.4 - 0.2 = 0.2            A1 = 0.2 + 0.5*0.6 = 0.5
      t=0: delta = 0 + 0.2 - 0.5 = -0.3           A0 = -0.3 + 0.5*0.5 = -0.05
      returns = A + V = [0.45, 0.7, 1.0]
    Row 1 (last position is padding, its 99s must not leak): r=[0,2,99], V=[1,1,99], mask=[1,1,0]
      t=1: delta = 2 + 0 - 1 = 1                  A1 = 1
      t=0: delta = 0 + 1 - 1 = 0                  A0 = 0 + 0.5*1 = 0.5
      returns = [1.5, 2, 0]"""
    r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    v = torch.tensor([[0.5, 0.2, 0.4], [1.0, 1.0, 99.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.05, 0.5, 0.6], [0.5, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.45, 0.7, 1.0], [1.5, 2.0, 0.0]]))


def test_gae_discount():
    """gamma=0.5, lam=1 (Monte Carlo minus baseline): r=[1,0,4], V=0 -> returns are discounted sums:
    G2 = 4, G1 = 0 + 0.5*4 = 2, G0 = 1 + 0.5*2 = 2."""
    adv, ret = gae(torch.tensor([[1.0, 0.0, 4.0]]), torch.zeros(1, 3), torch.ones(1, 3), gamma=0.5, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[2.0, 2.0, 4.0]]))
    torch.testing.assert_close(adv, ret)


def test_whiten_hand_derived():
    """x = [1, 2, 3, (100 masked)]: mean 2, unbiased var ((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1, 0].
    shift_mean=False adds the mean back: [1, 2, 3, 0]."""
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(whiten(x, m), torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(whiten(x, m, shift_mean=False), torch.tensor([1.0, 2.0, 3.0, 0.0]), atol=1e-6, rtol=0)


def test_policy_loss_hand_derived():
    """cliprange 0.2; log ratios [0.5, 0, -0.5, -0.5] (ratios e^.5=1.6487, 1, e^-.5=0.6065, 0.6065), A = [1, -2, -1, 1]:
      tok0: max(-1.6487, -1*1.2) = -1.2     clipped term wins
      tok1: max(2, 2) = 2                    not clipped
      tok2: max(0.6065, 0.8) = 0.8           clipped term wins
      tok3: max(-0.6065, -0.8) = -0.6065     not clipped (pessimistic bound keeps the unclipped term)
    loss = (-1.2 + 2 + 0.8 - 0.60653) / 4 = 0.248367; clipfrac = 2/4; approxkl = 0.5 * mean(.25, 0, .25, .25) = 0.09375.
    A fifth, masked token with a huge ratio must not count."""
    old = torch.zeros(1, 5)
    new = torch.tensor([[0.5, 0.0, -0.5, -0.5, 9.0]])
    adv = torch.tensor([[1.0, -2.0, -1.0, 1.0, 50.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    out = policy_loss(new, old, adv, m, cliprange=0.2)
    assert out["loss"].item() == pytest.approx((-1.2 + 2 + 0.8 - math.exp(-0.5)) / 4, abs=1e-6)
    assert out["clipfrac"].item() == pytest.approx(0.5)
    assert out["approxkl"].item() == pytest.approx(0.09375)
    assert out["ratio"].item() == pytest.approx((math.exp(0.5) + 1 + 2 * math.exp(-0.5)) / 4, abs=1e-6)


def test_policy_loss_gradient_is_zero_when_clipped():
    """Past the clip range (ratio 1.6487 > 1.2 with A > 0) the objective is flat: no gradient pushes further."""
    new = torch.tensor([[0.5]], requires_grad=True)
    policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)["loss"].backward()
    assert new.grad.item() == 0.0


def test_value_loss_hand_derived():
    """c = 0.2; V_old = [0, 0, 1], V = [0.5, 0.1, 1.0], R = [1, -1, 2]:
      tok0: V_clip = 0 + clip(0.5) = 0.2; (0.5-1)^2 = 0.25 vs (0.2-1)^2 = 0.64 -> 0.64 (clipped wins)
      tok1: V_clip = 0.1;                  (1.1)^2 = 1.21 both                -> 1.21
      tok2: V_clip = 1.0;                  1 both                             -> 1
    loss = 0.5 * (0.64 + 1.21 + 1) / 3 = 0.475; clipfrac = 1/3."""
    out = value_loss(torch.tensor([[0.5, 0.1, 1.0]]), torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[1.0, -1.0, 2.0]]),
                     torch.ones(1, 3), cliprange_value=0.2)
    assert out["loss"].item() == pytest.approx(0.475)
    assert out["clipfrac"].item() == pytest.approx(1 / 3)


def test_kl_estimate_hand_derived_and_unbiased():
    """p = 0.5, q = 0.25 for the sampled token: k1 = log(p/q) = log 2 = 0.693147;
    k3 = (q/p - 1) - log(q/p) = -0.5 + log 2 = 0.193147.
    Over samples from p both estimators average to the true KL(p || q)."""
    lp, lq = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(lp, lq, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(lp, lq, "k3").item() == pytest.approx(math.log(2) - 0.5)
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    true_kl = float((p * (p / q).log()).sum())  # 0.5 ln 2.5 + 0.2 ln 0.4 = 0.274887
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        est = kl_estimate(p.log()[x], q.log()[x], kind).mean().item()
        assert est == pytest.approx(true_kl, abs=0.01), kind
    assert kl_estimate(p.log()[x], q.log()[x], "k3").min() >= 0


def test_kl_controllers_hand_derived():
    """Adaptive (target 6, horizon 10000, coef 0.1), after 1000 episodes:
      KL 9   -> e = clip(9/6 - 1 = 0.5) = 0.2   -> 0.1 * (1 + 0.2 * 0.1) = 0.102
      KL 5.4 -> e = 5.4/6 - 1 = -0.1             -> 0.102 * (1 - 0.01) = 0.10098
    Fixed never moves."""
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, 1000)
    assert c.value == pytest.approx(0.102)
    c.update(5.4, 1000)
    assert c.value == pytest.approx(0.10098)
    f = FixedKLController(0.3)
    f.update(100.0, 1000)
    assert f.value == 0.3
    with pytest.raises(UserError, match="kl_coef"):
        kl_controller("fixed", -0.1, 6.0, 10000)


def test_truncate_at_stop():
    """Tokens after the first stop id become padding; the stop token stays in the response mask."""
    resp, mask, ended = truncate_at_stop(torch.tensor([[5, 3, 7, 3], [5, 6, 7, 8]]), stop_ids=[3, 4], pad=1)
    assert resp.tolist() == [[5, 3, 1, 1], [5, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, False]


def test_reward_stats(tmp_path):
    """Missing stats: an error naming the opt-out key; bad std: an error; opt-out: identity normalisation."""
    with pytest.raises(UserError, match="normalize_reward: false"):
        reward_stats(tmp_path, normalize=True)
    assert reward_stats(tmp_path, normalize=False) == (0.0, 1.0)
    (tmp_path / "reward_stats.json").write_text('{"mean": 1.5, "std": 0}')
    with pytest.raises(UserError, match="std > 0"):
        reward_stats(tmp_path, normalize=True)
    (tmp_path / "reward_stats.json").write_text('{"mean": 1.5, "std": 2.0, "n": 10}')
    assert reward_stats(tmp_path, normalize=True) == (1.5, 2.0)
