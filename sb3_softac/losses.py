"""The SAC objectives as pure functions on tensors.

Notation follows Haarnoja et al. 2018b, "Soft Actor-Critic Algorithms and Applications"
(arXiv:1812.05905). ``q_values`` always stacks the critic ensemble on the first dimension:
``(n_critics, batch, k)``, where ``k`` is 1 for continuous actions (Q of the given action) and the
number of actions for discrete ones (Q of every action). For discrete policies, pass ``probs`` and the
expectations over actions are taken exactly (Christodoulou 2019, eqs. 10-12) instead of by sampling.
"""

from typing import Literal

import torch as th

#: How the actor's objective reduces the critic ensemble (see :func:`reduce_critics`).
CriticReduction = Literal["min", "mean"]
CRITIC_REDUCTIONS: tuple[CriticReduction, ...] = ("min", "mean")


def draw_critic_subset(n_critics: int, subset_size: int | None, device: th.device | str) -> th.Tensor | None:
    """REDQ's random subset of critics for one target (Chen et al. 2021, algorithm 1, line 6).

    :param n_critics: ensemble size
    :param subset_size: number of critics to draw without replacement; ``None`` means all of them
    :param device: where the indices live (and whose generator draws them)
    :return: the indices, shape ``(subset_size,)``, or None when the subset is the whole ensemble
    """
    if subset_size is None or subset_size >= n_critics:
        return None
    return th.randperm(n_critics, device=device)[:subset_size]


def min_over_critics(q_values: th.Tensor, subset_size: int | None = None) -> th.Tensor:
    """Clipped double-Q: the minimum over the critic ensemble (TD3, Fujimoto et al. 2018).

    With ``subset_size``, the minimum is taken over that many critics drawn at random without
    replacement (:func:`draw_critic_subset`), as in REDQ's in-target minimisation.

    :param q_values: shape ``(n_critics, batch, k)``
    :param subset_size: number of critics to take the minimum over; ``None`` means all of them
    :return: shape ``(batch, k)``
    """
    subset = draw_critic_subset(q_values.shape[0], subset_size, q_values.device)
    if subset is not None:
        q_values = q_values.index_select(0, subset)
    return q_values.min(dim=0).values


def reduce_critics(q_values: th.Tensor, reduction: CriticReduction) -> th.Tensor:
    """The ensemble value the actor maximises: SAC's minimum, or REDQ's mean over all critics.

    ``"min"`` is clipped double-Q (:func:`min_over_critics`), as in SAC's policy update; ``"mean"`` is the ensemble
    average of REDQ's policy update (Chen et al. 2021, algorithm 1, line 10).

    :param q_values: shape ``(n_critics, batch, k)``
    :param reduction: ``"min"`` or ``"mean"``
    :return: shape ``(batch, k)``
    """
    if reduction == "min":
        return min_over_critics(q_values)
    if reduction == "mean":
        return q_values.mean(dim=0)
    raise ValueError(f"reduction={reduction!r} is not one of {CRITIC_REDUCTIONS}.")


def soft_state_value(
    q_values: th.Tensor, log_prob: th.Tensor, ent_coef: th.Tensor, probs: th.Tensor | None = None
) -> th.Tensor:
    """Soft state value ``V(s) = E_{a~pi}[Q(s, a) - alpha * log pi(a|s)]`` (eq. 3).

    :param q_values: critic values already reduced over the ensemble, shape ``(batch, k)``
    :param log_prob: ``log pi(a|s)``: shape ``(batch, 1)`` for a sampled continuous action,
        ``(batch, n_actions)`` for every discrete action
    :param ent_coef: temperature ``alpha``, a scalar tensor without gradient
    :param probs: ``pi(a|s)`` of every discrete action, shape ``(batch, n_actions)``; ``None`` for
        continuous actions, where the expectation is the single sample
    :return: shape ``(batch, 1)``
    """
    value = q_values - ent_coef * log_prob
    if probs is None:
        return value
    return (probs * value).sum(dim=-1, keepdim=True)


def soft_q_target(
    rewards: th.Tensor, dones: th.Tensor, discounts: th.Tensor | float, next_value: th.Tensor
) -> th.Tensor:
    """Soft Bellman backup ``y = r + gamma * (1 - d) * V_target(s')`` (eqs. 2-3).

    :param rewards: shape ``(batch, 1)``
    :param dones: 1.0 where the episode terminated (not truncated), shape ``(batch, 1)``
    :param discounts: ``gamma``, or per-sample ``gamma^n`` for n-step returns, shape ``(batch, 1)``
    :param next_value: soft value of the next state under the target critics, shape ``(batch, 1)``
    :return: shape ``(batch, 1)``
    """
    return rewards + (1.0 - dones) * discounts * next_value


def critic_loss(current_q_values: th.Tensor, target_q_values: th.Tensor) -> th.Tensor:
    """Soft Bellman residual ``J_Q = 1/2 * sum_i E[(Q_i(s, a) - y)^2]`` over the ensemble (eq. 5).

    :param current_q_values: ``Q_i(s, a)`` of the replayed actions, shape ``(n_critics, batch, 1)``
    :param target_q_values: the backup ``y`` without gradient, shape ``(batch, 1)``
    :return: scalar loss
    """
    return 0.5 * (current_q_values - target_q_values).square().mean(dim=(1, 2)).sum()


def actor_loss(
    q_values: th.Tensor, log_prob: th.Tensor, ent_coef: th.Tensor, probs: th.Tensor | None = None
) -> th.Tensor:
    """Policy loss ``J_pi = E_s[E_{a~pi}[alpha * log pi(a|s) - Q(s, a)]] = -E_s[V(s)]`` (eq. 7 / 9).

    :param q_values: critic values reduced over the ensemble, shape ``(batch, k)``; for continuous
        actions they must be evaluated at the reparameterised sample so gradients reach the actor
    :param log_prob: as in :func:`soft_state_value`
    :param ent_coef: temperature ``alpha``, a scalar tensor without gradient
    :param probs: as in :func:`soft_state_value`
    :return: scalar loss
    """
    return -soft_state_value(q_values, log_prob, ent_coef, probs).mean()


def expected_log_prob(log_prob: th.Tensor, probs: th.Tensor | None = None) -> th.Tensor:
    """``E_{a~pi}[log pi(a|s)]``, the negative policy entropy at each state.

    :param log_prob: as in :func:`soft_state_value`
    :param probs: as in :func:`soft_state_value`
    :return: shape ``(batch, 1)``
    """
    if probs is None:
        return log_prob
    return (probs * log_prob).sum(dim=-1, keepdim=True)


def temperature_loss(
    log_ent_coef: th.Tensor, log_prob: th.Tensor, target_entropy: float, probs: th.Tensor | None = None
) -> th.Tensor:
    """Temperature loss ``J(alpha) = E[-log(alpha) * (log pi(a|s) + target_entropy)]`` (eq. 18).

    The loss is written in ``log(alpha)``, the parameter actually optimised, and the policy term is
    detached so that only ``alpha`` receives gradients.

    :param log_ent_coef: ``log(alpha)``, the learnable parameter, shape ``(1,)``
    :param log_prob: as in :func:`soft_state_value`
    :param target_entropy: the entropy the temperature steers the policy towards
    :param probs: as in :func:`soft_state_value`
    :return: scalar loss
    """
    return -(log_ent_coef * (expected_log_prob(log_prob, probs) + target_entropy).detach()).mean()
