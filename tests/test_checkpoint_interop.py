"""Checkpoints move between sb3_softac.SAC and stable_baselines3.SAC in both directions without losing anything.

After a conversion the deterministic actions are bit-identical, the entropy coefficient and every Adam moment are
the same numbers (the critic's moments only change layout: SB3 keeps one ``nn.Sequential`` per critic with
``(out, in)`` weights, sb3_softac one stacked ensemble with ``(n, in, out)`` weights), the timestep counter carries
over, and either library continues training from the converted file. The RL Zoo reads and writes these files too
(tested in ``tests/test_zoo.py``).
"""

import io
import re
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import stable_baselines3 as sb3
import torch as th
from envs import PointGoalEnv, VectorBoxEnv, make_sac
from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_softac import SAC

NET = [32, 32]
LEARNING_STARTS = 32
STEPS = 64
MORE_STEPS = 16

# (policy, env factory, extra policy_kwargs, extra algorithm kwargs)
CONFIGS = {
    "mlp": ("MlpPolicy", VectorBoxEnv, {}, {}),
    "mlp-3-critics": ("MlpPolicy", VectorBoxEnv, dict(n_critics=3), {}),
    "mlp-shared-extractor": ("MlpPolicy", VectorBoxEnv, dict(share_features_extractor=True), {}),
    "mlp-sde": ("MlpPolicy", VectorBoxEnv, {}, dict(use_sde=True)),
    "mlp-fixed-ent-coef": ("MlpPolicy", VectorBoxEnv, {}, dict(ent_coef=0.1)),
    "multi-input": ("MultiInputPolicy", PointGoalEnv, {}, {}),
    "multi-input-3-critics-shared": (
        "MultiInputPolicy",
        PointGoalEnv,
        dict(n_critics=3, share_features_extractor=True),
        {},
    ),
    "multi-input-sde": ("MultiInputPolicy", PointGoalEnv, {}, dict(use_sde=True)),
}

_SB3_CRITIC = re.compile(r"^qf(?P<member>\d+)\.(?P<layer>\d+)\.(?P<kind>weight|bias)$")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def _make_env(factory: type[gym.Env], seed: int = 0) -> gym.Env:
    env = factory()
    env.reset(seed=seed)
    env.observation_space.seed(seed)
    env.action_space.seed(seed)
    return env


def _train(algo: type[BaseAlgorithm], config: str, steps: int = STEPS) -> BaseAlgorithm:
    policy, factory, policy_kwargs, kwargs = CONFIGS[config]
    model = make_sac(
        _make_env(factory),
        policy,
        algo,
        learning_starts=LEARNING_STARTS,
        buffer_size=1_000,
        policy_kwargs=dict(net_arch=NET, **policy_kwargs),
        **kwargs,
    )
    return model.learn(steps)


def _observations(config: str, n: int = 32) -> Any:
    space = _make_env(CONFIGS[config][1], seed=7).observation_space
    samples = [space.sample() for _ in range(n)]
    if isinstance(samples[0], dict):
        return {key: np.stack([sample[key] for sample in samples]) for key in samples[0]}
    return np.stack(samples)


def _actions(model: BaseAlgorithm, observations: Any) -> np.ndarray:
    return model.predict(observations, deterministic=True)[0]


def _optimizers(model: BaseAlgorithm) -> dict[str, th.optim.Optimizer]:
    optimizers = {"actor": model.actor.optimizer, "critic": model.critic.optimizer}
    if model.ent_coef_optimizer is not None:
        optimizers["ent_coef"] = model.ent_coef_optimizer
    return optimizers


def _assert_same_optimizer_states(expected: BaseAlgorithm, actual: BaseAlgorithm) -> None:
    """Every tensor of every optimizer state bit-equal, same hyperparameters (both models in the same layout)."""
    expected_optimizers, actual_optimizers = _optimizers(expected), _optimizers(actual)
    assert expected_optimizers.keys() == actual_optimizers.keys()
    for name, optimizer in expected_optimizers.items():
        want, got = optimizer.state_dict(), actual_optimizers[name].state_dict()
        assert got["state"].keys() == want["state"].keys(), name
        assert len(want["state"]) > 0, f"{name}: nothing to compare, the model never trained"
        for index, state in want["state"].items():
            assert got["state"][index].keys() == state.keys(), (name, index)
            for key, value in state.items():
                assert th.equal(got["state"][index][key], value), (name, index, key)
        assert len(got["param_groups"]) == len(want["param_groups"])
        for want_group, got_group in zip(want["param_groups"], got["param_groups"], strict=True):
            for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "params"):
                assert got_group[key] == want_group[key], (name, key)


