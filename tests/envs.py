"""Helpers shared by the test files: small environments, the one model factory and the one subprocess runner.

Test files import them with ``from envs import ...`` (``tests/`` is on ``sys.path`` through the ``pythonpath``
setting of pytest in ``pyproject.toml``). Fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import VecEnv

import sb3_softac
from sb3_softac import SAC

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------------
# Environments


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


def box_vec_env(n_envs: int = 1, seed: int = 0, **kwargs: Any) -> VecEnv:
    """
    :param n_envs: number of ``VectorBoxEnv`` copies
    :param seed: seed of the first copy (the others get ``seed + i``)
    :param kwargs: further arguments of SB3's ``make_vec_env`` (``vec_env_cls``, ``vec_env_kwargs``...)
    :return: the vectorised ``VectorBoxEnv``
    """
    return make_vec_env(VectorBoxEnv, n_envs=n_envs, seed=seed, **kwargs)


def box_observations(n: int = 16, seed: int = 0) -> np.ndarray:
    """
    :param n: batch size
    :param seed: seed of the numpy generator
    :return: ``n`` observations of ``VectorBoxEnv``'s space, shape ``(n, 5)``
    """
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (n, 5)).astype(np.float32)


class ActionSpaceEnv(gym.Env):
    """3-d Box observations and the given action space: every episode ends after one step with reward 0.

    For tests of what an action space makes the algorithm build or refuse.
    """

    def __init__(self, action_space: spaces.Space) -> None:
        super().__init__()
        self.observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.action_space = action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros(3, np.float32), 0.0, False, True, {}


# ---------------------------------------------------------------------------------------------------------------------
# Models


# Small enough for a few seconds per test on one core.
SMALL_NET = dict(net_arch=[32, 32])


def make_sac(
    env: gym.Env | VecEnv | str | None = None,
    policy: str = "MlpPolicy",
    algo: type[BaseAlgorithm] = SAC,
    **kwargs: Any,
) -> BaseAlgorithm:
    """A tiny seeded model; keyword arguments override the small defaults.

    :param env: environment (or Gymnasium id); a fresh ``VectorBoxEnv`` when omitted
    :param policy: policy name
    :param algo: ``sb3_softac.SAC`` or a reference such as ``stable_baselines3.SAC``, built with the same defaults
    :param kwargs: constructor arguments; unless given: ``learning_starts=50, batch_size=32, buffer_size=2_000,
        seed=0, policy_kwargs=SMALL_NET``
    :return: the model, not trained
    """
    kwargs.setdefault("learning_starts", 50)
    kwargs.setdefault("batch_size", 32)
    kwargs.setdefault("buffer_size", 2_000)
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("policy_kwargs", dict(SMALL_NET))
    return algo(policy, VectorBoxEnv() if env is None else env, **kwargs)


def filled_sac(filled: int, env: gym.Env | VecEnv | str | None = None, **kwargs: Any) -> BaseAlgorithm:
    """A tiny model (:func:`make_sac`) whose replay buffer holds ``filled`` transitions and which has made no update
    yet, with a silent logger, ready for direct ``train()`` calls.

    :param filled: transitions to collect (``learning_starts`` defaults to it, so that no update happens)
    :param env: as for :func:`make_sac`
    :param kwargs: as for :func:`make_sac`
    :return: the model
    """
    kwargs.setdefault("learning_starts", filled)
    model = make_sac(env, **kwargs)
    model.learn(filled)
    assert model._n_updates == 0 and model.replay_buffer.size() == filled
    model.set_logger(Logger(None, []))
    return model


class Recorder(BaseCallback):
    """Records ``num_timesteps`` and the learning rates of the actor's and the critics' optimizers at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.timesteps: list[int] = []
        self.learning_rates: list[float] = []
        self.critic_learning_rates: list[float] = []

    def _on_step(self) -> bool:
        self.timesteps.append(self.model.num_timesteps)
        self.learning_rates.append(self.model.actor.optimizer.param_groups[0]["lr"])
        self.critic_learning_rates.append(self.model.critic.optimizer.param_groups[0]["lr"])
        return True


# ---------------------------------------------------------------------------------------------------------------------
# Subprocesses


def run_python(
    *args: str, cwd: Path, timeout: float = 300, expected_returncode: int = 0
) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` with this interpreter as a user would, and check its exit status.

    The child runs single-threaded and headless, and imports the same ``sb3_softac`` as the tests.

    :param args: arguments of the interpreter (a script path, or ``-m module``, and its arguments)
    :param cwd: working directory (relative output folders end up there)
    :param timeout: seconds before the child is killed and the test fails
    :param expected_returncode: the exit status the test expects
    :return: the finished process, with its output as text
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    package_parent = str(Path(sb3_softac.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == expected_returncode, (
        f"{' '.join(args)} exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result
