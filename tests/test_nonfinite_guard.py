"""A non-finite update never reaches the weights: at the ``FloatingPointError`` the model (weights, target weights,
entropy coefficient, optimizer states) is the last finite state, on the device-side path that fused optimizers take
and on the restoring path of any other optimizer, through the autograd update and the update engine alike."""

import copy
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from envs import filled_sac
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from torch.utils._python_dispatch import TorchDispatchMode

from sb3_softac import SAC
from sb3_softac.nonfinite import flag_nonfinite, guarded_copy_, guarded_lerp_, guarded_step, new_flag, skips_on_flag

OPTIMIZERS = {
    "fused-adam": {},
    "foreach-adam": dict(optimizer_kwargs=dict(fused=False)),
    "rmsprop": dict(optimizer_class=th.optim.RMSprop),
}


# The two update paths of ``SAC.train``: autograd, and the autograd-free engine that "auto" picks for these models.
PATHS = {"autograd": "autograd", "engine": "auto"}
# The engine steps Adam only: with another optimizer "auto" runs the autograd update, covered above.
CASES = [(optimizer, path) for optimizer in OPTIMIZERS for path in PATHS if (optimizer, path) != ("rmsprop", "engine")]


def _model(optimizer: str = "fused-adam", ent_coef: str | float = "auto", path: str = "autograd") -> SAC:
    """A model whose buffer holds 64 transitions and whose optimizers have taken two finite steps."""
    model = filled_sac(
        64,
        "Pendulum-v1",
        ent_coef=ent_coef,
        update_engine=PATHS[path],
        policy_kwargs=dict(net_arch=[16, 16], **OPTIMIZERS[optimizer]),
    )
    model.train(2, 32)
    assert model.update_path == path
    return model


def _state(model: SAC) -> dict[str, Any]:
    """Everything an update may change: policy (actor, critics, target critics), log alpha, optimizer states."""
    state: dict[str, Any] = {f"policy.{k}": v.clone() for k, v in model.policy.state_dict().items()}
    optimizers = {"actor": model.actor.optimizer, "critic": model.critic.optimizer}
    if model.ent_coef_optimizer is not None:
        assert model.log_ent_coef is not None
        state["log_ent_coef"] = model.log_ent_coef.detach().clone()
        optimizers["ent_coef"] = model.ent_coef_optimizer
    for name, optimizer in optimizers.items():
        for index, per_param in optimizer.state_dict()["state"].items():
            for key, value in per_param.items():
                state[f"{name}.{index}.{key}"] = value.clone() if isinstance(value, th.Tensor) else value
    return state


def _assert_same(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, th.Tensor):
            assert th.isfinite(actual[key]).all(), key
            assert th.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


def _poison_sample(model: SAC, bad_call: int) -> None:
    """From now on, the ``bad_call``-th minibatch drawn (1-based) carries one NaN reward."""
    buffer = model.replay_buffer
    assert buffer is not None
    original = buffer.sample
    calls = [0]

    def sample(batch_size: int, env: Any = None) -> ReplayBufferSamples:
        data = original(batch_size, env)
        # The update engine draws all the minibatches of a train() call at once: count minibatches, not calls.
        first = calls[0]
        calls[0] += batch_size // model.batch_size
        if first < bad_call <= calls[0]:
            rewards = data.rewards.clone()
            rewards[(bad_call - first - 1) * model.batch_size] = float("nan")
            data = data._replace(rewards=rewards)
        return data

    buffer.sample = sample  # type: ignore[method-assign]


def _seed(seed: int) -> None:
    # Minibatch indices come from NumPy's global generator, policy noise from torch's.
    np.random.seed(seed)  # noqa: NPY002 (SB3's replay buffer samples from the global generator)
    th.manual_seed(seed)


@pytest.mark.parametrize(("optimizer", "path"), CASES)
@pytest.mark.parametrize("ent_coef", ["auto", 0.1])
def test_nan_in_first_step_leaves_the_state_before_the_call(optimizer: str, ent_coef: str | float, path: str) -> None:
    model = _model(optimizer, ent_coef, path)
    before = _state(model)
    n_updates = model._n_updates
    _poison_sample(model, bad_call=1)
    with pytest.raises(FloatingPointError, match=rf"the critic loss is nan at gradient step {n_updates + 1} "):
        model.train(3, 32)
    _assert_same(_state(model), before)
    assert model._n_updates == n_updates