def _named_optimizer_state(module: th.nn.Module) -> dict[str, dict[str, th.Tensor]]:
    """The Adam state of each parameter of ``module.optimizer``, by parameter name (found by identity)."""
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    optimizer = module.optimizer
    states = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter in optimizer.state:
                states[names[id(parameter)]] = optimizer.state[parameter]
    return states


def _assert_critic_optimizer_matches_across_layouts(sb3_model: sb3.SAC, ours: SAC) -> None:
    """Each SB3 per-critic Adam moment equals the slice of our stacked moment, transposed for weights."""
    sb3_states, our_states = _named_optimizer_state(sb3_model.critic), _named_optimizer_state(ours.critic)
    assert len(sb3_states) > 0
    expected_ours = set()
    for name, state in sb3_states.items():
        match = _SB3_CRITIC.match(name)
        if match is None:
            our_name, select = name, (lambda tensor: tensor)
        else:
            our_name = f"q_networks.{match['layer']}.{match['kind']}"
            member = int(match["member"])
            if match["kind"] == "weight":
                select = lambda tensor, m=member: tensor[m].t()  # noqa: E731
            else:
                select = lambda tensor, m=member: tensor[m, 0]  # noqa: E731
        expected_ours.add(our_name)
        for key in ("exp_avg", "exp_avg_sq"):
            assert th.equal(select(our_states[our_name][key]), state[key]), (name, key)
        assert th.equal(our_states[our_name]["step"], state["step"]), name
    assert set(our_states) == expected_ours


def _assert_same_actor_optimizer(sb3_model: sb3.SAC, ours: SAC) -> None:
    sb3_states, our_states = _named_optimizer_state(sb3_model.actor), _named_optimizer_state(ours.actor)
    assert sb3_states.keys() == our_states.keys() and len(sb3_states) > 0
    for name, state in sb3_states.items():
        for key, value in state.items():
            assert th.equal(our_states[name][key], value), (name, key)


def _assert_same_ent_coef(first: BaseAlgorithm, second: BaseAlgorithm) -> None:
    if first.log_ent_coef is None:
        assert second.log_ent_coef is None
        assert th.equal(first.ent_coef_tensor, second.ent_coef_tensor)
    else:
        assert th.equal(first.log_ent_coef.detach(), second.log_ent_coef.detach())
        first_state, second_state = first.ent_coef_optimizer.state_dict(), second.ent_coef_optimizer.state_dict()
        for key, value in first_state["state"][0].items():
            assert th.equal(second_state["state"][0][key], value), key


def _assert_continues_training(model: BaseAlgorithm) -> None:
    before_steps = model.num_timesteps
    before = {name: value.clone() for name, value in model.policy.state_dict().items()}
    model.learn(MORE_STEPS, reset_num_timesteps=False)
    assert model.num_timesteps == before_steps + MORE_STEPS
    after = model.policy.state_dict()
    changed = [name for name, value in before.items() if value.is_floating_point() and not th.equal(after[name], value)]
    assert any(name.startswith("actor.") for name in changed)
    assert any(name.startswith("critic.") for name in changed)
    assert any(name.startswith("critic_target.") for name in changed)
    for value in after.values():
        assert th.isfinite(value.float()).all()


# ---------------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("config", list(CONFIGS))
def test_ours_to_sb3_and_back(tmp_path: Path, config: str) -> None:
    ours = _train(SAC, config)
    observations = _observations(config)
    ours.save_as_sb3(tmp_path / "as_sb3.zip")

    reference = sb3.SAC.load(tmp_path / "as_sb3.zip", env=_make_env(CONFIGS[config][1]))
    assert isinstance(reference.policy, sb3.sac.policies.SACPolicy)
    assert np.array_equal(_actions(reference, observations), _actions(ours, observations))
    assert reference.num_timesteps == ours.num_timesteps == STEPS
    assert reference._n_updates == ours._n_updates > 0
    _assert_same_ent_coef(ours, reference)
    _assert_same_actor_optimizer(reference, ours)
    _assert_critic_optimizer_matches_across_layouts(reference, ours)

    # Back to ours: everything bit-equal to the model that was never converted.
    reference.save(tmp_path / "sb3.zip")
    back = SAC.load(tmp_path / "sb3.zip", env=_make_env(CONFIGS[config][1]))
    assert isinstance(back.policy, type(ours.policy))
    assert np.array_equal(_actions(back, observations), _actions(ours, observations))
    assert back.num_timesteps == STEPS
    _assert_same_ent_coef(ours, back)
    _assert_same_optimizer_states(ours, back)
    ours_state, back_state = ours.policy.state_dict(), back.policy.state_dict()
    assert ours_state.keys() == back_state.keys()
    for name, value in ours_state.items():
        assert th.equal(back_state[name], value), name

    _assert_continues_training(reference)
    _assert_continues_training(back)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sb3_to_ours_and_back(tmp_path: Path, config: str) -> None:
    reference = _train(sb3.SAC, config)
    observations = _observations(config)
    reference.save(tmp_path / "sb3.zip")

    ours = SAC.load(tmp_path / "sb3.zip", env=_make_env(CONFIGS[config][1]))
    assert isinstance(ours, SAC) and ours.policy.__module__ == "sb3_softac.policies"
    assert np.array_equal(_actions(ours, observations), _actions(reference, observations))
    assert ours.num_timesteps == reference.num_timesteps == STEPS
    assert ours._n_updates == reference._n_updates > 0
    _assert_same_ent_coef(reference, ours)
    _assert_same_actor_optimizer(reference, ours)
    _assert_critic_optimizer_matches_across_layouts(reference, ours)

    ours.save_as_sb3(tmp_path / "back.zip")
    back = sb3.SAC.load(tmp_path / "back.zip", env=_make_env(CONFIGS[config][1]))
    assert np.array_equal(_actions(back, observations), _actions(reference, observations))
    assert back.num_timesteps == STEPS
    _assert_same_ent_coef(reference, back)
    _assert_same_optimizer_states(reference, back)
    reference_state, back_state = reference.policy.state_dict(), back.policy.state_dict()
    assert reference_state.keys() == back_state.keys()
    for name, value in reference_state.items():
        assert th.equal(back_state[name], value), name

    _assert_continues_training(ours)
    _assert_continues_training(back)


