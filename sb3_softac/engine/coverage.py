"""Which models the update engine covers, and why any other is left to the autograd update.

:func:`unsupported_reason` reads a model's spaces, policy, networks, optimizers and hooks and names the first thing
the engine does not differentiate; :func:`critic_layers` reads the critics' layer structure that the engine
binds to. The engine covers MLP policies on ``Box`` observations and actions (flatten extractor, not shared), the
squashed-Gaussian actor without gSDE, ReLU or Tanh hidden layers, critics with layer normalisation and dropout (on
the CPU) or without, any number of critics (with REDQ subsets), fixed or learned temperature, and Adam/AdamW
optimizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import FlattenExtractor
from torch import nn
from torch.nn.modules import module as module_hooks

from sb3_softac.networks import EnsembleDropout, EnsembleLayerNorm, EnsembleLinear
from sb3_softac.policies import Actor, Critic, SACActor, SACPolicy
from sb3_softac.torch_ops import Activation, EngineOps, engine_ops_for

ACTIVATIONS: dict[type[nn.Module], Activation] = {nn.ReLU: "relu", nn.Tanh: "tanh"}
_OPTIMIZERS = (th.optim.Adam, th.optim.AdamW)

#: A hidden layer of the critics as modules: affine, dropout (or None), layer norm (or None).
CriticModules = tuple[EnsembleLinear, EnsembleDropout | None, EnsembleLayerNorm | None]


def critic_layers(
    modules: Sequence[nn.Module], activation: type[nn.Module]
) -> tuple[list[CriticModules], EnsembleLinear] | None:
    """The hidden layers and the head of ``linear -> [dropout] -> [layer norm] -> activation -> ... -> linear``, or
    None when ``modules`` are anything else (see :class:`sb3_softac.networks.EnsembleMLP`)."""
    layers = list(modules)
    hidden: list[CriticModules] = []
    while len(layers) > 1:
        linear = layers.pop(0)
        dropout = layers.pop(0) if type(layers[0]) is EnsembleDropout else None
        norm = layers.pop(0) if layers and type(layers[0]) is EnsembleLayerNorm else None
        if type(linear) is not EnsembleLinear or not layers or type(layers.pop(0)) is not activation:
            return None
        assert isinstance(linear, EnsembleLinear)
        assert dropout is None or isinstance(dropout, EnsembleDropout)
        assert norm is None or isinstance(norm, EnsembleLayerNorm)
        hidden.append((linear, dropout, norm))
    if len(layers) != 1 or type(layers[0]) is not EnsembleLinear:
        return None
    head = layers[0]
    assert isinstance(head, EnsembleLinear)
    return hidden, head


def dropout_rate(dropout: EnsembleDropout | None) -> float:
    """The rate at which a dropout layer drops now: its ``p`` in training mode, 0 in evaluation mode or without."""
    return float(dropout.p) if dropout is not None and dropout.training else 0.0


def dropout_reason(dropouts: Sequence[EnsembleDropout | None], device: th.device) -> str | None:
    """Why a critic dropout layer, as it is now, does not drop as the engine does, or None.

    ``p`` may be changed on a built model. :class:`~sb3_softac.networks.EnsembleDropout` drops as the engine does
    on the CPU, at rates strictly between 0 and 1; elsewhere it runs ``nn.Dropout``'s own kernel.
    """
    for dropout in dropouts:
        if dropout is None:
            continue
        if device.type != "cpu":
            return f"critic dropout is covered by the engine on the CPU only, not on {device.type}"
        if not 0.0 < dropout.p < 1.0:
            return f"a critic dropout layer drops at p={dropout.p}, not strictly between 0 and 1"
    return None


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


def _is_mlp(modules: Sequence[nn.Module], activation: type[nn.Module]) -> bool:
    """Whether ``modules`` are exactly ``nn.Linear -> activation -> nn.Linear -> ...`` (the actor's hidden layers)."""
    layers = list(modules)
    return all(type(layer) is nn.Linear for layer in layers[0::2]) and all(type(a) is activation for a in layers[1::2])


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
    activation = policy.activation_fn
    if activation not in ACTIVATIONS:
        return f"the activation {getattr(activation, '__name__', activation)} is not ReLU or Tanh"
    actor, critic, target = model.actor, model.critic, model.critic_target
    if type(actor) is not Actor:
        return "the actor is not the squashed-Gaussian Actor"
    for network in (actor, critic, target):
        if type(network.features_extractor) is not FlattenExtractor:
            return f"the features extractor {type(network.features_extractor).__name__} is not FlattenExtractor"
    if type(actor.mu) is not nn.Linear or type(actor.log_std) is not nn.Linear:
        return "the actor's heads are not linear layers"
    if not _is_mlp(list(actor.latent_pi), activation):
        return "the actor's hidden layers are not linear layers and activations"
    for network in (critic, target):
        if type(network) is not Critic:
            return f"the critic class {type(network).__name__} is not sb3_softac's Critic"
        structure = critic_layers(network.q_networks.layers, activation)
        if structure is None:
            return "the critics are not linear layers, dropout, layer norms and activations"
        reason = dropout_reason([dropout for _, dropout, _ in structure[0]], structure[1].weight.device)
        if reason is not None:
            return reason
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
    return hooks_reason(list(policy.modules()), trained_parameters(model))


def engine_ops(model: EngineModel) -> EngineOps | str:
    """The engine's private torch operations for the model's device and dtype, checked, or why they are unusable.

    :param model: a model that :func:`unsupported_reason` accepts
    """
    parameter = next(model.actor.parameters())
    return engine_ops_for(parameter.device, parameter.dtype)


def hooks_reason(modules: Sequence[nn.Module], parameters: Sequence[th.Tensor]) -> str | None:
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


def trained_parameters(model: EngineModel) -> list[th.Tensor]:
    parameters: list[th.Tensor] = list(model.policy.parameters())
    if model.log_ent_coef is not None:
        parameters.append(model.log_ent_coef)
    return parameters
