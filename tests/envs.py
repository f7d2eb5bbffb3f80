"""Helpers shared by the test files: small environments, the one model factory, comparisons with SB3's SAC,
archive tools, the learning settings shared with the zoo tests, and the one subprocess runner.

Test files import them with ``from envs import ...`` (``tests/`` is on ``sys.path`` through the ``pythonpath``
setting of pytest in ``pyproject.toml``). Fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cloudpickle
import gymnasium as gym
import numpy as np
import pytest
import stable_baselines3 as sb3
import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import Logger, configure
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.common.vec_env import VecEnv

import sb3_softac
from sb3_softac import SAC, compat
from sb3_softac.sb3_conversion import state_dict_from_sb3, state_dict_to_sb3

REPO_ROOT = Path(__file__).resolve().parents[1]
#: For tests of n-step returns, which stable-baselines3 added in 2.7.
needs_n_steps = pytest.mark.skipif(not compat.HAS_N_STEPS, reason="n-step returns need stable-baselines3 >= 2.7")

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
    """Random observations in [-1, 1] and actions in [-2, 2]; reward favours actions near 1 in the first dimension.

    :param episode_length: steps before the episode is truncated
    :param obs_dim: size of the observations
    :param action_dim: size of the actions
    """

    def __init__(self, episode_length: int = 25, obs_dim: int = 5, action_dim: int = 3) -> None:
        super().__init__()
        self.observation_space = spaces.Box(-1.0, 1.0, (obs_dim,), np.float32)
        self.action_space = spaces.Box(-2.0, 2.0, (action_dim,), np.float32)
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


class ImageEnv(gym.Env):
    """36x36 images (the smallest NatureCNN accepts) with a bright left or right half; the task is to name the
    bright side: reward 1 for the right action (a ``Discrete(2)`` index, or the sign of a ``Box`` action's first
    entry: negative for left), else 0.

    :param channels: image channels (1: grey, 3: RGB)
    :param action_space: ``Discrete(2)`` (the default) or a ``Box``
    :param episode_length: steps before the episode is truncated
    """

    def __init__(self, channels: int = 1, action_space: spaces.Space | None = None, episode_length: int = 8) -> None:
        super().__init__()
        self.observation_space = spaces.Box(0, 255, (36, 36, channels), np.uint8)
        self.action_space = spaces.Discrete(2) if action_space is None else action_space
        self.episode_length = episode_length
        self._side = 0
        self._t = 0

    def _image(self) -> np.ndarray:
        image = np.zeros(self.observation_space.shape, np.uint8)  # type: ignore[arg-type]
        image[:, 18 * self._side : 18 * (self._side + 1)] = 255
        return image

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        self._side = int(self.np_random.integers(2))
        return self._image(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        named = int(action) if isinstance(self.action_space, spaces.Discrete) else int(action[0] >= 0)
        reward = float(named == self._side)
        self._t += 1
        self._side = int(self.np_random.integers(2))
        return self._image(), reward, False, self._t >= self.episode_length, {}


def episode_return(env: gym.Env, act: Callable[[Any], Any], seed: int | None = None) -> float:
    """Undiscounted return of one episode.

    :param env: the environment (not vectorised)
    :param act: observation -> action
    :param seed: seed of the reset (None: the environment's own sequence)
    :return: the sum of the rewards until termination or truncation
    """
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(act(obs))
        total += float(reward)
        done = terminated or truncated
    return total


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
# Against SB3's SAC: the same weights, minibatch and noise

#: Minibatch size of the comparisons.
PAIR_BATCH = 64


def sb3_pair(env: gym.Env, **kwargs: Any) -> tuple[BaseAlgorithm, BaseAlgorithm]:
    """``stable_baselines3.SAC`` and ``sb3_softac.SAC`` built alike by :func:`make_sac`, ours with SB3's weights.

    :param env: the environment of both
    :param kwargs: further constructor arguments of both
    :return: ``(reference, ours)``
    """
    kwargs = dict(learning_starts=0, batch_size=PAIR_BATCH, **kwargs)
    reference = make_sac(env, algo=sb3.SAC, **kwargs)
    ours = make_sac(env, **kwargs)
    ours.policy.load_state_dict(state_dict_from_sb3(reference.policy.state_dict()))
    return reference, ours


def random_batch(env: gym.Env) -> ReplayBufferSamples:
    """A fixed minibatch of ``PAIR_BATCH`` random transitions in ``env``'s (flat ``Box``) spaces."""
    generator = th.Generator().manual_seed(1)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]  # type: ignore[index]
    return ReplayBufferSamples(
        observations=th.rand(PAIR_BATCH, obs_dim, generator=generator) * 2 - 1,
        actions=th.rand(PAIR_BATCH, act_dim, generator=generator) * 2 - 1,
        next_observations=th.rand(PAIR_BATCH, obs_dim, generator=generator) * 2 - 1,
        dones=(th.rand(PAIR_BATCH, 1, generator=generator) < 0.2).float(),
        rewards=th.randn(PAIR_BATCH, 1, generator=generator),
    )


