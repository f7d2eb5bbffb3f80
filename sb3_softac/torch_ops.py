"""The private PyTorch operations that the update engine calls, found and checked before their first use.

The engine (:mod:`sb3_softac.engine`) calls operations that PyTorch does not promise to keep: the fused Adam/AdamW
kernels, foreach kernels, ATen's layer-norm forward and three backward kernels, and the hook dictionaries of
modules, tensors and optimizers (the engine runs no module and no autograd, so it must see every hook that it would
bypass). A release may rename, remove or change any of them. :func:`engine_ops_for` finds each one and runs it once
per device and dtype on small tensors, called as the engine calls it, against the public PyTorch operation that
defines it. A missing operation, one that raises, or one whose result differs, makes the model train through
autograd, with a warning that names it (see ``SAC.update_path``), so that a PyTorch release never changes the update
silently.

It also reads a convention that autograd has changed between releases: whether ``clamp`` passes the gradient at
its bounds (it did up to torch 2.13 and does not from 2.14 on). The engine's log-std clamp follows what autograd
does on the running release.

:func:`nonfinite_check` is the fused non-finite check of :mod:`sb3_softac.nonfinite`, used by both update paths,
with a public fallback where the private kernel is missing or wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch as th
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.optim import optimizer as torch_optimizer

from sb3_softac.distributions import LOG_STD_MAX, LOG_STD_MIN, clamp_log_std
from sb3_softac.networks import LAYER_NORM_EPS

Activation = Literal["relu", "tanh"]
#: Called as ``check(tensors, flag, scale)``: sets ``flag`` to 1 where a tensor holds NaN or inf (see nonfinite).
NonfiniteCheck = Callable[[list[th.Tensor], th.Tensor, th.Tensor], None]


class OpsUnavailableError(RuntimeError):
    """A private PyTorch operation is missing, raises, or no longer computes what the engine expects."""


def _lookup(owner: object, path: str) -> Any:
    """``owner.a.b.c`` for ``path = "a.b.c"``; a missing name raises :class:`OpsUnavailableError`."""
    value = owner
    for name in path.split("."):
        try:
            value = getattr(value, name)
        except (AttributeError, RuntimeError) as error:  # torch.ops raises RuntimeError for some missing ops
            raise OpsUnavailableError(f"torch.{path} is missing") from error
    return value


@dataclass(frozen=True)
class EngineOps:
    """The private operations of the engine, resolved, with the calls the engine makes of them."""

    fused_adam: Callable[..., None]
    fused_adamw: Callable[..., None]
    foreach_add_: Callable[..., None]
    foreach_lerp_: Callable[..., None]
    threshold_backward: Callable[..., th.Tensor]
    tanh_backward: Callable[..., th.Tensor]
    native_layer_norm: Callable[..., tuple[th.Tensor, th.Tensor, th.Tensor]]
    native_layer_norm_backward: Callable[..., tuple[th.Tensor | None, ...]]
    #: Whether autograd's ``clamp`` passes the gradient where the input equals the lower (upper) bound.
    clamp_passes_lower: bool = True
    clamp_passes_upper: bool = True

    @classmethod
    def resolve(cls) -> EngineOps:
        """The operations found by name; :class:`OpsUnavailableError` names the first one missing."""
        return cls(
            fused_adam=_lookup(th, "_fused_adam_"),
            fused_adamw=_lookup(th, "_fused_adamw_"),
            foreach_add_=_lookup(th, "_foreach_add_"),
            foreach_lerp_=_lookup(th, "_foreach_lerp_"),
            threshold_backward=_lookup(th, "ops.aten.threshold_backward.grad_input"),
            tanh_backward=_lookup(th, "ops.aten.tanh_backward.grad_input"),
            native_layer_norm=_lookup(th, "native_layer_norm"),
            native_layer_norm_backward=_lookup(th, "ops.aten.native_layer_norm_backward.default"),
        )

    def adam_(
        self,
        tensors: Sequence[list[th.Tensor]],
        increments: list[th.Tensor],
        flag: th.Tensor,
        group: dict[str, Any],
        decoupled: bool,
    ) -> None:
        """One fused Adam (AdamW when ``decoupled``) step of a parameter group, skipped on the device when ``flag``.

        :param tensors: parameters, gradients, first and second moments, max second moments (amsgrad, else
            empty) and step counts, the optimizer's own state tensors
        :param increments: ``1 - flag`` per parameter: a skipped step does not count, as in ``Optimizer.step``
        :param flag: the non-finite flag, the kernel's ``found_inf``
        :param group: the optimizer's parameter group, whose hyper-parameters are read now
        """
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = tensors
        self.foreach_add_(steps, increments)
        beta1, beta2 = group["betas"]
        kernel = self.fused_adamw if decoupled else self.fused_adam
        kernel(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            amsgrad=group["amsgrad"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            grad_scale=None,
            found_inf=flag,
        )

    def polyak_(self, targets: list[th.Tensor], sources: list[th.Tensor], flag: th.Tensor, tau: float) -> None:
        """``target <- target + w (source - target)`` for each pair, ``w = (1 - flag) tau`` (0 once flagged).

        The weight is made in the parameters' dtype: torch 2.4's foreach lerp refuses a float32 weight for
        float64 tensors.
        """
        weight = (1.0 - flag.to(targets[0].dtype)) * tau
        self.foreach_lerp_(targets, sources, [weight] * len(targets))

    def activation_backward(self, grad: th.Tensor, output: th.Tensor, activation: Activation, out: th.Tensor) -> None:
        """Gradient through the activation from its output: ``grad * 1[y > 0]`` or ``grad * (1 - y^2)``."""
        # ATen's own backward kernels: a where() or a multiply by a mask costs many times more on the CPU.
        if activation == "relu":
            self.threshold_backward(grad, output, 0, grad_input=out)
        else:
            self.tanh_backward(grad, output, grad_input=out)

    def layer_norm(self, z: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """``xhat = (z - mean) * rstd`` over the last dimension, with the mean and ``rstd`` (new tensors), as
        :class:`sb3_softac.networks.EnsembleLayerNorm` normalises before its affine transform."""
        return self.native_layer_norm(z, z.shape[-1:], None, None, LAYER_NORM_EPS)

    def layer_norm_backward(self, grad: th.Tensor, z: th.Tensor, mean: th.Tensor, rstd: th.Tensor) -> th.Tensor:
        """The gradient w.r.t. ``z`` of :meth:`layer_norm`'s ``xhat``, given the gradient ``grad`` w.r.t. it (new)."""
        grad_z, _, _ = self.native_layer_norm_backward(
            grad, z, z.shape[-1:], mean, rstd, None, None, [True, False, False]
        )
        assert grad_z is not None
        return grad_z

    def clamp_mask(self, raw: th.Tensor, clamped: th.Tensor, out: th.Tensor) -> None:
        """Where autograd's log-std clamp passes the gradient: inside the bounds, and on each bound where it does."""
        if self.clamp_passes_lower and self.clamp_passes_upper:
            # Where the clamp left the value as it was, bounds included.
            th.eq(clamped, raw, out=out)
            return
        (th.ge if self.clamp_passes_lower else th.gt)(raw, LOG_STD_MIN, out=out)
        out.logical_and_((th.le if self.clamp_passes_upper else th.lt)(raw, LOG_STD_MAX))


