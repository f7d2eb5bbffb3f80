"""Discrete actions in ``sb3_softac.SAC``: the math by hand through the algorithm, prediction, and the SB3 machinery."""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from envs import ActionSpaceEnv, ImageEnv, make_sac
from gymnasium import spaces
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.torch_layers import CombinedExtractor, NatureCNN
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from sb3_softac import SAC
from sb3_softac.policies import CategoricalActor
from sb3_softac.sac import DISCRETE_TARGET_ENTROPY_SCALE

SMALL = dict(net_arch=[16, 16])


class VectorDiscreteEnv(gym.Env):
    """2-d observations in [-1, 1], 3 actions; reward 1 when the action is the index of the largest of
    (obs[0], obs[1], 0). Episodes last 10 steps."""

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = spaces.Discrete(3)
        self._obs = np.zeros(2, np.float32)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        self._obs = self.np_random.uniform(-1.0, 1.0, 2).astype(np.float32)
        return self._obs.copy(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward = float(int(action) == int(np.argmax([self._obs[0], self._obs[1], 0.0])))
        self._t += 1
        self._obs = self.np_random.uniform(-1.0, 1.0, 2).astype(np.float32)
        return self._obs.copy(), reward, False, self._t >= 10, {}


class DictDiscreteEnv(gym.Env):
    """Dict observations (a vector and a discrete flag), 2 actions; reward 1 for repeating the flag."""

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = spaces.Dict(
            {"vec": spaces.Box(-1.0, 1.0, (3,), np.float32), "flag": spaces.Discrete(2)}
        )
        self.action_space = spaces.Discrete(2)
        self._flag = 0
        self._t = 0

    def _obs(self) -> dict:
        return {"vec": self.np_random.uniform(-1.0, 1.0, 3).astype(np.float32), "flag": self._flag}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self._t = 0
        self._flag = int(self.np_random.integers(2))
        return self._obs(), {}

    def step(self, action: int) -> tuple[dict, float, bool, bool, dict]:
        reward = float(int(action) == self._flag)
        self._t += 1
        self._flag = int(self.np_random.integers(2))
        return self._obs(), reward, False, self._t >= 8, {}


# ---------------------------------------------------------------------------------------------------------------
# The math, by hand (numpy, float64) against one gradient step of the algorithm
# ---------------------------------------------------------------------------------------------------------------


def _softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return np.exp(log_p), log_p


def _set(parameter: th.Tensor, value: np.ndarray) -> None:
    with th.no_grad():
        parameter.copy_(th.as_tensor(value, dtype=parameter.dtype).reshape(parameter.shape))


def _assert_close(actual: th.Tensor, expected: np.ndarray) -> None:
    th.testing.assert_close(actual.detach(), th.as_tensor(expected, dtype=th.float32), rtol=1e-5, atol=1e-6)


def _linear_model(**kwargs) -> SAC:
    """A model whose actor and critics are single linear layers (no hidden layer), optimised by plain SGD."""
    model = make_sac(
        VectorDiscreteEnv(),
        learning_rate=0.1,
        gamma=0.9,
        ent_coef="auto_0.5",
        target_entropy=0.7,
        learning_starts=0,
        policy_kwargs=dict(net_arch=[], optimizer_class=th.optim.SGD),
        **kwargs,
    )
    model.set_logger(Logger(None, []))
    return model


def test_categorical_actor_probabilities_by_hand() -> None:
    model = _linear_model()
    actor = model.actor
    assert isinstance(actor, CategoricalActor)
    weight = np.array([[1.0, -0.5], [0.0, 0.5], [-1.0, 0.25]])
    bias = np.array([0.1, 0.0, -0.2])
    _set(actor.logits.weight, weight)
    _set(actor.logits.bias, bias)
    obs = np.array([[0.5, -0.25], [-1.0, 1.0]])
    probs, log_probs = _softmax(obs @ weight.T + bias)
    sample = actor.evaluate(th.as_tensor(obs, dtype=th.float32))
    assert sample.actions is None
    th.testing.assert_close(sample.probs, th.as_tensor(probs, dtype=th.float32))
    th.testing.assert_close(sample.log_prob, th.as_tensor(log_probs, dtype=th.float32))
    th.testing.assert_close(sample.probs.sum(dim=1), th.ones(2))


def test_one_gradient_step_by_hand() -> None:
    """Temperature, critic and actor losses, the SGD updates they imply and the target update, computed in numpy.

    Order of SB3's SAC: alpha is read, the temperature is updated from the entropy of the current policy, the critics
    regress on the target (computed with the pre-update alpha and policy), then the actor minimises
    sum_a pi(a|s) [alpha log pi(a|s) - min_i Q_i(s, a)] against the updated critics, then Polyak averaging.
    """
    model = _linear_model()
    rng = np.random.default_rng(123)
    lr, gamma, alpha, target_entropy, tau = 0.1, 0.9, 0.5, 0.7, model.tau
    w_pi, b_pi = rng.normal(size=(3, 2)), rng.normal(size=3)
    w_q, b_q = rng.normal(size=(2, 2, 3)), rng.normal(size=(2, 1, 3))  # (critic, in, out): Q_i(s) = s W_i + b_i
    w_t, b_t = rng.normal(size=(2, 2, 3)), rng.normal(size=(2, 1, 3))
    _set(model.actor.logits.weight, w_pi)
    _set(model.actor.logits.bias, b_pi)
    (q_layer,) = model.critic.q_networks.layers
    (t_layer,) = model.critic_target.q_networks.layers
    _set(q_layer.weight, w_q)
    _set(q_layer.bias, b_q)
    _set(t_layer.weight, w_t)
    _set(t_layer.bias, b_t)

    obs = rng.uniform(-1, 1, size=(4, 2))
    next_obs = rng.uniform(-1, 1, size=(4, 2))
    actions = np.array([0, 2, 1, 2])
    rewards = np.array([1.0, 0.0, -0.5, 2.0])
    dones = np.array([0.0, 0.0, 1.0, 0.0])
    columns = (obs, actions[:, None], next_obs, dones[:, None], rewards[:, None])
    batch = ReplayBufferSamples(*(th.as_tensor(x, dtype=th.float32) for x in columns))
    model.replay_buffer.sample = lambda *args, **kwargs: batch  # type: ignore[method-assign]
    model.train(gradient_steps=1, batch_size=4)
    logged = model.logger.name_to_value

    # Temperature: J = -log(alpha) (-H + target), gradient H - target; Adam's first step moves by lr * sign.
    probs, log_probs = _softmax(obs @ w_pi.T + b_pi)
    entropy = -(probs * log_probs).sum(axis=1).mean()
    assert logged["train/entropy"] == pytest.approx(entropy, rel=1e-5)
    assert logged["train/ent_coef"] == pytest.approx(alpha, rel=1e-6)
    assert logged["train/ent_coef_loss"] == pytest.approx(-math.log(alpha) * (-entropy + target_entropy), rel=1e-5)
    expected_log_alpha = math.log(alpha) - lr * np.sign(entropy - target_entropy)
    assert model.log_ent_coef.item() == pytest.approx(expected_log_alpha, abs=1e-5)

    # Critics: y = r + gamma (1 - d) sum_a' pi(a'|s') [min_i Qtarget_i(s', a') - alpha log pi(a'|s')].
    next_probs, next_log_probs = _softmax(next_obs @ w_pi.T + b_pi)
    next_q = np.min(next_obs[None] @ w_t + b_t, axis=0)
    y = rewards + gamma * (1 - dones) * (next_probs * (next_q - alpha * next_log_probs)).sum(axis=1)
    q_all = obs[None] @ w_q + b_q  # (critic, batch, action)
    q_taken = q_all[:, np.arange(4), actions]
    assert logged["train/critic_loss"] == pytest.approx(0.5 * ((q_taken - y) ** 2).mean(axis=1).sum(), rel=1e-5)
    assert logged["train/mean_q"] == pytest.approx(q_taken.mean(), rel=1e-5)
    grad_q = np.zeros_like(q_all)  # dJ_Q / dQ_i(s_b, a): only the replayed actions
    grad_q[:, np.arange(4), actions] = (q_taken - y) / 4
    w_q_new = w_q - lr * np.einsum("bi,nbo->nio", obs, grad_q)
    b_q_new = b_q - lr * grad_q.sum(axis=1, keepdims=True)
    _assert_close(q_layer.weight, w_q_new)
    _assert_close(q_layer.bias, b_q_new)

    # Actor, against the updated critics: L = mean_s sum_a pi (alpha log pi - min_i Q_i); dL/dlogits = p (h - E_p h).
    min_q = np.min(obs[None] @ w_q_new + b_q_new, axis=0)
    h = alpha * log_probs - min_q
    assert logged["train/actor_loss"] == pytest.approx((probs * h).sum(axis=1).mean(), rel=1e-5)
    grad_logits = probs * (h - (probs * h).sum(axis=1, keepdims=True)) / 4
    _assert_close(model.actor.logits.weight, w_pi - lr * grad_logits.T @ obs)
    _assert_close(model.actor.logits.bias, b_pi - lr * grad_logits.sum(axis=0))

    # Target critics: Polyak averaging towards the updated critics.
    _assert_close(t_layer.weight, (1 - tau) * w_t + tau * w_q_new)
    _assert_close(t_layer.bias, (1 - tau) * b_t + tau * b_q_new)


# ---------------------------------------------------------------------------------------------------------------
# Prediction and target entropy
# ---------------------------------------------------------------------------------------------------------------


def test_deterministic_predict_is_argmax_of_logits() -> None:
    model = SAC("MlpPolicy", VectorDiscreteEnv(), policy_kwargs=SMALL, seed=1)
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, size=(256, 2)).astype(np.float32)
    actor = model.actor
    with th.no_grad():
        logits = actor.logits(actor.latent_pi(th.as_tensor(obs))).numpy()
    actions, _ = model.predict(obs, deterministic=True)
    assert actions.shape == (256,) and actions.dtype.kind == "i"
    np.testing.assert_array_equal(actions, logits.argmax(axis=1))
    single, _ = model.predict(obs[0], deterministic=True)
    assert model.action_space.contains(single) and int(single) == int(logits[0].argmax())

    # A linear policy whose argmax is the environment's rule: the index of the largest of (obs[0], obs[1], 0).
    linear = _linear_model()
    _set(linear.actor.logits.weight, np.array([[4.0, 0.0], [0.0, 4.0], [0.0, 0.0]]))
    _set(linear.actor.logits.bias, np.zeros(3))
    expected = np.argmax(np.column_stack([obs, np.zeros(256)]), axis=1)
    assert set(expected) == {0, 1, 2}
    np.testing.assert_array_equal(linear.predict(obs, deterministic=True)[0], expected)


