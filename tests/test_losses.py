"""The SAC objectives against values computed by hand on a two-sample batch."""

from math import comb

import pytest
import torch as th

from sb3_softac.losses import (
    actor_loss,
    critic_loss,
    min_over_critics,
    soft_q_target,
    soft_state_value,
    temperature_loss,
)

ALPHA = th.tensor(0.2)


def test_soft_q_target_by_hand() -> None:
    # Two target critics: min over them is [1.5, 3.0].
    next_q = th.tensor([[[2.0], [3.0]], [[1.5], [4.0]]])
    next_log_prob = th.tensor([[-1.0], [0.5]])
    value = soft_state_value(min_over_critics(next_q), next_log_prob, ALPHA)
    # V = min Q - alpha log pi = [1.5 + 0.2, 3.0 - 0.1]
    th.testing.assert_close(value, th.tensor([[1.7], [2.9]]))
    target = soft_q_target(th.tensor([[1.0], [-0.5]]), th.tensor([[0.0], [1.0]]), 0.9, value)
    # y = r + gamma (1 - d) V: the second transition is terminal.
    th.testing.assert_close(target, th.tensor([[1.0 + 0.9 * 1.7], [-0.5]]))


def test_soft_q_target_with_per_sample_discounts() -> None:
    target = soft_q_target(
        th.tensor([[0.0], [0.0]]), th.zeros(2, 1), th.tensor([[0.5], [0.25]]), th.tensor([[2.0], [2.0]])
    )
    th.testing.assert_close(target, th.tensor([[1.0], [0.5]]))


def test_critic_loss_by_hand() -> None:
    target = th.tensor([[2.53], [-0.5]])
    current = th.tensor([[[2.0], [0.0]], [[3.0], [-1.0]]])
    # critic 1 errors (-0.53, 0.5): mean square 0.26545; critic 2 errors (0.47, -0.5): 0.23545.
    th.testing.assert_close(critic_loss(current, target), th.tensor(0.5 * (0.26545 + 0.23545)))


def test_actor_loss_by_hand() -> None:
    q_pi = th.tensor([[[1.0], [2.0]], [[0.5], [3.0]]])
    log_prob = th.tensor([[-1.0], [2.0]])
    # min Q = [0.5, 2.0]; alpha log pi - min Q = [-0.2 - 0.5, 0.4 - 2.0] = [-0.7, -1.6]
    th.testing.assert_close(actor_loss(min_over_critics(q_pi), log_prob, ALPHA), th.tensor(-1.15))


def test_actor_loss_gradient_reaches_actions_only_through_q() -> None:
    actions = th.tensor([[0.3], [-0.2]], requires_grad=True)
    q_pi = (2.0 * actions).unsqueeze(0).expand(2, 2, 1)
    actor_loss(min_over_critics(q_pi), th.zeros(2, 1), ALPHA).backward()
    th.testing.assert_close(actions.grad, th.tensor([[-1.0], [-1.0]]))


def test_temperature_loss_by_hand() -> None:
    log_alpha = th.tensor([0.5], requires_grad=True)
    log_prob = th.tensor([[-1.0], [2.0]], requires_grad=True)
    loss = temperature_loss(log_alpha, log_prob, target_entropy=-1.0)
    # -(0.5 * ((-1 - 1) + (2 - 1)) / 2) = 0.25
    th.testing.assert_close(loss, th.tensor(0.25))
    loss.backward()
    th.testing.assert_close(log_alpha.grad, th.tensor([0.5]))
    assert log_prob.grad is None  # the policy term is detached


def test_discrete_expectations_by_hand() -> None:
    probs = th.tensor([[0.25, 0.75]])
    log_probs = probs.log()
    q = th.tensor([[[1.0, 2.0]], [[0.0, 3.0]]])  # min over critics: [0, 2]
    value = soft_state_value(min_over_critics(q), log_probs, ALPHA, probs)
    expected = 0.25 * (0.0 - 0.2 * th.log(th.tensor(0.25))) + 0.75 * (2.0 - 0.2 * th.log(th.tensor(0.75)))
    th.testing.assert_close(value, expected.reshape(1, 1))
    th.testing.assert_close(actor_loss(min_over_critics(q), log_probs, ALPHA, probs), -expected)
    log_alpha = th.zeros(1, requires_grad=True)
    entropy = -(probs * log_probs).sum()
    th.testing.assert_close(temperature_loss(log_alpha, log_probs, 0.5, probs), th.tensor(0.0))  # log(alpha) = 0
    temperature_loss(log_alpha, log_probs, 0.5, probs).backward()
    # d/dlog(alpha) of -log(alpha) * (-H + target) = H - target
    th.testing.assert_close(log_alpha.grad, (entropy - 0.5).reshape(1))


@pytest.mark.parametrize("subset_size", [1, 2, 3])
def test_min_over_random_subset_uses_exactly_that_many_critics(subset_size: int) -> None:
    # Critic i predicts i everywhere: the min over a subset is its smallest index.
    q = th.arange(10.0).reshape(10, 1, 1).expand(10, 4, 1)
    th.manual_seed(0)
    minima = th.stack([min_over_critics(q, subset_size) for _ in range(2000)])
    frequencies = th.bincount(minima[:, 0, 0].long(), minlength=10).double() / 2000
    # P(min = k) for a uniform subset of size m out of 10 is C(9 - k, m - 1) / C(10, m).
    expected = th.tensor([comb(9 - k, subset_size - 1) / comb(10, subset_size) for k in range(10)], dtype=th.float64)
    th.testing.assert_close(frequencies, expected, atol=0.04, rtol=0.0)


def test_min_over_all_critics_without_subset() -> None:
    q = th.tensor([[[3.0]], [[1.0]], [[2.0]]])
    th.testing.assert_close(min_over_critics(q), th.tensor([[1.0]]))
    th.testing.assert_close(min_over_critics(q, 3), th.tensor([[1.0]]))
