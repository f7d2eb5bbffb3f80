"""Nothing is lost when a run is interrupted, and exactly what a resumed run repeats of an uninterrupted one.

A run with ``CheckpointCallback(save_replay_buffer=True, save_vecnormalize=True)`` is killed with SIGKILL and
restarted from its last checkpoint: the model, replay buffer and VecNormalize statistics are the ones the run held.

What a resume reproduces (measured on CPU, one thread, ``DummyVecEnv``, fixed seed; see docs/files-and-safe-loading.md):

* the checkpoint restores, bit for bit, what the run held when the callback ran. ``CheckpointCallback`` runs in the
  middle of environment step N: after ``env.step`` but before the transition is stored and before that step's
  gradient update, so the files hold N - 1 transitions and one gradient step fewer than a run that carries on;
* a resumed run is reproducible: ``SAC.load`` re-seeds numpy, torch, the action space and the environment with the
  saved seed (``_setup_model`` calls ``set_random_seed``), whatever the process did before;
* it is not the uninterrupted run: the random generators restart from the seed and the environments are reset
  (their first observation is the run's very first one again), so new transitions and parameters differ;
* splitting ``learn`` in one process is exact, and so is a resume from disk at a ``learn`` boundary when the state
  SB3 does not save is carried over too: torch's and numpy's generator states, the environments themselves,
  VecNormalize's running returns and ``_last_obs`` (``force_reset=False``).
"""

import copy
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from envs import make_sac
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.save_util import load_from_pkl
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_softac import SAC

SEED = 0
LEARNING_STARTS = 50
N = 100  # checkpoint step
M = 50  # steps after the checkpoint
KWARGS = dict(
    learning_starts=LEARNING_STARTS,
    batch_size=32,
    buffer_size=5_000,
    policy_kwargs=dict(net_arch=[32, 32]),
    device="cpu",
)
FIELDS = ("observations", "actions", "rewards", "next_observations", "dones", "timeouts")


def _vec_env() -> DummyVecEnv:
    return DummyVecEnv([lambda: Monitor(gym.make("Pendulum-v1"))])


def _new_model() -> SAC:
    return make_sac(VecNormalize(_vec_env()), seed=SEED, **KWARGS)


def _snapshot(model: SAC) -> dict[str, Any]:
    """Everything training depends on that the checkpoint files are meant to hold."""
    buffer = model.replay_buffer
    vec_normalize = model.get_vec_normalize_env()
    return dict(
        num_timesteps=model.num_timesteps,
        n_updates=model._n_updates,
        pos=buffer.pos,
        buffer={name: getattr(buffer, name)[: buffer.pos].copy() for name in FIELDS},
        params={name: value.clone() for name, value in model.policy.state_dict().items()},
        optimizers=[
            copy.deepcopy(optimizer.state_dict())
            for optimizer in (model.actor.optimizer, model.critic.optimizer, model.ent_coef_optimizer)
        ],
        log_ent_coef=model.log_ent_coef.detach().clone(),
        obs_rms=(vec_normalize.obs_rms.mean.copy(), vec_normalize.obs_rms.var.copy(), vec_normalize.obs_rms.count),
        ret_rms=(vec_normalize.ret_rms.mean.copy(), vec_normalize.ret_rms.var.copy(), vec_normalize.ret_rms.count),
    )


def _equal(first: Any, second: Any) -> bool:
    """Bit-equality of nested snapshots."""
    if isinstance(first, dict):
        return first.keys() == second.keys() and all(_equal(first[key], second[key]) for key in first)
    if isinstance(first, (list, tuple)):
        return len(first) == len(second) and all(_equal(a, b) for a, b in zip(first, second, strict=True))
    if isinstance(first, th.Tensor):
        return th.equal(first, second)
    if isinstance(first, np.ndarray):
        return first.shape == second.shape and np.array_equal(first, second)
    return first == second


def _differing(first: dict[str, Any], second: dict[str, Any]) -> set[str]:
    return {key for key in first if not _equal(first[key], second[key])}


