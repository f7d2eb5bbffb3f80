"""Each derivative of the update engine on its own, in float64, against ``torch.func.vjp`` of what it differentiates.

No environment and no model: random tensors go through one function of :mod:`sb3_softac.engine.derivatives` and
through the function it differentiates (the networks of :mod:`sb3_softac.networks`, the objectives of
:mod:`sb3_softac.losses`, the log-density of :mod:`sb3_softac.distributions`), and the two must agree to 1e-10
relative. A wrong formula fails here under its own name.
"""

import itertools
from collections.abc import Callable

import pytest
import torch as th
from torch import nn
from torch.func import functional_call, vjp

from sb3_softac.distributions import LOG_STD_MAX, LOG_STD_MIN, clamp_log_std, squashed_log_prob_from_noise
from sb3_softac.engine import derivatives
from sb3_softac.engine.derivatives import ActorTensors, CriticLayer, CriticTensors, Layer, Norm
from sb3_softac.losses import actor_loss, critic_loss, reduce_critics, temperature_loss
from sb3_softac.networks import EnsembleDropout, EnsembleLayerNorm, EnsembleLinear, EnsembleMLP
from sb3_softac.torch_ops import EngineOps, engine_ops_for

DTYPE = th.float64
BATCH = 9
OBS_DIM = 4
ACTION_DIM = 3
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


@pytest.fixture(scope="module")
def ops() -> EngineOps:
    found = engine_ops_for(th.device("cpu"), DTYPE)
    assert isinstance(found, EngineOps), found
    return found


def _randn(*shape: int, generator: th.Generator) -> th.Tensor:
    return th.randn(*shape, generator=generator, dtype=DTYPE)


def _assert_close(actual: th.Tensor, expected: th.Tensor, name: str) -> None:
    actual, expected = actual.detach(), expected.detach()
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= 1e-10 * max(scale, 1.0), f"{name}: max error {error:.3g} vs scale {scale:.3g}"


# ---------------------------------------------------------------------------------------------------------------------
# The losses' first derivatives
# ---------------------------------------------------------------------------------------------------------------------


def test_critic_loss_grad() -> None:
    generator = th.Generator().manual_seed(0)
    q, target = _randn(3, BATCH, 1, generator=generator), _randn(BATCH, 1, generator=generator)
    _, pullback = vjp(lambda q: critic_loss(q, target), q)
    (expected,) = pullback(th.ones((), dtype=DTYPE))
    _assert_close(derivatives.critic_loss_grad(q, target, out=th.empty_like(q)), expected, "dQ")


def test_temperature_grad() -> None:
    generator = th.Generator().manual_seed(1)
    log_ent_coef, log_prob = _randn(1, generator=generator), _randn(BATCH, 1, generator=generator)
    _, pullback = vjp(lambda a: temperature_loss(a, log_prob, -2.5), log_ent_coef)
    (expected,) = pullback(th.ones((), dtype=DTYPE))
    _assert_close(derivatives.temperature_grad(log_prob, -2.5, out=th.empty(1, dtype=DTYPE)), expected, "dlog_alpha")


@pytest.mark.parametrize("n_critics", [1, 2, 4])
def test_min_grad_routes_to_the_first_minimum(n_critics: int) -> None:
    """Critic 0 and the last are equal on half the rows: the gradient goes where autograd's min sends it."""
    generator = th.Generator().manual_seed(2)
    q = _randn(n_critics, BATCH, 1, generator=generator)
    q[-1, ::2] = q[0, ::2]
    _, pullback = vjp(lambda q: -0.3 * reduce_critics(q, "min").sum(), q)
    (expected,) = pullback(th.ones((), dtype=DTYPE))
    actual = derivatives.min_grad(q, -0.3, out=th.empty_like(q))
    assert th.equal(actual, expected)


def test_layer_norm_backward(ops: EngineOps) -> None:
    """d/dz of the normalisation without its affine transform, against autograd's ``F.layer_norm``."""
    generator = th.Generator().manual_seed(3)
    z, grad = _randn(2, BATCH, 6, generator=generator), _randn(2, BATCH, 6, generator=generator)
    xhat, mean, rstd = ops.layer_norm(z)
    output, pullback = vjp(lambda z: nn.functional.layer_norm(z, z.shape[-1:], eps=1e-5), z)
    _assert_close(xhat, output, "xhat")
    (expected,) = pullback(grad)
    _assert_close(derivatives.layer_norm_backward(ops, grad, z, mean, rstd), expected, "dz")


