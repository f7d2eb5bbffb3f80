"""Acting draws its action without a log-probability: the same action, from the same draw, as the SAC update's."""

import torch as th

from sb3_softac import SAC
from sb3_softac.distributions import SquashedDiagGaussianDistribution, sample_squashed_gaussian


def test_actor_forward_draws_the_update_sample() -> None:
    actor = SAC("MlpPolicy", "Pendulum-v1", policy_kwargs=dict(net_arch=[8]), seed=0).actor
    obs = th.randn(5, 3)
    with th.no_grad():
        th.manual_seed(1)
        acted = actor(obs)
        after_acting = th.rand(1)
        th.manual_seed(1)
        sampled, _ = actor.action_log_prob(obs)
        after_sampling = th.rand(1)
    assert th.equal(acted, sampled)
    assert th.equal(after_acting, after_sampling)  # one draw each: the random stream stays in step
    # A reference built here: mean + std * xi through tanh, with xi drawn as the actor draws it.
    mean, log_std, _ = actor.get_action_dist_params(obs)
    th.manual_seed(1)
    expected = th.tanh(mean + log_std.exp() * th.randn_like(mean))
    th.testing.assert_close(acted, expected.detach(), rtol=0, atol=0)


def test_distribution_sample_is_the_log_prob_sample() -> None:
    mean, log_std = th.randn(4, 2), th.randn(4, 2).clamp(-2, 1)
    dist = SquashedDiagGaussianDistribution(2).proba_distribution(mean, log_std)
    th.manual_seed(3)
    sample = dist.sample()
    th.manual_seed(3)
    expected, _ = sample_squashed_gaussian(mean, log_std)
    assert th.equal(sample, expected)
