"""An autograd-free SAC update for the common configuration.

:class:`UpdateEngine` runs the same update as :meth:`sb3_softac.SAC._gradient_step` (critics, then temperature and
actor, with the same random draws in the same order) with forward and backward passes derived by hand and written into
preallocated tensors. Autograd records every operation and replays it backwards; here a gradient step is a fixed
list of ATen calls under inference mode, which is what makes a CPU step with small networks fast.

It covers MLP policies on ``Box`` observations and actions (flatten extractor, not shared), the squashed-Gaussian
actor without gSDE, ReLU or Tanh hidden layers, any number of critics (with REDQ subsets), fixed or learned
temperature, and Adam/AdamW optimizers. :func:`unsupported_reason` says why any other model is left to the
autograd update. The forward values reuse the objectives of :mod:`sb3_softac.losses` and the log-density of
:mod:`sb3_softac.distributions`; only their derivatives live here.

Nothing is copied out of the model: the engine reads the live parameters and optimizers on every call and
writes the gradients into each parameter's ``.grad``, then steps the model's own optimizers (their fused Adam kernel
on their own state), so that in-place edits, ``set_parameters``, learning-rate schedules and optimizer state dicts
stay what they are. It obeys the non-finite guard of :mod:`sb3_softac.nonfinite` as the autograd update does.

The engine has been verified on the CPU only, so ``update_engine="auto"`` takes it there only. Off the CPU the step
makes no host synchronisation, so that a device never waits for the host; on the CPU, where reading a tensor on the
host is free, the actor's "min" backward groups the batch's rows by critic with group sizes read on the host (see
:func:`_counts_on_host`). The private torch operations it calls are checked before use by
:mod:`sb3_softac.torch_ops`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import FlattenExtractor
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.optim import optimizer as torch_optimizer

from sb3_softac import compat, train_statistics
from sb3_softac.distributions import LOG_STD_MAX, LOG_STD_MIN, squashed_log_prob_from_noise
from sb3_softac.losses import (
    CriticReduction,
    actor_loss,
    critic_loss,
    draw_critic_subset,
    min_over_critics,
    reduce_critics,
    soft_q_target,
    soft_state_value,
    temperature_loss,
)
from sb3_softac.networks import EnsembleLinear
from sb3_softac.nonfinite import flag_nonfinite, guarded_step
from sb3_softac.policies import Actor, Critic, SACActor, SACPolicy
from sb3_softac.torch_ops import Activation, EngineOps, engine_ops_for

#: Values of ``SAC(update_engine=...)``: ``"auto"`` takes this engine wherever it applies on a device where it has
#: been verified (the CPU), ``"engine"`` on any device, ``"autograd"`` never.
UPDATE_ENGINES = ("auto", "engine", "autograd")
#: The device types on which the engine has been run and checked against autograd: ``"auto"`` takes it there only.
VERIFIED_DEVICES = ("cpu",)
#: A ``train`` call draws its minibatches this many at a time: all of them for the usual update-to-data ratios
#: (up to 20 or so), while ``gradient_steps=-1`` after a long episode does not hold thousands in memory at once.
MINIBATCHES_PER_DRAW = 64

_ACTIVATIONS: dict[type[nn.Module], Activation] = {nn.ReLU: "relu", nn.Tanh: "tanh"}
_OPTIMIZERS = (th.optim.Adam, th.optim.AdamW)


class EngineModel(Protocol):
    """What the engine reads of a model (``sb3_softac.SAC`` has it all): spaces, networks, optimizers, temperature."""

    @property
    def action_space(self) -> spaces.Space: ...
    @property
    def observation_space(self) -> spaces.Space: ...
    @property
    def policy(self) -> SACPolicy: ...
    @property
    def actor(self) -> SACActor: ...
    @property
    def critic(self) -> Critic: ...
    @property
    def critic_target(self) -> Critic: ...
    @property
    def ent_coef_optimizer(self) -> th.optim.Optimizer | None: ...
    @property
    def log_ent_coef(self) -> th.Tensor | None: ...
    @property
    def ent_coef_tensor(self) -> th.Tensor | None: ...
    @property
    def batch_norm_stats(self) -> list[th.Tensor]: ...


@dataclass(frozen=True)
class UpdateSettings:
    """The settings of the SAC update that the engine reads, as the model holds them at a ``train`` call."""

    gamma: float
    tau: float
    #: The learned temperature's target entropy (unused for a fixed temperature).
    target_entropy: float
    critic_subset_size: int | None
    actor_q_reduction: CriticReduction


def _is_mlp(modules: Sequence[nn.Module], linear: type[nn.Module], activation: type[nn.Module]) -> bool:
    """Whether ``modules`` are exactly ``linear -> activation -> linear -> ...`` (what the engine differentiates)."""
    layers = list(modules)
    return all(type(layer) is linear for layer in layers[0::2]) and all(type(a) is activation for a in layers[1::2])


def unsupported_reason(model: EngineModel) -> str | None:
    """Why the update engine cannot run this model's update, or None when it can.

    :param model: a model whose networks and optimizers are built (a ``SAC`` whose update methods are its own)
    :return: a short description of the first unsupported feature found
    """
    policy = model.policy
    if type(policy) is not SACPolicy:
        return f"the policy class {type(policy).__name__} is not the plain MlpPolicy"
    if not isinstance(model.action_space, spaces.Box) or not isinstance(model.observation_space, spaces.Box):
        return "only Box observations and Box actions are covered"
    if is_image_space(model.observation_space, check_channels=False) and policy.normalize_images:
        return "image observations are covered by the autograd update only"
    if policy.use_sde:
        return "gSDE is covered by the autograd update only"
    if policy.share_features_extractor:
        return "a shared features extractor is covered by the autograd update only"
    if policy.dropout_rate > 0.0 or policy.layer_norm:
        return "critic dropout and layer normalisation are covered by the autograd update only"
    activation = policy.activation_fn
    if activation not in _ACTIVATIONS:
        return f"the activation {getattr(activation, '__name__', activation)} is not ReLU or Tanh"
    actor, critic, target = model.actor, model.critic, model.critic_target
    if type(actor) is not Actor:
        return "the actor is not the squashed-Gaussian Actor"
    for network in (actor, critic, target):
        if type(network.features_extractor) is not FlattenExtractor:
            return f"the features extractor {type(network.features_extractor).__name__} is not FlattenExtractor"
    if type(actor.mu) is not nn.Linear or type(actor.log_std) is not nn.Linear:
        return "the actor's heads are not linear layers"
    if not _is_mlp(list(actor.latent_pi), nn.Linear, activation):
        return "the actor's hidden layers are not linear layers and activations"
    for network in (critic, target):
        if type(network) is not Critic:
            return f"the critic class {type(network).__name__} is not sb3_softac's Critic"
        if not _is_mlp(network.q_networks.layers, EnsembleLinear, activation):
            return "the critics are not linear layers and activations"
    if len(model.batch_norm_stats) > 0:
        return "batch normalisation is covered by the autograd update only"
    optimizers: dict[str, tuple[th.optim.Optimizer, list[th.Tensor]]] = {
        "actor": (actor.optimizer, list(actor.parameters())),
        "critic": (critic.optimizer, list(critic.parameters())),
    }
    if model.ent_coef_optimizer is not None and model.log_ent_coef is not None:
        optimizers["temperature"] = (model.ent_coef_optimizer, [model.log_ent_coef])
    for name, (optimizer, expected) in optimizers.items():
        if type(optimizer) not in _OPTIMIZERS:
            return f"the {name} optimizer {type(optimizer).__name__} is not Adam or AdamW"
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if len(params) != len(expected) or any(p is not q for p, q in zip(params, expected, strict=True)):
            return f"the {name} optimizer does not hold exactly the {name}'s parameters"
    parameters = [p for _, expected in optimizers.values() for p in expected]
    dtypes = {p.dtype for p in [*parameters, *target.parameters()]}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return "the parameters do not share one floating-point dtype"
    return _hooks_reason(list(policy.modules()), _trained_parameters(model))


def engine_ops(model: EngineModel) -> EngineOps | str:
    """The engine's private torch operations for the model's device and dtype, checked, or why they are unusable.

    :param model: a model that :func:`unsupported_reason` accepts
    """
    parameter = next(model.actor.parameters())
    return engine_ops_for(parameter.device, parameter.dtype)


def _hooks_reason(modules: Sequence[nn.Module], parameters: Sequence[th.Tensor]) -> str | None:
    """Why hooks that the engine would bypass (it runs no module and no autograd) forbid it, or None.

    :param modules: every module of the policy
    :param parameters: every parameter the update trains
    """
    if (
        module_hooks._global_forward_pre_hooks
        or module_hooks._global_forward_hooks
        or module_hooks._global_backward_pre_hooks
        or module_hooks._global_backward_hooks
    ):
        return "global module hooks are registered"
    for module in modules:
        if module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks or module._backward_hooks:
            return f"a {type(module).__name__} module has hooks"
    for parameter in parameters:
        if parameter._backward_hooks or getattr(parameter, "_post_accumulate_grad_hooks", None):
            return "a parameter has gradient hooks"
    return None


def _trained_parameters(model: EngineModel) -> list[th.Tensor]:
    parameters: list[th.Tensor] = list(model.policy.parameters())
    if model.log_ent_coef is not None:
        parameters.append(model.log_ent_coef)
    return parameters


class _Snapshot:
    """What the engine is bound to, by identity: when any of it is replaced, coverage is checked again.

    The objects the update reads (policy, networks, optimizers, temperature), every module's parameters and
    children, every optimizer's parameter groups, and where each parameter's data lives (the engine keeps views of
    it: a parameter given new memory, ``p.data = ...``, binds it again). Comparing identities costs a few
    little, where the full :func:`unsupported_reason` would cost far more at every ``train`` call.
    """

    def __init__(self, model: EngineModel) -> None:
        self.objects = self._objects(model)
        self.modules = list(model.policy.modules())
        self.parameters = _trained_parameters(model)
        self.data = [(parameter, parameter.data_ptr()) for parameter in self.parameters]
        containers: list[Mapping[str, object]] = [module._parameters for module in self.modules]
        containers += [module._modules for module in self.modules]
        lists: list[Sequence[object]] = []
        for optimizer in (model.actor.optimizer, model.critic.optimizer, model.ent_coef_optimizer):
            if optimizer is not None:
                lists.append(optimizer.param_groups)
                containers.extend(optimizer.param_groups)
                lists.extend(group["params"] for group in optimizer.param_groups)
        self.entries = [(container, key, value) for container in containers for key, value in container.items()]
        self.sizes = [(container, len(container)) for container in [*containers, *lists]]

    @staticmethod
    def _objects(model: EngineModel) -> list[object]:
        return [
            model.policy,
            model.actor,
            model.critic,
            model.critic_target,
            model.actor.optimizer,
            model.critic.optimizer,
            model.ent_coef_optimizer,
            model.log_ent_coef,
            model.ent_coef_tensor,
        ]

    def still_current(self, model: EngineModel) -> bool:
        """Whether nothing recorded has been replaced, added or removed since the snapshot."""
        return (
            all(a is b for a, b in zip(self._objects(model), self.objects, strict=True))
            and all(len(container) == size for container, size in self.sizes)
            and all(container.get(key) is value for container, key, value in self.entries)
            and all(parameter.data_ptr() == address for parameter, address in self.data)
        )


#: The smallest positive subnormal double, made from its bits rather than parsed (parsing may itself flush it).
_SUBNORMAL = struct.unpack("<d", struct.pack("<Q", 1))[0]


def _flushing_denormals() -> bool:
    """Whether this thread flushes subnormal floats to zero.

    ``torch.set_flush_denormal`` sets the thread's floating-point control register, which Python's own float
    arithmetic obeys too: a subnormal times one then comes out zero. PyTorch has no getter, and a probe on a tensor
    would read a value back to the host.
    """
    return _SUBNORMAL * 1.0 == 0.0


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """Run the block with subnormal floats flushed to zero in this thread, then put the thread's mode back.

    Adam's first moment of a weight whose gradient is zero (a dead ReLU unit) decays by ``beta1`` at each step and
    spends about 150 steps below float32's smallest normal number (1.2e-38) before it reaches zero. CPUs handle
    such subnormal numbers in microcode, much slower than normal ones (the CHANGELOG has the measurement). XLA, and
    so SBX, flush them by default. Flushing changes only values below 1.2e-38, which then read as zero.
    ``torch.set_flush_denormal`` sets the calling thread's mode; with more than one torch thread the intra-op
    worker threads keep theirs.
    """
    was_flushing = _flushing_denormals()
    if not was_flushing:
        th.set_flush_denormal(True)
    try:
        yield
    finally:
        if not was_flushing:
            th.set_flush_denormal(False)


@dataclass
class _Linear:
    """Live references to one affine layer's parameters and their gradient tensors, with views of them made once.

    A view made at every step costs Python and dispatch time. These views share the parameters' memory, so they see
    in-place edits; a parameter given new memory makes :class:`_Snapshot` bind the engine again.
    """

    weight: th.Tensor
    bias: th.Tensor
    grad_weight: th.Tensor
    grad_bias: th.Tensor
    #: The weight with its last two dimensions swapped.
    weight_t: th.Tensor = field(init=False)
    #: An ensemble head's ``(n, hidden, 1)`` weight as one ``(hidden,)`` column per critic, and its gradient's.
    columns: list[th.Tensor] = field(init=False)
    grad_columns: list[th.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        with th.no_grad():
            self.weight_t = self.weight.transpose(-2, -1)
            head = self.weight.dim() == 3 and self.weight.shape[2] == 1
            self.columns = [member[:, 0] for member in self.weight] if head else []
            self.grad_columns = [member[:, 0] for member in self.grad_weight] if head else []


def _with_grad(parameter: th.Tensor) -> th.Tensor:
    """The parameter's ``.grad``, created (zero) when missing; the engine writes gradients into it."""
    if parameter.grad is None or parameter.grad.shape != parameter.shape:
        parameter.grad = th.zeros_like(parameter)
    return parameter.grad