# ---------------------------------------------------------------------------------------------------------------------
# The critics: forward pass, backward to the parameters, backward to the actions
# ---------------------------------------------------------------------------------------------------------------------

CRITICS = {
    "plain-relu": dict(hidden=[7, 5], activation="relu"),
    "plain-tanh-1-critic": dict(hidden=[6], activation="tanh", n=1),
    "no-hidden": dict(hidden=[]),
    "dropout": dict(hidden=[7, 5], dropout=0.3),
    "layer-norm": dict(hidden=[7, 5], layer_norm=True),
    "dropout-layer-norm-tanh": dict(hidden=[8, 6, 5], dropout=0.3, layer_norm=True, activation="tanh"),
    "dropout-layer-norm-5-critics": dict(hidden=[6], dropout=0.3, layer_norm=True, n=5),
}


def _ensemble(
    hidden: list[int], activation: str = "relu", n: int = 3, dropout: float = 0.0, layer_norm: bool = False
) -> EnsembleMLP:
    th.manual_seed(4)
    mlp = EnsembleMLP(n, OBS_DIM + ACTION_DIM, 1, hidden, ACTIVATIONS[activation], dropout, layer_norm).double()
    with th.no_grad():  # layer norms away from their initial (1, 0), so that their gradients are not special
        for module in mlp.layers:
            if isinstance(module, EnsembleLayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return mlp


def _engine_layers(mlp: EnsembleMLP) -> tuple[list[CriticLayer], Layer]:
    """The ensemble's layers as the engine binds them, gradients into fresh tensors."""

    def layer(module: EnsembleLinear) -> Layer:
        return Layer(
            module.weight.detach(), module.bias.detach(), *(th.zeros_like(module.weight), th.zeros_like(module.bias))
        )

    hidden: list[CriticLayer] = []
    for module in mlp.layers[:-1]:
        if isinstance(module, EnsembleLinear):
            hidden.append(CriticLayer(layer(module), None, 0.0))
        elif isinstance(module, EnsembleDropout):
            hidden[-1].dropout_rate = module.p
        elif isinstance(module, EnsembleLayerNorm):
            weight, bias = module.weight.detach(), module.bias.detach()
            hidden[-1].norm = Norm(weight, bias, th.zeros_like(weight), th.zeros_like(bias))
    head = mlp.layers[-1]
    assert isinstance(head, EnsembleLinear)
    return hidden, layer(head)


def _critic_tensors(mlp: EnsembleMLP, layers: list[CriticLayer], x: th.Tensor) -> CriticTensors:
    n = mlp.n_members
    shapes = [(n, BATCH, layer.linear.weight.shape[2]) for layer in layers]
    pre_norm = [
        None if layer.norm is None else th.empty(shape, dtype=DTYPE)
        for layer, shape in zip(layers, shapes, strict=True)
    ]
    return CriticTensors(
        x.clone(),
        OBS_DIM,
        [th.empty(shape, dtype=DTYPE) for shape in shapes],
        th.empty(n, BATCH, 1, dtype=DTYPE),
        pre_norm,
    )


def _critic_backward(
    ops: EngineOps, mlp: EnsembleMLP, x: th.Tensor, q_grad: th.Tensor, weights: bool, seed: int
) -> tuple[th.Tensor, th.Tensor | None, list[CriticLayer], Layer]:
    """The engine's forward pass (masks drawn from ``seed``) and its backward pass of ``q_grad``."""
    layers, head = _engine_layers(mlp)
    t = _critic_tensors(mlp, layers, x)
    activation = "relu" if any(isinstance(m, nn.ReLU) for m in mlp.layers) else "tanh"
    n = mlp.n_members
    th.manual_seed(seed)
    derivatives.critic_forward(layers, head, activation, ops, t)
    first = layers[0].linear if layers else head
    action_grad = derivatives.critic_backward(
        layers,
        head,
        activation,
        ops,
        t,
        q_grad,
        [th.empty(n, BATCH, layer.linear.weight.shape[2], dtype=DTYPE) for layer in layers],
        weights,
        first.weight[:, OBS_DIM:, :].transpose(1, 2),
        th.empty(n, BATCH, ACTION_DIM, dtype=DTYPE),
        th.empty(BATCH, ACTION_DIM, dtype=DTYPE),
    )
    return t.q, action_grad, layers, head


@pytest.mark.parametrize("critic", CRITICS.values(), ids=CRITICS.keys())
def test_critic_backward_to_the_parameters(ops: EngineOps, critic: dict) -> None:
    """Values, and the gradients of every weight, bias and layer-norm parameter, for a random ``dL/dQ``.

    Both passes draw their drops after the same seed: ``EnsembleDropout`` and the engine drop the same elements.
    """
    mlp = _ensemble(**critic)
    generator = th.Generator().manual_seed(5)
    x = _randn(BATCH, OBS_DIM + ACTION_DIM, generator=generator)
    q_grad = _randn(mlp.n_members, BATCH, 1, generator=generator)
    params = {name: p.detach() for name, p in mlp.named_parameters()}
    th.manual_seed(6)
    q, pullback = vjp(lambda params: functional_call(mlp, params, (x,)), params)
    (expected,) = pullback(q_grad)
    engine_q, _, layers, head = _critic_backward(ops, mlp, x, q_grad, weights=True, seed=6)
    _assert_close(engine_q, q, "q")
    grads: list[th.Tensor] = []
    for layer in layers:
        grads += [layer.linear.grad_weight, layer.linear.grad_bias]
        if layer.norm is not None:
            grads += [layer.norm.grad_weight, layer.norm.grad_bias]
    grads += [head.grad_weight, head.grad_bias]
    assert len(grads) == len(expected)
    for (name, value), grad in zip(expected.items(), grads, strict=True):
        _assert_close(grad, value, f"d{name}")


@pytest.mark.parametrize("critic", CRITICS.values(), ids=CRITICS.keys())
def test_critic_backward_to_the_actions(ops: EngineOps, critic: dict) -> None:
    """The gradient w.r.t. the action columns of the input, summed over the critics, parameters untouched."""
    mlp = _ensemble(**critic)
    generator = th.Generator().manual_seed(7)
    x = _randn(BATCH, OBS_DIM + ACTION_DIM, generator=generator)
    q_grad = _randn(mlp.n_members, BATCH, 1, generator=generator)
    obs, actions = x[:, :OBS_DIM], x[:, OBS_DIM:]
    th.manual_seed(8)
    _, pullback = vjp(lambda a: mlp(th.cat([obs, a], dim=1)), actions)
    (expected,) = pullback(q_grad)
    _, action_grad, layers, head = _critic_backward(ops, mlp, x, q_grad, weights=False, seed=8)
    assert action_grad is not None
    _assert_close(action_grad, expected, "da")
    assert all(
        float(g.abs().max()) == 0.0 for layer in layers for g in (layer.linear.grad_weight, layer.linear.grad_bias)
    )
    assert float(head.grad_weight.abs().max()) == 0.0


@pytest.mark.parametrize(("hidden", "n_critics"), [([7, 5], 3), ([6], 2), ([], 4)], ids=["deep", "one-layer", "none"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_chosen_critic_action_grad(ops: EngineOps, hidden: list[int], n_critics: int, activation: str) -> None:
    """d/da of ``scale * sum_b min_i Q_i(s_b, a_b)`` through each row's chosen critic, ties included."""
    mlp = _ensemble(hidden, activation, n_critics)
    with th.no_grad():  # the last critic a copy of the first: they tie wherever they are the minimum
        for p in mlp.parameters():
            p[-1].copy_(p[0])
    generator = th.Generator().manual_seed(9)
    x = _randn(BATCH, OBS_DIM + ACTION_DIM, generator=generator)
    obs, actions = x[:, :OBS_DIM], x[:, OBS_DIM:]
    scale = -1.0 / BATCH
    _, pullback = vjp(lambda a: scale * reduce_critics(mlp(th.cat([obs, a], dim=1)), "min").sum(), actions)
    (expected,) = pullback(th.ones((), dtype=DTYPE))

    layers, head = _engine_layers(mlp)
    t = _critic_tensors(mlp, layers, x)
    derivatives.critic_forward(layers, head, activation, ops, t)
    affine = [*(layer.linear for layer in layers), head]
    first = affine[0]
    action_rows_t = first.weight[:, OBS_DIM:, :].transpose(1, 2)
    widths = [layer.linear.weight.shape[2] for layer in layers]
    actual = derivatives.chosen_critic_action_grad(
        affine,
        activation,
        ops,
        t.q,
        [h.view(-1, h.shape[2]) for h in t.hidden],
        head.weight[:, :, 0],
        [list(action_rows_t), *(list(layer.linear.weight_t) for layer in layers[1:])],
        scale,
        [th.empty(BATCH, w, dtype=DTYPE) for w in widths],
        [th.empty(BATCH, w, dtype=DTYPE) for w in widths],
        th.empty(BATCH, OBS_DIM + ACTION_DIM, dtype=DTYPE),
        th.empty(BATCH, ACTION_DIM, dtype=DTYPE),
        th.empty(BATCH, ACTION_DIM, dtype=DTYPE),
    )
    _assert_close(actual, expected, "da")


# ---------------------------------------------------------------------------------------------------------------------
# The actor: the squashed-Gaussian tail and the network below it
# ---------------------------------------------------------------------------------------------------------------------


def _actor_tensors(rows: int, widths: list[int], generator: th.Generator) -> ActorTensors:
    return ActorTensors(
        _randn(rows, OBS_DIM, generator=generator),
        [th.empty(rows, w, dtype=DTYPE) for w in widths],
        *(th.empty(rows, ACTION_DIM, dtype=DTYPE) for _ in range(4)),
        _randn(rows, ACTION_DIM, generator=generator),
        *(th.empty(rows, ACTION_DIM, dtype=DTYPE) for _ in range(2)),
    )


@pytest.mark.parametrize("alpha", [0.0, 0.2, 3.0])
def test_squashed_gaussian_backward(ops: EngineOps, alpha: float) -> None:
    """The actor loss ``mean(alpha log pi - Q)`` w.r.t. the mean and the raw log std, for a given ``dL/da``.

    Q is made linear in the actions, ``Q_b = -B sum_j g_bj a_bj``, so that ``dL/da = g``. Some raw log stds lie
    beyond the clamp's bounds; the engine's clamp follows autograd's convention on its bounds (checked at start).
    """
    generator = th.Generator().manual_seed(10)
    mean = _randn(BATCH, ACTION_DIM, generator=generator)
    raw = _randn(BATCH, ACTION_DIM, generator=generator) * 2
    raw[0, 0], raw[1, 1], raw[2, 2] = LOG_STD_MIN - 1.0, LOG_STD_MAX + 1.0, LOG_STD_MAX
    noise = _randn(BATCH, ACTION_DIM, generator=generator)
    action_grad = _randn(BATCH, ACTION_DIM, generator=generator)
    ent_coef = th.tensor(alpha, dtype=DTYPE)

    def loss(mean: th.Tensor, raw: th.Tensor) -> th.Tensor:
        log_std = clamp_log_std(raw)
        gaussian = mean + log_std.exp() * noise
        actions = th.tanh(gaussian)
        q = -BATCH * (action_grad * actions).sum(dim=1, keepdim=True)
        return actor_loss(q, squashed_log_prob_from_noise(noise, gaussian, log_std).unsqueeze(1), ent_coef)

    _, pullback = vjp(loss, mean, raw)
    expected_mean, expected_raw = pullback(th.ones((), dtype=DTYPE))

    t = _actor_tensors(BATCH, [], generator)
    t.noise.copy_(noise)
    t.mean.copy_(mean)
    t.log_std_raw.copy_(raw)
    th.clamp(raw, LOG_STD_MIN, LOG_STD_MAX, out=t.log_std)
    th.exp(t.log_std, out=t.std)
    th.addcmul(t.mean, t.std, t.noise, out=t.gaussian_actions)
    th.tanh(t.gaussian_actions, out=t.actions)
    gaussian_grad, log_std_grad = th.empty_like(mean), th.empty_like(mean)
    mask = th.empty(BATCH, ACTION_DIM, dtype=th.bool)
    derivatives.squashed_gaussian_backward(t, action_grad, ent_coef, ops, gaussian_grad, log_std_grad, mask)
    _assert_close(gaussian_grad, expected_mean, "dmean")
    _assert_close(log_std_grad, expected_raw, "dlog_std_raw")
    assert float(log_std_grad[0, 0]) == 0.0 and float(log_std_grad[1, 1]) == 0.0  # clamped: no gradient


def _reference_actor(widths: list[int], activation: str) -> tuple[nn.ModuleList, nn.Linear, nn.Linear]:
    th.manual_seed(11)
    sizes = [OBS_DIM, *widths]
    hidden = nn.ModuleList([nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]).double()
    return hidden, nn.Linear(sizes[-1], ACTION_DIM).double(), nn.Linear(sizes[-1], ACTION_DIM).double()


@pytest.mark.parametrize("widths", [[8, 6], [5], []], ids=["deep", "one-layer", "none"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_actor_forward_and_backward(ops: EngineOps, widths: list[int], activation: str) -> None:
    """The actor's heads (mean, raw log std) and every parameter's gradient, for random gradients of the heads."""
    hidden, mu, log_std = _reference_actor(widths, activation)
    function: Callable[[th.Tensor], th.Tensor] = th.relu if activation == "relu" else th.tanh
    generator = th.Generator().manual_seed(12)
    t = _actor_tensors(BATCH, widths, generator)
    gaussian_grad = _randn(BATCH, ACTION_DIM, generator=generator)
    log_std_grad = _randn(BATCH, ACTION_DIM, generator=generator)
    modules = nn.ModuleDict(dict(hidden=hidden, mu=mu, log_std=log_std))
    params = {name: p.detach() for name, p in modules.named_parameters()}

    def heads(params: dict[str, th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
        x = t.actor_in
        for i in range(len(widths)):
            x = function(nn.functional.linear(x, params[f"hidden.{i}.weight"], params[f"hidden.{i}.bias"]))
        return (
            nn.functional.linear(x, params["mu.weight"], params["mu.bias"]),
            nn.functional.linear(x, params["log_std.weight"], params["log_std.bias"]),
        )

    (expected_mean, expected_raw), pullback = vjp(heads, params)
    (expected,) = pullback((gaussian_grad, log_std_grad))

    def layer(module: nn.Linear) -> Layer:
        weight, bias = module.weight.detach(), module.bias.detach()
        return Layer(weight, bias, th.zeros_like(weight), th.zeros_like(bias))

    layers = [layer(m) for m in hidden]  # type: ignore[arg-type]
    mu_layer, log_std_layer = layer(mu), layer(log_std)
    derivatives.actor_forward(layers, mu_layer, log_std_layer, activation, t)  # type: ignore[arg-type]
    _assert_close(t.mean, expected_mean, "mean")
    _assert_close(t.log_std_raw, expected_raw, "log_std_raw")
    _assert_close(t.actions, th.tanh(t.mean + clamp_log_std(t.log_std_raw).exp() * t.noise), "actions")
    derivatives.actor_backward(
        layers,
        mu_layer,
        log_std_layer,
        activation,  # type: ignore[arg-type]
        ops,
        t,
        gaussian_grad,
        log_std_grad,
        [th.empty(BATCH, w, dtype=DTYPE) for w in widths],
    )
    grads = {
        f"hidden.{i}.{kind}": getattr(lay, f"grad_{kind}")
        for i, lay in enumerate(layers)
        for kind in ("weight", "bias")
    }
    grads.update(
        {
            f"{name}.{kind}": getattr(lay, f"grad_{kind}")
            for name, lay in (("mu", mu_layer), ("log_std", log_std_layer))
            for kind in ("weight", "bias")
        }
    )
    assert grads.keys() == expected.keys()
    for name, value in expected.items():
        _assert_close(grads[name], value, f"d{name}")
