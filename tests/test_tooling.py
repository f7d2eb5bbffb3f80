"""sb3_softac.SAC inside the Stable-Baselines3 tool chain: callbacks, vectorised envs, evaluation, persistence,
the logger, the constructor and policy arguments of SB3's SAC, and the training plumbing of OffPolicyAlgorithm.

Every model here is tiny (32x32 networks, a few hundred steps) so that each test takes a few seconds on one core.
"""

import importlib.util
import inspect
import io
import itertools
import zipfile
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import stable_baselines3 as sb3
import torch as th
from conftest import PointGoalEnv, VectorBoxEnv
from gymnasium import spaces
from stable_baselines3.common.buffers import NStepReplayBuffer
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    StopTrainingOnRewardThreshold,
)
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, CombinedExtractor, NatureCNN
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize, VecTransposeImage
from stable_baselines3.her import HerReplayBuffer
from torch import nn

import sb3_softac
from sb3_softac import SAC

NET = dict(net_arch=[32, 32])


def _sac(env: Any, policy: str = "MlpPolicy", **kwargs: Any) -> SAC:
    """A tiny seeded SAC; keyword arguments override the small defaults."""
    kwargs.setdefault("learning_starts", 50)
    kwargs.setdefault("batch_size", 32)
    kwargs.setdefault("buffer_size", 2_000)
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("policy_kwargs", dict(NET))
    return SAC(policy, env, **kwargs)


def _box_vec_env(n_envs: int = 1, seed: int = 0, **kwargs: Any) -> Any:
    return make_vec_env(VectorBoxEnv, n_envs=n_envs, seed=seed, **kwargs)


def _obs_batch(n: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (n, 5)).astype(np.float32)


class _Recorder(BaseCallback):
    """Records ``num_timesteps`` at every step (and, optionally, the actor's learning rate)."""

    def __init__(self) -> None:
        super().__init__()
        self.timesteps: list[int] = []
        self.learning_rates: list[float] = []

    def _on_step(self) -> bool:
        self.timesteps.append(self.model.num_timesteps)
        self.learning_rates.append(self.model.actor.optimizer.param_groups[0]["lr"])
        return True


# ----------------------------------------------------------------------------------------------------------------
# Callbacks and the progress bar
# ----------------------------------------------------------------------------------------------------------------


def test_eval_callback_writes_evaluations_and_best_model(tmp_path, box_env) -> None:
    eval_env = Monitor(VectorBoxEnv())
    eval_env.reset(seed=1)
    callback = EvalCallback(
        eval_env, eval_freq=50, n_eval_episodes=2, log_path=str(tmp_path), best_model_save_path=str(tmp_path)
    )
    model = _sac(box_env).learn(150, callback=callback)

    evaluations = np.load(tmp_path / "evaluations.npz")
    np.testing.assert_array_equal(evaluations["timesteps"], [50, 100, 150])
    assert evaluations["results"].shape == (3, 2)
    np.testing.assert_array_equal(evaluations["ep_lengths"], np.full((3, 2), 25))
    assert np.all(evaluations["results"] <= 0.0)  # rewards are -(a0 - 1)^2
    assert callback.best_mean_reward == pytest.approx(evaluations["results"].mean(axis=1).max())

    best = SAC.load(tmp_path / "best_model.zip")
    assert isinstance(best.policy, sb3_softac.MlpPolicy)
    assert best.num_timesteps in (50, 100, 150)
    assert model.num_timesteps == 150


