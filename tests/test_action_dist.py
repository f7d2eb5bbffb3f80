"""``actor.action_dist``: the squashed Gaussian with SB3's distribution interface, against ``torch.distributions``,
hand computations and SB3's SAC actor run through the same user code."""

import copy
import io

import numpy as np
import pytest
import stable_baselines3 as sb3
import torch as th
from stable_baselines3.common.distributions import StateDependentNoiseDistribution
from torch import nn
from torch.distributions import Independent, Normal, TransformedDistribution
from torch.distributions.transforms import TanhTransform

from sb3_softac import SAC
from sb3_softac.distributions import SquashedDiagGaussianDistribution
from sb3_softac.sb3_conversion import state_dict_from_sb3

ACTION_DIM = 3
SB3_EPSILON = 1e-6  # SB3's log(1 - tanh(u)^2 + 1e-6)


def _torch_reference(mean: th.Tensor, log_std: th.Tensor) -> TransformedDistribution:
    return TransformedDistribution(Independent(Normal(mean, log_std.exp()), 1), [TanhTransform()])


def _params(batch: int = 6, dtype: th.dtype = th.float64) -> tuple[th.Tensor, th.Tensor]:
    generator = th.Generator().manual_seed(0)
    mean = th.randn(batch, ACTION_DIM, generator=generator, dtype=dtype)
    log_std = th.rand(batch, ACTION_DIM, generator=generator, dtype=dtype) * 2 - 1.5
    return mean, log_std


def _actions(batch: int = 6, dtype: th.dtype = th.float64, bound: float = 0.95) -> th.Tensor:
    generator = th.Generator().manual_seed(1)
    return (th.rand(batch, ACTION_DIM, generator=generator, dtype=dtype) * 2 - 1) * bound


def test_log_prob_of_given_actions_is_torch_distributions_tanh_gaussian() -> None:
    mean, log_std = _params()
    actions = _actions()
    dist = SquashedDiagGaussianDistribution(ACTION_DIM)
    assert dist.proba_distribution(mean, log_std) is dist
    th.testing.assert_close(dist.log_prob(actions), _torch_reference(mean, log_std).log_prob(actions))


def test_log_prob_at_the_bounds_is_finite_and_clamped() -> None:
    mean, log_std = _params(batch=2)
    actions = th.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, -1.0]], dtype=th.float64)
    log_prob = SquashedDiagGaussianDistribution(ACTION_DIM).proba_distribution(mean, log_std).log_prob(actions)
    assert th.isfinite(log_prob).all()  # torch.distributions gives inf/nan here
    bound = 1.0 - th.finfo(th.float64).eps
    expected = _torch_reference(mean, log_std).log_prob(actions.clamp(-bound, bound))
    th.testing.assert_close(log_prob, expected)


def test_sample_is_reparameterised_tanh_of_the_gaussian() -> None:
    mean, log_std = _params()
    mean.requires_grad_(True)
    dist = SquashedDiagGaussianDistribution(ACTION_DIM).proba_distribution(mean, log_std)
    th.manual_seed(5)
    sample = dist.sample()
    th.manual_seed(5)
    expected = th.tanh(mean + log_std.exp() * th.randn_like(mean))
    th.testing.assert_close(sample, expected, rtol=0, atol=0)
    assert sample.grad_fn is not None  # gradients reach the mean through the sample
    th.manual_seed(5)
    th.testing.assert_close(dist.get_actions(), expected, rtol=0, atol=0)
    th.manual_seed(5)
    th.testing.assert_close(dist.actions_from_params(mean, log_std), expected, rtol=0, atol=0)


def test_mode_is_tanh_of_the_mean() -> None:
    mean, log_std = _params()
    dist = SquashedDiagGaussianDistribution(ACTION_DIM).proba_distribution(mean, log_std)
    th.testing.assert_close(dist.mode(), th.tanh(mean), rtol=0, atol=0)
    th.testing.assert_close(dist.get_actions(deterministic=True), th.tanh(mean), rtol=0, atol=0)
    other_mean = mean + 1.0
    th.testing.assert_close(
        dist.actions_from_params(other_mean, log_std, deterministic=True), th.tanh(other_mean), rtol=0, atol=0
    )


def test_log_prob_from_params_gives_actions_and_their_exact_log_prob() -> None:
    mean, log_std = _params()
    dist = SquashedDiagGaussianDistribution(ACTION_DIM)
    th.manual_seed(7)
    actions, log_prob = dist.log_prob_from_params(mean, log_std)
    th.manual_seed(7)
    th.testing.assert_close(actions, th.tanh(mean + log_std.exp() * th.randn_like(mean)), rtol=0, atol=0)
    th.testing.assert_close(log_prob, _torch_reference(mean, log_std).log_prob(actions))
    th.testing.assert_close(dist.log_prob(actions), log_prob)  # recomputed from the actions alone


def test_log_prob_keeps_no_state_from_an_earlier_sample() -> None:
    """SB3's distribution remembers the pre-squash sample; this one only its parameters."""
    mean, log_std = _params()
    dist = SquashedDiagGaussianDistribution(ACTION_DIM)
    actions, _ = dist.log_prob_from_params(mean, log_std)
    dist.proba_distribution(mean + 0.5, log_std)
    th.testing.assert_close(dist.log_prob(actions), _torch_reference(mean + 0.5, log_std).log_prob(actions))


def test_entropy_is_none_as_in_sb3() -> None:
    mean, log_std = _params()
    ours = SquashedDiagGaussianDistribution(ACTION_DIM).proba_distribution(mean, log_std)
    theirs = sb3.common.distributions.SquashedDiagGaussianDistribution(ACTION_DIM).proba_distribution(mean, log_std)
    assert ours.entropy() is None and theirs.entropy() is None