def _linear(weight: th.Tensor, bias: th.Tensor) -> _Linear:
    return _Linear(weight, bias, _with_grad(weight), _with_grad(bias))


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


class _AdamStep:
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


@dataclass
class _Bound:
    """Live references to everything of a model the update reads or writes."""

    actor_hidden: list[_Linear]
    mu: _Linear
    log_std: _Linear
    critic: list[_Linear]
    critic_target: list[_Linear]
    target_parameters: list[th.Tensor]
    critic_parameters: list[th.Tensor]
    activation: Activation
    ops: EngineOps
    actor_optimizer: _AdamStep
    critic_optimizer: _AdamStep
    ent_coef_optimizer: _AdamStep | None
    log_ent_coef: th.Tensor | None
    log_ent_coef_grad: th.Tensor | None
    fixed_ent_coef: th.Tensor | None
    grads: list[tuple[th.Tensor, th.Tensor]] = field(default_factory=list)

    @classmethod
    def from_model(cls, model: EngineModel, ops: EngineOps) -> _Bound:
        actor, critic, target = model.actor, model.critic, model.critic_target
        assert isinstance(actor, Actor)
        activation = _ACTIVATIONS[model.policy.activation_fn]
        actor_hidden = [_linear(layer.weight, layer.bias) for layer in actor.latent_pi if isinstance(layer, nn.Linear)]
        assert isinstance(actor.mu, nn.Linear)
        assert isinstance(actor.log_std, nn.Linear)
        critic_layers = [_linear(m.weight, m.bias) for m in critic.q_networks.layers if isinstance(m, EnsembleLinear)]
        # The target critics get no gradient: their "grad" fields are never read.
        target_layers = [
            _Linear(m.weight, m.bias, m.weight, m.bias)
            for m in target.q_networks.layers
            if isinstance(m, EnsembleLinear)
        ]
        log_ent_coef = model.log_ent_coef
        bound = cls(
            actor_hidden=actor_hidden,
            mu=_linear(actor.mu.weight, actor.mu.bias),
            log_std=_linear(actor.log_std.weight, actor.log_std.bias),
            critic=critic_layers,
            critic_target=target_layers,
            target_parameters=[t for layer in target_layers for t in (layer.weight, layer.bias)],
            critic_parameters=[t for layer in critic_layers for t in (layer.weight, layer.bias)],
            activation=activation,
            ops=ops,
            actor_optimizer=_AdamStep(actor.optimizer, ops),
            critic_optimizer=_AdamStep(critic.optimizer, ops),
            ent_coef_optimizer=None if model.ent_coef_optimizer is None else _AdamStep(model.ent_coef_optimizer, ops),
            log_ent_coef=log_ent_coef,
            log_ent_coef_grad=None if log_ent_coef is None else _with_grad(log_ent_coef),
            fixed_ent_coef=model.ent_coef_tensor,
        )
        for layer in [*actor_hidden, bound.mu, bound.log_std, *critic_layers]:
            bound.grads.extend([(layer.weight, layer.grad_weight), (layer.bias, layer.grad_bias)])
        if log_ent_coef is not None:
            assert bound.log_ent_coef_grad is not None
            bound.grads.append((log_ent_coef, bound.log_ent_coef_grad))
        return bound

    def grads_in_place(self) -> bool:
        """Whether every parameter still holds the gradient tensor the engine writes into."""
        return all(p.grad is g for p, g in self.grads)


