"""The actor's log standard deviation is clamped to SB3's bounds, and the sampled log-probability uses the clamp.

The log-std head's bias is set to +-100 so that every state hits a bound; the mean is set to 0 so that the
pre-squash action ``u = atanh(a)`` can be recovered from the sampled action (exactly at the lower bound, where
``tanh(u) = u`` in float32; from the unsaturated samples at the upper bound). The expected log-probability is
``torch.distributions.Normal(0, exp(bound)).log_prob(u) - log(1 - a^2)``, summed over actions, in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from envs import make_sac
from stable_baselines3.sac.policies import LOG_STD_MAX, LOG_STD_MIN
from torch.distributions import Normal


@pytest.mark.parametrize(("head_bias", "bound"), [(100.0, LOG_STD_MAX), (-100.0, LOG_STD_MIN)])
def test_log_std_is_clamped_to_sb3_bounds_and_sampled_at_the_clamp(box_env, head_bias: float, bound: float) -> None:
    actor = make_sac(box_env).actor
    with th.no_grad():
        actor.log_std.weight.zero_()
        actor.log_std.bias.fill_(head_bias)
        actor.mu.weight.zero_()
        actor.mu.bias.zero_()
    observations = th.as_tensor(np.stack([box_env.observation_space.sample() for _ in range(2048)]))

    with th.no_grad():
        mean, log_std, _ = actor.get_action_dist_params(observations)
        actions, log_prob = actor.action_log_prob(observations)
    assert th.equal(mean, th.zeros_like(mean))
    assert th.equal(log_std, th.full_like(log_std, bound))

    # Away from saturation, atanh(a) recovers u to ~1e-5 (float32 rounding of a, divided by 1 - a^2 >= 2e-3).
    unsaturated = (actions.abs() < 0.999).all(dim=1)
    assert unsaturated.sum() >= 50
    squashed = actions[unsaturated].double()
    gaussian_actions = th.atanh(squashed)
    expected = Normal(0.0, np.exp(bound)).log_prob(gaussian_actions).sum(dim=1)
    expected -= th.log1p(-squashed.square()).sum(dim=1)
    th.testing.assert_close(log_prob[unsaturated].double(), expected, rtol=1e-5, atol=1e-3)
