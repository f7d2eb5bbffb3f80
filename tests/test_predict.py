"""``predict`` (single and batched, deterministic and stochastic) and SB3's ``evaluate_policy``."""

import itertools

import numpy as np
import pytest
import torch as th
from envs import VectorBoxEnv, box_observations, episode_return, make_sac
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor

from sb3_softac import SAC


@pytest.fixture(scope="module")
def trained_box_model() -> SAC:
    env = VectorBoxEnv()
    env.reset(seed=0)
    env.observation_space.seed(0)
    return make_sac(env).learn(150)


def test_predict_single_and_batched_observations(trained_box_model) -> None:
    model = trained_box_model
    obs = box_observations(16)
    single, state = model.predict(obs[0], deterministic=True)
    assert state is None
    assert single.shape == (3,)
    batched, _ = model.predict(obs, deterministic=True)
    assert batched.shape == (16, 3)
    np.testing.assert_allclose(batched[0], single, rtol=0, atol=1e-6)

    stochastic, _ = model.predict(obs[0], deterministic=False)
    assert stochastic.shape == (3,)
    assert model.predict(obs, deterministic=False)[0].shape == (16, 3)


def test_predict_deterministic_repeats_and_stochastic_varies_within_bounds(trained_box_model) -> None:
    model = trained_box_model
    obs = box_observations(64)
    th.manual_seed(0)
    first, _ = model.predict(obs, deterministic=True)
    second, _ = model.predict(obs, deterministic=True)
    np.testing.assert_array_equal(first, second)

    draws = np.stack([model.predict(obs, deterministic=False)[0] for _ in range(5)])
    for earlier, later in itertools.pairwise(draws):
        assert not np.allclose(earlier, later)
    for actions in (first, draws):
        assert actions.dtype == np.float32
        assert np.all(actions >= -2.0)
        assert np.all(actions <= 2.0)
    # stochastic actions scatter around the deterministic (mode) action
    assert np.abs(draws - first).max() > 1e-3


def test_predict_deterministic_equals_rescaled_tanh_mean(trained_box_model) -> None:
    model = trained_box_model
    obs = box_observations(32)
    actions, _ = model.predict(obs, deterministic=True)
    with th.no_grad():
        mean, _, _ = model.actor.get_action_dist_params(th.as_tensor(obs))
    low, high = model.action_space.low, model.action_space.high
    expected = low + (np.tanh(mean.numpy()) + 1.0) / 2.0 * (high - low)
    np.testing.assert_allclose(actions, expected, rtol=0, atol=1e-5)


def test_evaluate_policy_matches_a_hand_rollout(trained_box_model) -> None:
    model = trained_box_model
    env = Monitor(VectorBoxEnv())
    env.observation_space.seed(123)
    returns, lengths = evaluate_policy(model, env, n_eval_episodes=3, deterministic=True, return_episode_rewards=True)
    assert lengths == [25, 25, 25]

    # VectorBoxEnv draws its observations from its observation space: re-seeding replays them.
    env = VectorBoxEnv()
    env.observation_space.seed(123)
    expected = [episode_return(env, lambda obs: model.predict(obs, deterministic=True)[0]) for _ in range(3)]
    np.testing.assert_allclose(returns, expected, rtol=1e-5)

    mean, std = evaluate_policy(model, Monitor(VectorBoxEnv()), n_eval_episodes=4, deterministic=False)
    assert np.isfinite(mean)
    assert mean <= 0.0
    assert std > 0.0  # stochastic actions on random observations never give equal returns