class _Rows:
    """Views of the actor's buffers for some of their rows: its forward pass writes them, its backward reads them."""

    def __init__(self, buf: _Buffers, rows: slice) -> None:
        self.actor_in = buf.actor_in[rows]
        self.hidden = [hidden[rows] for hidden in buf.actor_hidden]
        self.mean = buf.mean[rows]
        self.log_std_raw = buf.log_std_raw[rows]
        self.log_std = buf.log_std[rows]
        self.std = buf.std[rows]
        self.noise = buf.noise[rows]
        self.gaussian_actions = buf.gaussian_actions[rows]
        self.actions = buf.actions[rows]


class _CriticPass:
    """One evaluation of an ensemble on one ``(batch, obs + action)`` input, and views of its tensors.

    :param x: the input, whose observation and action columns are filled before the pass
    :param hidden: each hidden layer's activations, ``(members, batch, width)``
    :param q: the values, ``(members, batch, 1)``
    """

    def __init__(self, x: th.Tensor, obs_dim: int, hidden: list[th.Tensor], q: th.Tensor) -> None:
        members = q.shape[0]
        self.x, self.hidden, self.q = x, hidden, q
        self.obs, self.actions = x[:, :obs_dim], x[:, obs_dim:]
        self.x_t = x.t()
        self.x_members = x.expand(members, *x.shape)
        self.hidden_t = [h.transpose(1, 2) for h in hidden]
        # The head's input and values one critic at a time (see UpdateEngine._critic_forward).
        self.head_in = list(hidden[-1] if hidden else self.x_members)
        self.head_in_t = [h.t() for h in self.head_in]
        self.q_columns = [column[:, 0] for column in q]


