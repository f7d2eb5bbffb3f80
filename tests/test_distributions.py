"""The squashed Gaussian against torch.distributions, and its numerical behaviour at saturation."""

import math

import pytest
import torch as th
from torch.distributions import Normal, TransformedDistribution
from torch.distributions.transforms import TanhTransform

from sb3_softac.distributions import (
    categorical_probs,
    sample_squashed_gaussian,
    squashed_gaussian_log_prob,
    squashed_log_prob_from_noise,
    tanh_log_abs_det_jacobian,
)


def reference_log_prob(gaussian_actions: th.Tensor, mean: th.Tensor, log_std: th.Tensor) -> th.Tensor:
    """log-prob of tanh(u) from torch.distributions, in float64."""
    dist = TransformedDistribution(Normal(mean.double(), log_std.double().exp()), [TanhTransform(cache_size=1)])
    squashed = dist.transforms[0](gaussian_actions.double())  # cached, so log_prob does not invert tanh
    return dist.log_prob(squashed).sum(dim=-1)


@pytest.mark.parametrize("action_dim", [1, 3, 6])
def test_log_prob_matches_torch_distributions(action_dim: int) -> None:
    generator = th.Generator().manual_seed(action_dim)
    mean = th.randn(64, action_dim, generator=generator) * 2.0
    log_std = th.rand(64, action_dim, generator=generator) * 4.0 - 3.0
    gaussian_actions = mean + log_std.exp() * th.randn(64, action_dim, generator=generator)

    ours = squashed_gaussian_log_prob(gaussian_actions, mean, log_std)
    expected = reference_log_prob(gaussian_actions, mean, log_std)
    assert ours.shape == (64,)
    th.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


def test_sampled_log_prob_matches_torch_distributions() -> None:
    mean = th.linspace(-3.0, 3.0, 24).reshape(8, 3)
    log_std = th.linspace(-2.0, 1.0, 24).reshape(8, 3)
    th.manual_seed(0)
    actions, log_prob = sample_squashed_gaussian(mean, log_std)
    th.manual_seed(0)
    gaussian_actions = mean + log_std.exp() * th.randn_like(mean)
    th.testing.assert_close(actions, th.tanh(gaussian_actions))
    th.testing.assert_close(
        log_prob.double(), reference_log_prob(gaussian_actions, mean, log_std), atol=1e-5, rtol=1e-5
    )


def test_log_prob_from_noise_matches_torch_distributions() -> None:
    """The form the update engine uses: the standardised noise given, not recomputed from ``u``."""
    generator = th.Generator().manual_seed(5)
    mean = th.randn(32, 4, generator=generator, dtype=th.float64) * 2.0
    log_std = th.rand(32, 4, generator=generator, dtype=th.float64) * 4.0 - 3.0
    noise = th.randn(32, 4, generator=generator, dtype=th.float64)
    gaussian_actions = mean + log_std.exp() * noise
    ours = squashed_log_prob_from_noise(noise, gaussian_actions, log_std)
    assert ours.shape == (32,)
    th.testing.assert_close(ours, reference_log_prob(gaussian_actions, mean, log_std), atol=1e-10, rtol=1e-10)


def test_sampling_is_reparameterised() -> None:
    mean = th.zeros(4, 2, requires_grad=True)
    log_std = th.zeros(4, 2, requires_grad=True)
    actions, log_prob = sample_squashed_gaussian(mean, log_std)
    (actions.sum() + log_prob.sum()).backward()
    assert mean.grad is not None and mean.grad.abs().sum() > 0
    assert log_std.grad is not None and log_std.grad.abs().sum() > 0


@pytest.mark.parametrize("u", [-20.0, -8.0, 12.0, 20.0])
def test_tanh_correction_is_exact_and_finite_when_saturated(u: float) -> None:
    gaussian_actions = th.full((1, 2), u, requires_grad=True)
    correction = tanh_log_abs_det_jacobian(gaussian_actions)
    # log(1 - tanh(u)^2) = log(sech(u)^2) = 2 log 2 - 2|u| - 2 log(1 + exp(-2|u|)), exactly, in float64.
    exact = 2 * math.log(2.0) - 2 * abs(u) - 2 * math.log1p(math.exp(-2 * abs(u)))
    th.testing.assert_close(correction, th.full((1, 2), exact), atol=1e-5, rtol=1e-6)
    # An epsilon-biased correction would saturate near log(1e-6) = -13.8 instead.
    if abs(u) >= 10.0:
        assert correction.max().item() < math.log(1e-6) - 1.0

    log_prob = squashed_gaussian_log_prob(gaussian_actions, th.zeros(1, 2), th.zeros(1, 2))
    log_prob.sum().backward()
    assert th.isfinite(log_prob).all()
    assert gaussian_actions.grad is not None and th.isfinite(gaussian_actions.grad).all()


def test_sample_is_finite_with_saturated_mean() -> None:
    mean = th.tensor([[20.0, -20.0]], requires_grad=True)
    log_std = th.tensor([[-20.0, 2.0]], requires_grad=True)
    actions, log_prob = sample_squashed_gaussian(mean, log_std)
    log_prob.sum().backward()
    assert th.isfinite(actions).all() and th.isfinite(log_prob).all()
    assert mean.grad is not None and log_std.grad is not None
    assert th.isfinite(mean.grad).all() and th.isfinite(log_std.grad).all()


def test_categorical_probs_match_torch_distributions() -> None:
    logits = th.tensor([[0.0, 1.0, -2.0], [5.0, 5.0, 5.0]])
    probs, log_probs = categorical_probs(logits)
    reference = th.distributions.Categorical(logits=logits)
    th.testing.assert_close(probs, reference.probs)
    th.testing.assert_close(log_probs, reference.logits)
    th.testing.assert_close(-(probs * log_probs).sum(-1), reference.entropy())
