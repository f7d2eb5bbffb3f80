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


def clamp_log_std(raw_log_std: th.Tensor) -> th.Tensor:
    """The actor's log standard deviation, clamped to ``[LOG_STD_MIN, LOG_STD_MAX]``."""
    return th.clamp(raw_log_std, LOG_STD_MIN, LOG_STD_MAX)


def tanh_log_abs_det_jacobian(gaussian_actions: th.Tensor) -> th.Tensor:
    """Elementwise ``log |d tanh(u) / du| = log(1 - tanh(u)^2)``, exact and numerically stable.

    Uses the identity ``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))`` (SAC paper, appendix C,
    eq. 21), which stays finite for any finite ``u``, unlike ``log(1 - tanh(u)^2 + eps)`` which is
    biased by ``eps`` and saturates at ``log(eps)``.

    :param gaussian_actions: pre-squash actions ``u``, any shape
    :return: tensor of the same shape
    """
    return 2.0 * (_LOG_2 - gaussian_actions - F.softplus(-2.0 * gaussian_actions))


def squashed_log_prob_from_noise(noise: th.Tensor, gaussian_actions: th.Tensor, log_std: th.Tensor) -> th.Tensor:
    """Log-density of ``a = tanh(u)``, ``u = mean + exp(log_std) * noise``, given the standardised noise itself.

    ``log pi(a|s) = sum_i [log N(noise_i; 0, 1) - log_std_i - log(1 - tanh(u_i)^2)]`` (SAC paper, eq. 21): the
    Gaussian term written with ``noise = (u - mean) / std``. For a sample, pass the drawn noise rather than
    recomputing it from ``u``, which loses all precision when ``std`` is tiny next to ``mean``.

    :param noise: standardised pre-squash actions ``(u - mean) / std``, shape ``(batch, action_dim)``
    :param gaussian_actions: pre-squash actions ``u``, same shape
    :param log_std: Gaussian log standard deviations, broadcastable to ``(batch, action_dim)``
    :return: log-probabilities of the squashed actions, shape ``(batch,)``
    """
    gaussian = -0.5 * noise.square() - log_std - _HALF_LOG_2PI
    return (gaussian - tanh_log_abs_det_jacobian(gaussian_actions)).sum(dim=-1)


def squashed_gaussian_log_prob(gaussian_actions: th.Tensor, mean: th.Tensor, log_std: th.Tensor) -> th.Tensor:
    """Log-density of ``a = tanh(u)`` with ``u ~ N(mean, exp(log_std)^2)`` (diagonal).

    ``log pi(a|s) = sum_i [log N(u_i; mean_i, std_i) - log(1 - tanh(u_i)^2)]`` (SAC paper, eq. 21).

    :param gaussian_actions: pre-squash actions ``u``, shape ``(batch, action_dim)``
    :param mean: Gaussian means, shape ``(batch, action_dim)``
    :param log_std: Gaussian log standard deviations, broadcastable to ``(batch, action_dim)``
    :return: log-probabilities of the squashed actions, shape ``(batch,)``
    """
    return squashed_log_prob_from_noise((gaussian_actions - mean) * th.exp(-log_std), gaussian_actions, log_std)