def test_checkpoint_callback_saves_model_buffer_and_vecnormalize(tmp_path) -> None:
    env = VecNormalize(_box_vec_env())
    callback = CheckpointCallback(
        save_freq=50, save_path=str(tmp_path), name_prefix="sac", save_replay_buffer=True, save_vecnormalize=True
    )
    _sac(env).learn(150, callback=callback)

    expected = {
        f"sac_{kind}{steps}_steps.{ext}"
        for steps in (50, 100, 150)
        for kind, ext in (("", "zip"), ("replay_buffer_", "pkl"), ("vecnormalize_", "pkl"))
    }
    assert {p.name for p in tmp_path.iterdir()} == expected

    checkpoint = SAC.load(tmp_path / "sac_100_steps.zip")
    assert checkpoint.num_timesteps == 100
    checkpoint.load_replay_buffer(tmp_path / "sac_replay_buffer_100_steps.pkl")
    # The checkpoint is taken in on_step, before the 100th transition is stored.
    assert checkpoint.replay_buffer.size() in (99, 100)
    stats = VecNormalize.load(str(tmp_path / "sac_vecnormalize_100_steps.pkl"), _box_vec_env())
    assert stats.obs_rms.count == pytest.approx(100, abs=2)


def test_stop_training_on_reward_threshold_stops_early(box_env) -> None:
    # Every return of VectorBoxEnv is > -1e6, so the first evaluation stops training.
    stop = StopTrainingOnRewardThreshold(reward_threshold=-1e6)
    eval_env = Monitor(VectorBoxEnv())
    callback = EvalCallback(eval_env, callback_on_new_best=stop, eval_freq=60, n_eval_episodes=1)
    model = _sac(box_env).learn(1_000, callback=callback)
    assert model.num_timesteps == 60
    assert model.num_timesteps < 1_000


def test_callback_list_runs_every_callback(tmp_path, box_env) -> None:
    recorder = _Recorder()
    checkpoint = CheckpointCallback(save_freq=80, save_path=str(tmp_path), name_prefix="m")
    _sac(box_env).learn(200, callback=CallbackList([recorder, checkpoint]))
    assert recorder.timesteps == list(range(1, 201))
    assert checkpoint.n_calls == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_160_steps.zip", "m_80_steps.zip"]


def test_progress_bar(box_env, capsys) -> None:
    pytest.importorskip("tqdm")
    pytest.importorskip("rich")
    model = _sac(box_env).learn(120, progress_bar=True)
    assert model.num_timesteps == 120
    captured = capsys.readouterr()
    assert "120/120" in captured.out + captured.err


# ----------------------------------------------------------------------------------------------------------------
# Vectorised environments
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vec_env_cls", "vec_env_kwargs", "n_envs"),
    [(DummyVecEnv, None, 4), (SubprocVecEnv, dict(start_method="fork"), 2)],
    ids=["dummy", "subproc"],
)
def test_multiple_envs_step_n_envs_at_a_time(vec_env_cls, vec_env_kwargs, n_envs) -> None:
    env = _box_vec_env(n_envs, vec_env_cls=vec_env_cls, vec_env_kwargs=vec_env_kwargs)
    try:
        model = _sac(env, learning_starts=40 * n_envs)  # learning_starts counts transitions of all envs
        recorder = _Recorder()
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
    model = _sac(env).learn(200)
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


# ----------------------------------------------------------------------------------------------------------------
# predict and evaluate_policy
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_box_model() -> SAC:
    env = VectorBoxEnv()
    env.reset(seed=0)
    env.observation_space.seed(0)
    return _sac(env).learn(150)


def test_predict_single_and_batched_observations(trained_box_model) -> None:
    model = trained_box_model
    obs = _obs_batch(16)
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
    obs = _obs_batch(64)
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
    obs = _obs_batch(32)
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
    expected = []
    for _ in range(3):
        obs, _ = env.reset()
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
        expected.append(total)
    np.testing.assert_allclose(returns, expected, rtol=1e-5)

    mean, std = evaluate_policy(model, Monitor(VectorBoxEnv()), n_eval_episodes=4, deterministic=False)
    assert np.isfinite(mean)
    assert mean <= 0.0
    assert std > 0.0  # stochastic actions on random observations never give equal returns


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_continue_training(tmp_path, box_env) -> None:
    model = _sac(box_env).learn(150)
    obs = _obs_batch(32)
    expected, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model.zip")

    loaded = SAC.load(tmp_path / "model.zip")
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], expected)
    for key, value in model.policy.state_dict().items():
        assert th.equal(loaded.policy.state_dict()[key], value), key
    assert loaded.num_timesteps == 150
    assert loaded._n_updates == model._n_updates

    env = VectorBoxEnv()
    loaded = SAC.load(tmp_path / "model.zip", env=env)
    assert loaded.get_env() is not None
    loaded.learn(60, reset_num_timesteps=False)
    assert loaded.num_timesteps == 210
    assert loaded._n_updates == model._n_updates + 60
    assert not np.array_equal(loaded.predict(obs, deterministic=True)[0], expected)


