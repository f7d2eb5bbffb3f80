"""The engine's preallocated tensors for one batch size, and the views of them that a gradient step uses."""

from __future__ import annotations

import torch as th

from sb3_softac.engine.bindings import Bound
from sb3_softac.engine.derivatives import ActorTensors, CriticLayer, CriticTensors, Layer


def buffers_key(
    bound: Bound, batch_size: int, obs_dim: int, action_dim: int, like: th.Tensor, target_members: int
) -> tuple[object, ...]:
    """What :class:`Buffers` are made for: while it stays the same, the same buffers serve."""
    dropouts = tuple(layer.dropout_rate > 0.0 for layer in [*bound.critic, *bound.critic_target])
    n_critics = bound.critic_head.weight.shape[0]
    return (batch_size, obs_dim, action_dim, like.dtype, like.device, n_critics, target_members, dropouts)


class Buffers:
    """Preallocated activations and gradients of one batch size, and the views of them that a step uses.

    Some buffers share memory with others (a smaller working set, which the CPU's caches reward). Each is correct
    only for the order of operations in :meth:`sb3_softac.engine.update.UpdateEngine.gradient_step`; a change of
    that order must check this table:

    =============================  ==============================  ==============================================
    buffer                         lives in                        why that memory is free then
    =============================  ==============================  ==============================================
    the target pass's activations  ``critic_hidden`` (and          the soft target is computed, and its
    (and pre-norm inputs)          ``pre_norm``), their first      activations dead, before the critics run
                                   ``target_members``
    ``actor_hidden_grad``          ``critic_hidden[i][0]``, where  the actor's backward pass comes after the last
                                   the shapes match                read of the critics' activations
    ``chosen_hidden``,             ``critic_hidden_grad[i][1]``,   the critic loss's backward pass and step are
    ``chosen_hidden_grad``         ``critic_hidden_grad[i][0]``    done before the actor's step starts
    =============================  ==============================  ==============================================

    :param target_members: how many target critics one target evaluates: all of them, or REDQ's subset, whose
        weights are gathered into ``target_subset`` at each step so that the critics left out cost nothing
    """

    def __init__(
        self, bound: Bound, batch_size: int, obs_dim: int, action_dim: int, like: th.Tensor, target_members: int
    ) -> None:
        def empty(*shape: int) -> th.Tensor:
            return th.empty(shape, dtype=like.dtype, device=like.device)

        self.key = buffers_key(bound, batch_size, obs_dim, action_dim, like, target_members)
        n_critics = bound.critic_head.weight.shape[0]
        widths = [layer.linear.weight.shape[2] for layer in bound.critic]
        rows = 2 * batch_size  # the actor runs on observations and next observations in one pass
        self.all_rows = ActorTensors(
            empty(rows, obs_dim),
            [empty(rows, layer.weight.shape[0]) for layer in bound.actor_hidden],
            *(empty(rows, action_dim) for _ in range(7)),
        )
        self.obs_rows = self.all_rows.rows(slice(None, batch_size))
        self.next_rows = self.all_rows.rows(slice(batch_size, None))

        # Critic inputs: (obs, replayed action), (next obs, next action), (obs, policy action).
        critic_in, target_in, actor_critic_in = (empty(batch_size, obs_dim + action_dim) for _ in range(3))
        self.critic_hidden = [empty(n_critics, batch_size, width) for width in widths]
        self.critic_hidden_grad = [empty(n_critics, batch_size, width) for width in widths]
        pre_norm = [
            None if layer.norm is None else empty(n_critics, batch_size, w)
            for layer, w in zip(bound.critic, widths, strict=True)
        ]
        self.q = empty(n_critics, batch_size, 1)
        self.q_grad = empty(n_critics, batch_size, 1)
        self.critic_pass = CriticTensors(critic_in, obs_dim, self.critic_hidden, self.q, pre_norm)
        self.actor_critic_pass = CriticTensors(actor_critic_in, obs_dim, self.critic_hidden, self.q, pre_norm)

        # The target pass. Shares memory: see the table in the class docstring.
        def first_members(tensor: th.Tensor | None, needed: bool, width: int) -> th.Tensor | None:
            if not needed:
                return None
            return empty(target_members, batch_size, width) if tensor is None else tensor[:target_members]

        self.target_subset: list[CriticLayer] = []
        self.target_subset_head: Layer | None = None
        if target_members < n_critics:  # plain critics only (see UpdateEngine.gradient_step)
            for layer in bound.critic_target:
                weight = empty(target_members, *layer.linear.weight.shape[1:])
                bias = empty(target_members, *layer.linear.bias.shape[1:])
                self.target_subset.append(CriticLayer(Layer(weight, bias, weight, bias), None, 0.0))  # no gradient
            head = bound.critic_target_head
            weight, bias = empty(target_members, *head.weight.shape[1:]), empty(target_members, *head.bias.shape[1:])
            self.target_subset_head = Layer(weight, bias, weight, bias)
        self.target_q = empty(target_members, batch_size, 1)
        self.target_pass = CriticTensors(
            target_in,
            obs_dim,
            [hidden[:target_members] for hidden in self.critic_hidden],
            self.target_q,
            [
                first_members(p, t.norm is not None, w)
                for p, t, w in zip(pre_norm, bound.critic_target, widths, strict=True)
            ],
        )

        self.action_grad_members = empty(n_critics, batch_size, action_dim)
        # The actor's "min" backward through each row's chosen critic (derivatives.chosen_critic_action_grad).
        # Shares memory: see the table in the class docstring.
        several = n_critics > 1
        self.chosen_hidden = [grad[1] for grad in self.critic_hidden_grad] if several else []
        self.chosen_hidden_grad = [grad[0] for grad in self.critic_hidden_grad] if several else []
        first = bound.critic[0].linear if bound.critic else bound.critic_head
        self.chosen_input_grad = empty(batch_size, first.weight.shape[1])
        self.chosen_action_grad = empty(batch_size, action_dim)
        self.action_grad = empty(batch_size, action_dim)
        self.gaussian_grad = empty(batch_size, action_dim)
        self.log_std_grad = empty(batch_size, action_dim)
        self.clamp_mask = th.empty((batch_size, action_dim), dtype=th.bool, device=like.device)
        # Shares memory: see the table in the class docstring.
        self.actor_hidden_grad = [
            self.critic_hidden[i][0]
            if i < len(self.critic_hidden) and self.critic_hidden[i].shape[1:] == (batch_size, layer.weight.shape[0])
            else empty(batch_size, layer.weight.shape[0])
            for i, layer in enumerate(bound.actor_hidden)
        ]

        # Views, made once: each costs Python and dispatch time when made at every step.
        with th.no_grad():
            # The first critic layer's rows that multiply the action: the actor's gradient flows back through them.
            self.first_action_rows_t = first.weight[:, obs_dim:, :].transpose(1, 2)
            self.head_weights = bound.critic_head.weight[:, :, 0]
            # Per critic, the transposed weights that carry a hidden layer's gradient to its input (of the first
            # layer, to the action columns only), for the actor's "min" backward.
            self.input_grad_weights = [list(self.first_action_rows_t)]
            self.input_grad_weights += [list(layer.linear.weight_t) for layer in bound.critic[1:]]
        self.critic_hidden_rows = [hidden.view(-1, hidden.shape[2]) for hidden in self.critic_hidden]
