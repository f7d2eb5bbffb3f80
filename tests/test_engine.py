"""The autograd-free update engine against the autograd update, and which models take which path.

The equivalence tests run both paths in float64 from the same parameters, minibatches and noise, and compare
the gradients themselves (each parameter's ``.grad`` after the last step), the parameters after Adam, the
optimizers' states and the logged statistics. In float64 the two paths differ only by the rounding of
differently ordered sums (~1e-15 relative), so the 1e-6 tolerance leaves room for nothing but a wrong formula.
"""

import copy
from functools import partial

import numpy as np
import pytest
import stable_baselines3.common.policies as sb3_policies
import torch as th
from envs import ActionSpaceEnv, ImageEnv, PointGoalEnv, VectorBoxEnv, filled_sac, make_sac, needs_n_steps
from gymnasium import spaces
from stable_baselines3.common.logger import configure
from stable_baselines3.common.torch_layers import FlattenExtractor
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from torch import nn

import sb3_softac.engine
import sb3_softac.engine.update
import sb3_softac.losses
from sb3_softac import SAC
from sb3_softac.distributions import LOG_STD_MAX, LOG_STD_MIN
from sb3_softac.engine import MINIBATCHES_PER_DRAW, derivatives
from sb3_softac.engine.coverage import dropout_reason
from sb3_softac.networks import EnsembleDropout
from sb3_softac.policies import SACPolicy

BATCH = 32
OBS_DIM = 5
# The fallback cases' continuous actions on other observation spaces.
BOX = spaces.Box(-2.0, 2.0, (3,), np.float32)


def _batches(action_dim: int, n_rows: int, seed: int = 1) -> ReplayBufferSamples:
    generator = th.Generator().manual_seed(seed)

    def uniform(*shape: int) -> th.Tensor:
        return th.rand(*shape, generator=generator, dtype=th.float64) * 2 - 1

    return ReplayBufferSamples(
        observations=uniform(n_rows, OBS_DIM),
        # Some replayed actions at the bounds, as the buffer holds them after clipping.
        actions=uniform(n_rows, action_dim).mul(1.2).clamp(-1, 1),
        next_observations=uniform(n_rows, OBS_DIM),
        dones=(th.rand(n_rows, 1, generator=generator, dtype=th.float64) < 0.2).double(),
        rewards=th.randn(n_rows, 1, generator=generator, dtype=th.float64),
    )


class _Sampler:
    """Hands out consecutive rows of a fixed pool, however many minibatches are asked for at once."""

    def __init__(self, pool: ReplayBufferSamples) -> None:
        self.pool = pool
        self.cursor = 0

    def __call__(self, batch_size: int, env: object = None) -> ReplayBufferSamples:
        rows = slice(self.cursor, self.cursor + batch_size)
        self.cursor += batch_size
        return ReplayBufferSamples(*(None if x is None else x[rows] for x in self.pool))


def _model(action_dim: int, update_engine: str, **kwargs) -> SAC:
    kwargs["policy_kwargs"] = dict(dict(net_arch=[16, 16]), **kwargs.get("policy_kwargs", {}))
    env = VectorBoxEnv(obs_dim=OBS_DIM, action_dim=action_dim)
    return make_sac(env, learning_starts=0, update_engine=update_engine, **kwargs)


def _float64(model: SAC) -> SAC:
    model.policy.double()
    if model.log_ent_coef is not None:
        model.log_ent_coef.data = model.log_ent_coef.data.double()
    return model


def _pair(monkeypatch: pytest.MonkeyPatch, action_dim: int, **kwargs) -> tuple[SAC, SAC]:
    """The same model twice, in float64: one updated by the engine, one by autograd."""
    # The flatten extractor casts observations to float32; keep them float64 so both paths run in float64.
    monkeypatch.setattr(sb3_policies, "preprocess_obs", lambda obs, space, normalize_images=True: obs)
    engine = _float64(_model(action_dim, "auto", **kwargs))
    reference = _float64(_model(action_dim, "autograd", **kwargs))
    reference.policy.load_state_dict(engine.policy.state_dict())
    assert engine.update_path == "engine" and reference.update_path == "autograd"
    return engine, reference


def _train(model: SAC, pool: ReplayBufferSamples, gradient_steps: int) -> dict[str, float]:
    model.replay_buffer.sample = _Sampler(pool)  # type: ignore[method-assign]
    model.set_logger(configure(None, []))
    th.manual_seed(1234)
    model.train(gradient_steps=gradient_steps, batch_size=BATCH)
    return dict(model.logger.name_to_value)


def _train_both(engine: SAC, reference: SAC, pool: ReplayBufferSamples, gradient_steps: int) -> None:
    """The same ``train`` call on the engine model and on its autograd reference, from the same minibatches."""
    _train(engine, pool, gradient_steps)
    _train(reference, pool, gradient_steps)


