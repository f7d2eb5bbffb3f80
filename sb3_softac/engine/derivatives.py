"""The engine's math: the SAC networks' forward passes and the derivatives of the SAC losses, by hand.

Pure functions on tensors: each reads its arguments and writes its results into the output tensors it is given
(``out=``, preallocated by :mod:`sb3_softac.engine.buffers`), and keeps nothing. Each derivative's docstring gives
the formula it implements; ``tests/test_derivatives.py`` checks each one on its own, in float64 and without an
environment, against ``torch.func.vjp`` of the function it differentiates (the networks of
:mod:`sb3_softac.networks`, the objectives of :mod:`sb3_softac.losses` and the log-density of
:mod:`sb3_softac.distributions`).

Notation: a critic ensemble has ``n`` members, a minibatch ``B`` rows; a hidden layer of the critics computes
``h = act(norm(drop(x W + b)))``, with ``drop`` (dropout: zeros at the dropped elements, ``1 / (1 - p)`` times the
others) and
``norm`` (layer normalisation ``xhat * gamma + beta``, ``xhat = (z - mean(z)) * rstd``) each optional; the head
is affine with one output. The actor computes ``u = mean + std * noise``, ``a = tanh(u)``,
``std = exp(clamp(log_std_raw))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch as th

from sb3_softac.distributions import LOG_STD_MAX, LOG_STD_MIN
from sb3_softac.networks import dropped_positions
from sb3_softac.torch_ops import Activation, EngineOps


@dataclass
class Layer:
    """One affine layer's parameters and the tensors their gradients go to, with views of them made once.

    A view made at every step costs Python and dispatch time. The views share the parameters' memory, so they see
    in-place edits.
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


@dataclass
class Norm:
    """An ensemble layer normalisation's affine parameters ``gamma``, ``beta`` (``(n, 1, width)``) and gradients."""

    weight: th.Tensor
    bias: th.Tensor
    grad_weight: th.Tensor
    grad_bias: th.Tensor


@dataclass
class CriticLayer:
    """A hidden layer of the critics: affine, then dropout at ``dropout_rate`` and layer normalisation if any."""

    linear: Layer
    norm: Norm | None
    dropout_rate: float

    @property
    def plain(self) -> bool:
        """Whether the layer is affine and activation only (no layer norm, no dropout now)."""
        return self.norm is None and self.dropout_rate == 0.0


class CriticTensors:
    """One evaluation of an ensemble on one ``(batch, obs + action)`` input: the tensors its backward pass reads.

    :param x: the input, whose observation and action columns are filled before the pass
    :param hidden: each hidden layer's activations ``h``, ``(n, batch, width)``
    :param q: the values, ``(n, batch, 1)``
    :param pre_norm: each hidden layer's input ``z`` of its layer normalisation (after dropout), or None without
    """

    def __init__(
        self,
        x: th.Tensor,
        obs_dim: int,
        hidden: list[th.Tensor],
        q: th.Tensor,
        pre_norm: list[th.Tensor | None],
    ) -> None:
        members = q.shape[0]
        self.x, self.hidden, self.q, self.pre_norm = x, hidden, q, pre_norm
        self.obs, self.actions = x[:, :obs_dim], x[:, obs_dim:]
        self.x_t = x.t()
        self.x_members = x.expand(members, *x.shape)
        self.hidden_t = [h.transpose(1, 2) for h in hidden]
        # The head's input and values one critic at a time (see critic_forward).
        self.head_in = list(hidden[-1] if hidden else self.x_members)
        self.head_in_t = [h.t() for h in self.head_in]
        self.q_columns = [column[:, 0] for column in q]
        #: Per hidden layer with normalisation, the forward pass's ``xhat``, mean and ``rstd`` (kept for backward).
        self.normalised: list[tuple[th.Tensor, th.Tensor, th.Tensor] | None] = [None] * len(hidden)
        #: Per hidden layer with dropout, the forward pass's dropped elements (flat indices, kept for backward).
        self.dropped: list[th.Tensor | None] = [None] * len(hidden)


