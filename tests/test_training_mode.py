"""``SACPolicy.set_training_mode``: the flags it sets, without the module walk when nothing would change."""

import pytest
from torch import nn

from sb3_softac import SAC


def _modes(model: SAC) -> dict[str, bool]:
    """Every module's training flag by name (the policy's own included, as "")."""
    return {name: module.training for name, module in model.policy.named_modules()}


@pytest.fixture
def model() -> SAC:
    return SAC("MlpPolicy", "Pendulum-v1", policy_kwargs=dict(net_arch=[8], dropout_rate=0.1), seed=0)


@pytest.mark.parametrize("mode", [False, True])
def test_same_flags_as_switching_every_module(model: SAC, mode: bool) -> None:
    """From either mode to either mode: the actor and critics (and the policy) follow, the target critics do not."""
    target_before = {name: module.training for name, module in model.critic_target.named_modules()}
    for start in (not mode, mode):
        model.policy.set_training_mode(start)
        model.policy.set_training_mode(mode)
        assert model.policy.training is mode
        assert all(module.training is mode for module in [*model.actor.modules(), *model.critic.modules()])
        assert {name: module.training for name, module in model.critic_target.named_modules()} == target_before
    # The target keeps its dropout sampling whatever the policy's mode (see test_critic_options).
    assert any(m.training for m in model.critic_target.modules() if isinstance(m, nn.Dropout))


@pytest.mark.parametrize("mode", [False, True])
def test_a_submodule_switched_on_its_own_is_switched_back(model: SAC, mode: bool) -> None:
    """The policy and its networks already in ``mode`` but one deep module flipped directly: it is caught."""
    model.policy.set_training_mode(mode)
    expected = _modes(model)
    for module in (model.actor.latent_pi[0], model.critic.q_networks.layers[1], model.actor.log_std):
        module.train(not mode)
        model.policy.set_training_mode(mode)
        assert _modes(model) == expected


def test_the_policy_flag_alone_is_set(model: SAC) -> None:
    """Every network in evaluation mode but the policy's own flag left in training mode: the flag is cleared."""
    model.policy.set_training_mode(False)
    model.policy.training = True
    model.policy.set_training_mode(False)
    assert model.policy.training is False


def test_a_module_with_its_own_train_is_switched_by_its_train(model: SAC) -> None:
    """A module overriding train() (it may do more than set the flag) gets its train() called, as before."""
    calls: list[bool] = []

    class Recording(nn.Identity):
        def train(self, mode: bool = True) -> "Recording":
            calls.append(mode)
            return super().train(mode)

    model.actor.latent_pi.append(Recording())  # in training mode, as a new module is
    model.policy.set_training_mode(False)
    model.policy.set_training_mode(False)  # nothing to change: not called
    model.policy.set_training_mode(True)
    assert calls == [False, True]
    assert all(module.training is True for module in [*model.actor.modules(), *model.critic.modules()])