class _Buffers:
    """Preallocated activations and gradients of one batch size, and the views of them that a step uses.

    Three groups of buffers share memory with others (a smaller working set, which the CPU's caches reward). Each
    is correct only for the order of operations in :meth:`UpdateEngine.gradient_step`; a change of that order must
    check this table:

    =========================  ==============================  ==============================================
    buffer                     lives in                        why that memory is free then
    =========================  ==============================  ==============================================
    ``target_hidden``          ``critic_hidden``, its first    the soft target is computed, and its
                               ``target_members`` members      activations dead, before the critics run
    ``actor_hidden_grad``      ``critic_hidden[i][0]``, where  the actor's backward pass comes after the last
                               the shapes match                read of the critics' activations
    ``chosen_hidden``,         ``critic_hidden_grad[i][1]``,   the critic loss's backward pass and step are
    ``chosen_hidden_grad``     ``critic_hidden_grad[i][0]``    done before the actor's step starts
    =========================  ==============================  ==============================================
    """

    def __init__(
        self, bound: _Bound, batch_size: int, obs_dim: int, action_dim: int, like: th.Tensor, target_members: int
    ) -> None:
        def empty(*shape: int) -> th.Tensor:
            return th.empty(shape, dtype=like.dtype, device=like.device)

        n_critics = bound.critic[0].weight.shape[0]
        rows = 2 * batch_size  # the actor runs on observations and next observations in one pass
        self.actor_in = empty(rows, obs_dim)
        self.actor_hidden = [empty(rows, layer.weight.shape[0]) for layer in bound.actor_hidden]
        self.mean = empty(rows, action_dim)
        self.log_std_raw = empty(rows, action_dim)
        self.log_std = empty(rows, action_dim)
        self.std = empty(rows, action_dim)
        self.noise = empty(rows, action_dim)
        self.gaussian_actions = empty(rows, action_dim)
        self.actions = empty(rows, action_dim)
        # Critic inputs: (obs, replayed action), (next obs, next action), (obs, policy action).
        self.critic_in = empty(batch_size, obs_dim + action_dim)
        self.target_in = empty(batch_size, obs_dim + action_dim)
        self.actor_critic_in = empty(batch_size, obs_dim + action_dim)
        self.critic_hidden = [empty(n_critics, batch_size, layer.weight.shape[2]) for layer in bound.critic[:-1]]
        self.critic_hidden_grad = [empty(n_critics, batch_size, layer.weight.shape[2]) for layer in bound.critic[:-1]]
        # Shares memory: see the table in the class docstring.
        self.actor_hidden_grad = [
            self.critic_hidden[i][0]
            if i < len(self.critic_hidden) and self.critic_hidden[i].shape[1:] == (batch_size, layer.weight.shape[0])
            else empty(batch_size, layer.weight.shape[0])
            for i, layer in enumerate(bound.actor_hidden)
        ]
        self.q = empty(n_critics, batch_size, 1)
        self.q_grad = empty(n_critics, batch_size, 1)
        # The target critics that one target evaluates: all of them, or REDQ's subset, whose weights are gathered
        # into ``target_subset`` at each step so that the critics left out cost nothing.
        self.target_subset: list[_Linear] = []
        for layer in bound.critic_target if target_members < n_critics else []:
            weight = empty(target_members, *layer.weight.shape[1:])
            bias = empty(target_members, *layer.bias.shape[1:])
            self.target_subset.append(_Linear(weight, bias, weight, bias))  # no gradient: grad fields unused
        # Shares memory: see the table in the class docstring.
        self.target_hidden = [hidden[:target_members] for hidden in self.critic_hidden]
        self.target_q = empty(target_members, batch_size, 1)
        self.action_grad_members = empty(n_critics, batch_size, action_dim)
        # The actor's "min" backward on the CPU (see UpdateEngine._chosen_critic_action_grad, n_critics > 1): each
        # row's activations and gradients in the critic it takes the minimum from, rows sorted by that critic.
        # Shares memory: see the table in the class docstring.
        several = n_critics > 1
        self.chosen_hidden = [grad[1] for grad in self.critic_hidden_grad] if several else []
        self.chosen_hidden_grad = [grad[0] for grad in self.critic_hidden_grad] if several else []
        self.chosen_input_grad = empty(batch_size, bound.critic[0].weight.shape[1])
        self.chosen_action_grad = empty(batch_size, action_dim)
        self.action_grad = empty(batch_size, action_dim)
        self.gaussian_grad = empty(batch_size, action_dim)
        self.log_std_grad = empty(batch_size, action_dim)
        self.clamp_mask = th.empty((batch_size, action_dim), dtype=th.bool, device=like.device)
        self.key = (batch_size, obs_dim, action_dim, like.dtype, like.device, n_critics, target_members)

        # Views, made once: each costs Python and dispatch time when made at every step.
        self.all_rows = _Rows(self, slice(None))
        self.obs_rows = _Rows(self, slice(None, batch_size))
        self.next_rows = _Rows(self, slice(batch_size, None))
        self.target_pass = _CriticPass(self.target_in, obs_dim, self.target_hidden, self.target_q)
        self.critic_pass = _CriticPass(self.critic_in, obs_dim, self.critic_hidden, self.q)
        self.actor_critic_pass = _CriticPass(self.actor_critic_in, obs_dim, self.critic_hidden, self.q)
        self.q_grad_columns = [column[:, 0] for column in self.q_grad]
        with th.no_grad():
            # The first critic layer's rows that multiply the action: the actor's gradient flows back through them.
            self.first_action_rows_t = bound.critic[0].weight[:, obs_dim:, :].transpose(1, 2)
            self.head_weights = bound.critic[-1].weight[:, :, 0]
            # Per critic, the transposed weights that carry a hidden layer's gradient to its input (of the first
            # layer, to the action columns only), for the actor's "min" backward.
            self.input_grad_weights = [list(self.first_action_rows_t)]
            self.input_grad_weights += [list(layer.weight_t) for layer in bound.critic[1:-1]]
        self.critic_hidden_rows = [hidden.view(-1, hidden.shape[2]) for hidden in self.critic_hidden]
        self.chosen_input_grad_actions = self.chosen_input_grad[:, obs_dim:]
        self.gaussian_grad_t = self.gaussian_grad.t()
        self.log_std_grad_t = self.log_std_grad.t()
        self.actor_hidden_grad_t = [grad.t() for grad in self.actor_hidden_grad]