def test_load_from_a_byte_stream(box_env) -> None:
    """BaseAlgorithm.load accepts an open binary stream (e.g. io.BytesIO), and so must SAC.load."""
    model = _sac(box_env)
    stream = io.BytesIO()
    model.save(stream)
    stream.seek(0)
    loaded = SAC.load(stream)
    obs = _obs_batch(8)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


def test_replay_buffer_save_load_same_contents(tmp_path, box_env) -> None:
    model = _sac(box_env, buffer_size=120).learn(150)
    buffer = model.replay_buffer
    assert buffer.full
    assert buffer.pos == 30
    model.save_replay_buffer(tmp_path / "buffer")

    other = _sac(VectorBoxEnv(), buffer_size=120, seed=1)
    other.load_replay_buffer(tmp_path / "buffer")
    loaded = other.replay_buffer
    assert (loaded.pos, loaded.full, loaded.buffer_size) == (30, True, 120)
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(buffer, name), err_msg=name)


def test_get_set_parameters_round_trip(box_env) -> None:
    source = _sac(box_env, seed=0).learn(100)
    target = _sac(VectorBoxEnv(), seed=1)
    obs = _obs_batch(16)
    assert not np.allclose(source.predict(obs, deterministic=True)[0], target.predict(obs, deterministic=True)[0])

    parameters = source.get_parameters()
    assert {"policy", "actor.optimizer", "critic.optimizer"} <= parameters.keys()
    target.set_parameters(parameters, exact_match=True)
    np.testing.assert_array_equal(
        source.predict(obs, deterministic=True)[0], target.predict(obs, deterministic=True)[0]
    )
    for key, value in source.policy.state_dict().items():
        assert th.equal(target.policy.state_dict()[key], value), key


@pytest.mark.parametrize("ent_coef", ["auto", 0.05])
def test_saved_entropy_coefficient_restored_exactly(tmp_path, box_env, ent_coef) -> None:
    model = _sac(box_env, ent_coef=ent_coef).learn(120)
    model.save(tmp_path / "model")
    loaded = SAC.load(tmp_path / "model", env=VectorBoxEnv())
    if ent_coef == "auto":
        assert model.log_ent_coef.item() != 0.0  # alpha moved away from its initial value 1
        assert th.equal(loaded.log_ent_coef.detach(), model.log_ent_coef.detach())
        assert loaded.log_ent_coef.requires_grad
        # the optimizer of the loaded model optimises the loaded tensor
        assert loaded.ent_coef_optimizer.param_groups[0]["params"][0] is loaded.log_ent_coef
        saved_state = model.ent_coef_optimizer.state_dict()["state"][0]
        loaded_state = loaded.ent_coef_optimizer.state_dict()["state"][0]
        assert th.equal(loaded_state["exp_avg"], saved_state["exp_avg"])
        before = loaded.log_ent_coef.detach().clone()
        loaded.learn(60, reset_num_timesteps=False)
        assert not th.equal(loaded.log_ent_coef.detach(), before)
    else:
        assert loaded.ent_coef_optimizer is None
        assert loaded.ent_coef_tensor.item() == pytest.approx(0.05)
        assert th.equal(loaded.ent_coef_tensor, model.ent_coef_tensor)


# ----------------------------------------------------------------------------------------------------------------
# check_env and the logger
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_cls", [VectorBoxEnv, PointGoalEnv])
def test_check_env_passes_and_model_trains(env_cls) -> None:
    check_env(env_cls(), warn=False)
    env = env_cls()
    policy = "MultiInputPolicy" if isinstance(env.observation_space, spaces.Dict) else "MlpPolicy"
    model = _sac(env, policy).learn(120)
    assert model.num_timesteps == 120
    assert model._n_updates == 70


