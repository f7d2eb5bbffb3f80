"""An autograd-free SAC update for the common configuration.

Autograd records every operation and replays it backwards; here a gradient step is a fixed list of ATen calls under
inference mode, with forward and backward passes derived by hand and written into preallocated tensors, which is
what makes a CPU step with small networks fast. It runs the same update as ``sb3_softac.SAC._gradient_step``, with
the same random draws in the same order, and obeys the non-finite guard of :mod:`sb3_softac.nonfinite` as the
autograd update does. Nothing is copied out of the model: the engine reads the live parameters and optimizers on
every call, writes the gradients into each parameter's ``.grad`` and steps the model's own optimizers (their fused
Adam kernel on their own state), so that in-place edits, ``set_parameters``, learning-rate schedules and optimizer
state dicts stay what they are.

One job per module:

* :mod:`~sb3_softac.engine.coverage`: which models it covers (:func:`unsupported_reason` says why not);
* :mod:`~sb3_softac.engine.derivatives`: the forward passes and the derivatives, pure functions on tensors;
* :mod:`~sb3_softac.engine.update`: :class:`UpdateEngine`, the order of the update and its random draws;
* :mod:`~sb3_softac.engine.bindings`: live references to the model's parameters, gradients and optimizers;
* :mod:`~sb3_softac.engine.buffers`: the preallocated tensors, and which of them share memory;
* :mod:`~sb3_softac.engine.adam`: the optimizers' fused Adam/AdamW step, driven without ``Optimizer.step``;
* :mod:`~sb3_softac.engine.denormals`: subnormal floats flushed to zero while it runs.

The engine has been verified on the CPU only, so ``update_engine="auto"`` takes it there only. Off the CPU the step
makes no host synchronisation; on the CPU, where reading a tensor on the host is free, the actor's "min" backward
groups the batch's rows by critic with group sizes read on the host. The private torch operations it calls are
checked before use by :mod:`sb3_softac.torch_ops`.
"""

from sb3_softac.engine.coverage import EngineModel, engine_ops, unsupported_reason
from sb3_softac.engine.denormals import denormals_flushed
from sb3_softac.engine.update import UpdateEngine, UpdateSettings

#: Values of ``SAC(update_engine=...)``: ``"auto"`` takes this engine wherever it applies on a device where it has
#: been verified (the CPU), ``"engine"`` on any device, ``"autograd"`` never.
UPDATE_ENGINES = ("auto", "engine", "autograd")
#: The device types on which the engine has been run and checked against autograd: ``"auto"`` takes it there only.
VERIFIED_DEVICES = ("cpu",)
#: A ``train`` call draws its minibatches this many at a time: all of them for the usual update-to-data ratios
#: (up to 20 or so), while ``gradient_steps=-1`` after a long episode does not hold thousands in memory at once.
MINIBATCHES_PER_DRAW = 64

__all__ = [
    "MINIBATCHES_PER_DRAW",
    "UPDATE_ENGINES",
    "VERIFIED_DEVICES",
    "EngineModel",
    "UpdateEngine",
    "UpdateSettings",
    "denormals_flushed",
    "engine_ops",
    "unsupported_reason",
]
