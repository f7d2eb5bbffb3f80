"""Action distributions of the SAC actor, as pure functions on tensors.

Continuous actions use a diagonal Gaussian over pre-squash actions ``u`` followed by ``a = tanh(u)``
(Haarnoja et al. 2018, "Soft Actor-Critic", appendix C). All log-probabilities are taken in the
normalised action space ``[-1, 1]``, so the entropy target does not depend on the environment's
action bounds. Discrete actions use a categorical distribution whose expectations are computed
exactly over every action (Christodoulou 2019, "Soft Actor-Critic for Discrete Action Settings").
"""

import math

import torch as th
from torch.nn import functional as F

#: Bounds on the actor's log standard deviation, as in the reference SAC implementation.
LOG_STD_MIN = -20.0
LOG_STD_MAX = 2.0

_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def tanh_log_abs_det_jacobian(gaussian_actions: th.Tensor) -> th.Tensor:
    """Elementwise ``log |d tanh(u) / du| = log(1 - tanh(u)^2)``, exact and numerically stable.

    Uses the identity ``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))`` (SAC paper, appendix C,
    eq. 21), which stays finite for any finite ``u``, unlike ``log(1 - tanh(u)^2 + eps)`` which is
    biased by ``eps`` and saturates at ``log(eps)``.

    :param gaussian_actions: pre-squash actions ``u``, any shape
    :return: tensor of the same shape
    """
    return 2.0 * (_LOG_2 - gaussian_actions - F.softplus(-2.0 * gaussian_actions))


def _squashed_log_prob(standardised: th.Tensor, gaussian_actions: th.Tensor, log_std: th.Tensor) -> th.Tensor:
    # log N(u; mean, std) written with z = (u - mean) / std, minus the tanh Jacobian, summed over actions.
    gaussian = -0.5 * standardised.square() - log_std - _HALF_LOG_2PI
    return (gaussian - tanh_log_abs_det_jacobian(gaussian_actions)).sum(dim=-1)


def squashed_gaussian_log_prob(gaussian_actions: th.Tensor, mean: th.Tensor, log_std: th.Tensor) -> th.Tensor:
    """Log-density of ``a = tanh(u)`` with ``u ~ N(mean, exp(log_std)^2)`` (diagonal).

    ``log pi(a|s) = sum_i [log N(u_i; mean_i, std_i) - log(1 - tanh(u_i)^2)]`` (SAC paper, eq. 21).

    :param gaussian_actions: pre-squash actions ``u``, shape ``(batch, action_dim)``
    :param mean: Gaussian means, shape ``(batch, action_dim)``
    :param log_std: Gaussian log standard deviations, broadcastable to ``(batch, action_dim)``
    :return: log-probabilities of the squashed actions, shape ``(batch,)``
    """
    return _squashed_log_prob((gaussian_actions - mean) * th.exp(-log_std), gaussian_actions, log_std)


def sample_squashed_gaussian(mean: th.Tensor, log_std: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """Reparameterised sample ``a = tanh(mean + std * xi)``, ``xi ~ N(0, I)``, and its log-probability.

    Gradients flow to ``mean`` and ``log_std`` through the sample (SAC paper, eq. 11). The Gaussian
    term uses the drawn ``xi`` itself rather than ``(u - mean) / std``, which would lose all precision
    when ``std`` is tiny next to ``mean``.

    :param mean: Gaussian means, shape ``(batch, action_dim)``
    :param log_std: Gaussian log standard deviations, same shape
    :return: squashed actions in ``[-1, 1]``, shape ``(batch, action_dim)``, and their log-probabilities,
        shape ``(batch,)``
    """
    noise = th.randn_like(mean)
    gaussian_actions = mean + th.exp(log_std) * noise
    return th.tanh(gaussian_actions), _squashed_log_prob(noise, gaussian_actions, log_std)


def categorical_probs(logits: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """Probabilities and log-probabilities of every action of a categorical policy.

    :param logits: unnormalised scores, shape ``(batch, n_actions)``
    :return: ``(probs, log_probs)``, both of shape ``(batch, n_actions)``
    """
    log_probs = F.log_softmax(logits, dim=-1)
    return log_probs.exp(), log_probs