def _assert_relative(actual: th.Tensor, expected: th.Tensor, name: str, rel: float = 1e-6) -> None:
    """``max|actual - expected| <= rel * max|expected|``: relative to the tensor's scale, not elementwise."""
    scale = float(expected.detach().abs().max())
    error = float((actual.detach() - expected.detach()).abs().max())
    assert error <= rel * max(scale, 1e-12), f"{name}: max error {error:.3g} vs scale {scale:.3g}"


def _assert_same_update(engine: SAC, reference: SAC) -> None:
    expected = dict(reference.policy.named_parameters())
    for name, parameter in engine.policy.named_parameters():
        _assert_relative(parameter, expected[name], name)
        if name.startswith("critic_target"):
            continue
        assert parameter.grad is not None and expected[name].grad is not None, name
        _assert_relative(parameter.grad, expected[name].grad, f"{name}.grad")
    if reference.log_ent_coef is not None:
        assert engine.log_ent_coef is not None and engine.log_ent_coef.grad is not None
        _assert_relative(engine.log_ent_coef, reference.log_ent_coef, "log_ent_coef")
        _assert_relative(engine.log_ent_coef.grad, reference.log_ent_coef.grad, "log_ent_coef.grad")
    for ours, theirs in (
        (engine.actor.optimizer, reference.actor.optimizer),
        (engine.critic.optimizer, reference.critic.optimizer),
    ):
        for state, expected_state in zip(
            ours.state_dict()["state"].values(), theirs.state_dict()["state"].values(), strict=True
        ):
            assert float(state["step"]) == float(expected_state["step"])
            _assert_relative(state["exp_avg"], expected_state["exp_avg"], "exp_avg")
            _assert_relative(state["exp_avg_sq"], expected_state["exp_avg_sq"], "exp_avg_sq")


CONFIGURATIONS = {
    "1-critic": dict(policy_kwargs=dict(n_critics=1)),
    "2-critics": dict(),
    "3-critics": dict(policy_kwargs=dict(n_critics=3)),
    "10-critics": dict(policy_kwargs=dict(n_critics=10)),
    "redq-subset": dict(policy_kwargs=dict(n_critics=10), critic_subset_size=2, actor_q_reduction="mean"),
    "subset-min-actor": dict(policy_kwargs=dict(n_critics=4), critic_subset_size=3),
    "mean-actor": dict(policy_kwargs=dict(n_critics=3), actor_q_reduction="mean"),
    "fixed-alpha": dict(ent_coef=0.1),
    "auto-alpha-init": dict(ent_coef="auto_0.2", target_entropy=-1.5),
    "tanh": dict(policy_kwargs=dict(activation_fn=nn.Tanh)),
    "deep-wide": dict(policy_kwargs=dict(net_arch=dict(pi=[8, 24, 12], qf=[20, 10, 6]))),
    "no-hidden-layers": dict(policy_kwargs=dict(net_arch=[])),
    "qf-lr-and-target-interval": dict(qf_learning_rate=1e-3, target_update_interval=2, tau=0.1),
    "adamw": dict(policy_kwargs=dict(optimizer_class=th.optim.AdamW, optimizer_kwargs=dict(weight_decay=0.1))),
    # Critic dropout (masks drawn as nn.Dropout draws them, so both paths drop the same units) and layer norm.
    "dropout": dict(policy_kwargs=dict(dropout_rate=0.2)),
    "layer-norm": dict(policy_kwargs=dict(layer_norm=True)),
    "droq": dict(policy_kwargs=dict(dropout_rate=0.2, layer_norm=True)),
    "droq-tanh-1-critic": dict(
        policy_kwargs=dict(dropout_rate=0.2, layer_norm=True, activation_fn=nn.Tanh, n_critics=1)
    ),
    "droq-3-critics-deep": dict(
        policy_kwargs=dict(dropout_rate=0.2, layer_norm=True, n_critics=3, net_arch=dict(pi=[8], qf=[20, 10, 6]))
    ),
    "droq-redq": dict(
        policy_kwargs=dict(dropout_rate=0.2, layer_norm=True, n_critics=10),
        critic_subset_size=2,
        actor_q_reduction="mean",
    ),
    "layer-norm-subset": dict(policy_kwargs=dict(layer_norm=True, n_critics=4), critic_subset_size=2),
    "droq-adamw-fixed-alpha": dict(
        ent_coef=0.1,
        policy_kwargs=dict(
            dropout_rate=0.2, layer_norm=True, optimizer_class=th.optim.AdamW, optimizer_kwargs=dict(weight_decay=0.1)
        ),
    ),
}


