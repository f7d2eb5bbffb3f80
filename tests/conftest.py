"""Shared test set-up: one torch thread (the suite runs on 2-core machines) and small environments."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces

th.set_num_threads(1)


class PointGoalEnv(gym.Env):
    """A point on a line that must reach a goal: Dict observations, Box actions in [-2, 2].

    Reward is minus the distance to the goal after the move; episodes last 20 steps.
    """

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = spaces.Dict(
            {
                "position": spaces.Box(-5.0, 5.0, (1,), np.float32),
                "goal": spaces.Box(-2.0, 2.0, (1,), np.float32),
            }
        )
        self.action_space = spaces.Box(-2.0, 2.0, (1,), np.float32)
        self._position = np.zeros(1, np.float32)
        self._goal = np.zeros(1, np.float32)
        self._t = 0

    def _obs(self) -> dict[str, np.ndarray]:
        return {"position": self._position.copy(), "goal": self._goal.copy()}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
        super().reset(seed=seed)
        self._position = self.np_random.uniform(-2.0, 2.0, 1).astype(np.float32)
        self._goal = self.np_random.uniform(-2.0, 2.0, 1).astype(np.float32)
        self._t = 0
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        move = np.clip(action, -2.0, 2.0).astype(np.float32) * 0.25
        self._position = np.clip(self._position + move, -5.0, 5.0).astype(np.float32)
        self._t += 1
        reward = -float(abs(self._position[0] - self._goal[0]))
        return self._obs(), reward, False, self._t >= 20, {}


class VectorBoxEnv(gym.Env):
    """Random 5-d observations and 3-d actions in [-2, 2]; reward favours actions near 1 in the first dimension."""

    def __init__(self, episode_length: int = 25) -> None:
        super().__init__()
        self.observation_space = spaces.Box(-1.0, 1.0, (5,), np.float32)
        self.action_space = spaces.Box(-2.0, 2.0, (3,), np.float32)
        self.episode_length = episode_length
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        return self.observation_space.sample(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._t += 1
        reward = -float((action[0] - 1.0) ** 2)
        return self.observation_space.sample(), reward, False, self._t >= self.episode_length, {}


@pytest.fixture
def box_env() -> VectorBoxEnv:
    env = VectorBoxEnv()
    env.reset(seed=0)
    env.observation_space.seed(0)
    return env