def _checkpoint_files(folder: Path, step: int) -> tuple[Path, Path, Path]:
    """The files ``CheckpointCallback(name_prefix="rl_model")`` writes at ``step``."""
    return (
        folder / f"rl_model_{step}_steps.zip",
        folder / f"rl_model_replay_buffer_{step}_steps.pkl",
        folder / f"rl_model_vecnormalize_{step}_steps.pkl",
    )


def _resume(folder: Path, step: int, **load_kwargs: Any) -> SAC:
    model_path, buffer_path, vec_normalize_path = _checkpoint_files(folder, step)
    env = VecNormalize.load(str(vec_normalize_path), _vec_env())
    model = SAC.load(model_path, env=env, **load_kwargs)
    model.load_replay_buffer(buffer_path)
    return model


class _SnapshotAt(BaseCallback):
    """Records the model's in-memory state when the step counter reaches ``step`` (after the checkpoint)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step
        self.snapshot: dict[str, Any] | None = None

    def _on_step(self) -> bool:
        if self.num_timesteps == self.step:
            self.snapshot = _snapshot(self.model)
        return True


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of N + M steps that writes a checkpoint at step N along the way."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    model = _new_model()
    at_checkpoint = _SnapshotAt(N)
    checkpoint = CheckpointCallback(N, str(folder), save_replay_buffer=True, save_vecnormalize=True)
    model.learn(N + M, callback=[checkpoint, at_checkpoint])
    return dict(folder=folder, at_checkpoint=at_checkpoint.snapshot, final=_snapshot(model))


# ---------------------------------------------------------------------------------------------------------------------
# Nothing lost: a run killed with SIGKILL restarts from its last checkpoint

TRAINING_SCRIPT = """
import os
import sys

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.callbacks import CheckpointCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_softac import SAC

th.set_num_threads(1)
FIELDS = {fields!r}


class CheckpointAndRecord(CheckpointCallback):
    # Saves like CheckpointCallback, then records what the run holds in memory at that moment.

    def _on_step(self):
        saving = self.n_calls % self.save_freq == 0
        result = super()._on_step()
        if saving:
            buffer, vec_normalize = self.model.replay_buffer, self.model.get_vec_normalize_env()
            record = {{name: getattr(buffer, name)[: buffer.pos] for name in FIELDS}}
            record.update(
                num_timesteps=self.num_timesteps,
                pos=buffer.pos,
                log_ent_coef=self.model.log_ent_coef.detach().numpy(),
                obs_mean=vec_normalize.obs_rms.mean,
                obs_var=vec_normalize.obs_rms.var,
                ret_var=vec_normalize.ret_rms.var,
            )
            record.update({{"param " + k: v.numpy() for k, v in self.model.policy.state_dict().items()}})
            path = os.path.join(self.save_path, f"memory_{{self.num_timesteps}}.npz")
            with open(path + ".tmp", "wb") as file:
                np.savez(file, **record)
            os.replace(path + ".tmp", path)  # a complete record, or none
        return result


