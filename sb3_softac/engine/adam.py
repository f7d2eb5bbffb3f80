"""The optimizers' step, driven by the engine: their own fused Adam/AdamW kernel on their own state tensors."""

from __future__ import annotations

import torch as th
from torch.optim import optimizer as torch_optimizer

from sb3_softac.nonfinite import flag_nonfinite, guarded_step
from sb3_softac.torch_ops import EngineOps

# Per parameter group: parameters, gradients, first and second moments, max second moments (amsgrad), steps, and
# each step's increment.
_AdamTensors = tuple[
    list[th.Tensor],
    list[th.Tensor],
    list[th.Tensor],
    list[th.Tensor],
    list[th.Tensor],
    list[th.Tensor],
    list[th.Tensor],
]


class AdamStep:
    """``optimizer.step()`` for a fused Adam/AdamW: the same kernel on the optimizer's own state tensors.

    ``Optimizer.step`` collects its tensors in Python at every call; here they are collected
    once per ``train`` call. The hyper-parameters come from the optimizer at each call and the state tensors are
    its own, so ``optimizer.state_dict()`` stays the truth; the non-finite flag is the kernel's ``found_inf``, as
    in :func:`sb3_softac.nonfinite.guarded_step`. Anything else (state not created yet, a non-fused optimizer,
    gradient scaling, step hooks) goes through ``guarded_step`` itself.
    """

    def __init__(self, optimizer: th.optim.Optimizer, ops: EngineOps) -> None:
        self.optimizer = optimizer
        self._ops = ops
        self._tensors: list[_AdamTensors] | None = None
        # 1 - flag (a float32 scalar, as the flag): a step's increment of the step counts, 0 when the kernel skips it.
        device = optimizer.param_groups[0]["params"][0].device
        self._increment = th.empty((), dtype=th.float32, device=device)
        self._one = th.ones((), dtype=th.float32, device=device)

    def _collect(self) -> list[_AdamTensors] | None:
        optimizer = self.optimizer
        if (
            getattr(optimizer, "grad_scale", None) is not None
            or optimizer._optimizer_step_pre_hooks
            or optimizer._optimizer_step_post_hooks
            or torch_optimizer._global_optimizer_pre_hooks
            or torch_optimizer._global_optimizer_post_hooks
        ):
            return None
        tensors: list[_AdamTensors] = []
        for group in optimizer.param_groups:
            if not group.get("fused") or group["differentiable"]:
                return None
            if any(not optimizer.state.get(p) for p in group["params"]):
                return None
            states = [optimizer.state[p] for p in group["params"]]
            tensors.append(
                (
                    list(group["params"]),
                    [p.grad for p in group["params"]],
                    [state["exp_avg"] for state in states],
                    [state["exp_avg_sq"] for state in states],
                    [state["max_exp_avg_sq"] for state in states] if group["amsgrad"] else [],
                    [state["step"] for state in states],
                    [self._increment] * len(states),
                )
            )
        return tensors

    def forget(self) -> None:
        """Collect the tensors again at the next call."""
        self._tensors = None

    def __call__(self, loss: th.Tensor, flag: th.Tensor) -> None:
        """Check ``loss`` and the gradients, then step unless ``flag`` is set (see :mod:`sb3_softac.nonfinite`).

        :param loss: the loss whose gradients are in the parameters' ``.grad``
        :param flag: the ``train`` call's non-finite flag
        """
        flag_nonfinite(flag, [loss], self.optimizer)
        if self._tensors is None:
            self._tensors = self._collect()
            if self._tensors is None:
                # Outside inference mode: a first step creates the optimizer's state, which the autograd update
                # (after a fallback) must be able to update in place.
                with th.inference_mode(False):
                    guarded_step(self.optimizer, flag)
                return
        th.sub(self._one, flag, out=self._increment)
        for group, tensors in zip(self.optimizer.param_groups, self._tensors, strict=True):
            decoupled = group.get("decoupled_weight_decay", isinstance(self.optimizer, th.optim.AdamW))
            self._ops.adam_(tensors[:6], tensors[6], flag, group, decoupled)
