"""What ``train()`` logs is the mean of what each update computed, over the updates that computed it; the settings
behind the update (``ent_coef``, ``target_entropy``) are read once."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.logger import Logger

import sb3_softac.sac
from sb3_softac import SAC


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[tuple, Any]]:
    """Record the arguments and result of every call of ``sb3_softac.sac.<name>`` while still running it."""
    calls: list[tuple[tuple, Any]] = []
    original: Callable = getattr(sb3_softac.sac, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        calls.append((args, result))
        return result

    monkeypatch.setattr(sb3_softac.sac, name, spy)
    return calls


def _float32_mean(values: list[th.Tensor]) -> float:
    return float(np.mean(np.array([v.item() for v in values], dtype=np.float32)))


@pytest.mark.parametrize("ent_coef", ["auto", 0.1])
def test_logged_values_are_means_over_the_updates_that_computed_them(
    ent_coef: str | float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four gradient steps with ``policy_delay=2``: critic statistics over 4 updates, actor ones over 2 (the autograd
    update, whose losses the spies see; the engine's statistics are compared with it in test_engine.py)."""
    model = SAC(
        "MlpPolicy",
        "Pendulum-v1",
        update_engine="autograd",
        learning_starts=64,
        batch_size=32,
        ent_coef=ent_coef,
        policy_delay=2,
        policy_kwargs=dict(net_arch=[16]),
        seed=0,
    )
    model.learn(64)
    model.set_logger(Logger(None, []))
    critic_losses = _spy(monkeypatch, "critic_loss")
    actor_losses = _spy(monkeypatch, "actor_loss")
    temperature_losses = _spy(monkeypatch, "temperature_loss")
    log_probs = _spy(monkeypatch, "expected_log_prob")
    model.train(4, 32)
    logged = model.logger.name_to_value

    assert len(critic_losses) == 4 and len(actor_losses) == len(log_probs) == 2
    assert logged["train/critic_loss"] == pytest.approx(_float32_mean([r for _, r in critic_losses]), rel=1e-6)
    assert logged["train/mean_q"] == pytest.approx(_float32_mean([a[0].mean() for a, _ in critic_losses]), rel=1e-6)
    assert logged["train/actor_loss"] == pytest.approx(_float32_mean([r for _, r in actor_losses]), rel=1e-6)
    assert logged["train/entropy"] == pytest.approx(_float32_mean([-r.mean() for _, r in log_probs]), rel=1e-6)
    assert logged["train/n_updates"] == 4
    if ent_coef == "auto":
        assert len(temperature_losses) == 2
        expected = _float32_mean([r for _, r in temperature_losses])
        assert logged["train/ent_coef_loss"] == pytest.approx(expected, rel=1e-6)
    else:
        assert not temperature_losses and "train/ent_coef_loss" not in logged
        assert logged["train/ent_coef"] == pytest.approx(0.1)


def test_entropy_settings_are_parsed_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ent_coef_reads = _spy(monkeypatch, "_parse_ent_coef")
    target_entropy_reads = _spy(monkeypatch, "_parse_target_entropy")
    model = SAC("MlpPolicy", "Pendulum-v1", ent_coef="auto_0.5", buffer_size=100, policy_kwargs=dict(net_arch=[8]))
    assert [args[0] for args, _ in ent_coef_reads] == ["auto_0.5"]
    assert [args[0] for args, _ in target_entropy_reads] == ["auto"]
    assert model.target_entropy == -1.0

    model.save(tmp_path / "model.zip")
    SAC.load(tmp_path / "model.zip")
    assert len(ent_coef_reads) == len(target_entropy_reads) == 2  # once more each for the loaded model
