"""What the engine is bound to: live references to a model's parameters, gradients and optimizers.

Nothing is copied out of the model. :class:`Bound` holds the model's own parameter tensors (and views of them made
once), the tensors their gradients are written into, and the optimizers' step; :class:`Snapshot` records what was
bound, by identity, so that a replaced network, optimizer or parameter binds the engine again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch as th
from torch import nn

from sb3_softac.engine.adam import AdamStep
from sb3_softac.engine.coverage import (
    ACTIVATIONS,
    EngineModel,
    critic_layers,
    dropout_rate,
    dropout_reason,
    trained_parameters,
)
from sb3_softac.engine.derivatives import CriticLayer, Layer, Norm
from sb3_softac.networks import EnsembleDropout, EnsembleLinear
from sb3_softac.policies import Actor
from sb3_softac.torch_ops import Activation, EngineOps


class Snapshot:
    """What the engine is bound to, by identity: when any of it is replaced, coverage is checked again.

    The objects the update reads (policy, networks, optimizers, temperature), every module's parameters and
    children, every optimizer's parameter groups, and where each parameter's data lives (the engine keeps views of
    it: a parameter given new memory, ``p.data = ...``, binds it again). Comparing identities costs a few
    little, where the full :func:`unsupported_reason` would cost far more at every ``train`` call.
    """

    def __init__(self, model: EngineModel) -> None:
        self.objects = self._objects(model)
        self.modules = list(model.policy.modules())
        self.parameters = trained_parameters(model)
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


def _with_grad(parameter: th.Tensor) -> th.Tensor:
    """The parameter's ``.grad``, created (zero) when missing; the engine writes gradients into it."""
    if parameter.grad is None or parameter.grad.shape != parameter.shape:
        parameter.grad = th.zeros_like(parameter)
    return parameter.grad


def _layer(module: nn.Linear | EnsembleLinear) -> Layer:
    return Layer(module.weight, module.bias, _with_grad(module.weight), _with_grad(module.bias))


@dataclass
class Bound:
    """Live references to everything of a model the update reads or writes."""

    actor_hidden: list[Layer]
    mu: Layer
    log_std: Layer
    critic: list[CriticLayer]
    critic_head: Layer
    critic_target: list[CriticLayer]
    critic_target_head: Layer
    #: The dropout layers of the critics and of the target critics, by hidden layer (None where there is none).
    dropouts: list[EnsembleDropout | None]
    target_dropouts: list[EnsembleDropout | None]
    target_parameters: list[th.Tensor]
    critic_parameters: list[th.Tensor]
    activation: Activation
    ops: EngineOps
    actor_optimizer: AdamStep
    critic_optimizer: AdamStep
    ent_coef_optimizer: AdamStep | None
    log_ent_coef: th.Tensor | None
    log_ent_coef_grad: th.Tensor | None
    fixed_ent_coef: th.Tensor | None
    grads: list[tuple[th.Tensor, th.Tensor]] = field(default_factory=list)
    #: The critics' affine layers, the head last.
    critic_affine: list[Layer] = field(default_factory=list)
    #: Whether the critics (the target critics) have neither layer norm nor dropout now (see read_dropout_modes).
    plain_critics: bool = True
    plain_targets: bool = True

    @classmethod
    def from_model(cls, model: EngineModel, ops: EngineOps) -> Bound:
        """Bind to a model that :func:`sb3_softac.engine.coverage.unsupported_reason` accepts."""
        actor, critic, target = model.actor, model.critic, model.critic_target
        assert isinstance(actor, Actor)
        assert isinstance(actor.mu, nn.Linear)
        assert isinstance(actor.log_std, nn.Linear)
        activation = model.policy.activation_fn
        critic_structure = critic_layers(critic.q_networks.layers, activation)
        target_structure = critic_layers(target.q_networks.layers, activation)
        assert critic_structure is not None
        assert target_structure is not None
        critic_hidden = [
            CriticLayer(
                _layer(linear),
                None if norm is None else Norm(norm.weight, norm.bias, _with_grad(norm.weight), _with_grad(norm.bias)),
                0.0,
            )
            for linear, _, norm in critic_structure[0]
        ]
        # The target critics get no gradient: their "grad" fields are never read.
        target_hidden = [
            CriticLayer(
                Layer(linear.weight, linear.bias, linear.weight, linear.bias),
                None if norm is None else Norm(norm.weight, norm.bias, norm.weight, norm.bias),
                0.0,
            )
            for linear, _, norm in target_structure[0]
        ]
        head = target_structure[1]
        log_ent_coef = model.log_ent_coef
        bound = cls(
            actor_hidden=[_layer(layer) for layer in actor.latent_pi if isinstance(layer, nn.Linear)],
            mu=_layer(actor.mu),
            log_std=_layer(actor.log_std),
            critic=critic_hidden,
            critic_head=_layer(critic_structure[1]),
            critic_target=target_hidden,
            critic_target_head=Layer(head.weight, head.bias, head.weight, head.bias),
            dropouts=[dropout for _, dropout, _ in critic_structure[0]],
            target_dropouts=[dropout for _, dropout, _ in target_structure[0]],
            target_parameters=list(target.q_networks.parameters()),
            critic_parameters=list(critic.q_networks.parameters()),
            activation=ACTIVATIONS[activation],
            ops=ops,
            actor_optimizer=AdamStep(actor.optimizer, ops),
            critic_optimizer=AdamStep(critic.optimizer, ops),
            ent_coef_optimizer=None if model.ent_coef_optimizer is None else AdamStep(model.ent_coef_optimizer, ops),
            log_ent_coef=log_ent_coef,
            log_ent_coef_grad=None if log_ent_coef is None else _with_grad(log_ent_coef),
            fixed_ent_coef=model.ent_coef_tensor,
        )
        critic_linear = [layer.linear for layer in critic_hidden]
        bound.critic_affine = [*critic_linear, bound.critic_head]
        norms = [layer.norm for layer in critic_hidden if layer.norm is not None]
        layers: list[Layer | Norm] = [*bound.actor_hidden, bound.mu, bound.log_std, *critic_linear, bound.critic_head]
        for layer in [*layers, *norms]:
            bound.grads.extend([(layer.weight, layer.grad_weight), (layer.bias, layer.grad_bias)])
        if log_ent_coef is not None:
            assert bound.log_ent_coef_grad is not None
            bound.grads.append((log_ent_coef, bound.log_ent_coef_grad))
        return bound

    def read_dropout_modes(self) -> str | None:
        """Take each dropout layer's rate as it is now (its ``p``, or 0 in evaluation mode), or say why not."""
        reason = dropout_reason([*self.dropouts, *self.target_dropouts], self.critic_head.weight.device)
        if reason is not None:
            return reason
        for layers, dropouts in ((self.critic, self.dropouts), (self.critic_target, self.target_dropouts)):
            for layer, dropout in zip(layers, dropouts, strict=True):
                layer.dropout_rate = dropout_rate(dropout)
        self.plain_critics = all(layer.plain for layer in self.critic)
        self.plain_targets = all(layer.plain for layer in self.critic_target)
        return None

    def grads_in_place(self) -> bool:
        """Whether every parameter still holds the gradient tensor the engine writes into."""
        return all(p.grad is g for p, g in self.grads)