@pytest.mark.parametrize("action_dim", [1, 6])
@pytest.mark.parametrize("config", CONFIGURATIONS.values(), ids=CONFIGURATIONS.keys())
def test_one_update_matches_autograd(monkeypatch: pytest.MonkeyPatch, config: dict, action_dim: int) -> None:
    engine, reference = _pair(monkeypatch, action_dim, **config)
    pool = _batches(action_dim, BATCH)
    logged, expected = _train(engine, pool, 1), _train(reference, pool, 1)
    _assert_same_update(engine, reference)
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize(
    "config",
    [
        dict(policy_delay=2),
        dict(
            policy_delay=3,
            policy_kwargs=dict(n_critics=10),
            critic_subset_size=3,
            actor_q_reduction="mean",
            ent_coef=0.05,
        ),
        dict(target_update_interval=3, tau=0.5, qf_learning_rate=1e-2, learning_rate=1e-2),
        dict(policy_kwargs=dict(optimizer_class=th.optim.AdamW, optimizer_kwargs=dict(weight_decay=0.1, amsgrad=True))),
        dict(policy_kwargs=dict(optimizer_kwargs=dict(fused=False, betas=(0.5, 0.9), maximize=False))),
        dict(policy_delay=3, target_update_interval=2, policy_kwargs=dict(dropout_rate=0.2, layer_norm=True)),
    ],
    ids=[
        "policy-delay-2",
        "redq-delay-3-fixed-alpha",
        "target-interval-3",
        "adamw-amsgrad",
        "unfused-adam",
        "droq-delay-3",
    ],
)
def test_several_updates_in_one_call_match_autograd(monkeypatch: pytest.MonkeyPatch, config: dict) -> None:
    """``gradient_steps`` > 1: the engine draws every minibatch at once, autograd one by one; same rows here."""
    engine, reference = _pair(monkeypatch, 2, **config)
    gradient_steps = 5
    pool = _batches(2, BATCH * gradient_steps)
    logged, expected = _train(engine, pool, gradient_steps), _train(reference, pool, gradient_steps)
    _assert_same_update(engine, reference)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_many_gradient_steps_are_drawn_in_chunks_and_match_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """More minibatches than MINIBATCHES_PER_DRAW: drawn a chunk at a time, consumed in order, same update."""
    engine, reference = _pair(monkeypatch, 2, policy_delay=2)
    gradient_steps = 2 * MINIBATCHES_PER_DRAW + 5
    pool = _batches(2, BATCH * gradient_steps)
    sizes: list[int] = []
    sampler = _Sampler(pool)

    def sample(batch_size: int, env: object = None) -> ReplayBufferSamples:
        sizes.append(batch_size)
        return sampler(batch_size, env)

    _train(reference, pool, gradient_steps)
    engine.replay_buffer.sample = sample  # type: ignore[method-assign]
    engine.set_logger(configure(None, []))
    th.manual_seed(1234)
    engine.train(gradient_steps=gradient_steps, batch_size=BATCH)
    assert sizes == [BATCH * MINIBATCHES_PER_DRAW] * 2 + [BATCH * 5]
    _assert_same_update(engine, reference)


@needs_n_steps
def test_n_step_discounts_match_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """With n-step returns the replay buffer gives each transition its own discount gamma^k."""
    engine, reference = _pair(monkeypatch, 2)
    pool = _batches(2, 3 * BATCH)
    generator = th.Generator().manual_seed(2)
    pool = pool._replace(discounts=0.99 ** th.randint(1, 4, (3 * BATCH, 1), generator=generator).double())
    logged, expected = _train(engine, pool, 3), _train(reference, pool, 3)
    _assert_same_update(engine, reference)
    assert logged["train/critic_loss"] == pytest.approx(expected["train/critic_loss"], rel=1e-6)
    # The discounts matter: the same minibatches with gamma everywhere give another update.
    plain, _ = _pair(monkeypatch, 2)
    _train(plain, pool._replace(discounts=None), 3)
    assert not th.allclose(
        plain.critic.q_networks.layers[0].weight, engine.critic.q_networks.layers[0].weight, rtol=0, atol=1e-9
    )


