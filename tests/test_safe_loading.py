"""Loading never runs code hidden in an archive when the user asks it not to.

An archive's ``data`` holds cloudpickled objects. Each test plants, in place of those pickles, a payload that
creates a marker file when unpickled. A plain load runs it (the control: the payload is live); entries given in
``custom_objects`` are never unpickled, as with SB3's loader; ``weights_only=True`` unpickles nothing at all and
still gives the model that a plain load of the clean file gives.
"""

import importlib
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import stable_baselines3 as sb3
import torch as th
from envs import actions, observations, pickled_keys, plant_payloads, rewrite_archive, tiny_model
from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit

from sb3_softac import SAC, MlpPolicy

ORIGINS = {"sb3_softac": SAC, "stable_baselines3": sb3.SAC}


@pytest.fixture(params=list(ORIGINS))
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Any]:
    """A clean archive saved by either library, and the model it holds."""
    model = tiny_model(ORIGINS[request.param])
    model.save(tmp_path / "clean.zip")
    return tmp_path / "clean.zip", model


def _poisoned(clean: Path, folder: Path, keys: list[str] | None = None) -> tuple[Path, list[Path]]:
    markers: list[Path] = []
    path = folder / "poisoned.zip"
    rewrite_archive(clean, path, edit_data=lambda data: markers.extend(plant_payloads(data, folder, keys)))
    return path, markers


def test_a_plain_load_runs_the_payload(saved: tuple[Path, Any], tmp_path: Path) -> None:
    """The control: the planted payloads are live, so their absence below means something."""
    path, markers = _poisoned(saved[0], tmp_path)
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the broken objects make the load raise
        SAC.load(path, env=gym.make("Pendulum-v1"))
    assert any(marker.exists() for marker in markers)


def test_sb3_skips_the_keys_given_in_custom_objects(tmp_path: Path) -> None:
    """The contract being matched: SB3's own loader does not unpickle an entry given in ``custom_objects``."""
    tiny_model(sb3.SAC).save(tmp_path / "clean.zip")
    path, markers = _poisoned(tmp_path / "clean.zip", tmp_path, ["policy_class"])
    sb3.SAC.load(path, custom_objects={"policy_class": sb3.sac.policies.MlpPolicy})
    assert not markers[0].exists()


def test_keys_given_in_custom_objects_are_never_unpickled(saved: tuple[Path, Any], tmp_path: Path) -> None:
    clean, model = saved
    keys = ["policy_class", "observation_space", "action_space", "lr_schedule"]
    path, markers = _poisoned(clean, tmp_path, keys)
    env = gym.make("Pendulum-v1")
    custom_objects = {
        "policy_class": MlpPolicy,
        "observation_space": env.observation_space,
        "action_space": env.action_space,
        "lr_schedule": lambda _: 3e-4,
    }
    loaded = SAC.load(path, custom_objects=custom_objects)
    assert [marker for marker in markers if marker.exists()] == []
    assert np.array_equal(actions(loaded, observations()), actions(model, observations()))


def test_weights_only_unpickles_nothing_and_gives_the_same_model(saved: tuple[Path, Any], tmp_path: Path) -> None:
    clean, model = saved
    path, markers = _poisoned(clean, tmp_path)
    assert {marker.name for marker in markers} >= {
        "marker_policy_class",
        "marker_observation_space",
        "marker_train_freq",
    }

    # A train_freq pickle is read by comparing it with the pickles of candidate values, never by running it: the
    # payload in its place matches none, so it is refused, with what to pass instead.
    with pytest.raises(ValueError, match=r"\['train_freq'\]"):
        SAC.load(path, env=gym.make("Pendulum-v1"), weights_only=True)
    loaded = SAC.load(
        path,
        env=gym.make("Pendulum-v1"),
        weights_only=True,
        custom_objects={"train_freq": TrainFreq(1, TrainFrequencyUnit.STEP)},
    )
    assert [marker for marker in markers if marker.exists()] == []
    reference = SAC.load(clean, env=gym.make("Pendulum-v1"))
    obs = observations()
    assert np.array_equal(actions(loaded, obs), actions(reference, obs))
    assert np.array_equal(actions(loaded, obs), actions(model, obs))
    assert type(loaded.policy) is type(reference.policy)
    for name in ("num_timesteps", "_n_updates", "learning_rate", "train_freq", "replay_buffer_class", "policy_kwargs"):
        assert getattr(loaded, name) == getattr(reference, name), name
    assert loaded.lr_schedule(0.5) == reference.lr_schedule(0.5)
    assert SAC.load(clean, env=gym.make("Pendulum-v1"), weights_only=True).train_freq == reference.train_freq
    # It trains on from where it was saved.
    loaded.learn(10, reset_num_timesteps=False)
    assert loaded.num_timesteps == model.num_timesteps + 10


