"""Every file sb3_softac writes appears whole or not at all: a failed save keeps the previous file and leaves no
temporary file behind.

The failures are injected: ``os.fsync`` raising ``ENOSPC`` (a full disk reports there at the latest), an exception
from inside the serialiser, and, on Linux, a real write that hits a file-size limit half-way (``RLIMIT_FSIZE``, the
closest to a full disk that needs no mount).
"""

import errno
import io
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import stable_baselines3 as sb3
from envs import actions, observations, tiny_model
from stable_baselines3.common.callbacks import CheckpointCallback, EvalCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_softac import SAC, MlpPolicy, atomic_files


@pytest.fixture
def model() -> SAC:
    return tiny_model(SAC)


def _no_space(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _folder_listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# name -> (save into path, check that the file at path is the first save's)
def _savers(model: SAC) -> dict[str, tuple[Callable[[Path], None], Callable[[Path], None]]]:
    obs = observations()
    expected = actions(model, obs)
    buffer_size, buffer_observations = model.replay_buffer.size(), model.replay_buffer.observations.copy()

    def same_model(path: Path) -> None:
        assert np.array_equal(actions(SAC.load(path), obs), expected)

    def same_buffer(path: Path) -> None:
        fresh = tiny_model(SAC, steps=1)
        fresh.load_replay_buffer(path)
        assert fresh.replay_buffer.size() == buffer_size
        assert np.array_equal(fresh.replay_buffer.observations, buffer_observations)

    def same_policy(path: Path) -> None:
        assert np.array_equal(MlpPolicy.load(path).predict(obs, deterministic=True)[0], expected)

    def same_sb3_model(path: Path) -> None:
        assert np.array_equal(actions(sb3.SAC.load(path), obs), expected)

    def same_sb3_policy(path: Path) -> None:
        policy = sb3.sac.policies.MlpPolicy.load(path)
        assert np.array_equal(policy.predict(obs, deterministic=True)[0], expected)

    return {
        "save": (model.save, same_model),
        "save_replay_buffer": (model.save_replay_buffer, same_buffer),
        "save_as_sb3": (model.save_as_sb3, same_sb3_model),
        "policy.save": (model.policy.save, same_policy),
        "policy.save_as_sb3": (model.policy.save_as_sb3, same_sb3_policy),
    }


SAVERS = ["save", "save_replay_buffer", "save_as_sb3", "policy.save", "policy.save_as_sb3"]
SUFFIX = {"save": ".zip", "save_replay_buffer": ".pkl", "save_as_sb3": ".zip", "policy.save": ".pth"}


@pytest.mark.parametrize("saver", SAVERS)
def test_a_full_disk_keeps_the_previous_file(
    model: SAC, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saver: str
) -> None:
    save, is_first_save = _savers(model)[saver]
    path = tmp_path / f"latest{SUFFIX.get(saver, '.pth')}"
    save(path)
    before = path.read_bytes()
    model.learn(20, reset_num_timesteps=False)  # the model (and buffer) change: a second save would differ

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", _no_space)
        with pytest.raises(OSError, match="No space left") as info:
            save(path)
    assert info.value.errno == errno.ENOSPC
    assert _folder_listing(tmp_path) == [path.name]
    assert path.read_bytes() == before
    is_first_save(path)


def test_an_error_while_serialising_keeps_the_previous_model(
    model: SAC, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model.save(tmp_path / "latest.zip")
    before = (tmp_path / "latest.zip").read_bytes()

    def failing_writestr(self: zipfile.ZipFile, name: str, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"interrupted while writing {name}")

    with monkeypatch.context() as patch:
        patch.setattr(zipfile.ZipFile, "writestr", failing_writestr)
        with pytest.raises(RuntimeError, match="interrupted"):
            model.save(tmp_path / "latest.zip")
    assert _folder_listing(tmp_path) == ["latest.zip"]
    assert (tmp_path / "latest.zip").read_bytes() == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE with SIGXFSZ ignored is Linux's")
def test_a_write_cut_off_half_way_keeps_the_previous_model(model: SAC, tmp_path: Path) -> None:
    """A real short write: the process may not grow a file past a limit smaller than the model."""
    import resource
    import signal

    model.save(tmp_path / "latest.zip")
    before = (tmp_path / "latest.zip").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
    try:
        with pytest.raises(OSError, match="too large") as info:
            model.save(tmp_path / "latest.zip")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert info.value.errno == errno.EFBIG
    assert _folder_listing(tmp_path) == ["latest.zip"]
    assert (tmp_path / "latest.zip").read_bytes() == before
    assert np.array_equal(actions(SAC.load(tmp_path / "latest.zip"), observations()), actions(model, observations()))


@pytest.mark.parametrize(
    ("name", "written"),
    [
        ("model", "model.zip"),
        ("model.zip", "model.zip"),
        ("run_lr0.001", "run_lr0.001"),
        ("a/b/model", "a/b/model.zip"),
    ],
)
def test_the_paths_are_sb3s(model: SAC, tmp_path: Path, name: str, written: str) -> None:
    """Same names as SB3's ``save``: ``.zip`` only for a name without suffix, missing folders created."""
    reference = sb3.SAC("MlpPolicy", "Pendulum-v1", policy_kwargs=dict(net_arch=[8]))
    for library, saver in (("ours", model), ("sb3", reference)):
        (tmp_path / library).mkdir()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            saver.save(tmp_path / library / name)
        assert any("does not exist" in str(warning.message) for warning in caught) == ("/" in name)
        listing = {
            str(path.relative_to(tmp_path / library)) for path in (tmp_path / library).rglob("*") if path.is_file()
        }
        assert listing == {written}, library


def test_a_folder_in_the_way_is_saved_beside_as_sb3_does(model: SAC, tmp_path: Path) -> None:
    (tmp_path / "model.zip").mkdir()
    with pytest.warns(UserWarning, match="is a folder"):
        model.save(tmp_path / "model.zip")
    assert (tmp_path / "model.zip_2").is_file()


def test_streams_are_written_as_before(model: SAC) -> None:
    stream = io.BytesIO()
    model.save(stream)
    assert stream.tell() > 0  # written in place, not closed
    stream.seek(0)
    assert np.array_equal(actions(SAC.load(stream), observations()), actions(model, observations()))
    buffer_stream = io.BytesIO()
    model.save_replay_buffer(buffer_stream)
    assert pickle.loads(buffer_stream.getvalue()).size() == model.replay_buffer.size()


def test_new_files_get_the_permissions_of_a_plain_open(model: SAC, tmp_path: Path) -> None:
    """The temporary file is created as ``open`` creates files (0o666 minus the umask), not 0o600."""
    model.save(tmp_path / "ours.zip")
    with open(tmp_path / "plain.zip", "wb"):
        pass
    assert (tmp_path / "ours.zip").stat().st_mode == (tmp_path / "plain.zip").stat().st_mode


def test_eval_callback_best_model_is_saved_atomically(
    model: SAC, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``EvalCallback`` writes ``best_model.zip`` through ``model.save``: a failed save keeps the last best model."""
    callback = EvalCallback(
        Monitor(gym.make("Pendulum-v1")), best_model_save_path=str(tmp_path), eval_freq=10, n_eval_episodes=1
    )
    model.learn(10, callback=callback, reset_num_timesteps=False)
    best = (tmp_path / "best_model.zip").read_bytes()
    callback.best_mean_reward = -np.inf  # the next evaluation is a new best
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", _no_space)
        with pytest.raises(OSError, match="No space left"):
            model.learn(10, callback=callback, reset_num_timesteps=False)
    assert _folder_listing(tmp_path) == ["best_model.zip"]
    assert (tmp_path / "best_model.zip").read_bytes() == best


@pytest.mark.parametrize("vec_normalize_class", [atomic_files.AtomicVecNormalize, VecNormalize])
def test_checkpoint_callback_writes_through_the_atomic_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vec_normalize_class: type[VecNormalize]
) -> None:
    """``CheckpointCallback`` saves through ``model.save`` and ``save_replay_buffer``, which are atomic; its
    ``VecNormalize`` file is atomic only with :class:`~sb3_softac.atomic_files.AtomicVecNormalize`."""
    atomic: list[str] = []
    write_atomically = atomic_files.write_atomically

    def recording(destination: Any, write: Any, suffix: str | None = None) -> None:
        atomic.append(Path(destination).name)
        write_atomically(destination, write, suffix)

    monkeypatch.setattr(atomic_files, "write_atomically", recording)
    env = vec_normalize_class(DummyVecEnv([lambda: gym.make("Pendulum-v1")]))
    model = SAC("MlpPolicy", env, policy_kwargs=dict(net_arch=[8]), learning_starts=5, batch_size=8, seed=0)
    model.learn(10, callback=CheckpointCallback(10, str(tmp_path), save_replay_buffer=True, save_vecnormalize=True))

    written = ["rl_model_10_steps.zip", "rl_model_replay_buffer_10_steps.pkl", "rl_model_vecnormalize_10_steps.pkl"]
    assert _folder_listing(tmp_path) == written
    expected = written if vec_normalize_class is atomic_files.AtomicVecNormalize else written[:2]
    assert sorted(atomic) == expected
    statistics = VecNormalize.load(str(tmp_path / written[2]), DummyVecEnv([lambda: gym.make("Pendulum-v1")]))
    assert type(statistics) is vec_normalize_class
    assert np.array_equal(statistics.obs_rms.mean, env.obs_rms.mean)


def test_sb3_vec_normalize_save_is_not_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``AtomicVecNormalize`` is for: SB3's ``VecNormalize.save`` writes in place, so a failure mid-write
    destroys the previous statistics file."""
    env = VecNormalize(DummyVecEnv([lambda: gym.make("Pendulum-v1")]))
    env.save(str(tmp_path / "stats.pkl"))

    def failing_dump(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(pickle, "dump", failing_dump)
        with pytest.raises(OSError, match="No space"):
            env.save(str(tmp_path / "stats.pkl"))
        with pytest.raises(OSError, match="No space"):
            atomic_files.AtomicVecNormalize(DummyVecEnv([lambda: gym.make("Pendulum-v1")])).save(
                tmp_path / "atomic.pkl"
            )
    assert (tmp_path / "stats.pkl").stat().st_size == 0  # SB3's file is gone
    assert _folder_listing(tmp_path) == ["stats.pkl"]  # ours left nothing