def test_redq_target_evaluates_only_the_drawn_critics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Critic i (online and target, which do not learn) outputs the constant i: each target's minimum is taken
    over exactly the pair drawn for it."""
    model = _model(
        2, "auto", policy_kwargs=dict(n_critics=10), critic_subset_size=2, actor_q_reduction="mean", qf_learning_rate=0
    )
    for critic in (model.critic, model.critic_target):
        head = critic.q_networks.layers[-1]
        with th.no_grad():
            head.weight.zero_()
            head.bias.copy_(th.arange(10.0).reshape(10, 1, 1))
    drawn: list[th.Tensor] = []
    reduced: list[th.Tensor] = []

    def draw(*args, **kwargs):  # type: ignore[no-untyped-def]
        drawn.append(sb3_softac.losses.draw_critic_subset(*args, **kwargs))
        return drawn[-1]

    def minimum(q_values: th.Tensor, subset_size: int | None = None) -> th.Tensor:
        reduced.append(q_values.clone())
        return sb3_softac.losses.min_over_critics(q_values, subset_size)

    monkeypatch.setattr(sb3_softac.engine.update, "draw_critic_subset", draw)
    monkeypatch.setattr(sb3_softac.engine.update, "min_over_critics", minimum)
    pool = ReplayBufferSamples(*(None if x is None else x.float() for x in _batches(2, 20 * BATCH)))
    _train(model, pool, 20)
    assert len(drawn) == len(reduced) == 20
    assert len({tuple(subset.tolist()) for subset in drawn}) > 1  # a new pair at each step
    for subset, q_values in zip(drawn, reduced, strict=True):
        assert q_values.shape == (2, BATCH, 1)
        th.testing.assert_close(q_values, subset.float().reshape(2, 1, 1).expand(2, BATCH, 1))


def test_log_std_clamp_stops_the_gradient_outside_its_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Log stds beyond, inside and exactly on [LOG_STD_MIN, LOG_STD_MAX]: the clamp's gradient must match autograd's.

    With the head's weights at zero every sample has the same raw log std per dimension: below the minimum,
    above the maximum, inside, exactly at the maximum and exactly at the minimum. Whether clamp passes the gradient
    on its bounds depends on the torch release (up to 2.13 it does, from 2.14 on it does not): the engine must do
    what autograd does on the running one.
    """
    engine, reference = _pair(monkeypatch, 6)
    raw = th.tensor([-25.0, 3.0, 0.0, LOG_STD_MAX, LOG_STD_MIN, 1.0], dtype=th.float64)
    for model in (engine, reference):
        with th.no_grad():
            model.actor.log_std.weight.zero_()
            model.actor.log_std.bias.copy_(raw)
    pool = _batches(6, BATCH)
    _train_both(engine, reference, pool, 1)
    _assert_same_update(engine, reference)
    gradient = engine.actor.log_std.bias.grad
    assert gradient is not None
    assert float(gradient[0]) == 0.0 and float(gradient[1]) == 0.0  # clamped for every sample: no gradient
    assert float(gradient[2]) != 0.0 and float(gradient[5]) != 0.0  # inside: the gradient passes
    bounds = th.tensor([LOG_STD_MAX, LOG_STD_MIN], dtype=th.float64, requires_grad=True)
    th.clamp(bounds, LOG_STD_MIN, LOG_STD_MAX).sum().backward()
    assert bounds.grad is not None
    for passes, value in zip(bounds.grad.tolist(), gradient[3:5].tolist(), strict=True):
        assert (value != 0.0) == (passes == 1.0)  # on the bounds: as autograd on this release


@pytest.mark.parametrize(
    "options",
    [dict(), dict(gradient_steps=2, policy_delay=2, policy_kwargs=dict(dropout_rate=0.01, layer_norm=True))],
    ids=["sac", "droq"],
)
def test_pendulum_200_steps_stay_with_autograd(options: dict) -> None:
    """Two learn() runs from one seed in float32, 200 gradient steps: the paths must not drift apart.

    With critic dropout the two paths draw the same masks from the same generator in the same order: a mask drawn
    differently would send them apart at once.
    """

    def run(update_engine: str) -> SAC:
        kwargs = dict(dict(learning_starts=100, batch_size=64, seed=0), **options)
        kwargs["policy_kwargs"] = dict(net_arch=[64, 64], **options.get("policy_kwargs", {}))
        kwargs["train_freq"] = kwargs.pop("train_freq", 1)
        model = SAC("MlpPolicy", "Pendulum-v1", update_engine=update_engine, **kwargs)
        model.learn(300)
        return model

    engine, reference = run("auto"), run("autograd")
    assert engine.update_path == "engine" and reference.update_path == "autograd"
    assert engine._n_updates == reference._n_updates == 200 * options.get("gradient_steps", 1)
    expected = reference.policy.state_dict()
    for name, value in engine.policy.state_dict().items():
        th.testing.assert_close(value, expected[name], atol=1e-4, rtol=0.0, msg=lambda m, k=name: f"{k}: {m}")
    th.testing.assert_close(engine.log_ent_coef, reference.log_ent_coef, atol=1e-4, rtol=0.0)


def _copy_critic(model: SAC, source: int, destination: int) -> None:
    """Make critic ``destination`` (online and target) an exact copy of critic ``source``."""
    with th.no_grad():
        for critic in (model.critic, model.critic_target):
            for parameter in critic.parameters():
                parameter[destination].copy_(parameter[source])


