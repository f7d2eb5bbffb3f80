"""What ``SAC.train`` passes from one piece of the update to the next, checked at the level of ``train()``.

The math of each piece is tested on its own elsewhere (``test_losses.py``, ``test_distributions.py``); these tests
check the wiring between them, whichever update path runs: the replay buffer's n-step discounts reach the critic
target, the actor step leaves the critics' weights alone, the default target entropy ``-dim(A)`` reaches the
temperature loss, and the target critics follow the critics by exactly Polyak's amount, batch-norm statistics
included. Each test fills a real replay buffer with ``learn()``, records the minibatch that ``train()`` draws, and
recomputes what the step must do by hand from a copy of the weights taken before it.

The tests run on both update paths: ``update_engine="auto"`` takes the autograd-free engine for these plain MLP
models (each test checks that it did), ``"autograd"`` the autograd update; the batch-norm model is autograd's only.

Where the critic target is computed by hand, the models use a fixed ``ent_coef=0`` and an actor whose standard
deviation sits at ``exp(LOG_STD_MIN)``, so that the sampled next action is ``tanh(mean)`` to within ~1e-9.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import gymnasium as gym
import pytest
import stable_baselines3 as sb3
import torch as th
from envs import SMALL_NET, VectorBoxEnv, filled_sac, make_sac, needs_n_steps
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from torch import nn

from sb3_softac import SAC
from sb3_softac.networks import EnsembleLinear
from sb3_softac.policies import SACPolicy

BATCH = 64

# The update path each value of ``update_engine`` must take for the plain MLP models below.
UPDATE_PATHS = {"auto": "engine", "autograd": "autograd"}
on_both_paths = pytest.mark.parametrize("update_engine", list(UPDATE_PATHS))


def _filled_model(env: gym.Env | None = None, filled: int = 120, **kwargs: Any) -> SAC:
    """A model whose replay buffer holds ``filled`` transitions and which has made no update yet."""
    env = env or VectorBoxEnv()
    env.observation_space.seed(0)  # SAC's seed does not reach the space the observations are drawn from
    return filled_sac(filled, env, learning_starts=10 * filled, batch_size=BATCH, **kwargs)


def _train_one_step(model: SAC, update_engine: str) -> None:
    model.train(gradient_steps=1, batch_size=BATCH)
    assert model.update_path == UPDATE_PATHS[update_engine]


def _near_deterministic_actor(model: SAC) -> None:
    """Drive the actor's log standard deviation to its lower bound: sampled actions are ``tanh(mean)`` +- ~1e-9."""
    with th.no_grad():
        model.actor.log_std.weight.zero_()
        model.actor.log_std.bias.fill_(-100.0)


def _shift_q_values(model: SAC, shift: float) -> None:
    """Add ``shift`` to the output of every critic and target critic (the bias of their last layer)."""
    with th.no_grad():
        for critic in (model.critic, model.critic_target):
            *_, head = (m for m in critic.modules() if isinstance(m, EnsembleLinear))
            head.bias.add_(shift)


def _record_minibatches(model: SAC) -> list[ReplayBufferSamples]:
    """Let ``model.replay_buffer.sample`` work as before, and keep what it returns."""
    drawn: list[ReplayBufferSamples] = []
    sample = model.replay_buffer.sample

    def recording_sample(*args: Any, **kwargs: Any) -> ReplayBufferSamples:
        drawn.append(sample(*args, **kwargs))
        return drawn[-1]

    model.replay_buffer.sample = recording_sample
    return drawn


def _critic_loss_by_hand(policy: SACPolicy, batch: ReplayBufferSamples, discounts: th.Tensor | float) -> th.Tensor:
    """SAC's critic loss with ``alpha = 0`` and a deterministic next action, from the public forward passes:
    ``1/2 sum_i mean((Q_i(s, a) - y)^2)`` with ``y = r + (1 - d) * discount * min_j Q'_j(s', tanh(mean(s')))``."""
    with th.no_grad():
        next_actions = policy.actor(batch.next_observations, deterministic=True)
        next_q = th.min(th.cat(policy.critic_target(batch.next_observations, next_actions), dim=1), dim=1).values
        target = batch.rewards + (1.0 - batch.dones) * discounts * next_q.reshape(-1, 1)
    return sum(0.5 * (q - target).square().mean() for q in policy.critic(batch.observations, batch.actions))


@needs_n_steps
@on_both_paths
def test_critic_target_bootstraps_with_the_replayed_n_step_discounts(update_engine: str) -> None:
    gamma, n_steps = 0.8, 3
    # Short episodes: many 3-step windows are cut by a time limit, which shortens their discount to gamma^k, k < 3.
    env = VectorBoxEnv(episode_length=4)
    model = _filled_model(env, n_steps=n_steps, gamma=gamma, ent_coef=0.0, update_engine=update_engine)
    _near_deterministic_actor(model)
    _shift_q_values(model, 10.0)  # the bootstrapped term, and so its discount, then weighs in the target
    before = copy.deepcopy(model.policy)
    drawn = _record_minibatches(model)

    _train_one_step(model, update_engine)

    (batch,) = drawn
    assert batch.discounts is not None
    powers = {round(float(d), 6) for d in batch.discounts}
    assert powers <= {round(gamma**k, 6) for k in range(1, n_steps + 1)}
    assert round(gamma**n_steps, 6) in powers and round(gamma**2, 6) in powers, "the batch must mix n-step lengths"
    expected = _critic_loss_by_hand(before, batch, batch.discounts).item()
    ignoring_discounts = _critic_loss_by_hand(before, batch, gamma).item()
    assert abs(expected - ignoring_discounts) > 0.1 * abs(expected)  # the check below can tell the two apart
    assert model.logger.name_to_value["train/critic_loss"] == pytest.approx(expected, rel=1e-5)


