"""The vectorised ensemble layer against ``n`` separate ``torch.nn.functional.linear`` calls, values and gradients."""

from __future__ import annotations

import pytest
import torch as th
from torch.nn import functional as F

from sb3_softac.networks import EnsembleLinear


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