@pytest.mark.parametrize("n_critics", [2, 3])
def test_min_ties_route_to_the_first_critic(monkeypatch: pytest.MonkeyPatch, n_critics: int) -> None:
    """Equal minima: the actor's gradient goes through the first of the tied critics, as autograd's min routes it.

    The last critic is a copy of the first, so they tie on every row (they stay copies: same gradients, same Adam
    steps). With 2 critics every row ties and the second critic's group is empty; with 3 the middle critic
    takes the rows where it is the smaller.
    """
    engine, reference = _pair(monkeypatch, 3, policy_kwargs=dict(n_critics=n_critics))
    pool = _batches(3, 2 * BATCH)

    def policy_q_values(model: SAC) -> th.Tensor:
        with th.no_grad():
            return th.stack(model.critic(pool.observations, model.actor(pool.observations, deterministic=True)))

    for model in (engine, reference):
        _copy_critic(model, 0, n_critics - 1)
        if n_critics == 3:  # the middle critic shifted to be the smaller on about half the rows
            q_values = policy_q_values(model)
            with th.no_grad():
                model.critic.q_networks.layers[-1].bias[1] -= (q_values[1] - q_values[0]).median()
    _train_both(engine, reference, pool, 2)
    _assert_same_update(engine, reference)
    for parameter in engine.critic.parameters():
        assert th.equal(parameter[0], parameter[-1])  # still tied after the updates
    if n_critics == 3:  # not vacuous: the untied critic is the minimum on some rows and not on others
        q_values = policy_q_values(engine)
        assert 0 < int((q_values[1] < q_values[0]).sum()) < len(pool.observations)


@pytest.mark.parametrize("config", ["2-critics", "3-critics", "subset-min-actor", "no-hidden-layers", "deep-wide"])
def test_min_backward_without_host_counts_matches_autograd(monkeypatch: pytest.MonkeyPatch, config: str) -> None:
    """Where counts cannot be read on the host for free (CUDA), the "min" backward runs every critic on every row."""
    monkeypatch.setattr(sb3_softac.engine.update, "_counts_on_host", lambda device: False)
    engine, reference = _pair(monkeypatch, 2, **CONFIGURATIONS[config])
    pool = _batches(2, 2 * BATCH)
    _train_both(engine, reference, pool, 2)
    _assert_same_update(engine, reference)


def test_engine_reads_live_parameters_and_learning_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-place edits, set_parameters and a new lr_schedule between calls reach the engine's next update."""
    engine, reference = _pair(monkeypatch, 2)
    pool = _batches(2, 4 * BATCH)
    _train_both(engine, reference, pool, 1)
    # set_parameters copies into the existing tensors; an in-place edit changes them directly.
    parameters = reference.get_parameters()
    parameters["policy"]["actor.mu.weight"] = parameters["policy"]["actor.mu.weight"] * 0.5
    for model in (engine, reference):
        # A copy each: loading an optimizer state dict keeps its tensors, which two models must not share.
        model.set_parameters(copy.deepcopy(parameters), exact_match=False)
        with th.no_grad():
            model.critic.q_networks.layers[0].weight[0].mul_(-1.0)
        model.lr_schedule = lambda _: 1e-2
    _train_both(engine, reference, pool, 1)
    assert engine.actor.optimizer.param_groups[0]["lr"] == 1e-2
    _assert_same_update(engine, reference)


