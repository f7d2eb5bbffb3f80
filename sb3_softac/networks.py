"""Vectorised ensemble of MLPs: ``n`` independent networks evaluated in one batched call.

Each layer stores the weights of every member stacked on a leading dimension and runs one batched
matrix multiply, so the cost in Python overhead does not grow with the ensemble size.
"""

import math
import operator
from collections.abc import Iterator
from typing import Any, overload

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


def dropped_positions(numel: int, p: float, device: th.device, chunk: int | None = None) -> th.Tensor:
    """The flat indices that dropout zeroes in a tensor of ``numel`` elements, each alone with probability ``p``.

    Independent drops of probability ``p`` are gaps between drops that are i.i.d. geometric on ``{1, 2, ...}``
    (the number of trials up to the next success): drawing the gaps costs about ``numel * p`` random numbers where
    a Bernoulli mask costs ``numel``. The gaps are drawn with a margin of six standard deviations of the drop
    count, then more until they pass the end: reading that end is free on the CPU, the one device that draws
    this way (see :class:`EnsembleDropout`). The update engine drops the same elements
    (``sb3_softac.engine.derivatives.critic_forward``).

    :param chunk: how many gaps to draw at a time (the default: the margin above)
    :return: int64 indices, increasing
    """
    expected = numel * p
    if chunk is None:
        chunk = int(expected + 6.0 * math.sqrt(expected * (1.0 - p))) + 16
    ends = th.empty(chunk, dtype=th.float64, device=device).geometric_(p).cumsum_(0)
    while ends[-1] <= numel:
        more = th.empty(chunk, dtype=th.float64, device=device).geometric_(p).cumsum_(0).add_(ends[-1])
        ends = th.cat([ends, more])
    return ends[: int(th.searchsorted(ends, float(numel), right=True))].long().sub_(1)


class EnsembleDropout(nn.Dropout):
    """``nn.Dropout`` whose drops on the CPU are drawn as :func:`dropped_positions` (with the same distribution).

    ``nn.Dropout`` draws a Bernoulli number for every element, which on the CPU costs more than a matrix product
    of the critics' size at DroQ's rate (0.01). The kept elements are scaled by ``1 / (1 - p)`` as by
    ``nn.Dropout``. The autograd update and the update engine both draw the drops with
    :func:`dropped_positions`, so that the two drop the same elements. Other devices keep ``nn.Dropout``'s own
    kernel.
    """

    def forward(self, x: th.Tensor) -> th.Tensor:
        if not self.training or x.device.type != "cpu" or not 0.0 < self.p < 1.0:
            return super().forward(x)
        positions = dropped_positions(x.numel(), self.p, x.device)
        scaled = th.mul(x, 1.0 / (1.0 - self.p)).reshape(-1)
        return th.index_fill(scaled, 0, positions, 0.0).view(x.shape)


#: The layer normalisation's ``eps`` (``torch.nn.LayerNorm``'s default).
LAYER_NORM_EPS = 1e-5


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
        return th.addcmul(self.bias, F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS), self.weight)


