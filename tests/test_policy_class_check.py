"""A policy class that is not an ``sb3_softac.policies.SACPolicy`` (such as SB3's own) is refused at construction,
with a message that says what to do, instead of failing at the first gradient step."""

import re

import pytest
import stable_baselines3
from stable_baselines3.sac.policies import MlpPolicy as SB3MlpPolicy
from stable_baselines3.sac.policies import SACPolicy as SB3SACPolicy

from sb3_softac import SAC
from sb3_softac.policies import SACPolicy


class _SB3PolicySubclass(SB3SACPolicy):
    """A user's customisation of SB3's SAC policy."""


class _OurPolicySubclass(SACPolicy):
    """A user's customisation of this package's SAC policy."""


@pytest.mark.parametrize("policy", [SB3MlpPolicy, _SB3PolicySubclass])
def test_sb3_policy_classes_are_refused_at_construction(policy: type) -> None:
    kwargs = dict(learning_starts=10, batch_size=8, policy_kwargs=dict(net_arch=[8]), seed=0)
    with pytest.raises(TypeError) as info:
        SAC(policy, "Pendulum-v1", **kwargs)
    message = str(info.value)
    assert policy.__qualname__ in message
    assert "subclass sb3_softac.policies.SACPolicy" in message and "policy_kwargs" in message
    # Control: the same script with SB3's own SAC trains with its policy.
    stable_baselines3.SAC(policy, "Pendulum-v1", **kwargs).learn(20)


def test_own_policy_classes_are_accepted() -> None:
    model = SAC(_OurPolicySubclass, "Pendulum-v1", learning_starts=10, batch_size=8, policy_kwargs=dict(net_arch=[8]))
    model.learn(20)
    assert isinstance(model.policy, _OurPolicySubclass) and model._n_updates == 10


def test_policy_names_still_resolve_to_own_classes() -> None:
    model = SAC("MlpPolicy", "Pendulum-v1", buffer_size=100, policy_kwargs=dict(net_arch=[8]))
    assert isinstance(model.policy, SACPolicy)
    with pytest.raises(ValueError, match=re.escape("NoSuchPolicy")):
        SAC("NoSuchPolicy", "Pendulum-v1", buffer_size=100)
