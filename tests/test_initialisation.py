"""A fresh critic ensemble starts like ``torch.nn.Linear`` layers, one independent draw per member.

``torch.nn.Linear`` draws its weights and biases uniformly in ``+-1/sqrt(fan_in)``. Each ``EnsembleLinear`` of a
freshly built critic is compared with that, per member and pooled over members: a Kolmogorov-Smirnov test against
``U(-b, b)`` with ``b = 1/sqrt(fan_in)``, a two-sample test against the values of actual ``torch.nn.Linear``
layers of the same fan-in, and the range (within ``b`` and reaching close to it). Everything is seeded, so the
p-values are fixed numbers; the thresholds leave room for other seeds (per member, Bonferroni over all members).
"""

from __future__ import annotations

import math

import pytest
import torch as th
from envs import make_sac
from scipy import stats
from torch import nn

from sb3_softac.networks import EnsembleLinear

N_CRITICS = 32
P_VALUE = 1e-3


@pytest.fixture(scope="module")
def layers() -> list[EnsembleLinear]:
    # 32 members so that even the Q head's bias (one value per member) has a sample to test when pooled.
    model = make_sac(policy_kwargs=dict(net_arch=[64, 64], n_critics=N_CRITICS))
    found = [m for m in model.critic.modules() if isinstance(m, EnsembleLinear)]
    assert [(m.in_features, m.out_features) for m in found] == [(5 + 3, 64), (64, 64), (64, 1)]
    return found


def _assert_spans_the_bound(values: th.Tensor, bound: float, level: float, message: str) -> None:
    """All within ``+-bound``, and the largest close to it: for ``n`` uniform draws, ``max |x| < c * bound`` has
    probability ``c^n``, so ``c = level^(1/n)`` fails a correct initialisation with probability ``level``."""
    largest = float(values.abs().max())
    assert level ** (1.0 / values.numel()) * bound < largest <= bound, (
        f"{message}: max |x| = {largest:.4f}, b = {bound:.4f}"
    )


def _values(layer: EnsembleLinear, kind: str) -> th.Tensor:
    """Each member's weights or biases as one row: ``(n_members, count)``."""
    return getattr(layer, kind).detach().reshape(layer.n_members, -1).double()


def _torch_linear_values(fan_in: int, kind: str, count: int) -> th.Tensor:
    """``count`` initial weights or biases of fresh ``torch.nn.Linear(fan_in, 64)`` layers."""
    per_layer = 64 * fan_in if kind == "weight" else 64
    with th.random.fork_rng():
        th.manual_seed(1)
        values = [getattr(nn.Linear(fan_in, 64), kind).detach().flatten() for _ in range(math.ceil(count / per_layer))]
    return th.cat(values)[:count].double()


@pytest.mark.parametrize("kind", ["weight", "bias"])
def test_each_member_is_uniform_in_torch_linear_bounds(layers: list[EnsembleLinear], kind: str) -> None:
    members = [(i, row) for i, layer in enumerate(layers) for row in _values(layer, kind) if row.numel() >= 64]
    assert len(members) >= 2 * N_CRITICS
    for index, row in members:
        bound = 1.0 / math.sqrt(layers[index].in_features)
        _assert_spans_the_bound(row, bound, P_VALUE / len(members), f"layer {index}")
        p_value = stats.kstest(row.numpy(), stats.uniform(loc=-bound, scale=2 * bound).cdf).pvalue
        assert p_value > P_VALUE / len(members), f"layer {index}: p = {p_value:.2e}"


@pytest.mark.parametrize("kind", ["weight", "bias"])
def test_pooled_members_match_torch_linear(layers: list[EnsembleLinear], kind: str) -> None:
    for index, layer in enumerate(layers):
        values = _values(layer, kind)
        pooled = values.flatten().numpy()
        bound = 1.0 / math.sqrt(layer.in_features)
        _assert_spans_the_bound(values, bound, P_VALUE, f"layer {index}")
        assert stats.kstest(pooled, stats.uniform(loc=-bound, scale=2 * bound).cdf).pvalue > P_VALUE, f"layer {index}"
        reference = _torch_linear_values(layer.in_features, kind, len(pooled)).numpy()
        assert stats.ks_2samp(pooled, reference).pvalue > P_VALUE, f"layer {index}"
        # Members are independent draws, not copies of one another.
        assert th.unique(values, dim=0).shape[0] == layer.n_members, f"layer {index}"