class ActorTensors:
    """The actor's tensors for some rows of its input: its forward pass writes them, its backward reads them."""

    def __init__(
        self,
        actor_in: th.Tensor,
        hidden: list[th.Tensor],
        mean: th.Tensor,
        log_std_raw: th.Tensor,
        log_std: th.Tensor,
        std: th.Tensor,
        noise: th.Tensor,
        gaussian_actions: th.Tensor,
        actions: th.Tensor,
    ) -> None:
        self.actor_in, self.hidden, self.mean, self.log_std_raw = actor_in, hidden, mean, log_std_raw
        self.log_std, self.std, self.noise = log_std, std, noise
        self.gaussian_actions, self.actions = gaussian_actions, actions

    def rows(self, rows: slice) -> ActorTensors:
        """Views of some of the rows."""
        return ActorTensors(
            self.actor_in[rows],
            [hidden[rows] for hidden in self.hidden],
            self.mean[rows],
            self.log_std_raw[rows],
            self.log_std[rows],
            self.std[rows],
            self.noise[rows],
            self.gaussian_actions[rows],
            self.actions[rows],
        )


def activate_(x: th.Tensor, activation: Activation) -> None:
    """The hidden layers' activation, in place."""
    if activation == "relu":
        x.relu_()
    else:
        x.tanh_()


# ---------------------------------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------------------------------


def actor_forward(hidden: Sequence[Layer], mu: Layer, log_std: Layer, activation: Activation, t: ActorTensors) -> None:
    """Mean, clamped log std and reparameterised, squashed action of the actor's input ``t.actor_in``.

    The twin of ``Actor.get_action_dist_params`` and the squashed sample, kept here to write into preallocated
    tensors; ``tests/test_engine.py::test_engine_forward_passes_equal_the_modules`` holds the two equal.
    ``t.noise`` is drawn by the caller.
    """
    x = t.actor_in
    for layer, out in zip(hidden, t.hidden, strict=True):
        x = th.addmm(layer.bias, x, layer.weight_t, out=out)
        activate_(x, activation)
    th.addmm(mu.bias, x, mu.weight_t, out=t.mean)
    th.addmm(log_std.bias, x, log_std.weight_t, out=t.log_std_raw)
    th.clamp(t.log_std_raw, LOG_STD_MIN, LOG_STD_MAX, out=t.log_std)
    th.exp(t.log_std, out=t.std)
    th.addcmul(t.mean, t.std, t.noise, out=t.gaussian_actions)
    th.tanh(t.gaussian_actions, out=t.actions)


def critic_forward(
    layers: Sequence[CriticLayer], head: Layer, activation: Activation, ops: EngineOps, t: CriticTensors
) -> None:
    """Every critic's value of the pass's shared input, into ``t.q`` ``(n, batch, 1)``.

    The twin of ``Critic.q_values`` (:class:`sb3_softac.networks.EnsembleMLP`), kept here for its buffers and its
    per-critic head; ``tests/test_engine.py::test_engine_forward_passes_equal_the_modules`` holds the two equal.
    Dropout's drops are drawn here, layer by layer, as :class:`sb3_softac.networks.EnsembleDropout` draws them
    (:func:`sb3_softac.networks.dropped_positions`), so both update paths drop the same elements.
    """
    h = t.x_members
    for i, (layer, out) in enumerate(zip(layers, t.hidden, strict=True)):
        pre = t.pre_norm[i]
        z = th.baddbmm(layer.linear.bias, h, layer.linear.weight, out=out if pre is None else pre)
        if layer.dropout_rate > 0.0:
            dropped = dropped_positions(z.numel(), layer.dropout_rate, z.device)
            t.dropped[i] = dropped
            z.mul_(1.0 / (1.0 - layer.dropout_rate)).view(-1).index_fill_(0, dropped, 0.0)
        if layer.norm is not None:
            normalised = ops.layer_norm(z)
            t.normalised[i] = normalised
            th.addcmul(layer.norm.bias, normalised[0], layer.norm.weight, out=out)
        activate_(out, activation)
        h = out
    # The single-output head as one matrix-vector product per critic: on the CPU a batched matmul with an
    # output size of 1 is slow, and a multiply-and-sum writes a (n, batch, hidden) temporary.
    for column, head_in, q in zip(head.columns, t.head_in, t.q_columns, strict=True):
        th.mv(head_in, column, out=q)
    t.q.add_(head.bias)


# ---------------------------------------------------------------------------------------------------------------------
# Derivatives of the losses
# ---------------------------------------------------------------------------------------------------------------------


def critic_loss_grad(q: th.Tensor, target_q: th.Tensor, out: th.Tensor) -> th.Tensor:
    """d/dQ of ``losses.critic_loss`` ``= 1/2 sum_i mean_b (Q_ib - y_b)^2``: ``(Q_ib - y_b) / B``."""
    return th.sub(q, target_q, out=out).div_(q.shape[1])


