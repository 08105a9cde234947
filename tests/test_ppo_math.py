"""PPO's math, against hand computations and exact values: the per-token KL estimators and the adaptive KL
controller, and generalised advantage estimation. Fast, no model."""

import pytest
import torch

from nextbit.align.ppo import AdaptiveKLController, gae, kl_per_token


def test_kl_estimators_and_controller():
    logp = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    ref = torch.log(torch.tensor([0.4, 0.6, 0.9]))
    k3 = kl_per_token(logp, ref, "k3")
    k1 = kl_per_token(logp, ref, "k1")
    assert (k3 >= 0).all() and k3[2] == 0
    assert k1[1] < 0  # k1 can go negative per sample; k3 cannot
    # both are unbiased: the mean over samples of the policy approaches the exact KL
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    exact = float((p * (p / q).log()).sum())
    for est in ("k1", "k3"):
        assert abs(float(kl_per_token(p.log()[x], q.log()[x], est).mean()) - exact) < 0.01
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 100)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    ctl.update(3.0, 100)
    assert ctl.value < 0.1 * (1 + 0.2 * 100 / 10000)


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last column is past the end of the response
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d2 = 1.0 - 0.1
    d1 = 0.0 + 0.1 - 0.2
    d0 = 0.0 + 0.2 - 0.5
    a2, a1 = d2, d1 + 0.5 * d2
    a0 = d0 + 0.5 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert ret[0, :3].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.1])