def test_sb3_model_keeps_learning_in_ours_with_the_same_critics(tmp_path: Path) -> None:
    env = gym.make("Pendulum-v1")
    kwargs = dict(learning_starts=100, batch_size=64, policy_kwargs=dict(net_arch=NET, n_critics=3), seed=0)
    reference = sb3.SAC("MlpPolicy", env, **kwargs).learn(300)
    reference.save(tmp_path / "pendulum")

    ours = SAC.load(tmp_path / "pendulum", env=gym.make("Pendulum-v1"))
    buffer = reference.replay_buffer
    observations = th.as_tensor(buffer.observations[:64, 0])
    actions = th.as_tensor(buffer.actions[:64, 0])  # already in the policy's [-1, 1] space
    with th.no_grad():
        expected = reference.critic(observations, actions)
        got = ours.critic(observations, actions)
        expected_target = reference.critic_target(observations, actions)
        got_target = ours.critic_target(observations, actions)
    assert len(got) == len(expected) == 3
    for ours_q, sb3_q in zip([*got, *got_target], [*expected, *expected_target], strict=True):
        # A batched matmul sums in another order than nn.Linear: Q ~ -8 here, so a float32 ulp is ~1e-6.
        th.testing.assert_close(ours_q, sb3_q, atol=1e-6, rtol=1e-6)
    # The three critics hold different functions: a layer mapping that mixed them up would not match.
    assert not th.allclose(expected[0], expected[1])

    ours.learn(100, reset_num_timesteps=False)
    assert ours.num_timesteps == 400
    assert ours._n_updates == reference._n_updates + 100
    logged = ours.logger.name_to_value
    for key in ("train/critic_loss", "train/actor_loss", "train/ent_coef"):
        assert np.isfinite(logged[key]), key
    # Still a valid SB3 checkpoint after fine-tuning.
    ours.save_as_sb3(tmp_path / "fine_tuned")
    assert sb3.SAC.load(tmp_path / "fine_tuned", env=env).num_timesteps == 400


def test_load_sb3_archive_from_a_stream(tmp_path: Path) -> None:
    reference = _train(sb3.SAC, "mlp", steps=LEARNING_STARTS + 10)
    stream = io.BytesIO()
    reference.save(stream)
    stream.seek(0)
    ours = SAC.load(stream, env=_make_env(VectorBoxEnv))
    observations = _observations("mlp")
    assert np.array_equal(_actions(ours, observations), _actions(reference, observations))


def test_save_as_sb3_into_a_stream(tmp_path: Path) -> None:
    ours = _train(SAC, "mlp", steps=LEARNING_STARTS + 10)
    stream = io.BytesIO()
    ours.save_as_sb3(stream)
    stream.seek(0)
    reference = sb3.SAC.load(stream)
    observations = _observations("mlp")
    assert np.array_equal(_actions(reference, observations), _actions(ours, observations))