def test_gradients_reset_to_none_are_recreated(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, reference = _pair(monkeypatch, 2)
    pool = _batches(2, 2 * BATCH)
    _train_both(engine, reference, pool, 1)
    engine.actor.optimizer.zero_grad(set_to_none=True)
    engine.critic.optimizer.zero_grad(set_to_none=True)
    _train_both(engine, reference, pool, 1)
    _assert_same_update(engine, reference)


# --------------------------------------------------------------------------------------------------------------
# Which path runs
# --------------------------------------------------------------------------------------------------------------


class OwnExtractor(FlattenExtractor):
    pass


class OwnPolicy(SACPolicy):
    pass


class OwnGradientStep(SAC):
    def _gradient_step(self, replay_data: ReplayBufferSamples, update_actor: bool) -> th.Tensor:
        return super()._gradient_step(replay_data, update_actor)


FALLBACKS = {
    "discrete": (SAC, "MlpPolicy", partial(ActionSpaceEnv, spaces.Discrete(3)), dict(), "Box"),
    "dict-observations": (SAC, "MultiInputPolicy", PointGoalEnv, dict(), "policy class"),
    "images": (SAC, "CnnPolicy", partial(ImageEnv, action_space=BOX), dict(buffer_size=100), "policy class"),
    "images-mlp": (SAC, "MlpPolicy", partial(ImageEnv, action_space=BOX), dict(buffer_size=100), "image"),
    "gsde": (SAC, "MlpPolicy", VectorBoxEnv, dict(use_sde=True), "gSDE"),
    "elu": (SAC, "MlpPolicy", VectorBoxEnv, dict(policy_kwargs=dict(activation_fn=nn.ELU)), "ELU"),
    "shared-extractor": (
        SAC,
        "MlpPolicy",
        VectorBoxEnv,
        dict(policy_kwargs=dict(share_features_extractor=True)),
        "shared",
    ),
    "own-extractor": (
        SAC,
        "MlpPolicy",
        VectorBoxEnv,
        dict(policy_kwargs=dict(features_extractor_class=OwnExtractor)),
        "OwnExtractor",
    ),
    "own-policy": (SAC, OwnPolicy, VectorBoxEnv, dict(), "OwnPolicy"),
    "own-gradient-step": (OwnGradientStep, "MlpPolicy", VectorBoxEnv, dict(), "_gradient_step"),
    "sgd": (SAC, "MlpPolicy", VectorBoxEnv, dict(policy_kwargs=dict(optimizer_class=th.optim.SGD)), "SGD"),
}


@pytest.mark.parametrize("case", FALLBACKS.values(), ids=FALLBACKS.keys())
def test_uncovered_configurations_fall_back_to_autograd(case: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    algorithm, policy, env_class, kwargs, reason = case
    model = algorithm(policy, env_class(), learning_starts=0, batch_size=8, verbose=1, seed=0, **kwargs)
    assert model.update_path == "autograd"
    line = next(line for line in capsys.readouterr().out.splitlines() if "update path" in line)
    assert "autograd" in line and reason in line, line
    model.learn(10)  # and it trains
    assert model._n_updates > 0 and model.update_path == "autograd"


def test_update_path_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    model = SAC("MlpPolicy", VectorBoxEnv(), verbose=1, seed=0)
    assert model.update_path == "engine"
    assert "SAC update path: engine" in capsys.readouterr().out
    SAC("MlpPolicy", VectorBoxEnv(), verbose=0, seed=0)
    assert "update path" not in capsys.readouterr().out


def test_switch_forces_autograd_and_is_validated(capsys: pytest.CaptureFixture[str]) -> None:
    model = SAC("MlpPolicy", VectorBoxEnv(), update_engine="autograd", verbose=1, seed=0)
    assert model.update_path == "autograd"
    assert "SAC update path: autograd (update_engine='autograd')" in capsys.readouterr().out
    with pytest.raises(ValueError, match="update_engine='fast' is not one of"):
        SAC("MlpPolicy", VectorBoxEnv(), update_engine="fast")


def test_a_model_changed_after_construction_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = SAC("MlpPolicy", VectorBoxEnv(), learning_starts=0, batch_size=8, seed=0)
    model.critic.optimizer = th.optim.SGD(model.critic.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="critic optimizer SGD is not Adam"):
        model.learn(5)
    assert model.update_path == "autograd" and model._n_updates == 5


def test_save_load_keeps_the_switch_and_old_saves_default_to_auto(tmp_path) -> None:
    forced = SAC("MlpPolicy", VectorBoxEnv(), update_engine="autograd", seed=0)
    forced.save(tmp_path / "forced")
    assert SAC.load(tmp_path / "forced").update_path == "autograd"
    old = SAC("MlpPolicy", VectorBoxEnv(), seed=0)
    del old.update_engine  # a model saved before the switch existed
    old.save(tmp_path / "old")
    loaded = SAC.load(tmp_path / "old", env=VectorBoxEnv())
    assert loaded.update_engine == "auto" and loaded.update_path == "engine"
    loaded.learn(150)
    assert loaded._n_updates > 0


def test_hooks_send_the_update_to_autograd_until_removed(capsys: pytest.CaptureFixture[str]) -> None:
    """The engine runs no module and no autograd: while a hook is registered, autograd updates the model."""
    model = SAC("MlpPolicy", VectorBoxEnv(), learning_starts=0, batch_size=8, seed=0, verbose=1)
    model.learn(5)
    assert model.update_path == "engine"
    # The engine runs under inference mode: what it leaves behind must stay usable by autograd and the optimizers.
    for optimizer in (model.actor.optimizer, model.critic.optimizer, model.ent_coef_optimizer):
        assert optimizer is not None
        for state in optimizer.state.values():
            assert state and not any(value.is_inference() for value in state.values())
    assert not any(
        p.is_inference() or (p.grad is not None and p.grad.is_inference()) for p in model.policy.parameters()
    )
    calls = []
    handle = model.critic.q_networks.register_forward_hook(lambda *args: calls.append(1))
    with pytest.warns(UserWarning, match="autograd from now on \\(a EnsembleMLP module has hooks\\)"):
        model.learn(5)
    assert model.update_path == "autograd" and len(calls) > 0
    handle.remove()
    model.learn(5, reset_num_timesteps=False)
    assert model.update_path == "engine"
    assert "SAC update path: engine from now on" in capsys.readouterr().out


def _replace_a_parameter(model: SAC) -> None:
    model.actor.mu.weight = nn.Parameter(model.actor.mu.weight.detach().clone())


def _add_a_parameter_group(model: SAC) -> None:
    model.critic.optimizer.add_param_group({"params": [nn.Parameter(th.zeros(3))]})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_replace_a_parameter, "actor optimizer does not hold exactly"),
        (_add_a_parameter_group, "critic optimizer does not hold exactly"),
    ],
)
def test_parts_replaced_between_calls_are_noticed(change, reason: str) -> None:  # type: ignore[no-untyped-def]
    model = SAC("MlpPolicy", VectorBoxEnv(), learning_starts=0, batch_size=8, seed=0)
    model.learn(5)
    assert model.update_path == "engine"
    change(model)
    with pytest.warns(UserWarning, match=reason):
        model.learn(5, reset_num_timesteps=False)
    assert model.update_path == "autograd"