def temperature_grad(log_prob: th.Tensor, target_entropy: float, out: th.Tensor) -> th.Tensor:
    """d/dlog(alpha) of ``losses.temperature_loss`` ``= -log(alpha) mean_b(log pi_b + H)``: ``-(mean log pi + H)``.

    :param out: the gradient, shape ``(1,)`` as ``log_ent_coef``
    """
    return th.mean(log_prob, dim=0, out=out).add_(target_entropy).neg_()


def min_grad(q: th.Tensor, scale: float, out: th.Tensor) -> th.Tensor:
    """d/dQ of ``scale * sum_b min_i Q_ib``: ``scale`` at each row's minimum (the first of equal minima, where
    autograd's ``min(dim)`` backward routes it), zero elsewhere."""
    return out.zero_().scatter_(0, th.min(q, dim=0, keepdim=True).indices, scale)


def critic_backward(
    layers: Sequence[CriticLayer],
    head: Layer,
    activation: Activation,
    ops: EngineOps,
    t: CriticTensors,
    q_grad: th.Tensor,
    hidden_grads: Sequence[th.Tensor],
    weights: bool,
    action_rows_t: th.Tensor,
    action_grad_members: th.Tensor,
    action_grad: th.Tensor,
) -> th.Tensor | None:
    """Backpropagate ``q_grad`` (d loss / dQ, ``(n, batch, 1)``) through the critics' pass ``t``.

    Per layer, from the output down, with ``g`` the gradient w.r.t. the layer's output:

    * head ``q = h w + b``: ``dw = h^T g``, ``db = sum_b g``, ``dh = g w^T``;
    * activation: ``g * 1[h > 0]`` (ReLU) or ``g * (1 - h^2)`` (tanh), from the output ``h``;
    * layer norm: ``dgamma = sum_b g xhat``, ``dbeta = sum_b g``, then :func:`layer_norm_backward` of ``g gamma``;
    * dropout: ``g / (1 - p)``, zero at the dropped elements;
    * affine ``z = x W + b``: ``dW = x^T g``, ``db = sum_b g``, ``dx = g W^T``.

    :param hidden_grads: one ``(n, batch, width)`` tensor per hidden layer for the gradients w.r.t. it
    :param weights: write the gradients of the critics' parameters (critic loss), or return the gradient w.r.t. the
        input's action columns, summed over the critics, without touching them (actor loss)
    :param action_rows_t: the first layer's rows that multiply the action, transposed: ``(n, width, action_dim)``
    :param action_grad_members: ``(n, batch, action_dim)`` scratch
    :param action_grad: ``(batch, action_dim)``, the returned gradient w.r.t. the actions
    """
    if weights:
        # Head: dW = sum_b h_b g_b, one matrix-vector product per critic.
        for head_in_t, grad, grad_column in zip(t.head_in_t, q_grad, head.grad_columns, strict=True):
            th.mv(head_in_t, grad[:, 0], out=grad_column)
        th.sum(q_grad, dim=1, keepdim=True, out=head.grad_bias)
    grad = q_grad
    for i in range(len(layers) - 1, -1, -1):
        hidden_grad = hidden_grads[i]
        if i == len(layers) - 1:
            th.mul(grad, head.weight_t, out=hidden_grad)
        else:
            th.bmm(grad, layers[i + 1].linear.weight_t, out=hidden_grad)
        ops.activation_backward(hidden_grad, t.hidden[i], activation, out=hidden_grad)
        grad = hidden_grad
        layer = layers[i]
        normalised = t.normalised[i]
        if layer.norm is not None:
            pre = t.pre_norm[i]
            assert normalised is not None
            assert pre is not None
            xhat, mean, rstd = normalised
            if weights:
                th.sum(grad * xhat, dim=1, keepdim=True, out=layer.norm.grad_weight)
                th.sum(grad, dim=1, keepdim=True, out=layer.norm.grad_bias)
            grad = layer_norm_backward(ops, grad.mul_(layer.norm.weight), pre, mean, rstd)
        dropped = t.dropped[i]
        if layer.dropout_rate > 0.0 and dropped is not None:
            grad.mul_(1.0 / (1.0 - layer.dropout_rate)).view(-1).index_fill_(0, dropped, 0.0)
        if weights:
            if i == 0:
                # The input is shared by all critics: one broadcast matmul instead of a bmm on an expanded copy.
                th.matmul(t.x_t, grad, out=layer.linear.grad_weight)
            else:
                th.bmm(t.hidden_t[i - 1], grad, out=layer.linear.grad_weight)
            th.sum(grad, dim=1, keepdim=True, out=layer.linear.grad_bias)
    if weights:
        return None
    if not layers:  # no hidden layer: the action gradient is the head's weight itself
        th.mul(grad, action_rows_t, out=action_grad_members)
    else:
        th.bmm(grad, action_rows_t, out=action_grad_members)
    return th.sum(action_grad_members, dim=0, out=action_grad)


