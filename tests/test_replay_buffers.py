"""SB3's replay-buffer options with ``sb3_softac.SAC``: HER, ``optimize_memory_usage`` and n-step returns."""

from typing import Any

import gymnasium as gym
import numpy as np
from envs import make_sac, needs_n_steps
from gymnasium import spaces
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.her import HerReplayBuffer


class _ReachGoalEnv(gym.Env):
    """GoalEnv-style task: move a 2-d point to a goal; reward 0 within 0.1 of it, else -1; 10-step episodes."""

    def __init__(self) -> None:
        super().__init__()
        box = spaces.Box(-3.0, 3.0, (2,), np.float32)
        self.observation_space = spaces.Dict(dict(observation=box, achieved_goal=box, desired_goal=box))
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._position = np.zeros(2, np.float32)
        self._goal = np.zeros(2, np.float32)
        self._t = 0

    def _obs(self) -> dict[str, np.ndarray]:
        return dict(observation=self._position.copy(), achieved_goal=self._position.copy(), desired_goal=self._goal)

    def compute_reward(self, achieved_goal: np.ndarray, desired_goal: np.ndarray, _info: Any) -> np.ndarray:
        distance = np.linalg.norm(achieved_goal - desired_goal, axis=-1)
        return -(distance > 0.1).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self._position = np.zeros(2, np.float32)
        self._goal = self.np_random.uniform(-2.0, 2.0, 2).astype(np.float32)
        self._t = 0
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        self._position = np.clip(self._position + 0.3 * action, -3.0, 3.0).astype(np.float32)
        self._t += 1
        reward = float(self.compute_reward(self._position, self._goal, None))
        return self._obs(), reward, reward == 0.0, self._t >= 10, {}


def test_her_replay_buffer_with_multi_input_policy() -> None:
    env = _ReachGoalEnv()
    model = make_sac(
        env,
        "MultiInputPolicy",
        replay_buffer_class=HerReplayBuffer,
        replay_buffer_kwargs=dict(n_sampled_goal=4, goal_selection_strategy="future"),
        learning_starts=60,
    )
    assert isinstance(model.replay_buffer, HerReplayBuffer)
    model.learn(200)
    assert model._n_updates == 140

    set_random_seed(0)
    samples = model.replay_buffer.sample(256)
    achieved = samples.next_observations["achieved_goal"].numpy()
    desired = samples.observations["desired_goal"].numpy()
    np.testing.assert_array_equal(samples.rewards.numpy().ravel(), env.compute_reward(achieved, desired, None))
    # 4 of 5 samples get a goal achieved later in their episode, so many more rewards of 0 than in the stored data
    stored = model.replay_buffer.rewards[: model.replay_buffer.pos]
    assert (samples.rewards == 0).float().mean().item() > 0.1 + np.mean(stored == 0)


def test_optimize_memory_usage(box_env) -> None:
    model = make_sac(
        box_env, optimize_memory_usage=True, replay_buffer_kwargs=dict(handle_timeout_termination=False), seed=0
    )
    buffer = model.replay_buffer
    assert buffer.optimize_memory_usage
    assert getattr(buffer, "next_observations", None) is None
    model.learn(150)
    assert model._n_updates == 100
    samples = buffer.sample(32)
    observations = buffer.observations[:, 0]
    for obs, next_obs in zip(samples.observations.numpy(), samples.next_observations.numpy(), strict=True):
        (index,) = np.flatnonzero((observations == obs).all(axis=1))
        np.testing.assert_array_equal(next_obs, observations[(index + 1) % buffer.buffer_size])


@needs_n_steps
def test_n_step_returns_buffer(box_env) -> None:
    from stable_baselines3.common.buffers import NStepReplayBuffer

    model = make_sac(box_env, n_steps=3, gamma=0.9)
    assert isinstance(model.replay_buffer, NStepReplayBuffer)
    assert model.replay_buffer.n_steps == 3
    model.learn(150)
    assert model._n_updates == 100
    set_random_seed(0)
    samples = model.replay_buffer.sample(256)
    assert samples.discounts is not None
    discounts = samples.discounts.numpy().ravel()
    assert np.all(np.isclose(discounts[:, None], [0.9, 0.81, 0.729]).any(axis=1))
    assert np.mean(np.isclose(discounts, 0.729)) > 0.8  # most samples are 3 steps away from an episode end