def _clamp_convention(device: th.device, dtype: th.dtype) -> tuple[bool, bool]:
    """Whether autograd's gradient of the policy's log-std clamp passes at the lower and at the upper bound."""
    raw = th.tensor([LOG_STD_MIN, LOG_STD_MAX], dtype=dtype, device=device, requires_grad=True)
    with th.enable_grad():
        clamp_log_std(raw).sum().backward()
    assert raw.grad is not None
    lower, upper = raw.grad.tolist()
    return lower == 1.0, upper == 1.0


def _close(actual: th.Tensor, expected: th.Tensor, dtype: th.dtype | None = None) -> bool:
    tolerance = 1e-5 if (dtype or actual.dtype) == th.float32 else 1e-10
    return bool(th.allclose(actual, expected, rtol=tolerance, atol=tolerance))


def _adam_reference(
    start: th.Tensor, grads: list[th.Tensor], group: dict[str, Any], decoupled: bool
) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """Adam (AdamW when ``decoupled``) by its definition, in float64: the parameter and both moments after ``grads``.

    Kingma & Ba (2015), algorithm 1, with PyTorch's conventions: L2 decay added to the gradient (Adam) or decoupled
    decay ``p <- p (1 - lr wd)`` (AdamW, Loshchilov & Hutter 2019); ``eps`` added to the bias-corrected root of the
    second moment; amsgrad's running maximum of the second moment.
    """
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    param = start.double().cpu()
    exp_avg, exp_avg_sq, max_exp_avg_sq = (th.zeros_like(param) for _ in range(3))
    for t, raw in enumerate(grads, start=1):
        grad = raw.double().cpu()
        if decoupled:
            param = param * (1 - lr * decay)
        else:
            grad = grad + decay * param
        exp_avg = beta1 * exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        max_exp_avg_sq = th.maximum(max_exp_avg_sq, exp_avg_sq)
        second = max_exp_avg_sq if group["amsgrad"] else exp_avg_sq
        denominator = second.sqrt() / (1 - beta2**t) ** 0.5 + eps
        param = param - lr / (1 - beta1**t) * exp_avg / denominator
    return param, exp_avg, exp_avg_sq


