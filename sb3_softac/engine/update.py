"""The engine's gradient step: the order of the SAC update, its random draws, and which derivative runs where.

:meth:`UpdateEngine.gradient_step` runs the same update as ``sb3_softac.SAC._gradient_step`` (critics, then
temperature and actor, with the same random draws in the same order) through the forward passes and derivatives of
:mod:`sb3_softac.engine.derivatives`, written into the buffers of :mod:`sb3_softac.engine.buffers`. The forward
values reuse the objectives of :mod:`sb3_softac.losses` and the log-density of :mod:`sb3_softac.distributions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch as th
from stable_baselines3.common.type_aliases import ReplayBufferSamples

from sb3_softac import compat, train_statistics
from sb3_softac.distributions import squashed_log_prob_from_noise
from sb3_softac.engine import derivatives
from sb3_softac.engine.bindings import Bound, Snapshot
from sb3_softac.engine.buffers import Buffers, buffers_key
from sb3_softac.engine.coverage import EngineModel, engine_ops, hooks_reason, unsupported_reason
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


@dataclass(frozen=True)
class UpdateSettings:
    """The settings of the SAC update that the engine reads, as the model holds them at a ``train`` call."""

    gamma: float
    tau: float
    #: The learned temperature's target entropy (unused for a fixed temperature).
    target_entropy: float
    critic_subset_size: int | None
    actor_q_reduction: CriticReduction


def _counts_on_host(device: th.device) -> bool:
    """Whether reading a count on the host is free on ``device`` (the CPU), rather than a synchronisation.

    The actor's "min" backward groups rows by critic with sizes read on the host where that is free; elsewhere it
    runs every critic on every row (zeros where a critic is not the minimum), keeping the step free of
    synchronisations and of data-dependent shapes.
    """
    return device.type == "cpu"


class UpdateEngine:
    """The SAC gradient step without autograd, for the models :func:`unsupported_reason` accepts.

    One engine serves one model: it rebinds to the model's live parameters and optimizers at every
    :meth:`begin` and keeps its buffers between calls for as long as the batch size and the networks' shapes
    stay the same.
    """

    def __init__(self) -> None:
        self._bound: Bound | None = None
        self._snapshot: Snapshot | None = None
        self._buffers: Buffers | None = None

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
            self._bound = Bound.from_model(model, ops)
            self._snapshot = Snapshot(model)
            self._buffers = None
        else:
            # The full check only when something was replaced; hooks can come and go on the same modules.
            reason = hooks_reason(snapshot.modules, snapshot.parameters)
            if reason is not None:
                return reason
        # Dropout layers may have been switched to evaluation mode (or back), or their rate changed, since the last
        # call.
        reason = self._bound.read_dropout_modes()
        if reason is not None:
            return reason
        # The optimizers' state tensors may have been replaced (load_state_dict) since the last call.
        for step in (self._bound.actor_optimizer, self._bound.critic_optimizer, self._bound.ent_coef_optimizer):
            if step is not None:
                step.forget()
        return None

    def _buffers_for(
        self, batch_size: int, obs_dim: int, action_dim: int, like: th.Tensor, target_members: int
    ) -> Buffers:
        assert self._bound is not None
        key = buffers_key(self._bound, batch_size, obs_dim, action_dim, like, target_members)
        if self._buffers is None or self._buffers.key != key:
            self._buffers = Buffers(self._bound, batch_size, obs_dim, action_dim, like, target_members)
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
        ops, activation = bound.ops, bound.activation
        obs = replay_data.observations.flatten(1)
        batch_size, obs_dim = obs.shape
        n_critics = bound.critic_head.weight.shape[0]
        # REDQ's subset: of plain target critics only its members are evaluated; a target with dropout evaluates
        # every member, drawing every member's drops, and takes its subset after them, as the autograd update does.
        subset_size = settings.critic_subset_size
        gather = subset_size is not None and subset_size < n_critics and bound.plain_targets
        target_members = subset_size if gather and subset_size is not None else n_critics
        buf = self._buffers_for(batch_size, obs_dim, replay_data.actions.shape[1], bound.mu.weight, target_members)
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
        derivatives.actor_forward(bound.actor_hidden, bound.mu, bound.log_std, activation, rows)
        log_prob = squashed_log_prob_from_noise(rows.noise, rows.gaussian_actions, rows.log_std).unsqueeze(1)
        split = batch_size if update_actor else 0
        log_prob_pi, next_log_prob = log_prob[:split], log_prob[split:]

        # Soft Q target from the target critics at the next observations.
        buf.target_pass.obs.copy_(next_obs)
        buf.target_pass.actions.copy_(buf.next_rows.actions)
        target, target_head = bound.critic_target, bound.critic_target_head
        if gather:
            # Drawn where min_over_critics draws it (nothing random comes between), and only its members evaluated.
            subset = draw_critic_subset(n_critics, subset_size, flag.device)
            assert subset is not None
            assert buf.target_subset_head is not None
            pairs = [(s.linear, g.linear) for s, g in zip(target, buf.target_subset, strict=True)]
            for source, gathered in [*pairs, (target_head, buf.target_subset_head)]:
                th.index_select(source.weight, 0, subset, out=gathered.weight)
                th.index_select(source.bias, 0, subset, out=gathered.bias)
            target, target_head = buf.target_subset, buf.target_subset_head
        derivatives.critic_forward(target, target_head, activation, ops, buf.target_pass)
        next_q = min_over_critics(buf.target_q, None if gather else subset_size)
        discounts = compat.discounts(replay_data, settings.gamma)
        next_value = soft_state_value(next_q, next_log_prob, ent_coef)
        target_q = soft_q_target(replay_data.rewards, replay_data.dones, discounts, next_value)

        # The critics' loss, its gradient and their Adam step.
        critic_pass = buf.critic_pass
        critic_pass.obs.copy_(obs)
        critic_pass.actions.copy_(replay_data.actions)
        derivatives.critic_forward(bound.critic, bound.critic_head, activation, ops, critic_pass)
        loss_q = critic_loss(buf.q, target_q)
        mean_q = buf.q.mean()
        derivatives.critic_loss_grad(buf.q, target_q, out=buf.q_grad)
        self._critic_backward(bound, buf, critic_pass, weights=True)
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
                ent_coef_loss = temperature_loss(bound.log_ent_coef, log_prob_pi, settings.target_entropy)
                derivatives.temperature_grad(log_prob_pi, settings.target_entropy, out=bound.log_ent_coef_grad)
                bound.ent_coef_optimizer(ent_coef_loss, flag)
            loss_pi = self._actor_step(bound, buf, ent_coef, log_prob_pi, settings.actor_q_reduction, flag)
            actor_row = train_statistics.actor_row(loss_pi, entropy, ent_coef_loss, flag)

        if update_target:
            # guarded_lerp_ in one foreach call, without reading the flag on the host.
            ops.polyak_(bound.target_parameters, bound.critic_parameters, flag, settings.tau)
        return critic_row, actor_row

    @staticmethod
    def _critic_backward(bound: Bound, buf: Buffers, t: derivatives.CriticTensors, weights: bool) -> th.Tensor | None:
        return derivatives.critic_backward(
            bound.critic,
            bound.critic_head,
            bound.activation,
            bound.ops,
            t,
            buf.q_grad,
            buf.critic_hidden_grad,
            weights,
            buf.first_action_rows_t,
            buf.action_grad_members,
            buf.action_grad,
        )

    def _actor_step(
        self,
        bound: Bound,
        buf: Buffers,
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
        derivatives.critic_forward(bound.critic, bound.critic_head, bound.activation, bound.ops, critic_pass)
        # d loss / d Q_i(s_b, a_b) is -1/batch on the critic the reduction picks (min: the argmin, as autograd's
        # min backward routes it) or -1/(batch n) on each of them (mean).
        q_pi = reduce_critics(buf.q, reduction)
        loss_pi = actor_loss(q_pi, log_prob, ent_coef)
        n_critics = buf.q.shape[0]
        action_grad: th.Tensor | None
        if reduction == "min" and n_critics > 1 and bound.plain_critics and _counts_on_host(buf.q.device):
            action_grad = derivatives.chosen_critic_action_grad(
                bound.critic_affine,
                bound.activation,
                bound.ops,
                buf.q,
                buf.critic_hidden_rows,
                buf.head_weights,
                buf.input_grad_weights,
                -1.0 / batch_size,
                buf.chosen_hidden,
                buf.chosen_hidden_grad,
                buf.chosen_input_grad,
                buf.chosen_action_grad,
                buf.action_grad,
            )
        else:
            if reduction == "min":
                derivatives.min_grad(buf.q, -1.0 / batch_size, out=buf.q_grad)
            else:
                buf.q_grad.fill_(-1.0 / (batch_size * n_critics))
            action_grad = self._critic_backward(bound, buf, critic_pass, weights=False)
        assert action_grad is not None
        derivatives.squashed_gaussian_backward(
            rows, action_grad, ent_coef, bound.ops, buf.gaussian_grad, buf.log_std_grad, buf.clamp_mask
        )
        derivatives.actor_backward(
            bound.actor_hidden,
            bound.mu,
            bound.log_std,
            bound.activation,
            bound.ops,
            rows,
            buf.gaussian_grad,
            buf.log_std_grad,
            buf.actor_hidden_grad,
        )
        bound.actor_optimizer(loss_pi, flag)
        return loss_pi
