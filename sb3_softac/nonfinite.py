"""Keep a non-finite update out of the weights, without a host sync per gradient step.

A training call keeps one device-side flag: a float32 scalar tensor that is 0 while every loss and gradient
seen so far is finite, and becomes 1, for the rest of the call, as soon as one is not. The contract:

* before each optimizer step, :func:`flag_nonfinite` checks that step's loss and gradients;
* every optimizer step goes through :func:`guarded_step`, which leaves the parameters and the optimizer's
  state untouched while the flag is set;
* every Polyak update of target networks goes through :func:`guarded_lerp_`, whose weight is zero while the
  flag is set.

The host reads the flag once, with the call's statistics, and raises there. By then every skipped update
has left the model in its last finite state, so that catching the error and saving keeps a usable model.
"""

import functools
from collections.abc import Iterable, Sequence

import torch as th
from torch import nn

from sb3_softac.torch_ops import nonfinite_check


def new_flag(device: th.device | str) -> th.Tensor:
    """A cleared flag: a float32 scalar, the dtype that fused optimizers read as ``found_inf``."""
    return th.zeros((), dtype=th.float32, device=device)


def flag_nonfinite(flag: th.Tensor, losses: Sequence[th.Tensor], optimizer: th.optim.Optimizer) -> None:
    """Set ``flag`` to 1 if a loss or a gradient of ``optimizer``'s parameters holds NaN or inf.

    The flag is never cleared here: it stays set for the rest of the call.

    :param flag: the call's flag (see :func:`new_flag`)
    :param losses: the losses whose gradients the optimizer is about to apply (scalars)
    :param optimizer: the optimizer whose parameters' ``.grad`` are checked
    """
    tensors = [loss.detach().reshape(1) for loss in losses]
    tensors += [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    # GradScaler's own check: one kernel over all tensors that sets ``flag`` to 1 on a non-finite entry and
    # otherwise leaves it alone. It also multiplies the tensors in place by the given scale; 1.0 changes nothing.
    nonfinite_check(flag.device)(tensors, flag, _unit_scale(flag.device))


@functools.cache
def _unit_scale(device: th.device) -> th.Tensor:
    """A float32 1.0 on ``device``, made once rather than at every check."""
    return th.ones((), dtype=th.float32, device=device)


def skips_on_flag(optimizer: th.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` itself skips the update when its ``found_inf`` attribute is 1.

    PyTorch's fused optimizers (``Adam``, ``AdamW``, ``SGD``, ``Adagrad`` with ``fused=True``) declare it with
    ``_step_supports_amp_scaling``, the attribute ``torch.amp.GradScaler`` relies on: the kernel reads
    ``found_inf`` on the device, does nothing when it is 1, and takes back its increment of the step count.
    The attribute is set at construction, but the step follows each parameter group's ``fused`` option, which
    ``load_state_dict`` may have turned off (a state saved by a non-fused optimizer): every group must be fused.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups
    )


def guarded_step(optimizer: th.optim.Optimizer, flag: th.Tensor) -> None:
    """``optimizer.step()``, without effect on the parameters and the optimizer's state when ``flag`` is 1.

    Fused optimizers get the flag as ``found_inf`` and skip on the device (:func:`skips_on_flag`). Any other
    optimizer steps, and then every parameter it updated and every tensor of its state are put back, on the
    device, to their values before the step where the flag is set. State that the step created (an
    optimizer's first step) is put back to zeros, the initial state of PyTorch's own optimizers. Python
    numbers in a state (no built-in optimizer keeps its step count so by default) cannot be restored without
    a host sync and are left as the step wrote them; a state tensor on another device than the flag (Adam's
    step count on the CPU when the parameters are on a GPU) costs one copy of the flag to that device.

    :param optimizer: the optimizer, with gradients in place
    :param flag: the call's flag (see :func:`new_flag`)
    """
    if skips_on_flag(optimizer):
        optimizer.found_inf = flag  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    saved_params = [p.detach().clone() for p in params]
    saved_state = {
        p: {key: value.clone() for key, value in optimizer.state[p].items() if isinstance(value, th.Tensor)}
        for p in params
        if p in optimizer.state
    }
    optimizer.step()
    skip = flag.bool()
    skip_on = {skip.device: skip}  # one copy of the flag per device that holds optimizer state
    with th.no_grad():
        for param, saved in zip(params, saved_params, strict=True):
            param.copy_(th.where(skip, saved, param))
        for param in params:
            before = saved_state.get(param, {})
            for key, value in optimizer.state[param].items():
                if isinstance(value, th.Tensor):
                    old = before[key] if key in before else th.zeros_like(value)
                    if value.device not in skip_on:
                        skip_on[value.device] = skip.to(value.device)
                    value.copy_(th.where(skip_on[value.device], old, value))


def guarded_lerp_(
    targets: Iterable[nn.Parameter], sources: Iterable[nn.Parameter], tau: float, flag: th.Tensor
) -> None:
    """Polyak averaging ``target <- (1 - w) target + w source`` with ``w = tau``, or ``w = 0`` when ``flag`` is 1.

    :param targets: the target network's parameters, updated in place
    :param sources: the online network's parameters, in the same order
    :param tau: the Polyak coefficient
    :param flag: the call's flag (see :func:`new_flag`)
    """
    weight = (1.0 - flag) * tau
    with th.no_grad():
        for target, source in zip(targets, sources, strict=True):
            # In the target's dtype: torch 2.4's lerp refuses a float32 weight for float64 tensors.
            target.lerp_(source, weight.to(target.dtype))


def guarded_copy_(targets: Iterable[th.Tensor], sources: Iterable[th.Tensor], flag: th.Tensor) -> None:
    """``target <- source`` (e.g. batch-norm statistics of target networks), or nothing when ``flag`` is 1.

    :param targets: tensors updated in place
    :param sources: tensors to copy, in the same order
    :param flag: the call's flag (see :func:`new_flag`)
    """
    pairs = list(zip(targets, sources, strict=True))
    if not pairs:
        return
    keep = flag.bool()
    with th.no_grad():
        for target, source in pairs:
            target.copy_(th.where(keep, target, source))