def _check_adam(ops: EngineOps, device: th.device, dtype: th.dtype) -> None:
    """Two steps of ``adam_`` against Adam/AdamW by definition, then a flagged step that changes nothing.

    The reference is computed by hand, not by ``torch.optim``: an optimizer's first step imports torch's compiler
    stack, a cost that a model built only to act should not pay.
    """
    generator = th.Generator().manual_seed(0)
    start = th.randn(7, generator=generator, dtype=th.float64).to(device, dtype)
    grads = [th.randn(7, generator=generator, dtype=th.float64).to(device, dtype) for _ in range(2)]
    for decoupled in (False, True):
        for amsgrad in (False, True):
            name = f"torch._fused_adam{'w' if decoupled else ''}_ (amsgrad={amsgrad}, {dtype})"
            group = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=False)
            param = start.clone()
            state = [th.zeros_like(param) for _ in range(3)]
            step = th.zeros((), dtype=th.float32, device=device)
            flag = th.zeros((), dtype=th.float32, device=device)
            tensors = ([param], [grads[0]], [state[0]], [state[1]], [state[2]] if amsgrad else [], [step])
            for grad in grads:
                tensors[1][0] = grad
                with th.no_grad():
                    ops.adam_(tensors, [1.0 - flag], flag, group, decoupled)
            expected = _adam_reference(start, grads, group, decoupled)
            if not all(_close(a.double().cpu(), b, dtype) for a, b in zip((param, *state[:2]), expected, strict=True)):
                raise OpsUnavailableError(f"{name} does not step as {'AdamW' if decoupled else 'Adam'} does")
            if float(step) != 2.0:
                raise OpsUnavailableError(f"{name} does not count its steps")
            flag.fill_(1.0)
            before = [t.clone() for t in (param, *state, step)]
            with th.no_grad():
                ops.adam_(tensors, [1.0 - flag], flag, group, decoupled)
            if not all(th.equal(a, b) for a, b in zip(before, (param, *state, step), strict=True)):
                raise OpsUnavailableError(f"{name} changes the parameters or state when found_inf is set")