def test_weights_only_reads_train_freq_in_episodes(tmp_path: Path) -> None:
    model = tiny_model(SAC, train_freq=(2, "episode"))
    model.save(tmp_path / "model.zip")
    loaded = SAC.load(tmp_path / "model.zip", env=gym.make("Pendulum-v1"), weights_only=True)
    assert loaded.train_freq == TrainFreq(2, TrainFrequencyUnit.EPISODE)


def test_weights_only_reads_classes_in_policy_kwargs_from_trusted_modules(tmp_path: Path) -> None:
    model = tiny_model(SAC, policy_kwargs=dict(net_arch=[16], activation_fn=th.nn.Tanh, optimizer_class=th.optim.AdamW))
    model.save(tmp_path / "model.zip")
    assert "policy_kwargs" in pickled_keys(tmp_path / "model.zip")
    loaded = SAC.load(tmp_path / "model.zip", env=gym.make("Pendulum-v1"), weights_only=True)
    assert loaded.policy_kwargs["activation_fn"] is th.nn.Tanh
    assert isinstance(loaded.actor.optimizer, th.optim.AdamW)
    assert np.array_equal(actions(loaded, observations()), actions(model, observations()))


def test_weights_only_lists_what_to_pass(tmp_path: Path) -> None:
    model = tiny_model(SAC, learning_rate=lambda progress: 1e-3 * progress)
    model.save(tmp_path / "model.zip")
    with pytest.raises(ValueError, match="weights_only") as info:
        SAC.load(tmp_path / "model.zip", weights_only=True)
    message = str(info.value)
    for named in ("model.zip", "env", "custom_objects", "learning_rate", "observation_space", "action_space"):
        assert named in message, named
    loaded = SAC.load(
        tmp_path / "model.zip", env=gym.make("Pendulum-v1"), weights_only=True, custom_objects={"learning_rate": 1e-3}
    )
    assert loaded.learning_rate == 1e-3


def test_weights_only_refuses_an_env_of_another_shape(tmp_path: Path) -> None:
    tiny_model(SAC).save(tmp_path / "model.zip")
    with pytest.raises(ValueError, match="observation_space") as info:
        SAC.load(tmp_path / "model.zip", env=gym.make("MountainCarContinuous-v0"), weights_only=True)
    assert "(3,)" in str(info.value) or "[3]" in str(info.value)


def test_refusing_another_algorithm_unpickles_nothing(tmp_path: Path) -> None:
    tiny_model(sb3.TD3).save(tmp_path / "td3.zip")
    path, markers = _poisoned(tmp_path / "td3.zip", tmp_path, ["policy_class"])
    with pytest.raises(ValueError, match=r"stable_baselines3\.TD3\.load"):
        SAC.load(path)
    assert not markers[0].exists()


@pytest.mark.parametrize("algo", [SAC, sb3.SAC])
def test_a_policy_class_whose_module_is_gone_loads_with_custom_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algo: type
) -> None:
    """As with SB3: the saved class cannot be imported any more, and ``custom_objects`` supplies one."""
    base = "sb3_softac.policies.SACPolicy" if algo is SAC else "stable_baselines3.sac.policies.SACPolicy"
    module, name = base.rsplit(".", 1)
    gone = f"gone_policies_{module.split('.')[0]}"  # one name per library: sys.modules outlives the test
    (tmp_path / f"{gone}.py").write_text(f"from {module} import {name}\n\nclass MyPolicy({name}):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    policy_class = importlib.import_module(gone).MyPolicy

    model = algo(policy_class, gym.make("Pendulum-v1"), policy_kwargs=dict(net_arch=[16]), seed=0)
    model.save(tmp_path / "model.zip")
    monkeypatch.delitem(sys.modules, gone)
    (tmp_path / f"{gone}.py").unlink()

    with pytest.raises(ModuleNotFoundError):
        SAC.load(tmp_path / "model.zip")
    loaded = SAC.load(tmp_path / "model.zip", custom_objects={"policy_class": MlpPolicy})
    assert type(loaded.policy) is MlpPolicy
    assert np.array_equal(actions(loaded, observations()), actions(model, observations()))
    # The same file for SB3, the reference behaviour.
    if algo is sb3.SAC:
        sb3.SAC.load(tmp_path / "model.zip", custom_objects={"policy_class": sb3.sac.policies.MlpPolicy})
