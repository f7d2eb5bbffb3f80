"""The critic options of ``sb3_softac.SAC`` (dropout, layer norm, REDQ subsets, policy delay, critic learning rate)
each change what they claim, cost no extra Python work per ensemble member, and are off by default."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from math import comb
from typing import Any

import numpy as np
import pytest
import torch as th
from envs import VectorBoxEnv, filled_sac
from gymnasium import spaces
from stable_baselines3.common.logger import Logger
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sb3_softac.engine.update
import sb3_softac.sac
from sb3_softac import SAC
from sb3_softac.networks import EnsembleLayerNorm, EnsembleLinear


def _model(learning_starts: int = 64, net_arch: list[int] | None = None, **kwargs: Any) -> SAC:
    """A model on 5-d observations / 3-d actions whose replay buffer holds ``learning_starts`` transitions (no update
    has been made yet), with a silent logger."""
    policy_kwargs = dict(net_arch=net_arch or [32, 32])
    policy_kwargs.update(kwargs.pop("policy_kwargs", {}))
    return filled_sac(learning_starts, batch_size=32, policy_kwargs=policy_kwargs, **kwargs)


def _batch(model: SAC, size: int = 32) -> tuple[th.Tensor, th.Tensor]:
    data = model.replay_buffer.sample(size)
    return data.observations, data.actions


def _set_constant_outputs(q_networks: nn.Module) -> None:
    """Make member ``i`` of an ensemble output the constant ``i`` (zero output weights, bias ``i``)."""
    last = [m for m in q_networks.modules() if isinstance(m, EnsembleLinear)][-1]
    state = q_networks.state_dict()
    name = next(n for n, m in q_networks.named_modules() if m is last)
    state[f"{name}.weight"] = th.zeros_like(last.weight)
    state[f"{name}.bias"] = th.arange(last.n_members, dtype=last.bias.dtype).reshape(-1, 1, 1).expand_as(last.bias)
    q_networks.load_state_dict(state)


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[tuple, dict, Any]]:
    """Record every call of ``sb3_softac.sac.<name>`` (and the engine's) with arguments and result, still running it."""
    calls: list[tuple[tuple, dict, Any]] = []
    original: Callable = getattr(sb3_softac.sac, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(sb3_softac.sac, name, spy)
    if hasattr(sb3_softac.engine.update, name):  # the update engine computes its forward values with the same functions
        monkeypatch.setattr(sb3_softac.engine.update, name, spy)
    return calls


# ---------------------------------------------------------------------------------------------------------------
# Dropout and layer norm
# ---------------------------------------------------------------------------------------------------------------


def test_dropout_is_active_in_training_mode_only() -> None:
    model = _model(policy_kwargs=dict(dropout_rate=0.1))
    obs, actions = _batch(model)
    critic = model.critic
    assert sum(isinstance(m, nn.Dropout) for m in critic.q_networks.layers) == 2  # one per hidden layer
    with th.no_grad():
        critic.set_training_mode(True)
        train_1, train_2 = critic.q_values(obs, actions), critic.q_values(obs, actions)
        critic.set_training_mode(False)
        eval_1, eval_2 = critic.q_values(obs, actions), critic.q_values(obs, actions)
    assert not th.equal(train_1, train_2)  # a new dropout mask at every call
    assert not th.equal(train_1, eval_1)
    th.testing.assert_close(eval_1, eval_2, rtol=0, atol=0)
    # predict() and evaluation run in eval mode, the gradient steps in training mode.
    model.train(1, 32)
    assert critic.training and all(m.training for m in critic.q_networks.modules() if isinstance(m, nn.Dropout))
    model.predict(obs[0].numpy())
    assert not critic.training and not any(m.training for m in critic.modules() if isinstance(m, nn.Dropout))


def test_target_critic_keeps_dropout_active() -> None:
    model = _model(policy_kwargs=dict(dropout_rate=0.1))
    obs, actions = _batch(model)
    target = model.critic_target
    model.policy.set_training_mode(False)  # e.g. after predict(): the target is still sampled with dropout
    dropouts = [m for m in target.q_networks.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 2 and all(m.training for m in dropouts)
    assert not target.training  # everything else (e.g. batch norm in a features extractor) in eval mode
    with th.no_grad():
        assert not th.equal(target.q_values(obs, actions), target.q_values(obs, actions))
    # Switching the policy's mode back and forth (as learn() does) leaves it on.
    model.policy.set_training_mode(True)
    model.train(2, 32)
    assert all(m.training for m in dropouts)


def test_layer_norm_normalises_hidden_activations() -> None:
    model = _model(net_arch=[32, 24], policy_kwargs=dict(layer_norm=True))
    norms = [m for m in model.critic.q_networks.layers if isinstance(m, EnsembleLayerNorm)]
    assert len(norms) == 2
    assert not any(isinstance(m, EnsembleLayerNorm) for m in model.actor.modules())  # critics only
    # Order in each hidden layer: linear -> layer norm -> activation (DroQ, without dropout here).
    kinds = [type(m).__name__ for m in model.critic.q_networks.layers]
    assert kinds == ["EnsembleLinear", "EnsembleLayerNorm", "ReLU"] * 2 + ["EnsembleLinear"]
    outputs: list[th.Tensor] = []
    handles = [norm.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach())) for norm in norms]
    obs, actions = _batch(model, 64)
    with th.no_grad():
        model.critic.q_values(obs, actions)
    for handle in handles:
        handle.remove()
    assert [out.shape for out in outputs] == [(2, 64, 32), (2, 64, 24)]  # (member, batch, features)
    for out in outputs:
        # Default affine parameters (weight 1, bias 0): each member's features have mean 0 and std 1 per sample.
        th.testing.assert_close(out.mean(dim=-1), th.zeros(out.shape[:2]), atol=1e-5, rtol=0)
        th.testing.assert_close(out.std(dim=-1, unbiased=False), th.ones(out.shape[:2]), atol=1e-3, rtol=0)
    # With other affine parameters, each member applies its own.
    with th.no_grad():
        norms[0].weight[1].fill_(2.0)
        norms[0].bias[1].fill_(3.0)
    outputs.clear()
    handle = norms[0].register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
    with th.no_grad():
        model.critic.q_values(obs, actions)
    handle.remove()
    th.testing.assert_close(outputs[0][0].mean(dim=-1), th.zeros(64), atol=1e-5, rtol=0)
    th.testing.assert_close(outputs[0][1].mean(dim=-1), th.full((64,), 3.0), atol=1e-5, rtol=0)
    th.testing.assert_close(outputs[0][1].std(dim=-1, unbiased=False), th.full((64,), 2.0), atol=2e-3, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# REDQ: random subsets in the target, ensemble mean in the actor
# ---------------------------------------------------------------------------------------------------------------


def test_redq_target_takes_min_over_random_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Critic i (online and target) outputs the constant i; critics do not learn (qf_learning_rate=0), so every
    target's minimum is the smallest index of the pair drawn at that step: P(min = k) = (9 - k) / 45.

    On the autograd update, which evaluates every target critic; the update engine evaluates only the drawn pair
    and matches the autograd update draw for draw (tests/test_engine.py)."""
    model = _model(
        net_arch=[8],
        policy_kwargs=dict(n_critics=10),
        critic_subset_size=2,
        actor_q_reduction="mean",
        qf_learning_rate=0.0,
        update_engine="autograd",
    )
    _set_constant_outputs(model.critic.q_networks)
    _set_constant_outputs(model.critic_target.q_networks)
    minima = _spy(monkeypatch, "min_over_critics")
    actor_losses = _spy(monkeypatch, "actor_loss")
    n_steps = 450
    model.train(n_steps, 32)

    assert len(minima) == n_steps  # only the target reduces over critics; the actor takes the mean
    values = []
    for args, _, result in minima:
        q_values = args[0]
        assert q_values.shape == (10, 32, 1)  # all 10 target critics are evaluated...
        th.testing.assert_close(q_values[:, 0, 0], th.arange(10.0))
        assert result.shape == (32, 1) and th.all(result == result[0, 0])  # ...one pair per step for the whole batch
        values.append(int(result[0, 0]))
    counts = Counter(values)
    # The minimum of a pair is at most 8 (9 only with single critics, 8 impossible for triples and larger).
    assert max(counts) == 8 and 9 not in counts
    frequencies = np.array([counts[k] for k in range(10)]) / n_steps
    expected = np.array([comb(9 - k, 1) / comb(10, 2) for k in range(10)])
    np.testing.assert_allclose(frequencies, expected, atol=0.06)
    assert len(counts) >= 6  # subsets vary across steps

    # The actor maximises the ensemble mean, (0 + ... + 9) / 10 = 4.5, not a minimum.
    assert len(actor_losses) == n_steps
    for args, _, _ in actor_losses:
        th.testing.assert_close(args[0], th.full((32, 1), 4.5))


def test_redq_subset_size_cannot_exceed_ensemble() -> None:
    with pytest.raises(ValueError, match="exceeds n_critics"):
        SAC("MlpPolicy", VectorBoxEnv(), policy_kwargs=dict(n_critics=3), critic_subset_size=4)


def test_default_target_and_actor_take_min_over_all_critics(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(net_arch=[8], policy_kwargs=dict(n_critics=3), qf_learning_rate=0.0)
    _set_constant_outputs(model.critic.q_networks)
    _set_constant_outputs(model.critic_target.q_networks)
    minima = _spy(monkeypatch, "min_over_critics")
    actor_reductions = _spy(monkeypatch, "reduce_critics")
    model.train(5, 32)
    # Target (subset None) and actor at each step; both the minimum over the 3 critics, i.e. 0.
    assert len(minima) == 5 and len(actor_reductions) == 5
    for args, kwargs, result in minima:
        assert args[1:] in ((), (None,)) and kwargs.get("subset_size") is None
        assert args[0].shape[0] == 3
        th.testing.assert_close(result, th.zeros(32, 1))
    for args, _, result in actor_reductions:
        assert args[1:] == ("min",) and args[0].shape[0] == 3
        th.testing.assert_close(result, th.zeros(32, 1))


# ---------------------------------------------------------------------------------------------------------------
# policy_delay and qf_learning_rate
# ---------------------------------------------------------------------------------------------------------------


def _snapshot(module: nn.Module) -> list[th.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[th.Tensor], module: nn.Module) -> bool:
    return any(not th.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))


def test_policy_delay_updates_actor_every_second_step() -> None:
    model = _model(policy_delay=2)
    actor_changed, critic_changed, alpha_changed, logged_actor_loss = [], [], [], []
    for _ in range(6):
        actor, critic = _snapshot(model.actor), _snapshot(model.critic)
        log_alpha = model.log_ent_coef.detach().clone()
        model.set_logger(Logger(None, []))
        model.train(1, 32)
        actor_changed.append(_changed(actor, model.actor))
        critic_changed.append(_changed(critic, model.critic))
        alpha_changed.append(not th.equal(log_alpha, model.log_ent_coef))
        logged_actor_loss.append("train/actor_loss" in model.logger.name_to_value)
        assert "train/critic_loss" in model.logger.name_to_value
    # Counted over the whole run: updates 0, 2, 4 move the actor and the temperature, every update the critics.
    assert actor_changed == [True, False] * 3
    assert alpha_changed == [True, False] * 3
    assert logged_actor_loss == [True, False] * 3
    assert critic_changed == [True] * 6
    assert model._n_updates == 6
    # Within one train() call the count continues: 3 steps from update 6 move the actor at 6 and 8.
    actor = _snapshot(model.actor)
    model.train(3, 32)
    assert _changed(actor, model.actor) and model._n_updates == 9
    actor = _snapshot(model.actor)
    model.train(1, 32)  # update 9: critics only
    assert not _changed(actor, model.actor)


def test_qf_learning_rate_sets_the_critic_optimizer_only() -> None:
    model = _model(learning_rate=3e-4, qf_learning_rate=1e-3)
    model.train(1, 32)
    assert model.critic.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert model.actor.optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)
    assert model.ent_coef_optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)
    assert model.logger.name_to_value["train/qf_learning_rate"] == pytest.approx(1e-3)
    assert model.logger.name_to_value["train/learning_rate"] == pytest.approx(3e-4)
    # Without it, the critics use learning_rate and nothing extra is logged.
    plain = _model(learning_rate=5e-4)
    plain.train(1, 32)
    assert plain.critic.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert "train/qf_learning_rate" not in plain.logger.name_to_value


# ---------------------------------------------------------------------------------------------------------------
# Cost of the ensemble size in Python work
# ---------------------------------------------------------------------------------------------------------------


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched (forward, backward and optimizer) by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _count_module_calls() -> Iterator[Counter[str]]:
    calls: Counter[str] = Counter()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda module, _: calls.update([type(module).__name__]))
    try:
        yield calls
    finally:
        handle.remove()


def _work_of_one_update(n_critics: int, **kwargs: Any) -> tuple[Counter[str], Counter[str]]:
    policy_kwargs = dict(n_critics=n_critics, **kwargs.pop("policy_kwargs", {}))
    model = _model(net_arch=[32, 32], policy_kwargs=policy_kwargs, **kwargs)
    model.train(1, 64)  # warm-up: lazy initialisation (optimizer states) is not part of the steady state
    counter = _OpCounter()
    with _count_module_calls() as module_calls, counter:
        model.train(1, 64)
    return module_calls, counter.ops


@pytest.mark.parametrize(
    ("small", "large", "options"),
    [
        (2, 10, {}),
        (2, 10, dict(policy_kwargs=dict(dropout_rate=0.01, layer_norm=True))),
        (3, 10, dict(critic_subset_size=2, actor_q_reduction="mean")),
    ],
    ids=["plain", "droq", "redq"],
)
def test_ensemble_size_does_not_add_python_work(small: int, large: int, options: dict[str, Any]) -> None:
    """One gradient step with 10 critics runs exactly the module calls and tensor operators of one with 2 (or 3):
    the ensemble is batched, not looped over in Python."""
    modules_small, ops_small = _work_of_one_update(small, **options)
    modules_large, ops_large = _work_of_one_update(large, **options)
    assert modules_small == modules_large
    assert ops_small == ops_large
    assert sum(modules_small.values()) > 0 and sum(ops_small.values()) > 50  # the counters did see the update


# ---------------------------------------------------------------------------------------------------------------
# Defaults: exactly SAC
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("action_space", ["box", "discrete"])
def test_defaults_build_plain_sac(action_space: str) -> None:
    env = VectorBoxEnv()
    if action_space == "discrete":
        env.action_space = spaces.Discrete(4)
    model = SAC("MlpPolicy", env, seed=0)
    assert model.critic_subset_size is None and model.policy_delay == 1 and model.qf_learning_rate is None
    assert model.actor_q_reduction == "min"
    assert model.policy.dropout_rate == 0.0 and model.policy.layer_norm is False and model.policy.n_critics == 2
    for network in (model.critic, model.critic_target, model.actor):
        kinds = {type(m) for m in network.modules()}
        assert not kinds & {nn.Dropout, EnsembleLayerNorm, nn.LayerNorm, nn.BatchNorm1d}
    assert [type(m).__name__ for m in model.critic.q_networks.layers] == ["EnsembleLinear", "ReLU"] * 2 + [
        "EnsembleLinear"
    ]
    # The critics' optimizer uses learning_rate.
    assert model.critic.optimizer.param_groups[0]["lr"] == model.actor.optimizer.param_groups[0]["lr"] == 3e-4