def test_stochastic_predict_samples_with_the_policy_probabilities() -> None:
    model = SAC("MlpPolicy", VectorDiscreteEnv(), policy_kwargs=SMALL, seed=2)
    probs = np.array([0.2, 0.3, 0.5])
    _set(model.actor.logits.weight, np.zeros((3, 16)))
    _set(model.actor.logits.bias, np.log(probs))
    obs = np.zeros(2, np.float32)
    counts = np.zeros(3)
    for _ in range(2_000):  # one predict call per sample, as during a rollout
        action, _ = model.predict(obs, deterministic=False)
        counts[int(action)] += 1
    # Binomial standard deviation of a frequency over 2000 draws is at most 0.011.
    np.testing.assert_allclose(counts / counts.sum(), probs, atol=0.04)
    deterministic = {int(model.predict(obs, deterministic=True)[0]) for _ in range(20)}
    assert deterministic == {2}


@pytest.mark.parametrize("n_actions", [2, 3, 7])
def test_auto_target_entropy_is_scaled_log_n(n_actions: int) -> None:
    env = ActionSpaceEnv(spaces.Discrete(n_actions))
    model = SAC("MlpPolicy", env, policy_kwargs=SMALL)
    assert model.target_entropy == pytest.approx(DISCRETE_TARGET_ENTROPY_SCALE * math.log(n_actions))
    assert 0.0 < model.target_entropy < math.log(n_actions)  # below the entropy of the uniform policy
    assert SAC("MlpPolicy", env, policy_kwargs=SMALL, target_entropy=0.3).target_entropy == 0.3