def layer_norm_backward(ops: EngineOps, grad: th.Tensor, z: th.Tensor, mean: th.Tensor, rstd: th.Tensor) -> th.Tensor:
    """d/dz of ``xhat = (z - mean(z)) * rstd`` over the last dimension, ``rstd = 1 / sqrt(var(z) + eps)``.

    ``dz = rstd * (g - mean(g) - xhat * mean(g xhat))`` for ``g = d loss / dxhat`` (means over the features), in
    ATen's own kernel (the one autograd's layer-norm backward runs).

    :return: a new tensor
    """
    return ops.layer_norm_backward(grad, z, mean, rstd)


def chosen_critic_action_grad(
    layers: Sequence[Layer],
    activation: Activation,
    ops: EngineOps,
    q: th.Tensor,
    hidden_rows: Sequence[th.Tensor],
    head_weights: th.Tensor,
    input_grad_weights: Sequence[Sequence[th.Tensor]],
    scale: float,
    chosen_hidden: Sequence[th.Tensor],
    chosen_hidden_grad: Sequence[th.Tensor],
    chosen_input_grad: th.Tensor,
    chosen_action_grad: th.Tensor,
    action_grad: th.Tensor,
) -> th.Tensor:
    """d/da of ``scale * sum_b min_i Q_i(s_b, a_b)``, each row through its chosen critic only (critics without
    dropout or layer norm).

    The minimum passes each row's gradient to one critic, the first of equal minima as autograd's min routes it, so
    the other critics' share of :func:`critic_backward` is zeros. Here the rows are grouped by their critic and
    each group is multiplied by that critic's weights alone: the same sums without the zeros, ``1 / n`` of the
    input-gradient matmuls. The group sizes are read on the host, which is free on the CPU but a synchronisation
    elsewhere (the caller decides).

    :param layers: the critics' affine layers, the head last
    :param q: the values of the pass, ``(n, batch, 1)``
    :param hidden_rows: each hidden layer's activations as ``(n * batch, width)``
    :param head_weights: the head's weights, ``(n, width)``
    :param input_grad_weights: per layer, per critic, the transposed weights that carry a gradient to the layer's
        input (of the first layer, to its action columns only)
    :param scale: the derivative of the loss w.r.t. each row's minimum (the actor loss: ``-1 / batch``)
    :param chosen_hidden: scratch, per hidden layer, ``(batch, width)``
    :param chosen_hidden_grad: scratch, per hidden layer, ``(batch, width)``
    :param chosen_input_grad: scratch ``(batch, input)``, used without hidden layers
    :param chosen_action_grad: scratch ``(batch, action_dim)``
    :param action_grad: the returned gradient w.r.t. the actions, ``(batch, action_dim)``
    """
    n_critics, batch_size = q.shape[:2]
    chosen = th.min(q, dim=0).indices.flatten()
    critic_of_row, rows = th.sort(chosen, stable=True)
    ends = th.bincount(chosen, minlength=n_critics).cumsum(0).tolist()
    groups = [(c, start, end) for c, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)) if end > start]
    # Row j of the sorted batch is row rows[j] of critic critic_of_row[j] in the (critic, row) flattened layout.
    flat = th.add(rows, critic_of_row, alpha=batch_size)
    # d loss / d (last hidden layer, or input without hidden layers) = scale * the chosen critic's head weights.
    grad = chosen_hidden_grad[-1] if len(layers) > 1 else chosen_input_grad
    th.index_select(head_weights, 0, critic_of_row, out=grad).mul_(scale)
    for i in range(len(layers) - 2, -1, -1):
        hidden = th.index_select(hidden_rows[i], 0, flat, out=chosen_hidden[i])
        ops.activation_backward(grad, hidden, activation, out=grad)
        # Layer i's input gradient; of its first layer only the action columns are needed.
        below = chosen_hidden_grad[i - 1] if i > 0 else chosen_action_grad
        for critic, start, end in groups:
            th.mm(grad[start:end], input_grad_weights[i][critic], out=below[start:end])
        grad = below
    if len(layers) == 1:
        grad = chosen_input_grad[:, chosen_input_grad.shape[1] - action_grad.shape[1] :]
    return action_grad.index_copy_(0, rows, grad)