class EnsembleMLP(nn.Module):
    """``n`` independent MLPs with the same architecture, as one module.

    Every hidden layer is ``linear -> [dropout] -> [layer norm] -> activation``, the order used by
    DroQ (Hiraoka et al. 2022, section 3); the output layer is linear. The layers are the children
    ``"0"``, ``"1"``, ... (as in an ``nn.Sequential``), each holding the stacked weights of every member.

    Indexing, ``len`` and iteration are over the members, as for a list of separate networks:
    ``ensemble[k]`` is member ``k`` as an :class:`EnsembleMember`, and :attr:`layers` lists the layers.

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
        super().__init__()
        layers: list[nn.Module] = []
        last = in_features
        for size in hidden_sizes:
            layers.append(EnsembleLinear(n_members, last, size))
            if dropout_rate > 0.0:
                layers.append(EnsembleDropout(dropout_rate))
            if layer_norm:
                layers.append(EnsembleLayerNorm(n_members, size))
            layers.append(activation_fn())
            last = size
        layers.append(EnsembleLinear(n_members, last, out_features))
        for index, layer in enumerate(layers):
            self.add_module(str(index), layer)
        self.n_members = n_members
        self.in_features = in_features

    @property
    def layers(self) -> list[nn.Module]:
        """The layers in order (every member's weights stacked in each)."""
        return list(self._modules.values())  # type: ignore[arg-type]

    def forward(self, x: th.Tensor) -> th.Tensor:
        """
        :param x: shape ``(batch, in)``, shared by all members, or ``(n, batch, in)``, one input per member
        :return: shape ``(n, batch, out)``
        """
        for layer in self._modules.values():
            x = layer(x)  # type: ignore[misc]
        return x

    def __len__(self) -> int:
        return self.n_members

    @overload
    def __getitem__(self, index: int) -> "EnsembleMember": ...

    @overload
    def __getitem__(self, index: slice) -> list["EnsembleMember"]: ...

    def __getitem__(self, index: int | slice) -> "EnsembleMember | list[EnsembleMember]":
        if isinstance(index, slice):
            return [EnsembleMember(self, k) for k in range(self.n_members)[index]]
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(
                f"An ensemble is indexed by member number (0 to {self.n_members - 1}), got {index!r}; "
                "its layers are in .layers."
            )
        position = operator.index(index)
        if not -self.n_members <= position < self.n_members:
            raise IndexError(f"Member {position} does not exist: this ensemble has {self.n_members} members.")
        return EnsembleMember(self, position % self.n_members)

    def __iter__(self) -> Iterator["EnsembleMember"]:
        return (EnsembleMember(self, index) for index in range(self.n_members))


def _to_separate_layout(layer: nn.Module, name: str, member: th.Tensor) -> th.Tensor:
    """A member's tensor in the layout of a separate ``nn.Linear`` / ``nn.LayerNorm``: ``(out, in)`` or ``(out,)``."""
    if isinstance(layer, EnsembleLinear) and name == "weight":
        return member.T  # stored (in, out) for the batched matmul
    return member.squeeze(0)  # biases and layer-norm affines are stored (1, features) to broadcast over the batch


class EnsembleMember(nn.Module):
    """Member ``index`` of an :class:`EnsembleMLP`, as a network of its own that shares the ensemble's storage.

    Calling it computes that member's output (the slice of the ensemble's output, exactly). Its
    parameters are views ``stacked[index]`` of the ensemble's parameters, named as the ensemble's
    (``"0.weight"``, ...), so reading them or editing them in place (under ``torch.no_grad()``)
    reads or edits that member inside the ensemble. Its :meth:`state_dict` and :meth:`load_state_dict`
    use the layout of separate ``nn.Linear`` layers (weights ``(out, in)``), which is what a separate
    network's state dict holds, e.g. SB3's ``critic.qf0``.

    What cannot act on one member of a stacked tensor raises instead of acting on every member or on
    none: changing ``requires_grad``, moving or casting the member, switching its dropout mode.

    :param ensemble: the ensemble
    :param index: member number
    """

    def __init__(self, ensemble: EnsembleMLP, index: int) -> None:
        super().__init__()
        # Kept out of ``_modules``: the ensemble's parameters must be registered once, by the ensemble.
        self.__dict__["ensemble"] = ensemble
        self.index = index
        self.training = ensemble.training

    ensemble: EnsembleMLP

    def forward(self, x: th.Tensor) -> th.Tensor:
        """
        :param x: shape ``(..., in)``
        :return: shape ``(..., out)``
        """
        leading = x.shape[:-1]
        return self.ensemble(x.reshape(-1, x.shape[-1]))[self.index].reshape(*leading, -1)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        if not recurse:
            return  # as for a separate network, whose parameters all live in its layers
        for name, stacked in self.ensemble.named_parameters(prefix=prefix, remove_duplicate=remove_duplicate):
            # Slices are views (in-place edits reach the ensemble) and not leaves: an optimizer refuses them,
            # since it could not step one member of a stacked tensor.
            yield name, stacked[self.index]  # type: ignore[misc]

    def _separate_layout_tensors(self, prefix: str) -> Iterator[tuple[str, th.Tensor]]:
        """State-dict keys and tensors of this member as a separate network holds them (views of the storage)."""
        for layer_name, layer in self.ensemble.named_children():
            for name, stacked in layer.named_parameters(recurse=False):
                yield f"{prefix}{layer_name}.{name}", _to_separate_layout(layer, name, stacked[self.index])

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for key, member in self._separate_layout_tensors(prefix):
            destination[key] = member if keep_vars else member.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        expected = set()
        for key, member in self._separate_layout_tensors(prefix):
            expected.add(key)
            if key not in state_dict:
                missing_keys.append(key)
            elif state_dict[key].shape != member.shape:
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(state_dict[key].shape)}, the shape "
                    f"in member {self.index} is {tuple(member.shape)}."
                )
            else:
                with th.no_grad():
                    member.copy_(state_dict[key])
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero this member's slices of the ensemble's gradients (a slice cannot be set to None)."""
        with th.no_grad():
            for stacked in self.ensemble.parameters():
                if stacked.grad is not None:
                    stacked.grad[self.index].zero_()

    def requires_grad_(self, requires_grad: bool = True) -> "EnsembleMember":
        raise RuntimeError(
            f"Member {self.index} cannot be frozen alone: its weights are slices of tensors stacked with the other "
            "members, and requires_grad (like an optimizer's learning rate) belongs to a whole tensor. Freeze all "
            "members with critic.requires_grad_(False), or keep one member fixed by restoring its slices after each "
            "step (member.state_dict() / member.load_state_dict()), or use a custom policy with separate critics."
        )

    def train(self, mode: bool = True) -> "EnsembleMember":
        if any(isinstance(layer, nn.Dropout) for layer in self.ensemble.layers):
            raise RuntimeError(
                f"Member {self.index} cannot switch its dropout mode alone: the ensemble's dropout layers act on "
                "every member at once. Call train()/eval() on the critic instead."
            )
        # Without mode-dependent layers the mode changes nothing, as for a separate network of linear layers.
        self.training = mode
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> "EnsembleMember":
        raise RuntimeError(
            f"Member {self.index} cannot be moved or cast alone: its weights are slices of tensors shared with the "
            "other members. Call .to()/.double()/... on the critic (or the policy) instead."
        )

    def extra_repr(self) -> str:
        return f"index={self.index}, n_members={self.ensemble.n_members}"
