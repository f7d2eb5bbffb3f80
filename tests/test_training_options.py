"""The constructor arguments of SB3's SAC and the training plumbing of ``OffPolicyAlgorithm``: train frequency,
gradient steps, action noise, target update interval and gSDE exploration."""

import inspect

import numpy as np
import pytest
import stable_baselines3 as sb3
import torch as th
from envs import VectorBoxEnv, box_observations, box_vec_env, make_sac
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.utils import set_random_seed

import sb3_softac
from sb3_softac import SAC, compat


def test_constructor_has_every_sb3_parameter_with_the_same_default() -> None:
    ours = dict(inspect.signature(sb3_softac.SAC.__init__).parameters)
    theirs = inspect.signature(sb3.SAC.__init__).parameters
    if not compat.HAS_N_STEPS:  # SB3 2.6's SAC has no n_steps; ours takes only n_steps=1 there
        assert ours.pop("n_steps").default == 1
    missing = set(theirs) - set(ours)
    assert not missing
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default, name
        assert ours[name].kind == parameter.kind, name
    # the same positional order: SB3's parameters come first (new ones may only be added before _init_setup_model)
    public = [name for name in theirs if name != "_init_setup_model"]
    assert list(ours)[: len(public)] == public


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
    model = make_sac(box_env, learning_starts=100, train_freq=train_freq, gradient_steps=gradient_steps)
    calls = _record_train_calls(model)
    model.learn(200)
    assert calls == expected_calls
    assert model._n_updates == sum(expected_calls)


def test_gradient_steps_all_with_several_envs() -> None:
    env = box_vec_env(2)
    model = make_sac(env, learning_starts=40, train_freq=3, gradient_steps=-1)
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
    model = make_sac(box_env, learning_starts=0, action_noise=noise)
    model.learn(100)
    assert noise.calls == 100
    assert noise.resets == 1 + 4  # at the start of learn, then once per 25-step episode
    stored = model.replay_buffer.actions[:100]
    # noise of scale 10 drives almost every stored (scaled) action to the clip bounds
    assert np.mean(np.abs(stored) == 1.0) > 0.8

    quiet = make_sac(VectorBoxEnv(), learning_starts=0).learn(100)
    assert np.mean(np.abs(quiet.replay_buffer.actions[:100]) == 1.0) < 0.2


@pytest.mark.parametrize("interval", [1, 2, 3])
def test_target_update_interval(box_env, interval) -> None:
    model = make_sac(box_env, target_update_interval=interval, tau=0.5).learn(80)
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
    model = make_sac(
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

    obs = box_observations(1)
    model.policy.reset_noise()
    first, _ = model.predict(obs, deterministic=False)
    again, _ = model.predict(obs, deterministic=False)
    np.testing.assert_array_equal(first, again)  # gSDE noise is fixed between resets
    matrix = model.actor.action_dist.exploration_mat.clone()
    model.policy.reset_noise()
    assert not th.equal(model.actor.action_dist.exploration_mat, matrix)
    assert not np.array_equal(model.predict(obs, deterministic=False)[0], first)


def test_warmup_without_gsde_is_uniform(box_env) -> None:
    model = make_sac(box_env, use_sde=True, use_sde_at_warmup=False, learning_starts=100).learn(100)
    assert model.replay_buffer.actions[:100, 0].std() == pytest.approx(1 / np.sqrt(3), rel=0.25)