def test_logger_keys_in_progress_csv(tmp_path, box_env) -> None:
    model = _sac(box_env)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(200, log_interval=1)
    progress = pd.read_csv(tmp_path / "progress.csv")
    keys = [
        "train/ent_coef",
        "train/actor_loss",
        "train/critic_loss",
        "train/ent_coef_loss",
        "train/n_updates",
        "train/entropy",
        "train/mean_q",
    ]
    missing = set(keys) - set(progress.columns)
    assert not missing
    last = progress.dropna(subset=keys).iloc[-1]
    for key in keys:
        assert np.isfinite(last[key]), key
    # the last dump is at the end of the last episode, just before the last train call
    assert model._n_updates == 150  # 200 steps, learning starts after 50
    assert last["train/n_updates"] == 149
    assert last["train/ent_coef"] == pytest.approx(model.log_ent_coef.exp().item(), rel=0.05)
    assert last["train/critic_loss"] >= 0.0
    assert last["time/total_timesteps"] == 200


# ----------------------------------------------------------------------------------------------------------------
# Constructor and policy arguments
# ----------------------------------------------------------------------------------------------------------------


def test_constructor_has_every_sb3_parameter_with_the_same_default() -> None:
    ours = inspect.signature(sb3_softac.SAC.__init__).parameters
    theirs = inspect.signature(sb3.SAC.__init__).parameters
    missing = set(theirs) - set(ours)
    assert not missing
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default, name
        assert ours[name].kind == parameter.kind, name
    # the same positional order: SB3's parameters come first (new ones may only be added before _init_setup_model)
    public = [name for name in theirs if name != "_init_setup_model"]
    assert list(ours)[: len(public)] == public