@on_both_paths
def test_critics_hold_only_the_critic_loss_gradient_after_train(update_engine: str) -> None:
    """The actor's gradient goes through the critics to the actions only.

    A path that also computed the critics' weight gradients in the actor step would leave the same weights (those
    gradients are never applied) but would pay a second backward pass through the critics at every step. Whatever
    gradient a critic parameter holds after ``train`` must be exactly the critic loss's (a path that keeps no
    ``.grad`` passes trivially).
    """
    model = _filled_model(ent_coef=0.0, update_engine=update_engine)
    _near_deterministic_actor(model)
    before = copy.deepcopy(model.policy)
    drawn = _record_minibatches(model)

    _train_one_step(model, update_engine)

    (batch,) = drawn
    critic_parameters = dict(model.critic.named_parameters())
    before_parameters = dict(before.critic.named_parameters())
    expected = th.autograd.grad(_critic_loss_by_hand(before, batch, model.gamma), list(before_parameters.values()))
    checked = 0
    for (name, parameter), expected_grad in zip(critic_parameters.items(), expected, strict=True):
        if parameter.grad is None:
            continue
        th.testing.assert_close(parameter.grad, expected_grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    assert checked in (0, len(critic_parameters))


def test_autograd_actor_step_runs_no_backward_pass_through_the_critic_weights() -> None:
    """Counted with gradient hooks on the critics' parameters: one backward pass per gradient step, the critic
    loss's. (Hooks are autograd's: the engine runs no autograd, and a model with hooks is left to autograd.)"""
    model = _filled_model(update_engine="autograd")
    critic_parameters = dict(model.critic.named_parameters())
    backward_passes = dict.fromkeys(critic_parameters, 0)
    for name, parameter in critic_parameters.items():

        def count(grad: th.Tensor, name: str = name) -> None:
            backward_passes[name] += 1

        parameter.register_hook(count)

    model.train(gradient_steps=3, batch_size=BATCH)

    assert backward_passes == dict.fromkeys(critic_parameters, 3)


@on_both_paths
def test_default_target_entropy_is_minus_action_dim_and_steers_the_temperature(update_engine: str) -> None:
    initial_alpha = 0.5
    model = _filled_model(ent_coef=f"auto_{initial_alpha}", update_engine=update_engine)
    action_dim = 3
    assert model.target_entropy == -action_dim
    assert model.target_entropy == make_sac(algo=sb3.SAC).target_entropy

    _train_one_step(model, update_engine)
    logged = model.logger.name_to_value
    # J(alpha) = -log(alpha) * (E[log pi] + target_entropy), taken at alpha's value before the step.
    expected = -math.log(initial_alpha) * (-logged["train/entropy"] + model.target_entropy)
    assert logged["train/ent_coef_loss"] == pytest.approx(expected, rel=1e-5)


def _parameters(module: nn.Module) -> dict[str, th.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@on_both_paths
def test_polyak_update_moves_the_targets_by_exactly_tau(update_engine: str) -> None:
    tau = 0.3
    # A large learning rate makes the critics move far enough from the targets for tau to show clearly.
    model = _filled_model(tau=tau, learning_rate=1e-2, target_update_interval=2, update_engine=update_engine)
    targets_before = _parameters(model.critic_target)

    _train_one_step(model, update_engine)  # gradient step 0: the targets are updated
    critics = _parameters(model.critic)
    targets = _parameters(model.critic_target)
    for name, target in targets.items():
        assert (critics[name] - targets_before[name]).abs().max() > 1e-3, f"{name} did not move"
        expected = (1.0 - tau) * targets_before[name] + tau * critics[name]
        th.testing.assert_close(target, expected, rtol=0.0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    _train_one_step(model, update_engine)  # gradient step 1: not a target update step
    for name, target in _parameters(model.critic_target).items():
        assert th.equal(target, targets[name]), name


class BatchNormExtractor(BaseFeaturesExtractor):
    """A linear layer followed by batch normalisation: the features carry running statistics."""

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 8) -> None:
        super().__init__(observation_space, features_dim)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(int(observation_space.shape[0]), features_dim), nn.BatchNorm1d(features_dim)
        )

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.net(observations)


def _running_statistics(module: nn.Module) -> dict[str, th.Tensor]:
    return {name: b.clone() for name, b in module.named_buffers() if name.split(".")[-1].startswith("running_")}


def test_target_critics_copy_the_batch_norm_statistics_at_each_target_update() -> None:
    policy_kwargs = dict(SMALL_NET, features_extractor_class=BatchNormExtractor)
    model = _filled_model(policy_kwargs=policy_kwargs, target_update_interval=2)
    initial = _running_statistics(model.critic_target)
    assert len(initial) == 2  # running_mean and running_var of the critic's own extractor

    model.train(gradient_steps=1, batch_size=BATCH)  # gradient step 0: the targets are updated
    critic_statistics = _running_statistics(model.critic)
    target_statistics = _running_statistics(model.critic_target)
    assert critic_statistics.keys() == target_statistics.keys() == initial.keys()
    for name, statistic in critic_statistics.items():
        assert not th.allclose(statistic, initial[name]), f"{name}: the critic's statistics did not move"
        assert th.equal(target_statistics[name], statistic), name

    model.train(gradient_steps=1, batch_size=BATCH)  # gradient step 1: the targets keep the last copy
    for name, statistic in _running_statistics(model.critic_target).items():
        assert th.equal(statistic, target_statistics[name]), name
        assert not th.equal(statistic, _running_statistics(model.critic)[name]), name
