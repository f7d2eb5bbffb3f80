"""The entropy coefficient: learned from 1 or a given start, fixed, and steered by ``target_entropy``."""

import pytest
from envs import VectorBoxEnv, make_sac


@pytest.mark.parametrize(("ent_coef", "initial"), [("auto", 1.0), ("auto_0.1", 0.1)])
def test_learned_ent_coef(box_env, ent_coef, initial) -> None:
    model = make_sac(box_env, ent_coef=ent_coef)
    assert model.ent_coef_optimizer is not None
    assert model.log_ent_coef.exp().item() == pytest.approx(initial, rel=1e-6)
    model.learn(150)
    assert model.log_ent_coef.exp().item() != pytest.approx(initial, rel=1e-3)
    assert model.logger.name_to_value["train/ent_coef"] == pytest.approx(model.log_ent_coef.exp().item(), rel=0.05)


def test_fixed_ent_coef(box_env) -> None:
    model = make_sac(box_env, ent_coef=0.05)
    assert model.ent_coef_optimizer is None
    assert model.log_ent_coef is None
    model.learn(150)
    values = model.logger.name_to_value
    assert values["train/ent_coef"] == pytest.approx(0.05)
    assert "train/ent_coef_loss" not in values


def test_target_entropy_float_steers_the_temperature(box_env) -> None:
    low = make_sac(box_env, target_entropy=-50.0)
    assert low.target_entropy == -50.0
    low.learn(150)
    # a tanh-squashed 3-d policy has entropy <= 3 log 2: a target of 10 is never met and alpha grows
    high = make_sac(VectorBoxEnv(), target_entropy=10.0).learn(150)
    assert high.log_ent_coef.item() > 0.0 > low.log_ent_coef.item()
