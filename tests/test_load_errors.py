"""Loading a damaged, incomplete, poisoned or mismatched file fails at once, with an error that names the file, what
is wrong and what to do: never a bare ``KeyError``, never a model that predicts NaN, never a late failure inside SB3."""

import io
import json
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import sb3_contrib
import stable_baselines3 as sb3
import torch as th
from envs import actions, observations, rewrite_archive, tiny_model
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env

from sb3_softac import SAC


@pytest.fixture(scope="module")
def sb3_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sb3") / "sb3_model.zip"
    tiny_model(sb3.SAC).save(path)
    return path


@pytest.fixture(scope="module")
def ours_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ours") / "our_model.zip"
    tiny_model(SAC).save(path)
    return path


def _edited_state(archive: Path, member: str, edit: Callable[[dict], None]) -> bytes:
    with zipfile.ZipFile(archive) as zipped:
        state = th.load(io.BytesIO(zipped.read(member)), weights_only=True)
    edit(state)
    buffer = io.BytesIO()
    th.save(state, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Damaged and incomplete archives


@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("origin", ["sb3", "ours"])
def test_a_truncated_archive_is_reported_as_truncated(
    request: pytest.FixtureRequest, tmp_path: Path, fraction: float, origin: str
) -> None:
    whole = request.getfixturevalue(f"{origin}_archive").read_bytes()
    (tmp_path / "cut.zip").write_bytes(whole[: int(len(whole) * fraction)])
    with pytest.raises(ValueError, match="truncated") as info:
        SAC.load(tmp_path / "cut.zip")
    assert "cut.zip" in str(info.value)
    assert "not a model saved" not in str(info.value)
    assert "earlier copy" in str(info.value)


def test_a_corrupted_member_is_reported_as_damaged(ours_archive: Path, tmp_path: Path) -> None:
    content = bytearray(ours_archive.read_bytes())
    offset = content.index(b"actor.optimizer")  # inside the first weights file, past its header
    content[offset + 2000] ^= 0xFF
    (tmp_path / "flipped.zip").write_bytes(bytes(content))
    with pytest.raises(ValueError, match="damaged") as info:
        SAC.load(tmp_path / "flipped.zip")
    assert "flipped.zip" in str(info.value)


def test_invalid_data_json_names_the_file(ours_archive: Path, tmp_path: Path) -> None:
    rewrite_archive(ours_archive, tmp_path / "bad_json.zip", raw_data=b'{"policy_class": {')
    with pytest.raises(ValueError, match="not valid JSON") as info:
        SAC.load(tmp_path / "bad_json.zip")
    assert "bad_json.zip" in str(info.value)
    assert "'data'" in str(info.value)


@pytest.mark.parametrize("origin", ["sb3", "ours"])
def test_a_missing_policy_pth_is_named(request: pytest.FixtureRequest, tmp_path: Path, origin: str) -> None:
    rewrite_archive(request.getfixturevalue(f"{origin}_archive"), tmp_path / "no_weights.zip", drop=["policy.pth"])
    with pytest.raises(ValueError, match=r"no 'policy\.pth'") as info:
        SAC.load(tmp_path / "no_weights.zip")
    assert "no_weights.zip" in str(info.value)
    assert "incomplete" in str(info.value)


@pytest.mark.parametrize("missing", ["critic.qf0.0.weight", "critic.qf1.2.bias", "critic_target.qf1.0.weight"])
def test_an_sb3_archive_missing_a_critic_tensor_is_named(sb3_archive: Path, tmp_path: Path, missing: str) -> None:
    policy = _edited_state(sb3_archive, "policy.pth", lambda state: state.pop(missing))
    rewrite_archive(sb3_archive, tmp_path / "edited.zip", replace={"policy.pth": policy})
    with pytest.raises(ValueError, match="incomplete") as info:
        SAC.load(tmp_path / "edited.zip")
    assert missing in str(info.value)
    assert "edited.zip" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite weights


@pytest.mark.parametrize(("origin", "tensor"), [("ours", "actor.mu.weight"), ("sb3", "critic.qf1.0.bias")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(
    request: pytest.FixtureRequest, tmp_path: Path, origin: str, tensor: str, value: float
) -> None:
    archive = request.getfixturevalue(f"{origin}_archive")

    def poison(state: dict) -> None:
        state[tensor].view(-1)[1] = value

    rewrite_archive(
        archive, tmp_path / "diverged.zip", replace={"policy.pth": _edited_state(archive, "policy.pth", poison)}
    )
    with pytest.raises(ValueError, match="non-finite") as info:
        SAC.load(tmp_path / "diverged.zip")
    named = tensor if origin == "ours" else "critic.q_networks.0.bias"  # SB3's critics load as our ensemble
    assert named in str(info.value)
    assert "diverged.zip" in str(info.value)
    assert "earlier checkpoint" in str(info.value)


def test_non_finite_optimizer_state_is_refused(ours_archive: Path, tmp_path: Path) -> None:
    def poison(state: dict) -> None:
        state["state"][0]["exp_avg"].view(-1)[0] = float("nan")

    optimizer = _edited_state(ours_archive, "critic.optimizer.pth", poison)
    rewrite_archive(ours_archive, tmp_path / "diverged.zip", replace={"critic.optimizer.pth": optimizer})
    with pytest.raises(ValueError, match=r"critic\.optimizer\.pth"):
        SAC.load(tmp_path / "diverged.zip")


# ---------------------------------------------------------------------------------------------------------------------
# Other algorithms


@pytest.mark.parametrize(
    ("algo", "named"),
    [
        (sb3.TD3, "stable_baselines3.TD3.load"),
        (sb3.DDPG, "stable_baselines3.TD3.load"),  # DDPG is TD3's subclass and saves TD3's policies
        (sb3.DQN, "stable_baselines3.DQN.load"),
        (sb3_contrib.TQC, "sb3_contrib.TQC.load"),
    ],
)
def test_another_algorithms_archive_names_its_class(tmp_path: Path, algo: type[BaseAlgorithm], named: str) -> None:
    env_id = "CartPole-v1" if algo is sb3.DQN else "Pendulum-v1"
    algo("MlpPolicy", env_id, policy_kwargs=dict(net_arch=[8]), seed=0).save(tmp_path / "other")
    with pytest.raises(ValueError, match="is not a SAC model") as info:
        SAC.load(tmp_path / "other")
    assert named in str(info.value)
    assert "PPO" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# Replay buffers


@pytest.mark.parametrize(
    ("env_id", "n_envs", "named"),
    [
        ("MountainCarContinuous-v0", 1, "observation shape"),
        ("Pendulum-v1", 2, "number of environments"),
    ],
)
def test_a_replay_buffer_of_another_environment_is_refused_at_load(
    tmp_path: Path, env_id: str, n_envs: int, named: str
) -> None:
    source = tiny_model(SAC)
    source.save_replay_buffer(tmp_path / "buffer")
    model = SAC("MlpPolicy", make_vec_env(env_id, n_envs=n_envs), policy_kwargs=dict(net_arch=[8]), seed=0)
    own_buffer = model.replay_buffer
    with pytest.raises(ValueError, match=named) as info:
        model.load_replay_buffer(tmp_path / "buffer.pkl")
    assert "buffer.pkl" in str(info.value)
    assert "another environment" in str(info.value)
    assert model.replay_buffer is own_buffer
    model.learn(20)  # the model is as before the refused load


def test_a_replay_buffer_of_another_action_size_is_refused(tmp_path: Path) -> None:
    """Same observations, other actions: SB3 would fail inside its buffer code at the first ``add``."""
    source = SAC("MlpPolicy", "Pendulum-v1", policy_kwargs=dict(net_arch=[8]), seed=0)
    source.replay_buffer.actions = np.zeros((source.replay_buffer.buffer_size, 1, 2), np.float32)
    source.replay_buffer.action_dim = 2
    source.save_replay_buffer(tmp_path / "buffer.pkl")
    with pytest.raises(ValueError, match="action dimension 2"):
        SAC("MlpPolicy", "Pendulum-v1", policy_kwargs=dict(net_arch=[8]), seed=0).load_replay_buffer(
            tmp_path / "buffer.pkl"
        )


def test_sb3_accepts_the_mismatched_buffer_and_fails_later(tmp_path: Path) -> None:
    """Why the check exists: SB3's SAC loads the wrong buffer silently and only ``learn`` fails."""
    tiny_model(sb3.SAC).save_replay_buffer(tmp_path / "buffer.pkl")
    model = sb3.SAC("MlpPolicy", "MountainCarContinuous-v0", policy_kwargs=dict(net_arch=[8]), seed=0)
    model.load_replay_buffer(tmp_path / "buffer.pkl")
    with pytest.raises(ValueError, match="broadcast"):
        model.learn(10)


# ---------------------------------------------------------------------------------------------------------------------
# Archives from before actor_q_reduction


def _without_actor_q_reduction(data: dict) -> None:
    data.pop("actor_q_reduction", None)


def test_an_old_redq_archive_loads_with_the_mean_actor_and_a_warning(tmp_path: Path) -> None:
    model = tiny_model(SAC, critic_subset_size=2, policy_kwargs=dict(net_arch=[16], n_critics=3))
    model.save(tmp_path / "redq.zip")
    # An archive from before actor_q_reduction: critic_subset_size set, no actor_q_reduction entry.
    rewrite_archive(
        tmp_path / "redq.zip", tmp_path / "old.zip", edit_data=lambda data: data.pop("actor_q_reduction", None)
    )
    with pytest.warns(UserWarning, match="actor_q_reduction") as caught:
        loaded = SAC.load(tmp_path / "old.zip")
    message = str(caught[0].message)
    assert "'mean'" in message and "actor_q_reduction='min'" in message and "old.zip" in message
    assert loaded.actor_q_reduction == "mean"
    assert np.array_equal(actions(loaded, observations()), actions(model, observations()))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SAC.load(tmp_path / "old.zip", actor_q_reduction="min").actor_q_reduction == "min"


def test_an_old_plain_sac_archive_loads_without_a_warning(tmp_path: Path) -> None:
    tiny_model(SAC).save(tmp_path / "sac.zip")
    rewrite_archive(
        tmp_path / "sac.zip", tmp_path / "old.zip", edit_data=lambda data: data.pop("actor_q_reduction", None)
    )
    data = json.loads(__import__("zipfile").ZipFile(tmp_path / "old.zip").read("data"))
    assert data["critic_subset_size"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SAC.load(tmp_path / "old.zip", env=gym.make("Pendulum-v1"))
