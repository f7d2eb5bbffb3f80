"""``sb3_softac.SAC`` on vectorised environments: several envs per step and VecNormalize."""

import gymnasium as gym
import numpy as np
import pytest
from envs import Recorder, box_vec_env, make_sac
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

from sb3_softac import SAC


@pytest.mark.parametrize(
    ("vec_env_cls", "vec_env_kwargs", "n_envs"),
    [(DummyVecEnv, None, 4), (SubprocVecEnv, dict(start_method="fork"), 2)],
    ids=["dummy", "subproc"],
)
def test_multiple_envs_step_n_envs_at_a_time(vec_env_cls, vec_env_kwargs, n_envs) -> None:
    env = box_vec_env(n_envs, vec_env_cls=vec_env_cls, vec_env_kwargs=vec_env_kwargs)
    try:
        model = make_sac(env, learning_starts=40 * n_envs)  # learning_starts counts transitions of all envs
        recorder = Recorder()
        model.learn(40 * n_envs, callback=recorder)
        assert model.num_timesteps == 40 * n_envs
        assert recorder.timesteps == list(range(n_envs, 40 * n_envs + 1, n_envs))
        assert model.replay_buffer.n_envs == n_envs
        assert model.replay_buffer.pos == 40  # one buffer row per vectorised step, n_envs transitions per row
        assert model.replay_buffer.observations.shape[1:] == (n_envs, 5)
        # each env wrote its own (different) observations
        assert not np.allclose(model.replay_buffer.observations[:40, 0], model.replay_buffer.observations[:40, 1])

        model.learn(10 * n_envs, reset_num_timesteps=False)
        assert model.num_timesteps == 50 * n_envs
        assert model.replay_buffer.pos == 50
        assert model._n_updates == 10  # one gradient step per vectorised step after learning_starts
    finally:
        env.close()


class _OffsetObsEnv(gym.Env):
    """Observations far from zero mean and unit variance (around 100, scale 10), for VecNormalize."""

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = spaces.Box(-np.inf, np.inf, (3,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._t = 0

    def _obs(self) -> np.ndarray:
        return (100.0 + 10.0 * self.np_random.standard_normal(3)).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._t += 1
        return self._obs(), float(-np.sum(action**2)), False, self._t >= 20, {}


def test_vec_normalize_buffer_samples_normalised_and_stats_round_trip(tmp_path) -> None:
    env = VecNormalize(make_vec_env(_OffsetObsEnv, n_envs=1, seed=0), norm_reward=False)
    model = make_sac(env).learn(200)
    assert model._vec_normalize_env is env

    raw = model.replay_buffer.observations[: model.replay_buffer.pos]
    assert raw.mean() == pytest.approx(100.0, abs=2.0)  # the buffer keeps the original observations
    set_random_seed(0)
    samples = model.replay_buffer.sample(256, env=model._vec_normalize_env)
    observations = samples.observations.numpy()
    assert abs(observations.mean()) < 0.3
    assert observations.std() == pytest.approx(1.0, abs=0.3)

    obs = np.asarray([[100.0, 110.0, 90.0]], np.float32)
    expected_action, _ = model.predict(env.normalize_obs(obs), deterministic=True)
    env.save(str(tmp_path / "vecnormalize.pkl"))
    model.save(tmp_path / "model")

    loaded_env = VecNormalize.load(str(tmp_path / "vecnormalize.pkl"), make_vec_env(_OffsetObsEnv, n_envs=1))
    np.testing.assert_array_equal(loaded_env.obs_rms.mean, env.obs_rms.mean)
    np.testing.assert_array_equal(loaded_env.obs_rms.var, env.obs_rms.var)
    assert loaded_env.obs_rms.count == env.obs_rms.count
    loaded = SAC.load(tmp_path / "model", env=loaded_env)
    action, _ = loaded.predict(loaded_env.normalize_obs(obs), deterministic=True)
    np.testing.assert_array_equal(action, expected_action)