def _counts_on_host(device: th.device) -> bool:
    """Whether reading a count on the host is free on ``device`` (the CPU), rather than a synchronisation.

    The actor's "min" backward groups rows by critic with sizes read on the host where that is free; elsewhere it
    runs every critic on every row (zeros where a critic is not the minimum), keeping the step free of
    synchronisations and of data-dependent shapes.
    """
    return device.type == "cpu"


def _activate(x: th.Tensor, activation: Activation) -> None:
    if activation == "relu":
        x.relu_()
    else:
        x.tanh_()


class UpdateEngine:
    """The SAC gradient step without autograd, for the models :func:`unsupported_reason` accepts.

    One engine serves one model: it rebinds to the model's live parameters and optimizers at every
    :meth:`begin` and keeps its buffers between calls for as long as the batch size and the networks' shapes
    stay the same.
    """

    def __init__(self) -> None:
        self._bound: _Bound | None = None
        self._snapshot: _Snapshot | None = None
        self._buffers: _Buffers | None = None

    def __getstate__(self) -> dict[str, object]:
        # Its bindings, views and buffers belong to one model: a copy (deepcopy, pickle) starts unbound.
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()  # type: ignore[misc]

    def begin(self, model: EngineModel) -> str | None:
        """Bind to the model's current networks and optimizers before a ``train`` call.

        :param model: the model to update
        :return: None when bound, or why the engine does not cover the model (as it is now)
        """
        snapshot = self._snapshot
        if (
            self._bound is None
            or snapshot is None
            or not snapshot.still_current(model)
            or not self._bound.grads_in_place()
        ):
            reason = unsupported_reason(model)
            ops = engine_ops(model) if reason is None else reason
            if isinstance(ops, str):
                self._bound = None
                return ops
            self._bound = _Bound.from_model(model, ops)
            self._snapshot = _Snapshot(model)
            self._buffers = None
        else:
            # The full check only when something was replaced; hooks can come and go on the same modules.
            reason = _hooks_reason(snapshot.modules, snapshot.parameters)
            if reason is not None:
                return reason
        # The optimizers' state tensors may have been replaced (load_state_dict) since the last call.
        for step in (self._bound.actor_optimizer, self._bound.critic_optimizer, self._bound.ent_coef_optimizer):
            if step is not None:
                step.forget()
        return None

    def _buffers_for(
        self, batch_size: int, obs_dim: int, action_dim: int, like: th.Tensor, subset_size: int | None
    ) -> _Buffers:
        assert self._bound is not None
        n_critics = self._bound.critic[0].weight.shape[0]
        target_members = n_critics if subset_size is None else min(subset_size, n_critics)
        key = (batch_size, obs_dim, action_dim, like.dtype, like.device, n_critics, target_members)
        if self._buffers is None or self._buffers.key != key:
            self._buffers = _Buffers(self._bound, batch_size, obs_dim, action_dim, like, target_members)
        return self._buffers

    # Inference mode rather than no_grad: it skips autograd's bookkeeping in every operator.
    # Its outputs (the buffers) are inference tensors; parameters, gradients and optimizer states are not.
    @th.inference_mode()
    def gradient_step(
        self,
        settings: UpdateSettings,
        flag: th.Tensor,
        replay_data: ReplayBufferSamples,
        update_actor: bool,
        update_target: bool,
    ) -> tuple[th.Tensor, th.Tensor | None]:
        """One SAC update of the bound model on a minibatch, as ``SAC._gradient_step`` and its target update do it.

        It obeys the model's non-finite flag as the autograd update does (see :mod:`sb3_softac.nonfinite`): each
        loss and its gradients are checked before the optimizer step, which, like the Polyak update, does nothing
        once the flag is set.

        :param settings: the model's update settings
        :param flag: the ``train`` call's non-finite flag (see :mod:`sb3_softac.nonfinite`)
        :param replay_data: the minibatch
        :param update_actor: whether to update the temperature and the actor after the critics
        :param update_target: whether to move the target critics towards the critics afterwards
        :return: the critic statistics row and, when the actor was updated, the actor statistics row, as
            ``SAC._gradient_step`` returns them
        """
        bound = self._bound
        assert bound is not None, "call begin() first"
        obs = replay_data.observations.flatten(1)
        batch_size, obs_dim = obs.shape
        buf = self._buffers_for(
            batch_size, obs_dim, replay_data.actions.shape[1], bound.mu.weight, settings.critic_subset_size
        )
        if bound.log_ent_coef is not None:
            ent_coef = bound.log_ent_coef.exp().squeeze(0)
        else:
            assert bound.fixed_ent_coef is not None
            ent_coef = bound.fixed_ent_coef

        # Actor forward: observations in the first half (only when the actor learns), next observations in the
        # second. The noise is drawn half by half, in the order the autograd update draws it.
        next_obs = replay_data.next_observations.flatten(1)
        if update_actor:
            buf.obs_rows.actor_in.copy_(obs)
            buf.obs_rows.noise.normal_()
        buf.next_rows.actor_in.copy_(next_obs)
        buf.next_rows.noise.normal_()
        rows = buf.all_rows if update_actor else buf.next_rows
        self._actor_forward(bound, rows)
        log_prob = squashed_log_prob_from_noise(rows.noise, rows.gaussian_actions, rows.log_std).unsqueeze(1)
        split = batch_size if update_actor else 0
        log_prob_pi, next_log_prob = log_prob[:split], log_prob[split:]

        # Soft Q target from the target critics at the next observations.
        buf.target_pass.obs.copy_(next_obs)
        buf.target_pass.actions.copy_(buf.next_rows.actions)
        # REDQ's subset is drawn where min_over_critics draws it, and only its members are evaluated.
        subset = draw_critic_subset(len(bound.critic_target[0].weight), settings.critic_subset_size, flag.device)
        target = bound.critic_target
        if subset is not None:
            for source, gathered in zip(bound.critic_target, buf.target_subset, strict=True):
                th.index_select(source.weight, 0, subset, out=gathered.weight)
                th.index_select(source.bias, 0, subset, out=gathered.bias)
            target = buf.target_subset
        self._critic_forward(target, bound.activation, buf.target_pass)
        next_q = min_over_critics(buf.target_q)
        discounts = compat.discounts(replay_data, settings.gamma)
        next_value = soft_state_value(next_q, next_log_prob, ent_coef)
        target_q = soft_q_target(replay_data.rewards, replay_data.dones, discounts, next_value)

        # Critic loss 1/2 sum_i mean_b (Q_i - y)^2: its gradient w.r.t. Q_i(s_b, a_b) is (Q_i - y) / batch.
        buf.critic_pass.obs.copy_(obs)
        buf.critic_pass.actions.copy_(replay_data.actions)
        self._critic_forward(bound.critic, bound.activation, buf.critic_pass)
        loss_q = critic_loss(buf.q, target_q)
        mean_q = buf.q.mean()
        th.sub(buf.q, target_q, out=buf.q_grad).div_(batch_size)
        self._critic_backward(bound, buf, buf.critic_pass, weights=True)
        bound.critic_optimizer(loss_q, flag)
        critic_row = train_statistics.critic_row(loss_q, ent_coef, mean_q, flag)

        actor_row = None
        if update_actor:
            # The temperature after the critics, as the autograd update steps it (nothing in between reads it).
            entropy = -log_prob_pi.mean()
            ent_coef_loss = None
            if bound.log_ent_coef is not None:
                assert bound.ent_coef_optimizer is not None
                assert bound.log_ent_coef_grad is not None
                target_entropy = settings.target_entropy
                ent_coef_loss = temperature_loss(bound.log_ent_coef, log_prob_pi, target_entropy)
                # d/dlog(alpha) of -log(alpha) * mean(log pi + target entropy)
                th.mean(log_prob_pi, dim=0, out=bound.log_ent_coef_grad).add_(target_entropy).neg_()
                bound.ent_coef_optimizer(ent_coef_loss, flag)
            loss_pi = self._actor_step(bound, buf, ent_coef, log_prob_pi, settings.actor_q_reduction, flag)
            actor_row = train_statistics.actor_row(loss_pi, entropy, ent_coef_loss, flag)

        if update_target:
            # guarded_lerp_ in one foreach call, without reading the flag on the host.
            bound.ops.polyak_(bound.target_parameters, bound.critic_parameters, flag, settings.tau)
        return critic_row, actor_row

    @staticmethod
    def _actor_forward(bound: _Bound, rows: _Rows) -> None:
        """Mean, clamped log std and reparameterised action of the actor's input ``rows``.

        The twin of ``Actor.get_action_dist_params`` and the squashed sample, kept here to write into preallocated
        buffers; ``tests/test_engine.py::test_engine_forward_passes_equal_the_modules`` holds the two equal.
        """
        x = rows.actor_in
        for layer, out in zip(bound.actor_hidden, rows.hidden, strict=True):
            x = th.addmm(layer.bias, x, layer.weight_t, out=out)
            _activate(x, bound.activation)
        th.addmm(bound.mu.bias, x, bound.mu.weight_t, out=rows.mean)
        th.addmm(bound.log_std.bias, x, bound.log_std.weight_t, out=rows.log_std_raw)
        th.clamp(rows.log_std_raw, LOG_STD_MIN, LOG_STD_MAX, out=rows.log_std)
        th.exp(rows.log_std, out=rows.std)
        th.addcmul(rows.mean, rows.std, rows.noise, out=rows.gaussian_actions)
        th.tanh(rows.gaussian_actions, out=rows.actions)

    @staticmethod
    def _critic_forward(layers: list[_Linear], activation: Activation, critic_pass: _CriticPass) -> None:
        """Every critic's value of the pass's shared input, into ``critic_pass.q`` (n, batch, 1).

        The twin of ``Critic.q_values`` (:class:`sb3_softac.networks.EnsembleLinear` layers), kept here for its
        buffers and its per-critic head; ``tests/test_engine.py::test_engine_forward_passes_equal_the_modules``
        holds the two equal.
        """
        h = critic_pass.x_members
        for layer, out in zip(layers[:-1], critic_pass.hidden, strict=True):
            h = th.baddbmm(layer.bias, h, layer.weight, out=out)
            _activate(h, activation)
        # The single-output head as one matrix-vector product per critic: on the CPU a batched matmul with an
        # output size of 1 is slow, and a multiply-and-sum writes a (n, batch, hidden) temporary.
        head = layers[-1]
        for column, head_in, q in zip(head.columns, critic_pass.head_in, critic_pass.q_columns, strict=True):
            th.mv(head_in, column, out=q)
        critic_pass.q.add_(head.bias)

    @staticmethod
    def _critic_backward(bound: _Bound, buf: _Buffers, critic_pass: _CriticPass, weights: bool) -> th.Tensor | None:
        """Backpropagate ``buf.q_grad`` through the critics that produced ``buf.q`` in ``critic_pass``.

        :param weights: write the gradients of the critics' parameters (critic loss), or return the gradient
            w.r.t. the input's action columns, summed over the critics, without touching them (actor loss)
        """
        layers = bound.critic
        head = layers[-1]
        if weights:
            # Head: dW = sum_b h_b g_b, again one matrix-vector product per critic.
            for head_in_t, q_grad, grad_column in zip(
                critic_pass.head_in_t, buf.q_grad_columns, head.grad_columns, strict=True
            ):
                th.mv(head_in_t, q_grad, out=grad_column)
            th.sum(buf.q_grad, dim=1, keepdim=True, out=head.grad_bias)
        grad = buf.q_grad
        for i in range(len(layers) - 1, 0, -1):
            hidden_grad = buf.critic_hidden_grad[i - 1]
            if i == len(layers) - 1:
                th.mul(grad, head.weight_t, out=hidden_grad)
            else:
                th.bmm(grad, layers[i].weight_t, out=hidden_grad)
            bound.ops.activation_backward(hidden_grad, critic_pass.hidden[i - 1], bound.activation, out=hidden_grad)
            grad = hidden_grad
            if weights:
                layer = layers[i - 1]
                if i == 1:
                    # The input is shared by all critics: one broadcast matmul instead of a bmm on an expanded copy.
                    th.matmul(critic_pass.x_t, grad, out=layer.grad_weight)
                else:
                    th.bmm(critic_pass.hidden_t[i - 2], grad, out=layer.grad_weight)
                th.sum(grad, dim=1, keepdim=True, out=layer.grad_bias)
        if weights:
            return None
        if len(layers) == 1:  # no hidden layer: the action gradient is the head's weight itself
            th.mul(grad, buf.first_action_rows_t, out=buf.action_grad_members)
        else:
            th.bmm(grad, buf.first_action_rows_t, out=buf.action_grad_members)
        return th.sum(buf.action_grad_members, dim=0, out=buf.action_grad)

    @staticmethod
    def _chosen_critic_action_grad(bound: _Bound, buf: _Buffers, scale: float) -> th.Tensor:
        """The actor's action gradient through the minimum of the critics, each row through its chosen critic only.

        The minimum passes each row's gradient (``scale``) to one critic, the first of equal minima as autograd's
        min routes it, so the other critics' share of :meth:`_critic_backward` is zeros. Here the rows are grouped
        by their critic and each group is multiplied by that critic's weights alone: the same sums without the
        zeros, ``1 / n_critics`` of the input-gradient matmuls. The group sizes are read on the host, which is free
        on the CPU but a synchronisation elsewhere (see :func:`_counts_on_host`).

        :param scale: the derivative of the actor loss w.r.t. each row's minimum, ``-1 / batch``
        :return: the gradient w.r.t. the actions, shape ``(batch, action_dim)``, in ``buf.action_grad``
        """
        layers = bound.critic
        n_critics, batch_size = buf.q.shape[:2]
        # The indices autograd's min(dim) backward routes through (on ties the first critic): min's own indices.
        chosen = th.min(buf.q, dim=0).indices.flatten()
        critic_of_row, rows = th.sort(chosen, stable=True)
        ends = th.bincount(chosen, minlength=n_critics).cumsum(0).tolist()
        groups = [
            (c, start, end) for c, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)) if end > start
        ]
        # Row j of the sorted batch is row rows[j] of critic critic_of_row[j] in the (critic, row) flattened layout.
        flat = th.add(rows, critic_of_row, alpha=batch_size)
        # d loss / d (last hidden layer, or input without hidden layers) = scale * the chosen critic's head weights.
        grad = buf.chosen_hidden_grad[-1] if len(layers) > 1 else buf.chosen_input_grad
        th.index_select(buf.head_weights, 0, critic_of_row, out=grad).mul_(scale)
        for i in range(len(layers) - 2, -1, -1):
            chosen_hidden = th.index_select(buf.critic_hidden_rows[i], 0, flat, out=buf.chosen_hidden[i])
            bound.ops.activation_backward(grad, chosen_hidden, bound.activation, out=grad)
            # Layer i's input gradient; of its first layer only the action columns are needed.
            below = buf.chosen_hidden_grad[i - 1] if i > 0 else buf.chosen_action_grad
            for critic, start, end in groups:
                th.mm(grad[start:end], buf.input_grad_weights[i][critic], out=below[start:end])
            grad = below
        if len(layers) == 1:
            grad = buf.chosen_input_grad_actions
        return buf.action_grad.index_copy_(0, rows, grad)

    def _actor_step(
        self,
        bound: _Bound,
        buf: _Buffers,
        ent_coef: th.Tensor,
        log_prob: th.Tensor,
        reduction: CriticReduction,
        flag: th.Tensor,
    ) -> th.Tensor:
        """Actor loss ``mean(alpha log pi - Q(s, a_pi))`` through the just-updated critics, and its Adam step."""
        batch_size = log_prob.shape[0]
        rows = buf.obs_rows
        critic_pass = buf.actor_critic_pass
        critic_pass.obs.copy_(rows.actor_in)
        critic_pass.actions.copy_(rows.actions)
        self._critic_forward(bound.critic, bound.activation, critic_pass)
        # d loss / d Q_i(s_b, a_b) is -1/batch on the critic the reduction picks (min: the argmin, as autograd's
        # min backward routes it) or -1/(batch n) on each of them (mean).
        q_pi = reduce_critics(buf.q, reduction)
        loss_pi = actor_loss(q_pi, log_prob, ent_coef)
        n_critics = buf.q.shape[0]
        action_grad: th.Tensor | None
        if reduction == "min" and n_critics > 1 and _counts_on_host(buf.q.device):
            action_grad = self._chosen_critic_action_grad(bound, buf, -1.0 / batch_size)
        else:
            if reduction == "min":
                # min's own indices, which autograd's min(dim) backward routes through (and cheaper than argmin).
                buf.q_grad.zero_().scatter_(0, th.min(buf.q, dim=0, keepdim=True).indices, -1.0 / batch_size)
            else:
                buf.q_grad.fill_(-1.0 / (batch_size * n_critics))
            action_grad = self._critic_backward(bound, buf, critic_pass, weights=False)
        assert action_grad is not None

        # Through a = tanh(u): da/du = 1 - a^2. log pi depends on u through -log(1 - tanh(u)^2), whose derivative
        # is 2 tanh(u) = 2a, and on log_std directly (-1 per dimension); u = mean + std * noise. With c = alpha /
        # batch, the derivative of the loss w.r.t. each log pi:
        two_c = th.mul(ent_coef, 2.0 / batch_size)
        actions = rows.actions
        gaussian_grad = buf.gaussian_grad
        th.mul(actions, actions, out=gaussian_grad)
        th.addcmul(action_grad, gaussian_grad, action_grad, value=-1.0, out=gaussian_grad)  # (1 - a^2) dL/da
        gaussian_grad.addcmul_(actions, two_c)
        log_std_grad = buf.log_std_grad
        th.mul(gaussian_grad, rows.noise, out=log_std_grad).mul_(rows.std)
        log_std_grad.sub_(two_c, alpha=0.5)
        # clamp passes the gradient inside [LOG_STD_MIN, LOG_STD_MAX], on the bounds as autograd does on this torch.
        bound.ops.clamp_mask(rows.log_std_raw, rows.log_std, out=buf.clamp_mask)
        log_std_grad.mul_(buf.clamp_mask)

        latent = rows.hidden[-1] if rows.hidden else rows.actor_in
        th.mm(buf.gaussian_grad_t, latent, out=bound.mu.grad_weight)
        th.sum(gaussian_grad, dim=0, out=bound.mu.grad_bias)
        th.mm(buf.log_std_grad_t, latent, out=bound.log_std.grad_weight)
        th.sum(log_std_grad, dim=0, out=bound.log_std.grad_bias)
        if rows.hidden:
            grad = buf.actor_hidden_grad[-1]
            th.mm(gaussian_grad, bound.mu.weight, out=grad)
            grad.addmm_(log_std_grad, bound.log_std.weight)
            inputs = [rows.actor_in, *rows.hidden[:-1]]
            for i in range(len(bound.actor_hidden) - 1, -1, -1):
                layer = bound.actor_hidden[i]
                bound.ops.activation_backward(grad, rows.hidden[i], bound.activation, out=grad)
                th.mm(buf.actor_hidden_grad_t[i], inputs[i], out=layer.grad_weight)
                th.sum(grad, dim=0, out=layer.grad_bias)
                if i > 0:
                    th.mm(grad, layer.weight, out=buf.actor_hidden_grad[i - 1])
                    grad = buf.actor_hidden_grad[i - 1]
        bound.actor_optimizer(loss_pi, flag)
        return loss_pi
