"""Discrete SAC learns the classic-control tasks (slow: run with ``pytest -m slow tests/test_learning_discrete.py``).

Each test trains on one fixed seed with the settings of ``sb3_softac/hyperparams/softac.yml`` (restated in
``tests/envs.py``; ``tests/test_zoo.py`` checks that the two agree), evaluates the
deterministic policy on 10 episodes every 5k steps and stops as soon as the mean return reaches the threshold; it fails
if that never happens within 50k environment steps.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gymnasium as gym
import pytest
import torch as th
from envs import ACROBOT, CARTPOLE, DISCRETE_MAX_STEPS
from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.monitor import Monitor

from sb3_softac import SAC

th.set_num_threads(1)

EVAL_EVERY = 5_000


def train_until(env_id: str, threshold: float, seed: int, **kwargs: Any) -> tuple[float, int, float]:
    """Train until the mean deterministic return over 10 evaluation episodes reaches ``threshold``.

    :return: best mean evaluation return, environment steps done, wall time in seconds
    """
    start = time.perf_counter()
    # SB3 writes into the policy_kwargs it is given: keep the module constants intact.
    model = SAC("MlpPolicy", env_id, seed=seed, **copy.deepcopy(kwargs))
    eval_env = Monitor(gym.make(env_id))
    eval_env.reset(seed=10_000 + seed)
    evaluation = EvalCallback(
        eval_env,
        callback_on_new_best=StopTrainingOnRewardThreshold(reward_threshold=threshold),
        eval_freq=EVAL_EVERY,
        n_eval_episodes=10,
        deterministic=True,
        verbose=0,
    )
    model.learn(DISCRETE_MAX_STEPS, callback=evaluation)
    return float(evaluation.best_mean_reward), int(model.num_timesteps), time.perf_counter() - start


@pytest.mark.slow
def test_cartpole_reaches_450() -> None:
    """CartPole-v1 (max return 500). Seed 0 reaches 459.6 at 30k steps (375.7 at 5k); the learned temperature grows
    to several hundred, a known effect of discrete SAC with a target entropy close to log|A|."""
    best, steps, _ = train_until("CartPole-v1", 450.0, seed=0, **CARTPOLE)
    assert best >= 450.0, f"best mean return {best} after {steps} steps"


@pytest.mark.slow
def test_acrobot_reaches_minus_100() -> None:
    """Acrobot-v1 (random policy: about -490; solved around -80). Seed 0 reaches -85.6 at 30k steps (-134.2 at 25k,
    -500 before)."""
    best, steps, _ = train_until("Acrobot-v1", -100.0, seed=0, **ACROBOT)
    assert best >= -100.0, f"best mean return {best} after {steps} steps"