env = VecNormalize(DummyVecEnv([lambda: Monitor(gym.make("Pendulum-v1"))]))
model = SAC("MlpPolicy", env, seed={seed}, **{kwargs!r})
callback = CheckpointAndRecord({save_freq}, sys.argv[1], save_replay_buffer=True, save_vecnormalize=True)
model.learn(1_000_000, callback=callback)
"""


def _wait_for_record(process: subprocess.Popen, folder: Path, min_step: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(int(path.stem.split("_")[1]) >= min_step for path in folder.glob("memory_*.npz")):
            return
        if process.poll() is not None:
            log = (folder.parent / "stderr.txt").read_text(encoding="utf-8")
            pytest.fail(f"the training script exited with {process.returncode}:\n{log[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no checkpoint at step >= {min_step} after {timeout} s")


def test_killed_run_resumes_with_nothing_lost(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAINING_SCRIPT.format(fields=FIELDS, seed=SEED, kwargs=KWARGS, save_freq=25), encoding="utf-8")
    folder = tmp_path / "checkpoints"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(tmp_path / "stderr.txt", "w", encoding="utf-8") as stderr:  # a file: a full pipe would block it
        process = subprocess.Popen([sys.executable, str(script), str(folder)], cwd=tmp_path, env=env, stderr=stderr)
        try:
            _wait_for_record(process, folder, min_step=N)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    # A record is written after the three checkpoint files of its step, so those are complete; a later checkpoint
    # may be half-written, which is why the restart takes the latest recorded step.
    step = max(int(path.stem.split("_")[1]) for path in folder.glob("memory_*.npz"))
    memory = np.load(folder / f"memory_{step}.npz")
    model = _resume(folder, step)

    assert model.num_timesteps == step == int(memory["num_timesteps"])
    buffer = model.replay_buffer
    saved_buffer = load_from_pkl(_checkpoint_files(folder, step)[1])
    assert buffer.pos == saved_buffer.pos == int(memory["pos"]) == step - 1
    for name in FIELDS:
        assert np.array_equal(getattr(buffer, name), getattr(saved_buffer, name)), name
        assert np.array_equal(getattr(buffer, name)[: buffer.pos], memory[name]), name
    assert np.array_equal(model.log_ent_coef.detach().numpy(), memory["log_ent_coef"])
    for name, value in model.policy.state_dict().items():
        assert np.array_equal(value.numpy(), memory[f"param {name}"]), name
    vec_normalize = model.get_vec_normalize_env()
    assert np.array_equal(vec_normalize.obs_rms.mean, memory["obs_mean"])
    assert np.array_equal(vec_normalize.obs_rms.var, memory["obs_var"])
    assert np.array_equal(vec_normalize.ret_rms.var, memory["ret_var"])

    model.learn(M, reset_num_timesteps=False)
    assert model.num_timesteps == step + M
    assert buffer.pos == step - 1 + M
    for name in FIELDS:
        assert np.array_equal(getattr(buffer, name)[: step - 1], memory[name]), name
    assert not np.array_equal(model.log_ent_coef.detach().numpy(), memory["log_ent_coef"])


# ---------------------------------------------------------------------------------------------------------------------
# What a resumed run repeats


def test_checkpoint_is_taken_in_the_middle_of_its_step(uninterrupted: dict[str, Any]) -> None:
    at_checkpoint = uninterrupted["at_checkpoint"]
    loaded = _snapshot(_resume(uninterrupted["folder"], N))
    assert _equal(loaded, at_checkpoint), _differing(loaded, at_checkpoint)
    # Step N's transition and its gradient step come after the callbacks run.
    assert loaded["num_timesteps"] == N
    assert loaded["pos"] == N - 1
    assert loaded["n_updates"] == N - 1 - LEARNING_STARTS
    # VecNormalize has seen the first reset's observation and N step observations (count starts at 1e-4).
    assert loaded["obs_rms"][2] == pytest.approx(N + 1, abs=1e-3)


def test_resumed_run_is_reproducible(uninterrupted: dict[str, Any]) -> None:
    first = _resume(uninterrupted["folder"], N).learn(M, reset_num_timesteps=False)
    # Whatever the process draws in between, load re-seeds every generator with the saved seed.
    np.random.rand(17)  # noqa: NPY002 - SB3 samples its replay buffer from numpy's global generator
    th.rand(17)
    second = _resume(uninterrupted["folder"], N).learn(M, reset_num_timesteps=False)
    first_state, second_state = _snapshot(first), _snapshot(second)
    assert _equal(first_state, second_state), _differing(first_state, second_state)


def test_resumed_run_keeps_the_past_but_not_the_future(uninterrupted: dict[str, Any]) -> None:
    final = uninterrupted["final"]
    resumed = _snapshot(_resume(uninterrupted["folder"], N).learn(M, reset_num_timesteps=False))
    assert resumed["num_timesteps"] == final["num_timesteps"] == N + M
    # One transition and one gradient step fewer: those of step N, which the checkpoint came before.
    assert resumed["pos"] == final["pos"] - 1
    assert resumed["n_updates"] == final["n_updates"] - 1
    for name in FIELDS:
        assert np.array_equal(resumed["buffer"][name][: N - 1], final["buffer"][name][: N - 1]), name
    # The environment is reset with the saved seed: the resumed run starts again from the run's first state.
    assert np.array_equal(resumed["buffer"]["observations"][N - 1], final["buffer"]["observations"][0])
    assert not np.array_equal(resumed["buffer"]["observations"][N - 1], final["buffer"]["observations"][N - 1])
    # From there on the trajectories and the updates differ.
    assert {"params", "optimizers", "log_ent_coef", "obs_rms", "ret_rms"} <= _differing(resumed, final)


def _generator_and_env_state(model: SAC) -> bytes:
    """What SB3's files leave out: the random generators, the environments and VecNormalize's running returns."""
    vec_normalize = model.get_vec_normalize_env()
    return pickle.dumps(
        dict(
            torch=th.get_rng_state(),
            numpy=np.random.get_state(),  # noqa: NPY002 - the global generator SB3 samples minibatches from
            envs=vec_normalize.venv.envs,
            returns=vec_normalize.returns,
        )
    )


def test_resume_at_a_learn_boundary_with_generators_and_envs_is_exact(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    final = uninterrupted["final"]
    model = _new_model().learn(N)
    model.save(tmp_path / "model")
    model.save_replay_buffer(tmp_path / "buffer")
    model.get_vec_normalize_env().save(str(tmp_path / "vec_normalize.pkl"))
    extra = _generator_and_env_state(model)

    # Two learn calls in one process are one run.
    split = _snapshot(model.learn(M, reset_num_timesteps=False))
    assert _equal(split, final), _differing(split, final)

    # From disk: the files plus the state SB3 does not save give the uninterrupted run bit for bit.
    env = VecNormalize.load(str(tmp_path / "vec_normalize.pkl"), _vec_env())
    resumed = SAC.load(tmp_path / "model", env=env, force_reset=False)  # keep the saved _last_obs
    resumed.load_replay_buffer(tmp_path / "buffer")
    state = pickle.loads(extra)
    th.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    env.venv.envs, env.returns = state["envs"], state["returns"]
    exact = _snapshot(resumed.learn(M, reset_num_timesteps=False))
    assert _equal(exact, final), _differing(exact, final)


def test_resume_at_a_learn_boundary_without_generators_is_not_exact(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    model = _new_model().learn(N)
    model.save(tmp_path / "model")
    model.save_replay_buffer(tmp_path / "buffer")
    model.get_vec_normalize_env().save(str(tmp_path / "vec_normalize.pkl"))
    before = _snapshot(model)

    env = VecNormalize.load(str(tmp_path / "vec_normalize.pkl"), _vec_env())
    resumed = SAC.load(tmp_path / "model", env=env)
    resumed.load_replay_buffer(tmp_path / "buffer")
    loaded = _snapshot(resumed)
    assert _equal(loaded, before), _differing(loaded, before)  # at a learn boundary all N transitions are saved

    final = uninterrupted["final"]
    after = _snapshot(resumed.learn(M, reset_num_timesteps=False))
    assert after["pos"] == final["pos"] and after["n_updates"] == final["n_updates"]
    assert {"params", "log_ent_coef", "obs_rms"} <= _differing(after, final)


def test_fresh_environment_cannot_continue_an_episode(tmp_path: Path) -> None:
    """``force_reset=False`` keeps the saved ``_last_obs``, but a new environment must still be reset first."""
    model = _new_model().learn(LEARNING_STARTS + 5)
    model.save(tmp_path / "model")
    env = VecNormalize(_vec_env())
    resumed = SAC.load(tmp_path / "model", env=env, force_reset=False)
    with pytest.raises(RuntimeError, match="reset"):  # Monitor refuses to step an environment never reset
        resumed.learn(5, reset_num_timesteps=False)