# ---------------------------------------------------------------------------------------------------------------
# SB3 machinery: save/load, vectorised envs, policies, callbacks, errors
# ---------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = SAC("MlpPolicy", "CartPole-v1", learning_starts=100, batch_size=32, policy_kwargs=SMALL, seed=0)
    model.learn(300)
    assert model._n_updates > 0
    path = tmp_path / "cartpole_softac.zip"
    model.save(path)
    loaded = SAC.load(path)
    assert isinstance(loaded.actor, CategoricalActor)
    assert isinstance(loaded.action_space, spaces.Discrete)
    assert loaded.target_entropy == pytest.approx(model.target_entropy)
    assert loaded.log_ent_coef.item() == pytest.approx(model.log_ent_coef.item())
    obs = np.random.default_rng(0).normal(size=(128, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    for original, restored in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values(), strict=True):
        th.testing.assert_close(original, restored)
    # Training can continue after loading.
    loaded.set_env(make_vec_env("CartPole-v1", n_envs=1))
    loaded.learn(150, reset_num_timesteps=False)


@pytest.mark.parametrize("vec_env_cls", [DummyVecEnv, SubprocVecEnv])
def test_two_envs_on_cartpole(vec_env_cls: type) -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0, vec_env_cls=vec_env_cls)
    try:
        model = SAC("MlpPolicy", env, learning_starts=100, batch_size=32, policy_kwargs=SMALL, seed=0)
        model.learn(300)
        assert model.num_timesteps >= 300 and model._n_updates > 0
        stored = model.replay_buffer.actions[: model.replay_buffer.pos]
        assert stored.shape[1:] == (2, 1)
        assert set(np.unique(stored)) <= {0.0, 1.0} and len(np.unique(stored)) == 2
        actions, _ = model.predict(env.reset(), deterministic=False)
        assert actions.shape == (2,)
    finally:
        env.close()


