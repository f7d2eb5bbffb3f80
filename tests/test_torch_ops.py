"""The engine's private torch operations: checked before use, and a fallback to autograd (named) when one is missing,
raises or changed. Which devices take the engine by default. The non-finite guard without its fused kernel."""

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch as th
from envs import VectorBoxEnv, filled_sac, make_sac
from torch import nn

import sb3_softac.engine
import sb3_softac.sac
from sb3_softac import SAC, torch_ops


@pytest.fixture(autouse=True)
def _checked_anew() -> Iterator[None]:
    """Each test checks the operations as it has patched them; later tests check the real ones again."""
    torch_ops.engine_ops_for.cache_clear()
    torch_ops.nonfinite_check.cache_clear()
    yield
    torch_ops.engine_ops_for.cache_clear()
    torch_ops.nonfinite_check.cache_clear()


def _sac(**kwargs: Any) -> SAC:
    model = make_sac(VectorBoxEnv(), **kwargs)
    assert isinstance(model, SAC)
    return model


@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_this_torch_passes_every_check_on_the_cpu(dtype: th.dtype) -> None:
    ops = torch_ops.engine_ops_for(th.device("cpu"), dtype)
    assert isinstance(ops, torch_ops.EngineOps), ops


def _falls_back(match: str) -> SAC:
    """A default model built now takes autograd, with a warning naming the reason, and still trains."""
    with pytest.warns(UserWarning, match=match):
        model = _sac()
    assert model.update_path == "autograd"
    model.learn(80)
    assert model._n_updates > 0
    return model


