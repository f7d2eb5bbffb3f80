"""sb3_softac.SAC learns a Dict-observation goal task (Pendulum-v1 with the RL Zoo's settings: tests/test_zoo.py)."""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from envs import PointGoalEnv, episode_return

from sb3_softac import SAC

th.set_num_threads(1)


def _mean_return(env: PointGoalEnv, act: Callable[[Any], Any], n_episodes: int, seed: int) -> float:
    """Mean return of ``act`` on the same evaluation episodes as evaluate_policy sees."""
    return float(np.mean([episode_return(env, act, seed + episode) for episode in range(n_episodes)]))


def _random_return(n_episodes: int, seed: int) -> float:
    env = PointGoalEnv()
    env.action_space.seed(seed)
    return _mean_return(env, lambda _: env.action_space.sample(), n_episodes, seed)


def _policy_return(model: SAC, n_episodes: int, seed: int) -> float:
    return _mean_return(PointGoalEnv(), lambda obs: model.predict(obs, deterministic=True)[0], n_episodes, seed)


def test_multi_input_policy_learns_point_goal() -> None:
    """PointGoalEnv: start and goal uniform in [-2, 2], moves of at most 0.5 per step, reward -|distance| for 20
    steps. Standing still scores about -28 and random actions about -33; moving straight to the goal at full
    speed scores about -2.5 (the distance still left over the first steps). Reaching -6 means heading for the goal
    at once and staying on it in nearly every episode: a policy that wastes even 3 steps on an average episode
    (distance 1.3) loses about 4 more. After 1500 steps our SAC scores about -3.2 on seeds 0-3.
    """
    model = SAC(
        "MultiInputPolicy",
        PointGoalEnv(),
        learning_rate=1e-3,
        learning_starts=100,
        batch_size=64,
        buffer_size=10_000,
        policy_kwargs=dict(net_arch=[64, 64]),
        seed=0,
    )
    model.learn(1_500)
    n_episodes, seed = 20, 100
    learned = _policy_return(model, n_episodes, seed)
    random = _random_return(n_episodes, seed)
    assert random < -20.0  # sanity check of the baseline
    assert learned > random + 20.0
    assert learned >= -6.0