@pytest.mark.parametrize("name", ["model", "model.zip", "run_lr0.001", "not_yet/made/model"])
def test_save_as_sb3_writes_where_save_writes(tmp_path: Path, name: str) -> None:
    """``save_as_sb3(path)`` names (and places) the file as ``save(path)`` does, so one path loads both."""
    ours = SAC("MlpPolicy", VectorBoxEnv(), policy_kwargs=dict(net_arch=[8]), seed=0)
    (tmp_path / "save").mkdir()
    (tmp_path / "as_sb3").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SB3 warns that it creates the missing folders
        ours.save(tmp_path / "save" / name)
    ours.save_as_sb3(tmp_path / "as_sb3" / name)
    written = sorted(path.relative_to(tmp_path / "save") for path in (tmp_path / "save").rglob("*") if path.is_file())
    converted = sorted(
        path.relative_to(tmp_path / "as_sb3") for path in (tmp_path / "as_sb3").rglob("*") if path.is_file()
    )
    assert converted == written
    sb3.SAC.load(tmp_path / "as_sb3" / name)


# ---------------------------------------------------------------------------------------------------------------------
# Clear errors


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(policy_kwargs=dict(net_arch=[8], dropout_rate=0.01)), "dropout_rate"),
        (dict(policy_kwargs=dict(net_arch=[8], layer_norm=True)), "layer_norm"),
        (dict(policy_delay=2), "policy_delay"),
        (dict(qf_learning_rate=1e-3), "qf_learning_rate"),
        (dict(critic_subset_size=1, policy_kwargs=dict(net_arch=[8], n_critics=2)), "critic_subset_size"),
    ],
)
def test_save_as_sb3_refuses_softac_only_options(tmp_path: Path, kwargs: dict[str, Any], named: str) -> None:
    kwargs.setdefault("policy_kwargs", dict(net_arch=[8]))
    model = SAC("MlpPolicy", VectorBoxEnv(), seed=0, **kwargs)
    with pytest.raises(ValueError, match=named):
        model.save_as_sb3(tmp_path / "model.zip")
    assert not (tmp_path / "model.zip").exists()


def test_save_as_sb3_accepts_softac_options_at_their_sb3_values(tmp_path: Path) -> None:
    """Written out at the values that make sb3_softac behave as SB3, the options do not reach SB3's policy."""
    model = SAC(
        "MlpPolicy",
        VectorBoxEnv(),
        policy_kwargs=dict(net_arch=[8], dropout_rate=0.0, layer_norm=False),
        policy_delay=1,
        qf_learning_rate=None,
        critic_subset_size=None,
        seed=0,
    )
    model.save_as_sb3(tmp_path / "model.zip")
    reference = sb3.SAC.load(tmp_path / "model.zip")
    assert reference.policy_kwargs["net_arch"] == [8]
    assert not {"dropout_rate", "layer_norm"} & reference.policy_kwargs.keys()
    for name in ("policy_delay", "qf_learning_rate", "critic_subset_size"):
        assert not hasattr(reference, name)


def test_save_as_sb3_accepts_any_update_engine(tmp_path: Path) -> None:
    """``update_engine`` picks how the same update is computed: SB3's SAC represents the model either way."""
    model = SAC("MlpPolicy", VectorBoxEnv(), policy_kwargs=dict(net_arch=[8]), update_engine="autograd", seed=0)
    model.save_as_sb3(tmp_path / "model.zip")
    reference = sb3.SAC.load(tmp_path / "model.zip")
    assert not hasattr(reference, "update_engine")
    observations = _observations("mlp")
    assert np.array_equal(_actions(reference, observations), _actions(model, observations))


def test_save_as_sb3_names_every_option_in_use(tmp_path: Path) -> None:
    model = SAC(
        "MlpPolicy",
        VectorBoxEnv(),
        policy_kwargs=dict(net_arch=[8], dropout_rate=0.01, layer_norm=True),
        policy_delay=2,
        seed=0,
    )
    with pytest.raises(ValueError, match="cannot be written as a stable_baselines3") as info:
        model.save_as_sb3(tmp_path / "model.zip")
    for named in ("dropout_rate", "layer_norm", "policy_delay"):
        assert named in str(info.value)


def test_save_as_sb3_refuses_discrete_actions(tmp_path: Path) -> None:
    model = SAC("MlpPolicy", "CartPole-v1", policy_kwargs=dict(net_arch=[8]), seed=0)
    with pytest.raises(ValueError, match="Discrete"):
        model.save_as_sb3(tmp_path / "model.zip")
    assert not (tmp_path / "model.zip").exists()


@pytest.mark.parametrize(
    ("algo", "env_id", "policy_class"),
    [(sb3.PPO, "Pendulum-v1", "ActorCriticPolicy"), (sb3.TD3, "Pendulum-v1", "TD3Policy")],
)
def test_loading_another_algorithm_names_what_the_archive_holds(
    tmp_path: Path, algo: type[BaseAlgorithm], env_id: str, policy_class: str
) -> None:
    algo("MlpPolicy", env_id, policy_kwargs=dict(net_arch=[8]), seed=0).save(tmp_path / "other")
    with pytest.raises(ValueError, match=policy_class):
        SAC.load(tmp_path / "other")