def _linear_sizes(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def _critic_sizes(critic: Any) -> list[tuple[int, int]]:
    return [tuple(p.shape[1:]) for name, p in critic.q_networks.named_parameters() if name.endswith("weight")]


def test_policy_net_arch_list_and_dict(box_env) -> None:
    model = _sac(box_env, policy_kwargs=dict(net_arch=[32, 16]))
    assert _linear_sizes(model.actor.latent_pi) == [(5, 32), (32, 16)]
    assert _linear_sizes(model.actor.mu) == [(16, 3)]
    assert _critic_sizes(model.critic) == [(8, 32), (32, 16), (16, 1)]

    model = _sac(box_env, policy_kwargs=dict(net_arch=dict(pi=[24], qf=[16, 8])))
    assert _linear_sizes(model.actor.latent_pi) == [(5, 24)]
    assert _linear_sizes(model.actor.mu) == [(24, 3)]
    assert _critic_sizes(model.critic) == [(8, 16), (16, 8), (8, 1)]
    assert _critic_sizes(model.critic_target) == [(8, 16), (16, 8), (8, 1)]


def test_policy_activation_fn(box_env) -> None:
    model = _sac(box_env, policy_kwargs=dict(net_arch=[16, 16], activation_fn=nn.Tanh))
    for module in (model.actor, model.critic):
        kinds = {type(m) for m in module.modules()}
        assert nn.Tanh in kinds
        assert nn.ReLU not in kinds
    assert sum(isinstance(m, nn.Tanh) for m in model.critic.q_networks.layers) == 2


def test_policy_gsde_options(box_env) -> None:
    kwargs = dict(net_arch=[16, 16], log_std_init=0.5, use_expln=True, clip_mean=1.0)
    model = _sac(box_env, use_sde=True, policy_kwargs=kwargs)
    actor = model.actor
    assert th.all(actor.log_std == 0.5)
    # expln(0.5) = log1p(0.5) + 1, where exp would give e^0.5
    th.testing.assert_close(actor.get_std(), th.full((16, 3), np.log1p(0.5) + 1.0))
    with th.no_grad():
        mean, log_std, extra = actor.get_action_dist_params(th.full((8, 5), 1000.0))
    assert log_std is actor.log_std
    assert "latent_sde" in extra
    assert mean.abs().max() <= 1.0
    assert mean.abs().max() == pytest.approx(1.0)  # huge inputs saturate the clip

    unclipped = _sac(box_env, use_sde=True, policy_kwargs=dict(net_arch=[16, 16], clip_mean=0.0))
    assert isinstance(unclipped.actor.mu, nn.Linear)
    th.testing.assert_close(unclipped.actor.get_std(), th.full((16, 3), float(np.exp(-3.0))))


class _SmallExtractor(BaseFeaturesExtractor):
    """A learned linear features extractor with a configurable width."""

    def __init__(self, observation_space: spaces.Box, features_dim: int = 4) -> None:
        super().__init__(observation_space, features_dim)
        self.linear = nn.Linear(int(np.prod(observation_space.shape)), features_dim)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return th.relu(self.linear(observations.flatten(1)))


def test_policy_features_extractor_class_and_kwargs(box_env) -> None:
    policy_kwargs = dict(
        net_arch=[16], features_extractor_class=_SmallExtractor, features_extractor_kwargs=dict(features_dim=7)
    )
    model = _sac(box_env, policy_kwargs=policy_kwargs)
    for module in (model.actor, model.critic, model.critic_target):
        assert isinstance(module.features_extractor, _SmallExtractor)
        assert module.features_extractor.features_dim == 7
    assert model.actor.features_extractor is not model.critic.features_extractor
    assert _linear_sizes(model.actor.latent_pi) == [(7, 16)]
    assert _critic_sizes(model.critic) == [(10, 16), (16, 1)]
    model.learn(80)  # and trains


def test_policy_share_features_extractor(box_env) -> None:
    policy_kwargs = dict(net_arch=[16], features_extractor_class=_SmallExtractor, share_features_extractor=True)
    model = _sac(box_env, policy_kwargs=policy_kwargs)
    assert model.actor.features_extractor is model.critic.features_extractor
    assert model.critic_target.features_extractor is not model.critic.features_extractor
    extractor_ids = {id(p) for p in model.actor.features_extractor.parameters()}
    critic_ids = {id(p) for group in model.critic.optimizer.param_groups for p in group["params"]}
    actor_ids = {id(p) for group in model.actor.optimizer.param_groups for p in group["params"]}
    assert extractor_ids
    assert not extractor_ids & critic_ids
    assert extractor_ids <= actor_ids
    assert critic_ids == {id(p) for p in model.critic.q_networks.parameters()}

    not_shared = _sac(box_env, policy_kwargs=dict(policy_kwargs, share_features_extractor=False))
    own_ids = {id(p) for p in not_shared.critic.features_extractor.parameters()}
    critic_ids = {id(p) for group in not_shared.critic.optimizer.param_groups for p in group["params"]}
    assert own_ids <= critic_ids
    model.learn(80)


def test_policy_optimizer_class_and_kwargs(box_env) -> None:
    policy_kwargs = dict(net_arch=[16], optimizer_class=th.optim.RMSprop, optimizer_kwargs=dict(alpha=0.9))
    model = _sac(box_env, policy_kwargs=policy_kwargs, learning_rate=5e-4)
    for optimizer in (model.actor.optimizer, model.critic.optimizer):
        assert type(optimizer) is th.optim.RMSprop
        assert optimizer.param_groups[0]["alpha"] == 0.9
        assert optimizer.param_groups[0]["lr"] == 5e-4
    model.learn(80)
    assert model.actor.optimizer.state  # the RMSprop state (square averages) was filled by training


def test_policy_n_critics(box_env) -> None:
    model = _sac(box_env, policy_kwargs=dict(net_arch=[16], n_critics=3))
    obs, actions = th.as_tensor(_obs_batch(4)), th.zeros(4, 3)
    for critic in (model.critic, model.critic_target):
        with th.no_grad():
            values = critic(obs, actions)
        assert len(values) == 3
        assert all(v.shape == (4, 1) for v in values)
        assert not th.allclose(values[0], values[1])
        assert not th.allclose(values[1], values[2])
    model.learn(80)


class _ImageEnv(gym.Env):
    """Random 36x36 RGB images (the smallest NatureCNN accepts), Box actions, 10-step episodes."""

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = spaces.Box(0, 255, (36, 36, 3), np.uint8)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._t = 0

    def _obs(self) -> np.ndarray:
        return self.np_random.integers(0, 256, (36, 36, 3), dtype=np.uint8)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._t += 1
        return self._obs(), float(-np.sum(action**2)), False, self._t >= 10, {}


def _cnn_model(**policy_kwargs: Any) -> SAC:
    policy_kwargs = dict(net_arch=[16], features_extractor_kwargs=dict(features_dim=16), **policy_kwargs)
    return _sac(
        _ImageEnv(), "CnnPolicy", buffer_size=200, learning_starts=20, batch_size=8, policy_kwargs=policy_kwargs
    )


@pytest.mark.parametrize("normalize_images", [True, False])
def test_policy_normalize_images(normalize_images) -> None:
    model = _cnn_model(normalize_images=normalize_images)
    assert model.actor.normalize_images is normalize_images
    assert model.critic.normalize_images is normalize_images
    seen: list[float] = []
    hook = model.actor.features_extractor.register_forward_pre_hook(lambda _, args: seen.append(args[0].max().item()))
    model.predict(np.full((36, 36, 3), 255, np.uint8), deterministic=True)
    hook.remove()
    assert seen == [1.0 if normalize_images else 255.0]


def test_cnn_policy_on_images() -> None:
    model = _cnn_model()
    assert isinstance(model.policy, sb3_softac.CnnPolicy)
    assert isinstance(model.get_env(), VecTransposeImage)
    assert isinstance(model.actor.features_extractor, NatureCNN)
    assert model.actor.features_extractor is not model.critic.features_extractor
    model.learn(60)
    assert model._n_updates == 40
    buffer = model.replay_buffer
    assert buffer.observations.dtype == np.uint8
    assert buffer.observations.shape[1:] == (1, 3, 36, 36)  # channel-first after VecTransposeImage
    action, _ = model.predict(_ImageEnv().observation_space.sample(), deterministic=True)
    assert action.shape == (2,)
    assert np.all(np.abs(action) <= 1.0)


def test_multi_input_policy_on_dict_observations() -> None:
    model = _sac(PointGoalEnv(), "MultiInputPolicy")
    assert isinstance(model.policy, sb3_softac.MultiInputPolicy)
    assert isinstance(model.actor.features_extractor, CombinedExtractor)
    model.learn(120)
    assert set(model.replay_buffer.observations) == {"position", "goal"}
    single, _ = model.predict({"position": np.array([0.5], np.float32), "goal": np.array([1.0], np.float32)})
    assert single.shape == (1,)
    batch = {"position": np.zeros((6, 1), np.float32), "goal": np.linspace(-2, 2, 6, dtype=np.float32)[:, None]}
    actions, _ = model.predict(batch, deterministic=True)
    assert actions.shape == (6, 1)
    assert np.all(np.abs(actions) <= 2.0)
    assert len(np.unique(actions)) > 1  # the action depends on the goal


# ----------------------------------------------------------------------------------------------------------------
# Schedules and training plumbing
# ----------------------------------------------------------------------------------------------------------------


def test_learning_rate_schedule_changes_every_optimizer(box_env) -> None:
    def schedule(progress_remaining: float) -> float:
        return 1e-3 * (0.5 + 0.5 * progress_remaining)

    model = _sac(box_env, learning_rate=schedule)
    for optimizer in (model.actor.optimizer, model.critic.optimizer, model.ent_coef_optimizer):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    recorder = _Recorder()
    model.learn(200, callback=recorder)
    # learning rates are updated at each train call, from the progress after the previous step
    lrs = recorder.learning_rates[51:]
    assert len(set(lrs)) > 100
    assert all(a > b for a, b in itertools.pairwise(lrs))
    expected = schedule(1.0 - 200 / 200)
    for optimizer in (model.actor.optimizer, model.critic.optimizer, model.ent_coef_optimizer):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=0.02)