def _hide(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    """The engine's look-up finds no ``torch.<hidden>``, as on a release that renamed it (torch's own optimizers,
    which may call it too, keep it)."""
    real = torch_ops._lookup

    def lookup(owner: object, path: str) -> Any:
        if path == hidden:
            raise torch_ops.OpsUnavailableError(f"torch.{path} is missing")
        return real(owner, path)

    monkeypatch.setattr(torch_ops, "_lookup", lookup)


@pytest.mark.parametrize(
    "name",
    [
        "_fused_adam_",
        "_fused_adamw_",
        "_foreach_add_",
        "_foreach_lerp_",
        "ops.aten.threshold_backward.grad_input",
        "ops.aten.tanh_backward.grad_input",
    ],
)
def test_a_missing_private_op_falls_back_to_autograd_by_name(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    _hide(monkeypatch, name)
    _falls_back(rf"torch\.{name.replace('.', '[.]')} is missing")


def test_lookup_reports_a_name_torch_lacks() -> None:
    with pytest.raises(torch_ops.OpsUnavailableError, match=r"torch\._no_such_kernel_ is missing"):
        torch_ops._lookup(th, "_no_such_kernel_")
    with pytest.raises(torch_ops.OpsUnavailableError, match=r"torch\.ops\.aten\.no_such_backward\.grad_input"):
        torch_ops._lookup(th, "ops.aten.no_such_backward.grad_input")


def test_a_changed_fused_adam_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that still runs but steps differently (here: twice the learning rate) is caught before training."""
    real = th._fused_adam_

    def changed(*args: Any, **kwargs: Any) -> None:
        kwargs["lr"] = 2 * kwargs["lr"]
        real(*args, **kwargs)

    monkeypatch.setattr(th, "_fused_adam_", changed)
    _falls_back(r"torch\._fused_adam_ \(amsgrad=False, torch.float32\) does not step as Adam does")


def test_a_fused_adam_that_ignores_found_inf_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    real = th._fused_adam_

    def ignoring(*args: Any, **kwargs: Any) -> None:
        kwargs["found_inf"] = None
        real(*args, **kwargs)

    monkeypatch.setattr(th, "_fused_adam_", ignoring)
    _falls_back(r"_fused_adam_ .* changes the parameters or state when found_inf is set")


def test_a_raising_foreach_lerp_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def raising(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("expected dtype double for `weight` but got dtype float")

    monkeypatch.setattr(th, "_foreach_lerp_", raising)
    _falls_back(r"an engine operation raised RuntimeError: expected dtype double")


def test_a_changed_lerp_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    real = th._foreach_lerp_

    def changed(targets: list[th.Tensor], sources: list[th.Tensor], weights: list[th.Tensor]) -> None:
        real(targets, sources, [1.0 - weight for weight in weights])

    monkeypatch.setattr(th, "_foreach_lerp_", changed)
    _falls_back(r"torch\._foreach_lerp_ differs from torch\.lerp")


def test_a_hook_dictionary_that_no_longer_holds_hooks_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A release that keeps forward hooks elsewhere: the engine would not see them, so it must not run."""

    class _Handle:
        def remove(self) -> None:
            return None

    monkeypatch.setattr(nn.Module, "register_forward_hook", lambda self, hook, **kwargs: _Handle())
    _falls_back(r"Module\._forward_hooks does not hold a hook registered through PyTorch's public API")


def test_the_checks_leave_the_random_streams_alone() -> None:
    th.manual_seed(5)
    expected = th.rand(3)
    th.manual_seed(5)
    assert isinstance(torch_ops.engine_ops_for(th.device("cpu"), th.float32), torch_ops.EngineOps)
    assert th.equal(th.rand(3), expected)


def test_auto_takes_the_engine_only_on_verified_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the CPU taken off the verified list, "auto" runs autograd there and says why; "engine" still runs it."""
    assert _sac().update_path == "engine"
    monkeypatch.setattr(sb3_softac.sac, "VERIFIED_DEVICES", ())
    auto = _sac(verbose=1)
    assert auto.update_path == "autograd"
    auto.learn(80)
    assert auto.update_path == "autograd"  # train() does not bind the engine on an unverified device
    forced = _sac(update_engine="engine")
    assert forced.update_path == "engine"
    forced.learn(80)
    assert forced.update_path == "engine"


def test_update_engine_engine_refuses_a_model_it_does_not_cover() -> None:
    with pytest.raises(ValueError, match=r"update_engine='engine' cannot run this model's update: gSDE .*'auto'"):
        _sac(update_engine="engine", use_sde=True)


def test_update_engine_engine_refuses_a_subclass_that_overrides_the_update() -> None:
    class OwnStep(SAC):
        def _optimize(self, optimizer: th.optim.Optimizer, loss: th.Tensor) -> None:
            super()._optimize(optimizer, loss)

    with pytest.raises(ValueError, match=r"the SAC subclass overrides _optimize"):
        make_sac(VectorBoxEnv(), algo=OwnStep, update_engine="engine")
    assert make_sac(VectorBoxEnv(), algo=OwnStep).update_path == "autograd"


def test_update_engine_engine_still_falls_back_on_an_unusable_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "_fused_adam_")
    with pytest.warns(UserWarning, match=r"torch\._fused_adam_ is missing"):
        model = _sac(update_engine="engine")
    assert model.update_path == "autograd"


@pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA device")
def test_engine_matches_autograd_on_cuda() -> None:
    """On CUDA the engine runs only when asked for; its float32 updates must then stay with autograd's.

    The float64 comparison of single updates is CPU-only (``tests/test_engine.py``): SB3's preprocessing casts
    replayed observations to float32.
    """
    assert _sac(device="cuda").update_path == "autograd"
    models = [_sac(device="cuda", update_engine=choice, learning_starts=40) for choice in ("engine", "autograd")]
    models[1].policy.load_state_dict(models[0].policy.state_dict())
    for model in models:
        np.random.seed(0)  # noqa: NPY002 (SB3's replay buffer samples from the global generator)
        th.manual_seed(0)
        model.learn(100)
    assert [model.update_path for model in models] == ["engine", "autograd"]
    assert models[0]._n_updates == models[1]._n_updates == 60
    expected = models[1].policy.state_dict()
    for name, value in models[0].policy.state_dict().items():
        assert th.allclose(value, expected[name], rtol=1e-4, atol=1e-5), name


def test_the_nonfinite_guard_works_without_its_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torch._amp_foreach_non_finite_check_and_unscale_, a NaN still stops the update (public operations)."""
    _hide(monkeypatch, "_amp_foreach_non_finite_check_and_unscale_")
    model = filled_sac(64, VectorBoxEnv())
    before = {name: value.clone() for name, value in model.policy.state_dict().items()}
    original = model.replay_buffer.sample

    def poisoned(batch_size: int, env: Any = None) -> Any:
        data = original(batch_size, env)
        rewards = data.rewards.clone()
        rewards[0] = float("nan")
        return data._replace(rewards=rewards)

    model.replay_buffer.sample = poisoned  # type: ignore[method-assign]
    with (
        pytest.warns(RuntimeWarning, match=r"_amp_foreach_non_finite_check_and_unscale_ is unusable"),
        pytest.raises(FloatingPointError, match="critic loss is nan"),
    ):
        model.train(2, 32)
    after = model.policy.state_dict()
    assert all(th.equal(after[name], value) for name, value in before.items())


@pytest.mark.parametrize("dtype", [th.float32, th.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_public_nonfinite_check_flags_as_the_fused_kernel(dtype: th.dtype, bad: float | None) -> None:
    tensors = [th.ones(3, dtype=dtype), th.zeros(2, 2, dtype=dtype)]
    if bad is not None:
        tensors[1][1, 0] = bad
    flags = []
    for check in (torch_ops._public_nonfinite_check, th._amp_foreach_non_finite_check_and_unscale_):
        flag = th.zeros((), dtype=th.float32)
        check([t.clone() for t in tensors], flag, th.ones((), dtype=th.float32))
        flags.append(float(flag))
    assert flags == [0.0 if bad is None else 1.0] * 2
    # A set flag stays set.
    flag = th.ones((), dtype=th.float32)
    torch_ops._public_nonfinite_check([th.ones(2, dtype=dtype)], flag, th.ones((), dtype=th.float32))
    assert float(flag) == 1.0


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("optimizer_class", [th.optim.Adam, th.optim.AdamW])
def test_the_checks_adam_reference_is_torch_optims(optimizer_class: type[th.optim.Optimizer], amsgrad: bool) -> None:
    """The definition the fused kernels are checked against gives what torch.optim's for-loop optimizers give."""
    generator = th.Generator().manual_seed(4)
    start = th.randn(9, generator=generator, dtype=th.float64)
    grads = [th.randn(9, generator=generator, dtype=th.float64) for _ in range(3)]
    reference = start.clone().requires_grad_(True)
    optimizer = optimizer_class([reference], lr=0.01, weight_decay=0.1, amsgrad=amsgrad, foreach=False)
    for grad in grads:
        reference.grad = grad.clone()
        optimizer.step()
    group = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=False)
    param, exp_avg, exp_avg_sq = torch_ops._adam_reference(start, grads, group, optimizer_class is th.optim.AdamW)
    state = optimizer.state[reference]
    assert th.allclose(param, reference.detach(), rtol=1e-12, atol=1e-14)
    assert th.allclose(exp_avg, state["exp_avg"], rtol=1e-12, atol=1e-14)
    assert th.allclose(exp_avg_sq, state["exp_avg_sq"], rtol=1e-12, atol=1e-14)
