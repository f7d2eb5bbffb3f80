"""``actor_q_reduction`` alone decides how the actor's objective reduces the critic ensemble; ``critic_subset_size``
only changes the target (REDQ needs both)."""

from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.logger import Logger

import sb3_softac.engine.update
import sb3_softac.sac
from sb3_softac import SAC
from sb3_softac.losses import reduce_critics
from sb3_softac.networks import EnsembleLinear

# Constant outputs of the three critics (the second is the smallest): min 1 -> actor loss -(-1); mean 7/3.
_CRITIC_VALUES = (3.0, -1.0, 5.0)


def test_reduce_critics_against_elementwise_reference() -> None:
    q_values = th.randn(3, 7, 4, generator=th.Generator().manual_seed(0))
    th.testing.assert_close(
        reduce_critics(q_values, "min"), th.minimum(th.minimum(q_values[0], q_values[1]), q_values[2])
    )
    th.testing.assert_close(reduce_critics(q_values, "mean"), (q_values[0] + q_values[1] + q_values[2]) / 3)
    with pytest.raises(ValueError, match="'max'"):
        reduce_critics(q_values, "max")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["average", "MIN", None, 1])
def test_bad_actor_q_reduction_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match=rf"actor_q_reduction={value!r}.*'min'.*'mean'"):
        SAC("MlpPolicy", "Pendulum-v1", actor_q_reduction=value, buffer_size=100)


def _constant_critics(model: SAC) -> None:
    """Make critic ``i`` output ``_CRITIC_VALUES[i]`` for every state and action (zero last weights, constant bias)."""
    last = [m for m in model.critic.q_networks.modules() if isinstance(m, EnsembleLinear)][-1]
    with th.no_grad():
        last.weight.zero_()
        last.bias.copy_(th.tensor(_CRITIC_VALUES).reshape(-1, 1, 1).expand_as(last.bias))


# Continuous actions through both update paths (the engine where "auto" picks it), discrete ones through autograd.
@pytest.mark.parametrize(
    ("env_id", "update_engine"), [("Pendulum-v1", "autograd"), ("Pendulum-v1", "auto"), ("CartPole-v1", "auto")]
)
@pytest.mark.parametrize(
    ("critic_subset_size", "actor_q_reduction", "expected_actor_loss"),
    [
        (None, "min", 1.0),
        (2, "min", 1.0),  # the subset changes the target only
        (None, "mean", -7.0 / 3.0),
        (2, "mean", -7.0 / 3.0),
    ],
)
def test_actor_loss_uses_the_named_reduction(
    env_id: str,
    update_engine: str,
    critic_subset_size: int | None,
    actor_q_reduction: str,
    expected_actor_loss: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With alpha = 0 the actor loss is ``-E[reduce_i Q_i]``; the critics are constant and frozen (learning rate 0),
    so it is the hand-computed reduction of ``_CRITIC_VALUES`` at every step."""
    model = SAC(
        "MlpPolicy",
        env_id,
        learning_starts=64,
        batch_size=32,
        ent_coef=0.0,
        qf_learning_rate=0.0,
        critic_subset_size=critic_subset_size,
        actor_q_reduction=actor_q_reduction,
        update_engine=update_engine,
        policy_kwargs=dict(net_arch=[16], n_critics=3),
        seed=0,
    )
    assert model.update_path == ("engine" if (env_id, update_engine) == ("Pendulum-v1", "auto") else "autograd")
    model.learn(64)
    _constant_critics(model)
    model.set_logger(Logger(None, []))
    targets: list[int] = []
    original = sb3_softac.sac.min_over_critics

    def spy(*args: Any) -> th.Tensor:
        # How many critics the target's minimum is over: the subset drawn inside (autograd), or every critic it is
        # given (the engine evaluates only the drawn subset of the target critics).
        targets.append(args[1] if len(args) > 1 and args[1] is not None else args[0].shape[0])
        return original(*args)

    monkeypatch.setattr(sb3_softac.sac, "min_over_critics", spy)
    monkeypatch.setattr(sb3_softac.engine.update, "min_over_critics", spy)  # the update engine's target calls it too
    model.train(4, 32)
    assert model.logger.name_to_value["train/actor_loss"] == pytest.approx(expected_actor_loss, abs=1e-6)
    # The target's reduction is the subset minimum alone, whatever the actor does.
    assert targets == [critic_subset_size or 3] * 4
    assert np.isfinite(model.logger.name_to_value["train/critic_loss"])
