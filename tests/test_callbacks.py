"""SB3's callbacks and progress bar drive ``sb3_softac.SAC``: evaluation, checkpoints, early stopping, lists."""

import numpy as np
import pytest
from envs import Recorder, VectorBoxEnv, box_vec_env, make_sac
from stable_baselines3.common.callbacks import (
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    StopTrainingOnRewardThreshold,
)
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecNormalize

import sb3_softac
from sb3_softac import SAC


def test_eval_callback_writes_evaluations_and_best_model(tmp_path, box_env) -> None:
    eval_env = Monitor(VectorBoxEnv())
    eval_env.reset(seed=1)
    callback = EvalCallback(
        eval_env, eval_freq=50, n_eval_episodes=2, log_path=str(tmp_path), best_model_save_path=str(tmp_path)
    )
    model = make_sac(box_env).learn(150, callback=callback)

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
    env = VecNormalize(box_vec_env())
    callback = CheckpointCallback(
        save_freq=50, save_path=str(tmp_path), name_prefix="sac", save_replay_buffer=True, save_vecnormalize=True
    )
    make_sac(env).learn(150, callback=callback)

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
    stats = VecNormalize.load(str(tmp_path / "sac_vecnormalize_100_steps.pkl"), box_vec_env())
    assert stats.obs_rms.count == pytest.approx(100, abs=2)


def test_stop_training_on_reward_threshold_stops_early(box_env) -> None:
    # Every return of VectorBoxEnv is > -1e6, so the first evaluation stops training.
    stop = StopTrainingOnRewardThreshold(reward_threshold=-1e6)
    eval_env = Monitor(VectorBoxEnv())
    callback = EvalCallback(eval_env, callback_on_new_best=stop, eval_freq=60, n_eval_episodes=1)
    model = make_sac(box_env).learn(1_000, callback=callback)
    assert model.num_timesteps == 60
    assert model.num_timesteps < 1_000


def test_callback_list_runs_every_callback(tmp_path, box_env) -> None:
    recorder = Recorder()
    checkpoint = CheckpointCallback(save_freq=80, save_path=str(tmp_path), name_prefix="m")
    make_sac(box_env).learn(200, callback=CallbackList([recorder, checkpoint]))
    assert recorder.timesteps == list(range(1, 201))
    assert checkpoint.n_calls == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_160_steps.zip", "m_80_steps.zip"]


def test_progress_bar(box_env, capsys) -> None:
    pytest.importorskip("tqdm")
    pytest.importorskip("rich")
    model = make_sac(box_env).learn(120, progress_bar=True)
    assert model.num_timesteps == 120
    captured = capsys.readouterr()
    assert "120/120" in captured.out + captured.err