def _record_train_calls(model: SAC) -> list[int]:
    calls: list[int] = []
    original = model.train

    def train(gradient_steps: int, batch_size: int = 64) -> None:
        calls.append(gradient_steps)
        original(gradient_steps, batch_size)

    model.train = train  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize(
    ("train_freq", "gradient_steps", "expected_calls"),
    [
        (4, 1, [1] * 25),  # steps 104, 108, ..., 200
        (4, -1, [4] * 25),
        (4, 2, [2] * 25),
        ((2, "episode"), -1, [50] * 2),  # 2 episodes of 25 steps each; trains after steps 150 and 200
    ],
    ids=["int", "int-all", "int-2", "episode-all"],
)
def test_train_freq_and_gradient_steps(box_env, train_freq, gradient_steps, expected_calls) -> None:
    model = _sac(box_env, learning_starts=100, train_freq=train_freq, gradient_steps=gradient_steps)
    calls = _record_train_calls(model)
    model.learn(200)
    assert calls == expected_calls
    assert model._n_updates == sum(expected_calls)


def test_gradient_steps_all_with_several_envs() -> None:
    env = _box_vec_env(2)
    model = _sac(env, learning_starts=40, train_freq=3, gradient_steps=-1)
    calls = _record_train_calls(model)
    model.learn(60)  # 30 vectorised steps: rollouts of 3 steps x 2 envs
    assert calls == [6] * 4  # after num_timesteps 42, 48, 54, 60
    assert model._n_updates == 24


