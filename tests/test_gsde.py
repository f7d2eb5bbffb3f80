"""gSDE (generalized State-Dependent Exploration, Raffin et al. 2021) against SB3's own implementation.

The actor's gSDE log-density is compared with SB3's ``StateDependentNoiseDistribution`` given the same mean,
``log_std`` parameter, latent features and exploration matrix. SB3 corrects the tanh squashing with
``log(1 - tanh(u)^2 + 1e-6)``; sb3_softac uses the exact Jacobian, so the reference here takes its Gaussian part
from SB3 and the exact correction from ``torch.distributions.TanhTransform``. The variance floor ``1e-6`` is the
same in both (SB3's ``epsilon`` under the square root).

A full update with ``use_sde=True`` is compared with ``stable_baselines3.SAC`` from the same weights, batch and
noise matrices, with SB3's tanh epsilon set to 0 as in ``test_sb3_equivalence.py``. SB3 draws a new exploration
matrix from the current ``log_std`` at every gradient step; an update that kept a stale matrix would differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from envs import SMALL_NET, assert_same_parameters, make_sac, random_batch, sb3_pair, train_on
from stable_baselines3.common.distributions import StateDependentNoiseDistribution
from torch.distributions.transforms import TanhTransform


@pytest.mark.parametrize("use_expln", [False, True])
def test_gsde_log_prob_matches_sb3_state_dependent_noise(box_env, use_expln: bool) -> None:
    actor = make_sac(box_env, use_sde=True, policy_kwargs=dict(SMALL_NET, use_expln=use_expln)).actor
    generator = th.Generator().manual_seed(0)
    with th.no_grad():
        # A different log_std per (feature, action) entry, around -1 and above 0 too (expln's two branches).
        actor.log_std.copy_(th.randn(actor.log_std.shape, generator=generator) - 1.0)
    actor.reset_noise()
    observations = th.as_tensor(np.stack([box_env.observation_space.sample() for _ in range(64)]))

    with th.no_grad():
        actions, log_prob = actor.action_log_prob(observations)
        mean, log_std, extra = actor.get_action_dist_params(observations)
    latent = extra["latent_sde"]
    # The variance is a quadratic form in the latent features: check the batch has features where x^2 != |x|.
    assert ((latent > 0.05) & (latent < 0.95)).float().mean() > 0.1

    reference = StateDependentNoiseDistribution(
        box_env.action_space.shape[0], use_expln=use_expln, squash_output=True, learn_features=True
    )
    reference.proba_distribution(mean, log_std, latent)
    gaussian_actions = mean + latent @ actor.action_dist.exploration_mat
    expected = reference.distribution.log_prob(gaussian_actions).sum(dim=-1)
    expected -= TanhTransform().log_abs_det_jacobian(gaussian_actions, th.tanh(gaussian_actions)).sum(dim=-1)

    th.testing.assert_close(actions, th.tanh(gaussian_actions), rtol=0.0, atol=1e-6)
    th.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gradient_steps", [1, 3])
def test_gsde_update_matches_sb3_exactly_without_its_epsilon(box_env, gradient_steps: int) -> None:
    reference, ours = sb3_pair(box_env, use_sde=True)
    # SB3's epsilon plays two parts with gSDE: the variance floor (sb3_softac has the same one) and the biased
    # tanh correction (sb3_softac has none); only the second is removed.
    assert reference.actor.action_dist.bijector is not None
    reference.actor.action_dist.bijector.epsilon = 0.0
    batch = random_batch(box_env)
    expected = train_on(reference, batch, n_steps=gradient_steps)
    logged = train_on(ours, batch, n_steps=gradient_steps)
    for key in ("train/critic_loss", "train/actor_loss", "train/ent_coef_loss", "train/ent_coef"):
        assert logged[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert_same_parameters(reference, ours, atol=1e-6)
