"""Policy-only files (``model.policy.save(path)``, then ``Policy.load(path)``) move between SB3 and sb3_softac.

Checked against SB3's own classes: the same deterministic actions and critic values after the move.
"""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import stable_baselines3 as sb3
import torch as th
from envs import observations, tiny_model

from sb3_softac import SAC, MlpPolicy
from sb3_softac.policies import SACPolicy

CONFIGS: dict[str, dict[str, Any]] = {
    "mlp": {},
    "3-critics": dict(policy_kwargs=dict(net_arch=[16], n_critics=3)),
    "shared-extractor": dict(policy_kwargs=dict(net_arch=[16], share_features_extractor=True)),
    "sde": dict(use_sde=True),
}


def _policy_actions(policy: Any, obs: np.ndarray) -> np.ndarray:
    return policy.predict(obs, deterministic=True)[0]


def _critic_values(policy: Any, obs: np.ndarray) -> th.Tensor:
    obs_tensor = th.as_tensor(obs)
    with th.no_grad():
        actions = policy.actor(obs_tensor, deterministic=True)
        return th.cat([*policy.critic(obs_tensor, actions), *policy.critic_target(obs_tensor, actions)], dim=1)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sb3_policy_file_loads_into_ours(tmp_path: Path, config: str) -> None:
    reference = tiny_model(sb3.SAC, **CONFIGS[config]).policy
    reference.save(tmp_path / "sb3_policy.pth")

    ours = MlpPolicy.load(tmp_path / "sb3_policy.pth")
    assert isinstance(ours, SACPolicy)
    obs = observations()
    assert np.array_equal(_policy_actions(ours, obs), _policy_actions(reference, obs))
    # Same functions in every critic (a batched matmul sums in another order than nn.Linear: float32 rounding).
    th.testing.assert_close(_critic_values(ours, obs), _critic_values(reference, obs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_our_policy_written_for_sb3_loads_into_sb3(tmp_path: Path, config: str) -> None:
    ours = tiny_model(SAC, **CONFIGS[config]).policy
    ours.save_as_sb3(tmp_path / "for_sb3.pth")

    reference = sb3.sac.policies.MlpPolicy.load(tmp_path / "for_sb3.pth")
    assert type(reference) is sb3.sac.policies.SACPolicy
    obs = observations()
    assert np.array_equal(_policy_actions(reference, obs), _policy_actions(ours, obs))
    th.testing.assert_close(_critic_values(reference, obs), _critic_values(ours, obs), rtol=1e-6, atol=1e-6)
    # And back into ours through SB3's own save: bit-identical weights.
    reference.save(tmp_path / "back.pth")
    back = MlpPolicy.load(tmp_path / "back.pth")
    for name, value in ours.state_dict().items():
        assert th.equal(back.state_dict()[name], value), name


def test_our_policy_file_round_trip(tmp_path: Path) -> None:
    ours = tiny_model(SAC, policy_kwargs=dict(net_arch=[16], dropout_rate=0.1, layer_norm=True)).policy
    ours.save(tmp_path / "policy.pth")
    loaded = MlpPolicy.load(tmp_path / "policy.pth")
    assert loaded.dropout_rate == 0.1 and loaded.layer_norm
    for name, value in ours.state_dict().items():
        assert th.equal(loaded.state_dict()[name], value), name


@pytest.mark.parametrize(
    ("kwargs", "env_id", "named"),
    [
        (dict(policy_kwargs=dict(net_arch=[8], dropout_rate=0.1)), "Pendulum-v1", "dropout_rate"),
        (dict(policy_kwargs=dict(net_arch=[8], layer_norm=True)), "Pendulum-v1", "layer_norm"),
        ({}, "CartPole-v1", "Discrete"),
    ],
)
def test_save_as_sb3_refuses_what_sb3_policies_lack(
    tmp_path: Path, kwargs: dict[str, Any], env_id: str, named: str
) -> None:
    policy = SAC("MlpPolicy", env_id, seed=0, **kwargs).policy
    with pytest.raises(ValueError, match=named):
        policy.save_as_sb3(tmp_path / "policy.pth")
    assert not (tmp_path / "policy.pth").exists()


def test_save_as_sb3_refuses_a_custom_policy_class(tmp_path: Path) -> None:
    class WiderPolicy(SACPolicy):
        pass

    policy = SAC(WiderPolicy, "Pendulum-v1", policy_kwargs=dict(net_arch=[8]), seed=0).policy
    with pytest.raises(ValueError, match=r"custom policy class .*WiderPolicy"):
        policy.save_as_sb3(tmp_path / "policy.pth")


def test_a_policy_file_with_nan_weights_is_refused(tmp_path: Path) -> None:
    policy = SAC("MlpPolicy", "Pendulum-v1", policy_kwargs=dict(net_arch=[8]), seed=0).policy
    with th.no_grad():
        policy.actor.latent_pi[0].weight[0, 0] = float("nan")
    policy.save(tmp_path / "policy.pth")
    with pytest.raises(ValueError, match=r"actor\.latent_pi\.0\.weight") as info:
        MlpPolicy.load(tmp_path / "policy.pth")
    assert "policy.pth" in str(info.value)


def test_a_model_archive_is_not_a_policy_file(tmp_path: Path) -> None:
    model = SAC("MlpPolicy", "Pendulum-v1", policy_kwargs=dict(net_arch=[8]), seed=0)
    model.save(tmp_path / "model.zip")
    with pytest.raises(ValueError, match=r"SAC\.load"):
        MlpPolicy.load(tmp_path / "model.zip")