def _draw_gaussian(mean: th.Tensor, log_std: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """The drawn noise ``xi ~ N(0, I)`` and the reparameterised pre-squash sample ``u = mean + std * xi``."""
    noise = th.randn_like(mean)
    return noise, mean + th.exp(log_std) * noise


def sample_squashed_action(mean: th.Tensor, log_std: th.Tensor) -> th.Tensor:
    """The action of :func:`sample_squashed_gaussian` (same draw) without its log-probability.

    Acting needs no log-probability, and on one observation it costs four times the sample itself.

    :param mean: Gaussian means, shape ``(batch, action_dim)``
    :param log_std: Gaussian log standard deviations, same shape
    :return: squashed actions in ``[-1, 1]``, shape ``(batch, action_dim)``
    """
    return th.tanh(_draw_gaussian(mean, log_std)[1])


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
    noise, gaussian_actions = _draw_gaussian(mean, log_std)
    return th.tanh(gaussian_actions), squashed_log_prob_from_noise(noise, gaussian_actions, log_std)


def categorical_probs(logits: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """Probabilities and log-probabilities of every action of a categorical policy.

    :param logits: unnormalised scores, shape ``(batch, n_actions)``
    :return: ``(probs, log_probs)``, both of shape ``(batch, n_actions)``
    """
    log_probs = F.log_softmax(logits, dim=-1)
    return log_probs.exp(), log_probs


def squashed_gaussian_inverse(actions: th.Tensor) -> th.Tensor:
    """Pre-squash actions ``u = atanh(a)`` of squashed actions ``a`` in ``[-1, 1]``.

    ``a`` is first clamped to ``[-1 + eps, 1 - eps]`` (``eps`` the dtype's machine epsilon), since
    ``atanh(+-1)`` is infinite while a float ``tanh`` reaches ``+-1`` for any ``|u|`` above ~9 (float32).
    Inside that range the inverse is exact.

    :param actions: squashed actions, any shape
    :return: tensor of the same shape
    """
    bound = 1.0 - th.finfo(actions.dtype).eps
    return th.atanh(actions.clamp(-bound, bound))


class SquashedDiagGaussianDistribution:
    """The actor's tanh-squashed diagonal Gaussian, with the interface of SB3's distributions.

    A thin object over the pure functions of this module, for code written against
    ``actor.action_dist``: ``proba_distribution(mean, log_std)`` sets the parameters (and returns
    ``self``); the other methods use them. Log-probabilities are the exact ones the SAC update uses.
    Only the parameters are kept: a sample's log-probability is computed from the squashed actions
    themselves, never from a pre-squash sample remembered from an earlier call.

    :param action_dim: number of action dimensions
    """

    def __init__(self, action_dim: int) -> None:
        self.action_dim = action_dim
        self.mean: th.Tensor | None = None
        self.log_std: th.Tensor | None = None

    def _parameters(self) -> tuple[th.Tensor, th.Tensor]:
        if self.mean is None or self.log_std is None:
            raise RuntimeError(
                "The distribution has no parameters yet: call proba_distribution(mean, log_std) first, e.g. with "
                "actor.get_action_dist_params(obs)."
            )
        return self.mean, self.log_std

    def proba_distribution(self, mean_actions: th.Tensor, log_std: th.Tensor) -> "SquashedDiagGaussianDistribution":
        """Set the parameters.

        :param mean_actions: Gaussian means, shape ``(batch, action_dim)``
        :param log_std: Gaussian log standard deviations, broadcastable to the means
        :return: self
        """
        if mean_actions.shape[-1] != self.action_dim:
            raise ValueError(
                f"mean_actions has {mean_actions.shape[-1]} action dimensions, this distribution {self.action_dim}."
            )
        self.mean, self.log_std = mean_actions, log_std
        return self

    def log_prob(self, actions: th.Tensor) -> th.Tensor:
        """``log pi(a|s)`` of squashed actions ``a`` in ``[-1, 1]``, shape ``(batch,)``.

        :param actions: squashed actions, shape ``(batch, action_dim)`` (see :func:`squashed_gaussian_inverse`
            for actions at the bounds)
        """
        mean, log_std = self._parameters()
        return squashed_gaussian_log_prob(squashed_gaussian_inverse(actions), mean, log_std)

    def entropy(self) -> None:
        """None: the entropy of a tanh-squashed Gaussian has no closed form (SB3 returns None too).

        Estimate it as ``-log_prob`` of samples, e.g. ``-log_prob_from_params(mean, log_std)[1].mean()``.
        """
        return None

    def sample(self) -> th.Tensor:
        """A reparameterised sample of squashed actions, shape ``(batch, action_dim)``."""
        return sample_squashed_action(*self._parameters())

    def mode(self) -> th.Tensor:
        """The deterministic action ``tanh(mean)``, shape ``(batch, action_dim)``."""
        return th.tanh(self._parameters()[0])

    def get_actions(self, deterministic: bool = False) -> th.Tensor:
        """:meth:`mode` when deterministic, else :meth:`sample`."""
        return self.mode() if deterministic else self.sample()

    def actions_from_params(
        self, mean_actions: th.Tensor, log_std: th.Tensor, deterministic: bool = False
    ) -> th.Tensor:
        """Set the parameters, then :meth:`get_actions`."""
        return self.proba_distribution(mean_actions, log_std).get_actions(deterministic)

    def log_prob_from_params(self, mean_actions: th.Tensor, log_std: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """Set the parameters, then draw squashed actions and their log-probabilities (as the SAC update does).

        :return: actions ``(batch, action_dim)`` and log-probabilities ``(batch,)``
        """
        return sample_squashed_gaussian(*self.proba_distribution(mean_actions, log_std)._parameters())

    def __getstate__(self) -> dict[str, int]:
        # The parameters belong to one call; copies and pickles (deepcopy of a policy, th.save) start without
        # them, which also keeps non-leaf tensors, which cannot be deep-copied, out of the copy.
        return {"action_dim": self.action_dim}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["action_dim"])  # type: ignore[misc]
