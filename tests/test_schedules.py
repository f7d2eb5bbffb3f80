"""Learning-rate schedules reach every optimizer, including after they are replaced on a built model."""

import pytest

from sb3_softac import SAC


def _lrs(model: SAC) -> dict[str, float]:
    optimizers = {"actor": model.actor.optimizer, "critic": model.critic.optimizer, "alpha": model.ent_coef_optimizer}
    return {name: opt.param_groups[0]["lr"] for name, opt in optimizers.items() if opt is not None}


def test_replaced_lr_schedule_applies_to_all_optimizers(box_env) -> None:
    model = SAC("MlpPolicy", box_env, learning_starts=10, batch_size=8, policy_kwargs=dict(net_arch=[8]), seed=0)
    model.learn(20)
    model.lr_schedule = lambda _: 0.0  # SB3's own tests freeze training this way
    model.train(gradient_steps=1, batch_size=8)
    assert _lrs(model) == {"actor": 0.0, "critic": 0.0, "alpha": 0.0}


def test_qf_learning_rate_schedule_is_separate(box_env) -> None:
    model = SAC(
        "MlpPolicy",
        box_env,
        learning_rate=1e-3,
        qf_learning_rate=lambda progress: 2e-3 * progress,
        learning_starts=10,
        batch_size=8,
        policy_kwargs=dict(net_arch=[8]),
        seed=0,
    )
    assert _lrs(model)["critic"] == pytest.approx(2e-3)
    model.learn(40)
    lrs = _lrs(model)
    assert lrs["actor"] == pytest.approx(1e-3)
    assert lrs["critic"] < 2e-3 * 0.5  # progress has decreased to about 1/40
    assert model.logger.name_to_value["train/qf_learning_rate"] == pytest.approx(lrs["critic"])
