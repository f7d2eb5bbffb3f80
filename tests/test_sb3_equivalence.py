"""One gradient step of sb3_softac.SAC against stable_baselines3.SAC from identical weights, batch and noise.

SB3 corrects the tanh squashing with ``log(1 - tanh(u)^2 + 1e-6)``; sb3_softac uses the exact value. That
epsilon is the only difference in what the two compute: with it set to 0 in SB3 the two updates agree to
float32 rounding; with it left in place every log-probability differs by about ``1e-6 / (1 - tanh(u)^2)``
per action dimension, which moves the losses by ~1e-5 (relative) and the updated parameters by ~1e-8.
"""

import numpy as np
import pytest
import torch as th
from envs import assert_same_parameters, random_batch, sb3_pair, train_on

from sb3_softac.sb3_conversion import state_dict_to_sb3


def _pair(env, **kwargs):
    reference, ours = sb3_pair(env, **kwargs)
    assert ours.update_path == "engine"  # these tests check the autograd-free update engine against SB3
    return reference, ours


@pytest.mark.parametrize("n_critics", [1, 2, 3])
def test_one_update_matches_sb3_exactly_without_its_epsilon(box_env, n_critics: int) -> None:
    reference, ours = _pair(box_env, policy_kwargs=dict(net_arch=[32, 32], n_critics=n_critics))
    reference.actor.action_dist.epsilon = 0.0
    batch = random_batch(box_env)
    expected, logged = train_on(reference, batch, n_steps=3), train_on(ours, batch, n_steps=3)
    for key in ("train/critic_loss", "train/actor_loss", "train/ent_coef_loss", "train/ent_coef"):
        assert logged[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    # Three Adam steps from the same state: equal to float32 rounding, far below one step (3e-4).
    assert_same_parameters(reference, ours, atol=1e-6)


def test_updates_match_sb3_up_to_its_epsilon(box_env) -> None:
    reference, ours = _pair(box_env)
    batch = random_batch(box_env)
    expected, logged = train_on(reference, batch, n_steps=3), train_on(ours, batch, n_steps=3)
    # Measured: the losses differ by ~1e-5 relative and the parameters by ~3e-8 after one step.
    for key in ("train/critic_loss", "train/actor_loss", "train/ent_coef_loss", "train/ent_coef"):
        assert logged[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key
    assert_same_parameters(reference, ours, atol=1e-6)


def test_fixed_ent_coef_update_matches_sb3(box_env) -> None:
    reference, ours = _pair(box_env, ent_coef=0.1)
    reference.actor.action_dist.epsilon = 0.0
    batch = random_batch(box_env)
    expected, logged = train_on(reference, batch), train_on(ours, batch)
    assert logged["train/critic_loss"] == pytest.approx(expected["train/critic_loss"], rel=1e-5)
    assert logged["train/actor_loss"] == pytest.approx(expected["train/actor_loss"], rel=1e-5)
    assert "train/ent_coef_loss" not in logged
    expected_state = reference.policy.state_dict()
    for key, value in state_dict_to_sb3(ours.policy.state_dict()).items():
        th.testing.assert_close(value, expected_state[key], atol=1e-6, rtol=0.0)


def test_deterministic_actions_match_sb3(box_env) -> None:
    reference, ours = _pair(box_env)
    observations = np.stack([box_env.observation_space.sample() for _ in range(16)])
    np.testing.assert_allclose(
        ours.predict(observations, deterministic=True)[0],
        reference.predict(observations, deterministic=True)[0],
        atol=1e-6,
    )