def train_on(model: Any, batch: ReplayBufferSamples, n_steps: int = 1) -> dict[str, float]:
    """``n_steps`` updates of ``model``, each on ``batch``, from a fixed noise seed.

    :return: the logged training statistics
    """
    # The same minibatch at every step, however many steps' minibatches are asked for at once.
    model.replay_buffer.sample = lambda size, env=None: ReplayBufferSamples(
        *(None if x is None else x.repeat(size // PAIR_BATCH, 1) for x in batch)
    )
    model.set_logger(configure(None, []))
    th.manual_seed(1234)  # both draw their action noise from the global generator, in the same order
    model.train(gradient_steps=n_steps, batch_size=PAIR_BATCH)
    return {key: float(value) for key, value in model.logger.name_to_value.items()}


def assert_same_parameters(reference: Any, ours: Any, atol: float) -> None:
    """SB3's parameters and ours (converted to SB3's layout), and the entropy coefficients, agree within ``atol``."""
    expected = reference.policy.state_dict()
    converted = state_dict_to_sb3(ours.policy.state_dict())
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        th.testing.assert_close(converted[key], value, atol=atol, rtol=0.0, msg=lambda m, k=key: f"{k}: {m}")
    th.testing.assert_close(ours.log_ent_coef, reference.log_ent_coef, atol=atol, rtol=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Archives: tiny trained models to save, and tools that take archives apart


def tiny_model(algo: type, env_id: str = "Pendulum-v1", steps: int = 40, **kwargs: Any) -> Any:
    """A model of ``algo`` (made by :func:`make_sac`) trained for a few steps, so that optimizer states exist."""
    kwargs.setdefault("policy_kwargs", dict(net_arch=[16]))
    kwargs = dict(dict(learning_starts=20, batch_size=16, buffer_size=200), **kwargs)
    return make_sac(gym.make(env_id), algo=algo, **kwargs).learn(steps)


def observations(env_id: str = "Pendulum-v1", n: int = 16) -> np.ndarray:
    """``n`` observations drawn from the space of ``env_id`` (seeded)."""
    space = gym.make(env_id).observation_space
    space.seed(3)
    return np.stack([space.sample() for _ in range(n)])


def actions(model: Any, obs: np.ndarray) -> np.ndarray:
    """The deterministic actions of ``model`` at ``obs``."""
    return model.predict(obs, deterministic=True)[0]


def rewrite_archive(
    source: Path,
    destination: Path,
    edit_data: Callable[[dict[str, Any]], None] | None = None,
    replace: dict[str, bytes] | None = None,
    drop: Iterable[str] = (),
    raw_data: bytes | None = None,
) -> None:
    """Copy an archive member by member, editing its ``data`` JSON, replacing or dropping members."""
    replace = replace or {}
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(destination, "w") as copy:
        for name in original.namelist():
            if name in drop:
                continue
            content = replace.get(name, original.read(name))
            if name == "data" and raw_data is not None:
                content = raw_data
            elif name == "data" and edit_data is not None:
                data = json.loads(content)
                edit_data(data)
                content = json.dumps(data).encode()
            copy.writestr(name, content)


class WriteMarker:
    """Unpickling this object creates the file ``path``: a stand-in for code hidden in a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def plant_payloads(data: dict[str, Any], folder: Path, keys: Iterable[str] | None = None) -> list[Path]:
    """Replace the pickle of each pickled entry of ``data`` (or of ``keys``) by a :class:`WriteMarker`.

    The readable summary beside each pickle stays as saved: an attacker can write it too, and nothing may trust it
    to decide what to unpickle.

    :return: the marker files that unpickling the entries would create
    """
    markers = []
    for key, entry in data.items():
        if not (isinstance(entry, dict) and ":serialized:" in entry) or (keys is not None and key not in keys):
            continue
        marker = folder / f"marker_{key}"
        entry[":serialized:"] = base64.b64encode(cloudpickle.dumps(WriteMarker(marker))).decode()
        markers.append(marker)
    assert markers, "nothing to plant a payload in"
    return markers


def pickled_keys(path: Path) -> list[str]:
    """The entries of an archive's ``data`` that are stored pickled."""
    with zipfile.ZipFile(path) as archive:
        data = json.loads(archive.read("data"))
    return [key for key, entry in data.items() if isinstance(entry, dict) and ":serialized:" in entry]


# ---------------------------------------------------------------------------------------------------------------------
# Learning settings: the entries of sb3_softac/hyperparams/softac.yml that tests/test_learning_discrete.py shows to work
# (tests/test_zoo.py checks that the file holds them)

DISCRETE_MAX_STEPS = 50_000
CARTPOLE = dict(learning_starts=1_000, policy_kwargs=dict(net_arch=[64, 64]))
# Acrobot pays -1 per step until the goal: with the automatic temperature (target entropy 0.89 log 3) the behaviour
# policy stays close to uniform and seed 0 was still at -500 after 20k steps. A small fixed temperature keeps it
# near-greedy in the learned Q-values, which finds the goal and solves the task.
ACROBOT = dict(learning_starts=1_000, learning_rate=1e-3, ent_coef=0.01, policy_kwargs=dict(net_arch=[64, 64]))


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
