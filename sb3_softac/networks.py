"""Vectorised ensemble of MLPs: ``n`` independent networks evaluated in one batched call.

Each layer stores the weights of every member stacked on a leading dimension and runs one batched
matrix multiply, so the cost in Python overhead does not grow with the ensemble size.
"""

import math

import torch as th
from torch import nn
from torch.nn import functional as F


class EnsembleLinear(nn.Module):
    """``n`` independent affine maps ``y_k = x_k W_k + b_k``, evaluated together.

    Each member is initialised like :class:`torch.nn.Linear` (uniform in ``+-1/sqrt(in_features)``).

    :param n_members: number of ensemble members
    :param in_features: input size of each member
    :param out_features: output size of each member
    """

    def __init__(self, n_members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.n_members = n_members
        self.in_features = in_features
        self.out_features = out_features
        # Stored as (n, in, out) so that the forward pass is a plain batched matmul.
        self.weight = nn.Parameter(th.empty(n_members, in_features, out_features))
        self.bias = nn.Parameter(th.empty(n_members, 1, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: th.Tensor) -> th.Tensor:
        """
        :param x: shape ``(batch, in)``, shared by all members, or ``(n, batch, in)``, one input per member
        :return: shape ``(n, batch, out)``, contiguous
        """
        if x.dim() == 2:
            # A shared input is broadcast without a copy; the result stays contiguous per member, which keeps
            # the elementwise ops that follow (and their backward) on their fast path.
            x = x.expand(self.n_members, *x.shape)
        if self.out_features == 1:
            # A single output (the critics' Q head) as a multiply-and-sum: on the CPU, a batched matmul whose
            # output or inner size is 1 runs several times slower than this, forward and backward.
            return th.sum(x * self.weight.transpose(1, 2), dim=-1, keepdim=True) + self.bias
        return th.baddbmm(self.bias, x, self.weight)

    def extra_repr(self) -> str:
        return f"n_members={self.n_members}, in_features={self.in_features}, out_features={self.out_features}"


class EnsembleLayerNorm(nn.Module):
    """Layer normalisation over the features with a separate affine transform for each member.

    :param n_members: number of ensemble members
    :param features: feature size
    """

    def __init__(self, n_members: int, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(th.ones(n_members, 1, features))
        self.bias = nn.Parameter(th.zeros(n_members, 1, features))

    def forward(self, x: th.Tensor) -> th.Tensor:
        return th.addcmul(self.bias, F.layer_norm(x, x.shape[-1:]), self.weight)


class EnsembleMLP(nn.Sequential):
    """``n`` independent MLPs with the same architecture, as one module.

    Every hidden layer is ``linear -> [dropout] -> [layer norm] -> activation``, the order used by
    DroQ (Hiraoka et al. 2022, section 3); the output layer is linear.

    :param n_members: number of ensemble members
    :param in_features: input size
    :param out_features: output size of each member
    :param hidden_sizes: sizes of the hidden layers
    :param activation_fn: activation after each hidden layer
    :param dropout_rate: dropout probability after each hidden linear layer; 0 disables it
    :param layer_norm: whether to add layer normalisation after each hidden linear layer
    """

    def __init__(
        self,
        n_members: int,
        in_features: int,
        out_features: int,
        hidden_sizes: list[int],
        activation_fn: type[nn.Module] = nn.ReLU,
        dropout_rate: float = 0.0,
        layer_norm: bool = False,
    ) -> None:
        layers: list[nn.Module] = []
        last = in_features
        for size in hidden_sizes:
            layers.append(EnsembleLinear(n_members, last, size))
            if dropout_rate > 0.0:
                layers.append(nn.Dropout(dropout_rate))
            if layer_norm:
                layers.append(EnsembleLayerNorm(n_members, size))
            layers.append(activation_fn())
            last = size
        layers.append(EnsembleLinear(n_members, last, out_features))
        super().__init__(*layers)
        self.n_members = n_members