def test_cnn_policy_on_image_env() -> None:
    model = SAC(
        "CnnPolicy",
        ImageEnv(),
        learning_starts=32,
        batch_size=16,
        buffer_size=500,
        policy_kwargs=dict(net_arch=[16], features_extractor_kwargs=dict(features_dim=16)),
        seed=0,
    )
    assert isinstance(model.actor.features_extractor, NatureCNN)
    assert isinstance(model.critic.features_extractor, NatureCNN)
    model.learn(80)
    assert model._n_updates > 0
    obs, _ = ImageEnv().reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert model.action_space.contains(action)
    q_values = model.critic.q_values(model.policy.obs_to_tensor(obs)[0])
    assert q_values.shape == (2, 1, 2)  # (critics, batch, actions)


def test_multi_input_policy_with_discrete_actions() -> None:
    model = SAC("MultiInputPolicy", DictDiscreteEnv(), learning_starts=32, batch_size=16, policy_kwargs=SMALL, seed=0)
    assert isinstance(model.actor.features_extractor, CombinedExtractor)
    model.learn(80)
    assert model._n_updates > 0
    obs, _ = DictDiscreteEnv().reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert model.action_space.contains(action)


def test_eval_callback_runs(tmp_path: Path) -> None:
    eval_env = Monitor(gym.make("CartPole-v1"))
    callback = EvalCallback(
        eval_env, eval_freq=100, n_eval_episodes=2, best_model_save_path=str(tmp_path), log_path=str(tmp_path)
    )
    model = SAC("MlpPolicy", "CartPole-v1", learning_starts=50, batch_size=32, policy_kwargs=SMALL, seed=0)
    model.learn(300, callback=callback)
    assert len(callback.evaluations_results) == 3
    assert all(len(r) == 2 for r in callback.evaluations_results)
    assert np.isfinite(callback.best_mean_reward) and callback.best_mean_reward >= 8.0  # CartPole lasts >= 8 steps
    assert isinstance(SAC.load(tmp_path / "best_model.zip").actor, CategoricalActor)
    np.testing.assert_array_equal(np.load(tmp_path / "evaluations.npz")["timesteps"], [100, 200, 300])


def test_use_sde_or_action_noise_with_discrete_actions_is_refused() -> None:
    with pytest.raises(ValueError, match="continuous actions"):  # SB3's own check comes first for gSDE
        SAC("MlpPolicy", VectorDiscreteEnv(), use_sde=True)
    with pytest.raises(ValueError, match="use_sde and action_noise"):
        SAC("MlpPolicy", VectorDiscreteEnv(), action_noise=NormalActionNoise(np.zeros(1), np.ones(1)))