def _check_polyak(ops: EngineOps, device: th.device, dtype: th.dtype) -> None:
    generator = th.Generator().manual_seed(1)
    target, source = (th.randn(5, generator=generator, dtype=th.float64).to(device, dtype) for _ in range(2))
    expected = th.lerp(target, source, 0.3)
    flag = th.zeros((), dtype=th.float32, device=device)
    ops.polyak_([target], [source], flag, 0.3)
    if not _close(target, expected):
        raise OpsUnavailableError(f"torch._foreach_lerp_ differs from torch.lerp ({dtype})")
    flag.fill_(1.0)
    before = target.clone()
    ops.polyak_([target], [source], flag, 0.3)
    if not th.equal(target, before):
        raise OpsUnavailableError(f"torch._foreach_lerp_ with a zero weight changes its target ({dtype})")


def _check_activations(ops: EngineOps, device: th.device, dtype: th.dtype) -> None:
    generator = th.Generator().manual_seed(2)
    x = th.randn(4, 6, generator=generator, dtype=th.float64).to(device, dtype)
    grad = th.randn(4, 6, generator=generator, dtype=th.float64).to(device, dtype)
    x[0, 0] = 0.0  # relu's kink: autograd passes no gradient there
    activations: tuple[tuple[Activation, Callable[[th.Tensor], th.Tensor], str], ...] = (
        ("relu", th.relu, "threshold_backward"),
        ("tanh", th.tanh, "tanh_backward"),
    )
    for activation, function, op in activations:
        inputs = x.clone().requires_grad_(True)
        with th.enable_grad():
            output = function(inputs)
            (expected,) = th.autograd.grad(output, inputs, grad)
        out = th.empty_like(grad)
        ops.activation_backward(grad, output.detach(), activation, out)
        if not _close(out, expected):
            raise OpsUnavailableError(f"torch.ops.aten.{op}.grad_input differs from autograd's {activation} ({dtype})")


def _check_layer_norm(ops: EngineOps, device: th.device, dtype: th.dtype) -> None:
    generator = th.Generator().manual_seed(3)
    z = th.randn(2, 3, 6, generator=generator, dtype=th.float64).to(device, dtype)
    grad = th.randn(2, 3, 6, generator=generator, dtype=th.float64).to(device, dtype)
    inputs = z.clone().requires_grad_(True)
    with th.enable_grad():
        output = nn.functional.layer_norm(inputs, z.shape[-1:], eps=LAYER_NORM_EPS)
        (expected,) = th.autograd.grad(output, inputs, grad)
    xhat, mean, rstd = ops.layer_norm(z)
    if not _close(xhat, output.detach()) or not _close(
        rstd, (z.var(-1, unbiased=False, keepdim=True) + LAYER_NORM_EPS).rsqrt()
    ):
        raise OpsUnavailableError(f"torch.native_layer_norm differs from torch.nn.functional.layer_norm ({dtype})")
    if not _close(ops.layer_norm_backward(grad, z, mean, rstd), expected):
        raise OpsUnavailableError(f"torch.ops.aten.native_layer_norm_backward differs from autograd's ({dtype})")


def _check_hooks() -> None:
    """Each hook dictionary that the engine reads holds a hook registered through PyTorch's public API."""
    module = nn.Linear(1, 1)
    optimizer = th.optim.Adam([nn.Parameter(th.zeros(1))])
    if module._parameters.get("weight") is not module.weight or module._modules != {}:
        raise OpsUnavailableError("Module._parameters or Module._modules no longer holds a module's members")

    def hook(*args: object) -> None:
        return None

    def size(hooks: object) -> int:
        return 0 if hooks is None else len(hooks)  # type: ignore[arg-type]

    weight = module.weight
    global_kinds = ("forward_pre", "forward", "backward_pre", "backward")
    registrations: list[tuple[str, object, str, Callable[..., Any]]] = [
        ("Module", module, "_forward_pre_hooks", module.register_forward_pre_hook),
        ("Module", module, "_forward_hooks", module.register_forward_hook),
        ("Module", module, "_backward_pre_hooks", module.register_full_backward_pre_hook),
        ("Module", module, "_backward_hooks", module.register_full_backward_hook),
        ("Tensor", weight, "_backward_hooks", weight.register_hook),
        ("Tensor", weight, "_post_accumulate_grad_hooks", weight.register_post_accumulate_grad_hook),
        ("Optimizer", optimizer, "_optimizer_step_pre_hooks", optimizer.register_step_pre_hook),
        ("Optimizer", optimizer, "_optimizer_step_post_hooks", optimizer.register_step_post_hook),
    ]
    registrations += [
        (
            "torch.nn.modules.module",
            module_hooks,
            f"_global_{kind}_hooks",
            getattr(module_hooks, f"register_module_{'full_' if 'backward' in kind else ''}{kind}_hook"),
        )
        for kind in global_kinds
    ]
    registrations += [
        (
            "torch.optim.optimizer",
            torch_optimizer,
            f"_global_optimizer_{kind}_hooks",
            getattr(torch_optimizer, f"register_optimizer_step_{kind}_hook"),
        )
        for kind in ("pre", "post")
    ]
    for owner_name, owner, attribute, register in registrations:
        name = f"{owner_name}.{attribute}"
        try:
            before = size(getattr(owner, attribute))
            handle = register(hook)
            try:
                held = size(getattr(owner, attribute)) == before + 1
            finally:
                handle.remove()
        except (AttributeError, TypeError) as error:
            raise OpsUnavailableError(f"{name} is missing") from error
        if not held:
            raise OpsUnavailableError(f"{name} does not hold a hook registered through PyTorch's public API")