@pytest.mark.parametrize(("optimizer", "path"), CASES)
def test_nan_in_a_later_step_keeps_the_steps_before_it(optimizer: str, path: str) -> None:
    """Steps 1 and 2 of the call are applied (as by a clean ``train(2)`` from the same state and random streams),
    step 3 carries a NaN reward and neither it nor step 4 is applied."""
    model = _model(optimizer, path=path)
    reference = copy.deepcopy(model)
    start = _state(model)
    n_updates = model._n_updates
    _seed(1)
    reference.train(2, 32)
    expected = _state(reference)

    _poison_sample(model, bad_call=3)
    _seed(1)
    with pytest.raises(FloatingPointError, match=rf"critic loss is nan at gradient step {n_updates + 3} "):
        model.train(4, 32)
    _assert_same(_state(model), expected)
    assert model._n_updates == n_updates + 2
    for network in ("critic", "critic_target", "actor"):  # the finite steps did change every network
        keys = [key for key in start if key.startswith(f"policy.{network}.")]
        assert keys and any(not th.equal(expected[key], start[key]) for key in keys)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_model_saved_after_the_error_is_the_last_finite_one(tmp_path: Path, path: str) -> None:
    model = _model(path=path)
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    _poison_sample(model, bad_call=2)
    with pytest.raises(FloatingPointError):
        model.train(2, 32)
    model.save(tmp_path / "model.zip")
    loaded = SAC.load(tmp_path / "model.zip")
    after_one_step = loaded.policy.state_dict()
    assert all(th.isfinite(v).all() for v in after_one_step.values())
    assert any(not th.equal(after_one_step[k], before[k]) for k in before)  # the first, finite step was kept
    obs = th.zeros(1, 3)
    with th.no_grad():
        th.testing.assert_close(loaded.actor(obs, deterministic=True), model.actor(obs, deterministic=True))


def test_a_non_finite_gradient_of_a_finite_loss_is_caught() -> None:
    """The flag covers gradients, not only losses: an infinite gradient behind a finite critic loss is not applied."""
    model = _model()
    before = _state(model)
    weight = model.critic.optimizer.param_groups[0]["params"][0]
    handle = weight.register_hook(lambda grad: grad * float("inf"))
    try:
        with pytest.raises(FloatingPointError, match="a gradient of the critic loss is not finite"):
            model.train(2, 32)
    finally:
        handle.remove()
    _assert_same(_state(model), before)


