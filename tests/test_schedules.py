"""Learning-rate schedules reach every optimizer (actor, critics, temperature), follow the training progress,
apply after they are replaced on a built model, and the critics' own schedule (``qf_learning_rate``) is separate."""

import itertools

import numpy as np
import pytest
from envs import Recorder, filled_sac, make_sac

from sb3_softac import SAC


def _lrs(model: SAC) -> dict[str, float]:
    optimizers = {"actor": model.actor.optimizer, "critic": model.critic.optimizer, "alpha": model.ent_coef_optimizer}
    return {name: opt.param_groups[0]["lr"] for name, opt in optimizers.items() if opt is not None}


def test_learning_rate_schedule_changes_every_optimizer(box_env) -> None:
    def schedule(progress_remaining: float) -> float:
        return 1e-3 * (0.5 + 0.5 * progress_remaining)

    model = make_sac(box_env, learning_rate=schedule)
    for optimizer in (model.actor.optimizer, model.critic.optimizer, model.ent_coef_optimizer):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    recorder = Recorder()
    model.learn(200, callback=recorder)
    # learning rates are updated at each train call, from the progress after the previous step
    lrs = recorder.learning_rates[51:]
    assert len(set(lrs)) > 100
    assert all(a > b for a, b in itertools.pairwise(lrs))
    expected = schedule(1.0 - 200 / 200)
    for optimizer in (model.actor.optimizer, model.critic.optimizer, model.ent_coef_optimizer):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=0.02)


def test_replaced_lr_schedule_applies_to_all_optimizers(box_env) -> None:
    model = make_sac(box_env, learning_starts=10, batch_size=8, policy_kwargs=dict(net_arch=[8]))
    model.learn(20)
    model.lr_schedule = lambda _: 0.0  # SB3's own tests freeze training this way
    model.train(gradient_steps=1, batch_size=8)
    assert _lrs(model) == {"actor": 0.0, "critic": 0.0, "alpha": 0.0}


def test_qf_learning_rate_schedule_is_separate(box_env) -> None:
    model = make_sac(
        box_env,
        learning_rate=1e-3,
        qf_learning_rate=lambda progress: 2e-3 * progress,
        learning_starts=10,
        batch_size=8,
        policy_kwargs=dict(net_arch=[8]),
    )
    assert _lrs(model)["critic"] == pytest.approx(2e-3)
    model.learn(40)
    lrs = _lrs(model)
    assert lrs["actor"] == pytest.approx(1e-3)
    assert lrs["critic"] < 2e-3 * 0.5  # progress has decreased to about 1/40
    assert model.logger.name_to_value["train/qf_learning_rate"] == pytest.approx(lrs["critic"])


def test_qf_learning_rate_schedule() -> None:
    model = filled_sac(
        64,
        policy_kwargs=dict(net_arch=[32, 32]),
        learning_rate=lambda progress: 3e-4 * progress,
        qf_learning_rate=lambda progress: 1e-3 * progress,
    )
    assert model.critic.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # progress 1 at creation
    model._current_progress_remaining = 0.25
    model.train(1, 32)
    assert model.critic.optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    assert model.actor.optimizer.param_groups[0]["lr"] == pytest.approx(7.5e-5)
    assert model.logger.name_to_value["train/qf_learning_rate"] == pytest.approx(2.5e-4)
    assert model.logger.name_to_value["train/learning_rate"] == pytest.approx(7.5e-5)
    # During learn() the critics' rate follows the schedule down to 0 (the last update is at progress 0).
    model = make_sac(
        learning_starts=50,
        batch_size=16,
        policy_kwargs=dict(net_arch=[8]),
        qf_learning_rate=lambda progress: 1e-3 * progress,
    )
    recorder = Recorder()
    model.learn(100, callback=recorder)
    rates = np.array(recorder.critic_learning_rates[51:])  # from the step after the first update on
    assert rates[0] == pytest.approx(5e-4, rel=0.05) and np.all(np.diff(rates) < 0)
    assert model.critic.optimizer.param_groups[0]["lr"] == 0.0
    assert model.actor.optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)  # learning_rate stays constant