def test_a_new_optimizer_between_calls_is_the_one_stepped(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, reference = _pair(monkeypatch, 2)
    pool = _batches(2, 2 * BATCH)
    _train_both(engine, reference, pool, 1)
    for model in (engine, reference):
        model.critic.optimizer = th.optim.Adam(model.critic.parameters(), lr=0.05, fused=True)
        model.qf_learning_rate = 0.05
        model.qf_lr_schedule = lambda _: 0.05
    _train_both(engine, reference, pool, 2)
    assert engine.update_path == "engine"
    assert engine.critic.optimizer.state_dict()["state"][0]["step"] == 2
    _assert_same_update(engine, reference)


def test_parameters_given_new_memory_between_calls_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """``p.data = ...`` keeps the Parameter but moves its values: the engine's views of it must follow."""
    engine, reference = _pair(monkeypatch, 2)
    pool = _batches(2, 2 * BATCH)
    _train_both(engine, reference, pool, 1)
    for model in (engine, reference):
        with th.no_grad():
            for parameter in (model.critic.q_networks.layers[-1].weight, model.actor.mu.weight):
                parameter.data = parameter.detach().clone().mul_(-0.5)
            target_head = model.critic_target.q_networks.layers[-1].weight
            target_head.data = target_head.detach().clone().mul_(2.0)
    _train_both(engine, reference, pool, 1)
    assert engine.update_path == "engine"
    _assert_same_update(engine, reference)


def test_a_deep_copy_of_a_trained_model_trains_on_its_own_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, reference = _pair(monkeypatch, 2)
    pool = _batches(2, 2 * BATCH)
    _train_both(engine, reference, pool, 1)
    copied = copy.deepcopy(engine)
    before = [p.detach().clone() for p in engine.policy.parameters()]
    _train_both(copied, reference, pool, 1)
    assert copied.update_path == "engine"
    _assert_same_update(copied, reference)
    assert all(th.equal(p, q) for p, q in zip(engine.policy.parameters(), before, strict=True))


def _subnormal_times_one() -> float:
    """A float32 subnormal (below 1.2e-38) times one: itself normally, zero where subnormals are flushed."""
    return th.mul(th.tensor(1e-40, dtype=th.float32), 1.0).item()


@pytest.mark.parametrize("flushing_before", [False, True], ids=["mode-off", "mode-on"])
def test_engine_steps_flush_subnormals_and_restore_the_threads_mode(
    monkeypatch: pytest.MonkeyPatch, flushing_before: bool
) -> None:
    """Decayed Adam moments must not run in microcode (see ``denormals_flushed``); the caller's mode is kept."""
    model = filled_sac(100)
    seen: list[float] = []
    gradient_step = sb3_softac.engine.UpdateEngine.gradient_step

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(_subnormal_times_one())
        return gradient_step(self, *args, **kwargs)

    monkeypatch.setattr(sb3_softac.engine.UpdateEngine, "gradient_step", spy)
    th.set_flush_denormal(flushing_before)
    try:
        model.train(gradient_steps=3, batch_size=16)
        after = _subnormal_times_one()
    finally:
        th.set_flush_denormal(False)
    assert model.update_path == "engine"
    assert seen == [0.0, 0.0, 0.0]
    assert (after == 0.0) == flushing_before
    # The autograd update is left as it was: it does not flush.
    reference = filled_sac(100, update_engine="autograd")
    flushed_in_autograd: list[float] = []
    optimize = SAC._optimize

    def spy_autograd(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        flushed_in_autograd.append(_subnormal_times_one())
        return optimize(self, *args, **kwargs)

    monkeypatch.setattr(SAC, "_optimize", spy_autograd)
    reference.train(gradient_steps=1, batch_size=16)
    assert flushed_in_autograd and all(value != 0.0 for value in flushed_in_autograd)


@pytest.mark.parametrize("critic_options", [dict(), dict(dropout_rate=0.3, layer_norm=True)], ids=["plain", "droq"])
@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh], ids=["relu", "tanh"])
def test_engine_forward_passes_equal_the_modules(
    monkeypatch: pytest.MonkeyPatch, activation: type[nn.Module], critic_options: dict
) -> None:
    """The engine's own actor and critic forward passes (kept for speed) give what the policy's modules give.

    Log stds are pushed past both clamp bounds for some rows, so that the clamp is part of what is compared. With
    dropout, both passes draw their drops after the same seed.
    """
    model, _ = _pair(monkeypatch, 3, policy_kwargs=dict(n_critics=3, activation_fn=activation, **critic_options))
    engine = model._engine
    assert engine.begin(model) is None
    bound = engine._bound
    assert bound is not None
    generator = th.Generator().manual_seed(3)
    obs = th.rand(BATCH, OBS_DIM, generator=generator, dtype=th.float64) * 2 - 1
    actions = th.rand(BATCH, 3, generator=generator, dtype=th.float64) * 2 - 1
    with th.no_grad():
        model.actor.log_std.bias.copy_(th.tensor([-30.0, 0.0, 5.0], dtype=th.float64))
    buf = engine._buffers_for(BATCH, OBS_DIM, 3, bound.mu.weight, 3)
    rows = buf.next_rows
    with th.inference_mode():
        rows.actor_in.copy_(obs)
        rows.noise.normal_(generator=generator)
        derivatives.actor_forward(bound.actor_hidden, bound.mu, bound.log_std, bound.activation, rows)
        buf.critic_pass.obs.copy_(obs)
        buf.critic_pass.actions.copy_(actions)
        th.manual_seed(4)
        derivatives.critic_forward(bound.critic, bound.critic_head, bound.activation, bound.ops, buf.critic_pass)
        engine_q = buf.q.clone()
        engine_actor = [t.clone() for t in (rows.mean, rows.log_std, rows.actions)]
        noise = rows.noise.clone()
    with th.no_grad():
        mean, log_std, _ = model.actor.get_action_dist_params(obs)
        expected_actions = th.tanh(mean + log_std.exp() * noise)
        th.manual_seed(4)
        expected_q = model.critic.q_values(obs, actions)
    for actual, expected, name in zip(
        engine_actor, (mean, log_std, expected_actions), ("mean", "log_std", "actions"), strict=True
    ):
        _assert_relative(actual, expected, name, rel=1e-12)
    assert {float(v) for v in log_std[:, 0]} == {LOG_STD_MIN} and {float(v) for v in log_std[:, 2]} == {LOG_STD_MAX}
    _assert_relative(engine_q, expected_q, "q", rel=1e-12)


