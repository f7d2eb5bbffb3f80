"""The vectorised ensemble layer against ``n`` separate ``torch.nn.functional.linear`` calls, values and gradients."""

from __future__ import annotations

import pytest
import torch as th
from torch.nn import functional as F

from sb3_softac.networks import EnsembleDropout, EnsembleLinear, dropped_positions


@pytest.mark.parametrize("out_features", [1, 3, 16])
@pytest.mark.parametrize("shared_input", [True, False])
def test_ensemble_linear_matches_separate_linear_layers(out_features: int, shared_input: bool) -> None:
    """Both code paths (multiply-and-sum for one output, batched matmul otherwise), with a shared or a per-member
    input, give each member's ``x W_k + b_k`` and the gradients of the separate layers."""
    th.manual_seed(0)
    n_members, batch, in_features = 4, 7, 5
    layer = EnsembleLinear(n_members, in_features, out_features).double()
    x_shape = (batch, in_features) if shared_input else (n_members, batch, in_features)
    x = th.randn(x_shape, dtype=th.float64, requires_grad=True)
    upstream = th.randn(n_members, batch, out_features, dtype=th.float64)

    out = layer(x)
    assert out.shape == (n_members, batch, out_features)
    (out * upstream).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    weights = layer.weight.detach().clone().requires_grad_(True)
    biases = layer.bias.detach().clone().requires_grad_(True)
    members = [F.linear(x_ref if shared_input else x_ref[k], weights[k].T, biases[k, 0]) for k in range(n_members)]
    (th.stack(members) * upstream).sum().backward()

    th.testing.assert_close(out, th.stack(members))
    th.testing.assert_close(x.grad, x_ref.grad)
    th.testing.assert_close(layer.weight.grad, weights.grad)
    th.testing.assert_close(layer.bias.grad, biases.grad)


# ---------------------------------------------------------------------------------------------------------------------
# Dropout: the drops drawn as gaps have nn.Dropout's distribution
# ---------------------------------------------------------------------------------------------------------------------


def _drop_frequencies(draw, n_draws: int, numel: int) -> th.Tensor:  # type: ignore[no-untyped-def]
    dropped = th.zeros(n_draws, numel)
    for row in dropped:
        row[draw()] = 1.0
    return dropped


@pytest.mark.parametrize(
    ("p", "chunk"),
    [(0.01, None), (0.3, None), (0.3, 7), (0.9, 3)],
    ids=["0.01", "0.3", "0.3-small-chunks", "0.9-small-chunks"],
)
def test_dropped_positions_are_independent_bernoulli_drops(p: float, chunk: int | None) -> None:
    """Each element dropped alone with probability p: the drop rate per element and per draw, and neighbours'
    joint drops, within 5 standard errors of Bernoulli(p). Small chunks take the path that draws more gaps."""
    th.manual_seed(0)
    numel, n_draws = 2000, 400
    positions = dropped_positions(numel, p, th.device("cpu"), chunk)
    assert positions.dtype == th.int64 and bool((positions[1:] > positions[:-1]).all())
    assert int(positions.min()) >= 0 and int(positions.max()) < numel
    dropped = _drop_frequencies(lambda: dropped_positions(numel, p, th.device("cpu"), chunk), n_draws, numel)
    total = n_draws * numel
    assert abs(float(dropped.mean()) - p) < 5 * (p * (1 - p) / total) ** 0.5
    # Per element (first and last included: the gaps start at the first element and end past the last).
    per_element = dropped.mean(dim=0)
    assert float((per_element - p).abs().max()) < 5.5 * (p * (1 - p) / n_draws) ** 0.5
    # Per draw: the count is Binomial(numel, p), its variance numel p (1 - p).
    counts = dropped.sum(dim=1)
    assert abs(float(counts.var()) / (numel * p * (1 - p)) - 1.0) < 5 * (2 / (n_draws - 1)) ** 0.5
    # Neighbours drop together with probability p^2.
    joint = float((dropped[:, 1:] * dropped[:, :-1]).mean())
    assert abs(joint - p * p) < 5 * (p * p * (1 - p * p) / (n_draws * (numel - 1))) ** 0.5 * 3


def test_ensemble_dropout_drops_as_nn_dropout_on_the_cpu() -> None:
    """Zeros where it drops, 1 / (1 - p) times the input elsewhere, the gradient likewise; nothing in eval mode."""
    th.manual_seed(1)
    x = th.randn(3, 64, 50, dtype=th.float64, requires_grad=True)
    dropout = EnsembleDropout(0.2)
    th.manual_seed(2)
    out = dropout(x)
    th.manual_seed(2)
    positions = dropped_positions(x.numel(), 0.2, x.device)
    kept = th.ones(x.numel(), dtype=th.bool)
    kept[positions] = False
    kept = kept.view(x.shape)
    th.testing.assert_close(out[kept], x[kept] * (1 / 0.8), rtol=0, atol=0)
    assert bool((out[~kept] == 0).all()) and 0.15 < float((~kept).double().mean()) < 0.25
    grad = th.randn_like(x)
    out.backward(grad)
    assert x.grad is not None
    th.testing.assert_close(x.grad, th.where(kept, grad * (1 / 0.8), th.zeros_like(grad)), rtol=0, atol=0)
    dropout.eval()
    assert dropout(x) is x