def squashed_gaussian_backward(
    t: ActorTensors,
    action_grad: th.Tensor,
    ent_coef: th.Tensor,
    ops: EngineOps,
    gaussian_grad: th.Tensor,
    log_std_grad: th.Tensor,
    clamp_mask: th.Tensor,
) -> None:
    """The actor loss's gradient w.r.t. the mean and the raw log std, given its gradient ``action_grad`` w.r.t. ``a``.

    The loss is ``mean_b(alpha log pi_b) + (terms in a)`` (``losses.actor_loss``), with ``log pi`` of
    ``distributions.squashed_log_prob_from_noise``: ``sum(-noise^2 / 2 - log_std - log(2 pi) / 2 - log(1 - a^2))``
    at ``a = tanh(u)``, ``u = mean + std * noise`` (the noise held fixed). With ``c = alpha / B``:

    * ``dL/du = (1 - a^2) dL/da + 2 c a`` (``d/du -log(1 - tanh(u)^2) = 2 tanh(u)``): the mean's gradient;
    * ``dL/dlog_std = dL/du * noise * std - c``, passed by the clamp inside its bounds (and on a bound where
      autograd's clamp passes it on the running torch, see :mod:`sb3_softac.torch_ops`).

    :param gaussian_grad: out: ``dL/du`` = ``dL/dmean``
    :param log_std_grad: out: ``dL/dlog_std_raw``
    :param clamp_mask: scratch, bool, the shape of the actions
    """
    batch_size = t.actions.shape[0]
    two_c = th.mul(ent_coef, 2.0 / batch_size)
    actions = t.actions
    th.mul(actions, actions, out=gaussian_grad)
    th.addcmul(action_grad, gaussian_grad, action_grad, value=-1.0, out=gaussian_grad)  # (1 - a^2) dL/da
    gaussian_grad.addcmul_(actions, two_c)
    th.mul(gaussian_grad, t.noise, out=log_std_grad).mul_(t.std)
    log_std_grad.sub_(two_c, alpha=0.5)
    ops.clamp_mask(t.log_std_raw, t.log_std, out=clamp_mask)
    log_std_grad.mul_(clamp_mask)


def actor_backward(
    hidden: Sequence[Layer],
    mu: Layer,
    log_std: Layer,
    activation: Activation,
    ops: EngineOps,
    t: ActorTensors,
    gaussian_grad: th.Tensor,
    log_std_grad: th.Tensor,
    hidden_grads: Sequence[th.Tensor],
) -> None:
    """The actor's parameter gradients from the gradients w.r.t. its two heads' outputs (mean, raw log std).

    Heads ``mean = x W_mu + b_mu``, ``log_std_raw = x W_ls + b_ls``: ``dW = g^T x``, ``db = sum_b g``, and
    ``dx = g_mu W_mu + g_ls W_ls``; then each hidden layer as in :func:`critic_backward` (activation, affine).

    :param gaussian_grad: d loss / d mean, ``(batch, action_dim)``
    :param log_std_grad: d loss / d log_std_raw
    :param hidden_grads: one ``(batch, width)`` tensor per hidden layer for the gradients w.r.t. it
    """
    latent = t.hidden[-1] if t.hidden else t.actor_in
    th.mm(gaussian_grad.t(), latent, out=mu.grad_weight)
    th.sum(gaussian_grad, dim=0, out=mu.grad_bias)
    th.mm(log_std_grad.t(), latent, out=log_std.grad_weight)
    th.sum(log_std_grad, dim=0, out=log_std.grad_bias)
    if not t.hidden:
        return
    grad = hidden_grads[-1]
    th.mm(gaussian_grad, mu.weight, out=grad)
    grad.addmm_(log_std_grad, log_std.weight)
    inputs = [t.actor_in, *t.hidden[:-1]]
    for i in range(len(hidden) - 1, -1, -1):
        layer = hidden[i]
        ops.activation_backward(grad, t.hidden[i], activation, out=grad)
        th.mm(grad.t(), inputs[i], out=layer.grad_weight)
        th.sum(grad, dim=0, out=layer.grad_bias)
        if i > 0:
            th.mm(grad, layer.weight, out=hidden_grads[i - 1])
            grad = hidden_grads[i - 1]