def _dropouts(model: SAC, target: bool) -> list[nn.Dropout]:
    critic = model.critic_target if target else model.critic
    return [module for module in critic.q_networks.layers if isinstance(module, nn.Dropout)]


def test_dropout_modes_and_rates_changed_between_calls_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The target critics' dropout switched off, then every rate changed: the engine follows each change."""
    engine, reference = _pair(monkeypatch, 2, policy_kwargs=dict(dropout_rate=0.2, layer_norm=True))
    pool = _batches(2, 3 * BATCH)
    _train_both(engine, reference, pool, 1)
    for model in (engine, reference):
        for dropout in _dropouts(model, target=True):
            dropout.eval()
    _train_both(engine, reference, pool, 1)
    assert engine.update_path == "engine"
    _assert_same_update(engine, reference)
    for model in (engine, reference):
        for dropout in [*_dropouts(model, target=False), *_dropouts(model, target=True)]:
            dropout.train()
            dropout.p = 0.5
    _train_both(engine, reference, pool, 1)
    assert engine.update_path == "engine"
    _assert_same_update(engine, reference)


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_a_dropout_rate_the_engine_does_not_draw_falls_back(rate: float) -> None:
    """At p=0 and p=1 nn.Dropout draws differently (nothing at all at 1): autograd takes over, with a warning."""
    model = SAC(
        "MlpPolicy", VectorBoxEnv(), learning_starts=0, batch_size=8, seed=0, policy_kwargs=dict(dropout_rate=0.1)
    )
    model.learn(5)
    assert model.update_path == "engine"
    _dropouts(model, target=False)[0].p = rate
    with pytest.warns(UserWarning, match=f"drops at p={rate}"):
        model.learn(5, reset_num_timesteps=False)
    assert model.update_path == "autograd"


def test_dropout_off_the_cpu_is_left_to_autograd() -> None:
    """Off the CPU, EnsembleDropout runs nn.Dropout's own kernel, which the engine does not reproduce."""
    dropouts = [None, EnsembleDropout(0.1)]
    assert dropout_reason(dropouts, th.device("cpu")) is None
    reason = dropout_reason(dropouts, th.device("cuda"))
    assert reason is not None and "CPU only" in reason and "cuda" in reason
    assert dropout_reason([None], th.device("cuda")) is None