@contextmanager
def _count_ops() -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            counts[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    with Counting():
        yield counts


@pytest.mark.parametrize("path", PATHS)
def test_no_host_sync_per_gradient_step(path: str) -> None:
    """Reading a device value on the host (``item``, ``bool``, ``.cpu()``) happens once per call, not per step, on
    both update paths (``_model`` checks that the model takes ``path``)."""
    model = _model(path=path)
    with _count_ops() as few:
        model.train(1, 32)
    with _count_ops() as many:
        model.train(6, 32)
    assert few["_local_scalar_dense"] == many["_local_scalar_dense"] == 0
    assert few["is_nonzero"] == many["is_nonzero"] == 0
    assert few["_amp_foreach_non_finite_check_and_unscale_"] == 3  # critic, temperature, actor
    assert many["_amp_foreach_non_finite_check_and_unscale_"] == 18


# ---------------------------------------------------------------------------------------------------------------
# The building blocks, against plain PyTorch
# ---------------------------------------------------------------------------------------------------------------


def _param_and_grad(values: list[float]) -> th.nn.Parameter:
    param = th.nn.Parameter(th.tensor([0.5, -1.0, 2.0]))
    param.grad = th.tensor(values)
    return param


@pytest.mark.parametrize(
    ("optimizer_class", "kwargs", "fused"),
    [
        (th.optim.Adam, dict(fused=True), True),
        (th.optim.Adam, dict(foreach=False), False),
        (th.optim.AdamW, dict(fused=True), True),
        (th.optim.SGD, dict(momentum=0.9), False),
        (th.optim.RMSprop, {}, False),
    ],
)
def test_guarded_step_matches_plain_steps_and_skips_when_flagged(
    optimizer_class: type[th.optim.Optimizer], kwargs: dict[str, Any], fused: bool
) -> None:
    """A skipped first step leaves the optimizer as if it had never stepped: the next finite steps equal those of a
    fresh optimizer; unflagged steps equal plain ``step()`` calls."""
    guarded = _param_and_grad([float("nan"), 1.0, 1.0])
    guarded_optimizer = optimizer_class([guarded], lr=0.1, **kwargs)
    assert skips_on_flag(guarded_optimizer) is fused
    plain = _param_and_grad([0.0, 0.0, 0.0])
    plain_optimizer = optimizer_class([plain], lr=0.1, **kwargs)

    flag = new_flag("cpu")
    flag_nonfinite(flag, [th.tensor(1.0)], guarded_optimizer)
    assert flag.item() == 1.0
    guarded_step(guarded_optimizer, flag)
    th.testing.assert_close(guarded.detach(), th.tensor([0.5, -1.0, 2.0]), rtol=0, atol=0)
    assert not hasattr(guarded_optimizer, "found_inf")

    flag = new_flag("cpu")
    for gradient in ([0.3, -0.2, 1.0], [1.0, 2.0, -3.0]):
        guarded.grad = th.tensor(gradient)
        plain.grad = th.tensor(gradient)
        flag_nonfinite(flag, [th.tensor(1.0)], guarded_optimizer)
        guarded_step(guarded_optimizer, flag)
        plain_optimizer.step()
        assert flag.item() == 0.0
        th.testing.assert_close(guarded.detach(), plain.detach(), rtol=0, atol=0)
    for key, value in plain_optimizer.state[plain].items():
        th.testing.assert_close(guarded_optimizer.state[guarded][key], value, rtol=0, atol=0)


def test_a_fused_optimizer_that_loaded_a_non_fused_state_is_restored_instead() -> None:
    """``load_state_dict`` from a non-fused optimizer (an SB3 archive's) turns the groups' ``fused`` off: the step then
    cannot take ``found_inf`` and the restoring path must be used."""
    param = _param_and_grad([1.0, 1.0, 1.0])
    optimizer = th.optim.Adam([param], fused=True)
    optimizer.load_state_dict(th.optim.Adam([_param_and_grad([1.0, 1.0, 1.0])]).state_dict())
    assert not skips_on_flag(optimizer)
    param.grad = th.tensor([float("nan"), 0.0, 0.0])
    flag = new_flag("cpu")
    flag_nonfinite(flag, [], optimizer)
    guarded_step(optimizer, flag)
    assert th.equal(param.detach(), th.tensor([0.5, -1.0, 2.0]))


def test_a_non_finite_loss_alone_sets_the_flag_and_it_stays_set() -> None:
    optimizer = th.optim.Adam([_param_and_grad([1.0, 1.0, 1.0])], fused=True)
    flag = new_flag("cpu")
    flag_nonfinite(flag, [th.tensor(2.0)], optimizer)
    assert flag.item() == 0.0
    flag_nonfinite(flag, [th.tensor(float("inf"))], optimizer)
    assert flag.item() == 1.0
    flag_nonfinite(flag, [th.tensor(2.0)], optimizer)
    assert flag.item() == 1.0


def test_guarded_polyak_update_and_copy() -> None:
    targets = [th.nn.Parameter(th.randn(4, 3)), th.nn.Parameter(th.randn(3))]
    sources = [th.nn.Parameter(th.randn(4, 3)), th.nn.Parameter(th.randn(3))]
    expected = [t.detach().clone().lerp_(s.detach(), 0.005) for t, s in zip(targets, sources, strict=True)]
    kept = [t.detach().clone() for t in targets]
    guarded_lerp_(targets, sources, 0.005, th.ones(()))
    for target, old in zip(targets, kept, strict=True):
        assert th.equal(target.detach(), old)
    guarded_lerp_(targets, sources, 0.005, th.zeros(()))
    for target, new in zip(targets, expected, strict=True):
        assert th.equal(target.detach(), new)

    stats, new_stats = [th.zeros(3), th.tensor(4)], [th.ones(3), th.tensor(7)]
    guarded_copy_(stats, new_stats, th.ones(()))
    assert th.equal(stats[0], th.zeros(3)) and stats[1].item() == 4
    guarded_copy_(stats, new_stats, th.zeros(()))
    assert th.equal(stats[0], th.ones(3)) and stats[1].item() == 7