@functools.cache
def engine_ops_for(device: th.device, dtype: th.dtype) -> EngineOps | str:
    """The engine's operations on ``device`` and ``dtype``, checked, or why the engine cannot use them there.

    Checked once per process for each device and dtype; ``engine_ops_for.cache_clear()`` checks again.
    """
    try:
        ops = EngineOps.resolve()
        # The checks draw no random number from the global generators: a seeded run stays the same run.
        with th.random.fork_rng(devices=[]):
            _check_adam(ops, device, dtype)
            _check_polyak(ops, device, dtype)
            _check_activations(ops, device, dtype)
            _check_layer_norm(ops, device, dtype)
            _check_hooks()
            lower, upper = _clamp_convention(device, dtype)
    except OpsUnavailableError as error:
        return f"torch {th.__version__}: {error}"
    except Exception as error:  # an operation that raises: the error's own message usually names it
        return f"torch {th.__version__}: an engine operation raised {type(error).__name__}: {error}"
    return dataclasses.replace(ops, clamp_passes_lower=lower, clamp_passes_upper=upper)


def _public_nonfinite_check(tensors: list[th.Tensor], flag: th.Tensor, scale: th.Tensor) -> None:
    """What ``torch._amp_foreach_non_finite_check_and_unscale_`` does with ``scale == 1``, in public operations."""
    bad = th.stack([th.isfinite(t).all().logical_not() for t in tensors]).any()
    th.maximum(flag, bad.to(flag.dtype), out=flag)


@functools.cache
def nonfinite_check(device: th.device) -> NonfiniteCheck:
    """The fused non-finite check on ``device`` where it works as expected, else a public equivalent (slower)."""
    reason = None
    try:
        check: NonfiniteCheck = _lookup(th, "_amp_foreach_non_finite_check_and_unscale_")
        scale = th.ones((), dtype=th.float32, device=device)
        for dtype in (th.float32, th.float64):
            for value, expected in ((1.0, 0.0), (float("nan"), 1.0), (float("inf"), 1.0)):
                flag = th.zeros((), dtype=th.float32, device=device)
                tensors = [th.ones(3, dtype=dtype, device=device), th.full((2,), value, dtype=dtype, device=device)]
                check(tensors, flag, scale)
                if float(flag) != expected or not th.equal(tensors[0], th.ones_like(tensors[0])):
                    reason = f"it does not flag {value} in {dtype} as expected"
    except Exception as error:
        reason = str(error)
    if reason is None:
        return check
    warnings.warn(
        f"torch {th.__version__}: torch._amp_foreach_non_finite_check_and_unscale_ is unusable ({reason}); the "
        "non-finite guard uses public operations instead (the same result, a little slower).",
        RuntimeWarning,
        stacklevel=2,
    )
    return _public_nonfinite_check
