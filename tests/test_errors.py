"""Bad input is refused with a clear error before any training happens, and a diverging run stops at once."""

import re
import warnings
import zipfile

import numpy as np
import pytest
from envs import ActionSpaceEnv, VectorBoxEnv, make_sac
from gymnasium import spaces
from stable_baselines3 import PPO

from sb3_softac import SAC


@pytest.mark.parametrize(
    ("action_space", "name"),
    [(spaces.MultiDiscrete([3, 2]), "MultiDiscrete"), (spaces.MultiBinary(4), "MultiBinary")],
)
def test_unsupported_action_spaces_are_refused(action_space, name) -> None:
    # SB3's own check of the supported action spaces refuses them (an AssertionError that names the space).
    with pytest.raises(AssertionError, match=name) as info:
        make_sac(ActionSpaceEnv(action_space))
    message = str(info.value)
    assert name in message
    assert "action space" in message.lower()


@pytest.mark.parametrize("ent_coef", ["autox", "auto_-1", "auto_abc", "foo", "auto_0", "auto_nan", -0.1, -5, "-1"])
def test_malformed_ent_coef_is_refused(ent_coef) -> None:
    with pytest.raises(ValueError, match=re.escape(f"ent_coef={ent_coef!r}")):
        make_sac(ent_coef=ent_coef)


@pytest.mark.parametrize(
    ("ent_coef", "learned", "value"),
    [("auto", True, 1.0), ("auto_0.3", True, 0.3), (0.0, False, 0.0), ("0.2", False, 0.2)],
)
def test_valid_ent_coef_is_accepted(ent_coef, learned, value) -> None:
    model = make_sac(ent_coef=ent_coef)
    assert (model.log_ent_coef is not None) is learned
    assert model._current_ent_coef().item() == pytest.approx(value)


@pytest.mark.parametrize("tau", [-0.1, 1.5, -1e-9, 1.0 + 1e-9])
def test_bad_tau_is_refused(tau) -> None:
    with pytest.raises(ValueError, match=re.escape(f"tau={tau}")):
        make_sac(tau=tau)


@pytest.mark.parametrize("tau", [0, 0.0])
def test_tau_zero_is_refused_or_flagged(tau) -> None:
    """tau=0 freezes the target critics: it must at least not pass silently (SB3's own tests use it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            make_sac(tau=tau)
            message = " ".join(str(warning.message) for warning in caught)
        except ValueError as error:
            message = str(error)
    assert "tau=0" in message


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_bad_batch_size_is_refused(batch_size) -> None:
    with pytest.raises(ValueError, match=re.escape(f"batch_size={batch_size!r}")):
        make_sac(batch_size=batch_size)


@pytest.mark.parametrize("gradient_steps", [-2, -10])
def test_bad_gradient_steps_is_refused(gradient_steps) -> None:
    with pytest.raises(ValueError, match=rf"gradient_steps={gradient_steps}"):
        make_sac(gradient_steps=gradient_steps)


@pytest.mark.parametrize("target_entropy", ["high", None, [1], float("nan"), True])
def test_bad_target_entropy_is_refused(target_entropy) -> None:
    with pytest.raises(ValueError, match=re.escape(f"target_entropy={target_entropy!r}")):
        make_sac(target_entropy=target_entropy)


def test_refused_arguments_do_not_touch_the_env() -> None:
    """The checks run in the constructor, before a single environment step."""

    class CountingEnv(VectorBoxEnv):
        steps = 0

        def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
            CountingEnv.steps += 1
            return super().step(action)

    bad = dict(tau=-1.0, batch_size=0, ent_coef="foo", target_entropy="high", gradient_steps=-2)
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            make_sac(CountingEnv(), **{name: value})
    assert CountingEnv.steps == 0


def test_loading_a_ppo_model_is_refused(tmp_path) -> None:
    path = tmp_path / "ppo_model.zip"
    PPO("MlpPolicy", VectorBoxEnv(), n_steps=16, batch_size=16, policy_kwargs=dict(net_arch=[8]), seed=0).save(path)
    with pytest.raises(ValueError, match="ActorCriticPolicy") as info:
        SAC.load(path)
    assert "ppo_model" in str(info.value)
    assert re.search(r"not an? .*SAC model", str(info.value))


def test_loading_a_file_that_is_not_a_zip_is_refused(tmp_path) -> None:
    path = tmp_path / "notes.zip"
    path.write_text("this is not a model\n")
    with pytest.raises(ValueError, match="no zip") as info:
        SAC.load(path)
    assert "notes.zip" in str(info.value)


def test_loading_a_zip_without_data_is_refused(tmp_path) -> None:
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
        archive.writestr("policy.pth", b"\x00\x01")
    with pytest.raises(ValueError, match="'data'") as info:
        SAC.load(path)
    assert "other.zip" in str(info.value)


class _NaNRewardEnv(VectorBoxEnv):
    """VectorBoxEnv whose reward becomes NaN from the ``nan_from``-th step on."""

    def __init__(self, nan_from: int) -> None:
        super().__init__()
        self.nan_from = nan_from
        self.total_steps = 0

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = super().step(action)
        self.total_steps += 1
        if self.total_steps >= self.nan_from:
            reward = float("nan")
        return obs, reward, terminated, truncated, info


@pytest.mark.parametrize("gradient_steps", [1, 4])
def test_nan_reward_stops_learning_at_the_first_bad_train_call(gradient_steps) -> None:
    # Half of the 100 transitions collected before learning starts carry a NaN reward, so the first batch of 32
    # holds one (with probability 1 - 2^-32): the first train call must fail, and name the critic loss.
    env = _NaNRewardEnv(nan_from=51)
    model = make_sac(env, learning_starts=100, batch_size=32, gradient_steps=gradient_steps)
    with pytest.raises(FloatingPointError, match="critic loss") as info:
        model.learn(1_000)
    assert "gradient step 1 " in str(info.value)
    assert "timestep 101" in str(info.value)
    assert model.num_timesteps == 101
    assert env.total_steps == 101
    assert model._n_updates == 0


def test_nan_reward_later_in_training_names_the_gradient_step() -> None:
    # NaN rewards only from step 150 on: the failing step is some gradient step after the first 50 good ones.
    env = _NaNRewardEnv(nan_from=150)
    model = make_sac(env, learning_starts=100, batch_size=64, seed=1)
    with pytest.raises(FloatingPointError, match="critic loss") as info:
        model.learn(1_000)
    match = re.search(r"gradient step (\d+) \(timestep (\d+)\)", str(info.value))
    assert match is not None
    step, timestep = int(match[1]), int(match[2])
    assert timestep == model.num_timesteps
    assert step == model._n_updates + 1
    assert 150 <= timestep <= 200  # a NaN transition is in the buffer and sampled soon after it is stored
    assert step == timestep - 100
