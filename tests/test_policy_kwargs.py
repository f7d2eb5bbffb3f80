"""The ``policy_kwargs`` of SB3's SAC policies build what they name: layer sizes, activations, gSDE options,
features extractors (own or shared), optimizers and the number of critics."""

from typing import Any

import numpy as np
import pytest
import torch as th
from envs import box_observations, make_sac
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn


def _linear_sizes(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def _critic_sizes(critic: Any) -> list[tuple[int, int]]:
    return [tuple(p.shape[1:]) for name, p in critic.q_networks.named_parameters() if name.endswith("weight")]


def test_policy_net_arch_list_and_dict(box_env) -> None:
    model = make_sac(box_env, policy_kwargs=dict(net_arch=[32, 16]))
    assert _linear_sizes(model.actor.latent_pi) == [(5, 32), (32, 16)]
    assert _linear_sizes(model.actor.mu) == [(16, 3)]
    assert _critic_sizes(model.critic) == [(8, 32), (32, 16), (16, 1)]

    model = make_sac(box_env, policy_kwargs=dict(net_arch=dict(pi=[24], qf=[16, 8])))
    assert _linear_sizes(model.actor.latent_pi) == [(5, 24)]
    assert _linear_sizes(model.actor.mu) == [(24, 3)]
    assert _critic_sizes(model.critic) == [(8, 16), (16, 8), (8, 1)]
    assert _critic_sizes(model.critic_target) == [(8, 16), (16, 8), (8, 1)]


def test_policy_activation_fn(box_env) -> None:
    model = make_sac(box_env, policy_kwargs=dict(net_arch=[16, 16], activation_fn=nn.Tanh))
    for module in (model.actor, model.critic):
        kinds = {type(m) for m in module.modules()}
        assert nn.Tanh in kinds
        assert nn.ReLU not in kinds
    assert sum(isinstance(m, nn.Tanh) for m in model.critic.q_networks.layers) == 2


def test_policy_gsde_options(box_env) -> None:
    kwargs = dict(net_arch=[16, 16], log_std_init=0.5, use_expln=True, clip_mean=1.0)
    model = make_sac(box_env, use_sde=True, policy_kwargs=kwargs)
    actor = model.actor
    assert th.all(actor.log_std == 0.5)
    # expln(0.5) = log1p(0.5) + 1, where exp would give e^0.5
    th.testing.assert_close(actor.get_std(), th.full((16, 3), np.log1p(0.5) + 1.0))
    with th.no_grad():
        mean, log_std, extra = actor.get_action_dist_params(th.full((8, 5), 1000.0))
    assert log_std is actor.log_std
    assert "latent_sde" in extra
    assert mean.abs().max() <= 1.0
    assert mean.abs().max() == pytest.approx(1.0)  # huge inputs saturate the clip

    unclipped = make_sac(box_env, use_sde=True, policy_kwargs=dict(net_arch=[16, 16], clip_mean=0.0))
    assert isinstance(unclipped.actor.mu, nn.Linear)
    th.testing.assert_close(unclipped.actor.get_std(), th.full((16, 3), float(np.exp(-3.0))))


class _SmallExtractor(BaseFeaturesExtractor):
    """A learned linear features extractor with a configurable width."""

    def __init__(self, observation_space: spaces.Box, features_dim: int = 4) -> None:
        super().__init__(observation_space, features_dim)
        self.linear = nn.Linear(int(np.prod(observation_space.shape)), features_dim)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return th.relu(self.linear(observations.flatten(1)))


def test_policy_features_extractor_class_and_kwargs(box_env) -> None:
    policy_kwargs = dict(
        net_arch=[16], features_extractor_class=_SmallExtractor, features_extractor_kwargs=dict(features_dim=7)
    )
    model = make_sac(box_env, policy_kwargs=policy_kwargs)
    for module in (model.actor, model.critic, model.critic_target):
        assert isinstance(module.features_extractor, _SmallExtractor)
        assert module.features_extractor.features_dim == 7
    assert model.actor.features_extractor is not model.critic.features_extractor
    assert _linear_sizes(model.actor.latent_pi) == [(7, 16)]
    assert _critic_sizes(model.critic) == [(10, 16), (16, 1)]
    model.learn(80)  # and trains


def test_policy_share_features_extractor(box_env) -> None:
    policy_kwargs = dict(net_arch=[16], features_extractor_class=_SmallExtractor, share_features_extractor=True)
    model = make_sac(box_env, policy_kwargs=policy_kwargs)
    assert model.actor.features_extractor is model.critic.features_extractor
    assert model.critic_target.features_extractor is not model.critic.features_extractor
    extractor_ids = {id(p) for p in model.actor.features_extractor.parameters()}
    critic_ids = {id(p) for group in model.critic.optimizer.param_groups for p in group["params"]}
    actor_ids = {id(p) for group in model.actor.optimizer.param_groups for p in group["params"]}
    assert extractor_ids
    assert not extractor_ids & critic_ids
    assert extractor_ids <= actor_ids
    assert critic_ids == {id(p) for p in model.critic.q_networks.parameters()}

    not_shared = make_sac(box_env, policy_kwargs=dict(policy_kwargs, share_features_extractor=False))
    own_ids = {id(p) for p in not_shared.critic.features_extractor.parameters()}
    critic_ids = {id(p) for group in not_shared.critic.optimizer.param_groups for p in group["params"]}
    assert own_ids <= critic_ids
    model.learn(80)


def test_policy_optimizer_class_and_kwargs(box_env) -> None:
    policy_kwargs = dict(net_arch=[16], optimizer_class=th.optim.RMSprop, optimizer_kwargs=dict(alpha=0.9))
    model = make_sac(box_env, policy_kwargs=policy_kwargs, learning_rate=5e-4)
    for optimizer in (model.actor.optimizer, model.critic.optimizer):
        assert type(optimizer) is th.optim.RMSprop
        assert optimizer.param_groups[0]["alpha"] == 0.9
        assert optimizer.param_groups[0]["lr"] == 5e-4
    model.learn(80)
    assert model.actor.optimizer.state  # the RMSprop state (square averages) was filled by training


def test_policy_n_critics(box_env) -> None:
    model = make_sac(box_env, policy_kwargs=dict(net_arch=[16], n_critics=3))
    obs, actions = th.as_tensor(box_observations(4)), th.zeros(4, 3)
    for critic in (model.critic, model.critic_target):
        with th.no_grad():
            values = critic(obs, actions)
        assert len(values) == 3
        assert all(v.shape == (4, 1) for v in values)
        assert not th.allclose(values[0], values[1])
        assert not th.allclose(values[1], values[2])
    model.learn(80)
