"""What training writes through SB3's logger: the keys of progress.csv and TensorBoard event files."""

import importlib.util

import numpy as np
import pandas as pd
import pytest
from envs import make_sac
from stable_baselines3.common.logger import configure


def test_logger_keys_in_progress_csv(tmp_path, box_env) -> None:
    model = make_sac(box_env)
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


def test_tensorboard_log(tmp_path, box_env) -> None:
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed")
    model = make_sac(box_env, tensorboard_log=str(tmp_path)).learn(100, tb_log_name="softac")
    runs = list(tmp_path.glob("softac_*"))
    assert len(runs) == 1
    assert any(p.name.startswith("events.out.tfevents") for p in runs[0].iterdir())
    assert model.num_timesteps == 100