def test_misuse_is_refused() -> None:
    dist = SquashedDiagGaussianDistribution(ACTION_DIM)
    with pytest.raises(RuntimeError, match="proba_distribution"):
        dist.sample()
    with pytest.raises(RuntimeError, match="proba_distribution"):
        dist.log_prob(_actions())
    with pytest.raises(ValueError, match="action dimensions"):
        dist.proba_distribution(th.zeros(2, ACTION_DIM + 1), th.zeros(2, ACTION_DIM + 1))


# The user's recipe, run on our SAC and on SB3's SAC with the same weights.


def _log_prob_of(model, obs: th.Tensor, actions: th.Tensor) -> th.Tensor:
    mean, log_std, kwargs = model.actor.get_action_dist_params(obs)
    return model.actor.action_dist.proba_distribution(mean, log_std, **kwargs).log_prob(actions)


def _pair(**kwargs):
    kwargs = dict(seed=0, policy_kwargs=dict(net_arch=[32, 32]), **kwargs)
    reference = sb3.SAC("MlpPolicy", "Pendulum-v1", **kwargs)
    ours = SAC("MlpPolicy", "Pendulum-v1", **kwargs)
    ours.policy.load_state_dict(state_dict_from_sb3(reference.policy.state_dict()))
    generator = th.Generator().manual_seed(2)
    obs = th.rand(64, 3, generator=generator) * 2 - 1
    actions = (th.rand(64, 1, generator=generator) * 2 - 1) * 0.99
    return reference, ours, obs, actions


def test_recipe_matches_torch_distributions_and_the_update() -> None:
    _, ours, obs, actions = _pair()
    with th.no_grad():
        log_prob = _log_prob_of(ours, obs, actions)
        mean, log_std, _ = ours.actor.get_action_dist_params(obs)
        th.testing.assert_close(log_prob, _torch_reference(mean, log_std).log_prob(actions))
        # The log-probability of the actor's own sample is the one the SAC update uses.
        th.manual_seed(0)
        sampled, update_log_prob = ours.actor.action_log_prob(obs)
        th.testing.assert_close(_log_prob_of(ours, obs, sampled), update_log_prob, rtol=1e-5, atol=1e-4)


def test_recipe_matches_sb3_up_to_its_epsilon() -> None:
    reference, ours, obs, actions = _pair()
    with th.no_grad():
        ours_log_prob, theirs_log_prob = _log_prob_of(ours, obs, actions), _log_prob_of(reference, obs, actions)
        # SB3 subtracts log(1 - a^2 + eps) where the exact term is log(1 - a^2): the difference is that epsilon.
        epsilon_bias = th.log1p(SB3_EPSILON / (1.0 - actions.double().square())).sum(dim=1)
        th.testing.assert_close(ours_log_prob.double() - theirs_log_prob.double(), epsilon_bias, rtol=0, atol=1e-4)
        assert epsilon_bias.abs().max() > 1e-6  # the bias is there to be explained
        reference.actor.action_dist.epsilon = 0.0
        th.testing.assert_close(ours_log_prob, _log_prob_of(reference, obs, actions), rtol=1e-5, atol=1e-4)
        # Same deterministic actions and same samples from the same noise.
        mean, log_std, _ = ours.actor.get_action_dist_params(obs)
        for deterministic in (True, False):
            th.manual_seed(4)
            ours_actions = ours.actor.action_dist.actions_from_params(mean, log_std, deterministic=deterministic)
            th.manual_seed(4)
            theirs_actions = reference.actor.action_dist.actions_from_params(mean, log_std, deterministic)
            th.testing.assert_close(ours_actions, theirs_actions)


def test_recipe_with_gsde_uses_sb3s_distribution() -> None:
    reference, ours, obs, actions = _pair(use_sde=True)
    assert isinstance(ours.actor.action_dist, StateDependentNoiseDistribution)
    with th.no_grad():
        th.testing.assert_close(_log_prob_of(ours, obs, actions), _log_prob_of(reference, obs, actions))


def test_policy_still_copies_and_pickles_after_the_recipe() -> None:
    _, ours, obs, actions = _pair()
    log_prob = _log_prob_of(ours, obs, actions)  # parameters with a graph are now held by the distribution
    assert log_prob.grad_fn is not None
    policy = copy.deepcopy(ours.policy)
    assert policy.actor.action_dist.mean is None
    buffer = io.BytesIO()
    th.save(ours.policy, buffer)
    buffer.seek(0)
    loaded = th.load(buffer, weights_only=False)
    observations = obs.numpy()
    for copied in (policy, loaded):
        np.testing.assert_array_equal(
            copied.predict(observations, deterministic=True)[0], ours.predict(observations, deterministic=True)[0]
        )
        assert th.equal(_log_prob_of(copied, obs, actions), log_prob)


def test_actor_exports_after_the_recipe() -> None:
    """The distribution object is plain Python state: tracing the actor for export (the first step of
    ``torch.onnx.export``) still works once it holds parameters."""
    _, ours, obs, actions = _pair()
    _log_prob_of(ours, obs, actions)

    class DeterministicActor(nn.Module):
        def __init__(self, actor: nn.Module) -> None:
            super().__init__()
            self.actor = actor

        def forward(self, observations: th.Tensor) -> th.Tensor:
            return self.actor(observations, deterministic=True)

    exported = th.export.export(DeterministicActor(ours.actor), (obs[:1],))
    with th.no_grad():
        th.testing.assert_close(exported.module()(obs[5:6]), ours.actor(obs[5:6], deterministic=True))