class _CountingNoise(NormalActionNoise):
    def __init__(self, sigma: float) -> None:
        super().__init__(mean=np.zeros(3), sigma=np.full(3, sigma))
        self.calls = 0
        self.resets = 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return super().__call__()

    def reset(self) -> None:
        self.resets += 1


def test_action_noise_is_added_to_every_action(box_env) -> None:
    set_random_seed(0)
    noise = _CountingNoise(sigma=10.0)
    model = _sac(box_env, learning_starts=0, action_noise=noise)
    model.learn(100)
    assert noise.calls == 100
    assert noise.resets == 1 + 4  # at the start of learn, then once per 25-step episode
    stored = model.replay_buffer.actions[:100]
    # noise of scale 10 drives almost every stored (scaled) action to the clip bounds
    assert np.mean(np.abs(stored) == 1.0) > 0.8

    quiet = _sac(VectorBoxEnv(), learning_starts=0).learn(100)
    assert np.mean(np.abs(quiet.replay_buffer.actions[:100]) == 1.0) < 0.2


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
    model = _sac(
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
    model = _sac(
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


def test_n_step_returns_buffer(box_env) -> None:
    model = _sac(box_env, n_steps=3, gamma=0.9)
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


@pytest.mark.parametrize(("ent_coef", "initial"), [("auto", 1.0), ("auto_0.1", 0.1)])
def test_learned_ent_coef(box_env, ent_coef, initial) -> None:
    model = _sac(box_env, ent_coef=ent_coef)
    assert model.ent_coef_optimizer is not None
    assert model.log_ent_coef.exp().item() == pytest.approx(initial, rel=1e-6)
    model.learn(150)
    assert model.log_ent_coef.exp().item() != pytest.approx(initial, rel=1e-3)
    assert model.logger.name_to_value["train/ent_coef"] == pytest.approx(model.log_ent_coef.exp().item(), rel=0.05)


def test_fixed_ent_coef(box_env) -> None:
    model = _sac(box_env, ent_coef=0.05)
    assert model.ent_coef_optimizer is None
    assert model.log_ent_coef is None
    model.learn(150)
    values = model.logger.name_to_value
    assert values["train/ent_coef"] == pytest.approx(0.05)
    assert "train/ent_coef_loss" not in values


def test_target_entropy_float_steers_the_temperature(box_env) -> None:
    low = _sac(box_env, target_entropy=-50.0)
    assert low.target_entropy == -50.0
    low.learn(150)
    # a tanh-squashed 3-d policy has entropy <= 3 log 2: a target of 10 is never met and alpha grows
    high = _sac(VectorBoxEnv(), target_entropy=10.0).learn(150)
    assert high.log_ent_coef.item() > 0.0 > low.log_ent_coef.item()


@pytest.mark.parametrize("interval", [1, 2, 3])
def test_target_update_interval(box_env, interval) -> None:
    model = _sac(box_env, target_update_interval=interval, tau=0.5).learn(80)
    changed = []
    for _ in range(6):
        before = [p.detach().clone() for p in model.critic_target.parameters()]
        n_updates = model._n_updates
        model.train(1, batch_size=32)
        after = list(model.critic_target.parameters())
        changed.append(any(not th.equal(a, b) for a, b in zip(before, after, strict=True)))
        assert changed[-1] == (n_updates % interval == 0)
    assert sum(changed) == 6 // interval


def test_gsde_learns_and_reset_noise(box_env) -> None:
    model = _sac(
        box_env,
        use_sde=True,
        sde_sample_freq=4,
        use_sde_at_warmup=True,
        learning_starts=96,
        train_freq=8,
        gradient_steps=8,
    )
    resets: list[int] = []
    original = model.actor.reset_noise

    def reset_noise(batch_size: int = 1) -> None:
        resets.append(model.num_timesteps)
        original(batch_size)

    model.actor.reset_noise = reset_noise  # type: ignore[method-assign]
    model.learn(96)  # warm-up only: actions come from the gSDE policy, with new noise every 4 steps
    assert model._n_updates == 0
    # (SB3 also draws new noise at the start of every rollout, here every 8 steps)
    assert sorted(set(resets)) == list(range(0, 96, 4))
    actions = model.replay_buffer.actions[:96, 0]
    # gSDE actions (log_std_init=-3) vary far less than uniform ones (std 0.58) and never hit the bounds
    assert actions.std() < 0.3
    model.actor.reset_noise = original  # type: ignore[method-assign]
    model.learn(96, reset_num_timesteps=False)
    assert model._n_updates == 96

    std = model.policy.actor.get_std()
    assert std.shape == (32, 3)
    assert th.all(std > 0)
    assert not th.allclose(model.actor.log_std, th.full_like(model.actor.log_std, -3.0))  # log_std was trained

    obs = _obs_batch(1)
    model.policy.reset_noise()
    first, _ = model.predict(obs, deterministic=False)
    again, _ = model.predict(obs, deterministic=False)
    np.testing.assert_array_equal(first, again)  # gSDE noise is fixed between resets
    matrix = model.actor.action_dist.exploration_mat.clone()
    model.policy.reset_noise()
    assert not th.equal(model.actor.action_dist.exploration_mat, matrix)
    assert not np.array_equal(model.predict(obs, deterministic=False)[0], first)


def test_warmup_without_gsde_is_uniform(box_env) -> None:
    model = _sac(box_env, use_sde=True, use_sde_at_warmup=False, learning_starts=100).learn(100)
    assert model.replay_buffer.actions[:100, 0].std() == pytest.approx(1 / np.sqrt(3), rel=0.25)


def test_tensorboard_log(tmp_path, box_env) -> None:
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed")
    model = _sac(box_env, tensorboard_log=str(tmp_path)).learn(100, tb_log_name="softac")
    runs = list(tmp_path.glob("softac_*"))
    assert len(runs) == 1
    assert any(p.name.startswith("events.out.tfevents") for p in runs[0].iterdir())
    assert model.num_timesteps == 100


def test_saved_archive_holds_our_policy(tmp_path, box_env) -> None:
    _sac(box_env).save(tmp_path / "model")
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        names = set(archive.namelist())
    assert {"data", "policy.pth", "actor.optimizer.pth", "critic.optimizer.pth", "pytorch_variables.pth"} <= names
