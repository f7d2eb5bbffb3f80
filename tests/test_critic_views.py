"""``critic.q_networks[i]`` and ``critic.qf<i>`` behave as SB3's separate critics while the storage stays one
stacked ensemble: checked against SB3's ``ContinuousCritic`` holding the same weights, run through the same user
code, and against the stacked forward pass."""

import copy
import io

import pytest
import stable_baselines3 as sb3
import torch as th
from torch import nn
from torch.nn.utils import parameters_to_vector

from sb3_softac import SAC
from sb3_softac.networks import EnsembleMember
from sb3_softac.sb3_conversion import state_dict_from_sb3

N_CRITICS = 3


def _pair(**kwargs):
    kwargs = dict(seed=0, policy_kwargs=dict(net_arch=[32, 24], n_critics=N_CRITICS), **kwargs)
    reference = sb3.SAC("MlpPolicy", "Pendulum-v1", **kwargs)
    ours = SAC("MlpPolicy", "Pendulum-v1", **kwargs)
    ours.policy.load_state_dict(state_dict_from_sb3(reference.policy.state_dict()))
    generator = th.Generator().manual_seed(2)
    obs = th.rand(16, 3, generator=generator) * 2 - 1
    actions = th.rand(16, 1, generator=generator) * 2 - 1
    return reference, ours, obs, actions


# What an SB3 user writes: each critic's Q from SB3's q-network input.
def _q_of_each_critic(model, obs: th.Tensor, actions: th.Tensor) -> list[th.Tensor]:
    features = model.critic.extract_features(obs, model.critic.features_extractor)
    return [q_net(th.cat([features, actions], dim=1)) for q_net in model.critic.q_networks]


def test_each_critic_computes_its_q_as_in_sb3() -> None:
    reference, ours, obs, actions = _pair()
    assert len(ours.critic.q_networks) == len(reference.critic.q_networks) == N_CRITICS
    with th.no_grad():
        ours_q, theirs_q = _q_of_each_critic(ours, obs, actions), _q_of_each_critic(reference, obs, actions)
        stacked = ours.critic.q_values(obs, actions)
    assert len(ours_q) == N_CRITICS
    for i in range(N_CRITICS):
        assert ours_q[i].shape == theirs_q[i].shape == (16, 1)
        th.testing.assert_close(ours_q[i], theirs_q[i])
        th.testing.assert_close(ours_q[i], stacked[i], rtol=0, atol=0)  # the stacked forward's slice exactly
        th.testing.assert_close(getattr(ours.critic, f"qf{i}")(th.cat([obs, actions], 1)), ours_q[i], rtol=0, atol=0)
    assert ours.critic.q_networks[-1].index == N_CRITICS - 1
    assert [member.index for member in ours.critic.q_networks[1:]] == [1, 2]


def test_discrete_critic_members_value_every_action() -> None:
    model = SAC("MlpPolicy", "CartPole-v1", seed=0, policy_kwargs=dict(net_arch=[16]))
    obs = th.rand(8, 4)
    with th.no_grad():
        stacked = model.critic.q_values(obs)
        for i, q_net in enumerate(model.critic.q_networks):
            th.testing.assert_close(q_net(obs), stacked[i], rtol=0, atol=0)  # features are the input
    assert stacked.shape == (2, 8, 2)


def test_parameters_are_the_members_slices_named_as_sb3() -> None:
    reference, ours, _, _ = _pair()
    for i in range(N_CRITICS):
        ours_named = dict(getattr(ours.critic, f"qf{i}").named_parameters())
        theirs_named = dict(getattr(reference.critic, f"qf{i}").named_parameters())
        assert ours_named.keys() == theirs_named.keys()
        for name, value in ours_named.items():
            layer, kind = name.split(".")
            stacked = getattr(ours.critic.q_networks.layers[int(layer)], kind)
            assert value.data_ptr() == stacked[i].data_ptr() and value.shape == stacked.shape[1:]  # a view
            th.testing.assert_close(value.detach(), stacked.detach()[i], rtol=0, atol=0)
            # Stored (in, out) and (1, out) where a separate nn.Linear holds (out, in) and (out,).
            theirs = theirs_named[name].detach()
            th.testing.assert_close(value.detach(), theirs.T if theirs.dim() == 2 else theirs[None])
        assert parameters_to_vector(ours.critic.qf0.parameters()).numel() == sum(
            p.numel() for p in reference.critic.qf0.parameters()
        )
    assert list(ours.critic.qf0.parameters(recurse=False)) == []


def test_in_place_edits_of_a_member_reach_the_ensemble() -> None:
    _, ours, obs, actions = _pair()
    with th.no_grad():
        before = ours.critic.q_values(obs, actions).clone()
        for parameter in ours.critic.qf1.parameters():
            parameter.zero_()
        after = ours.critic.q_values(obs, actions)
    assert th.equal(after[1], th.zeros_like(after[1]))
    assert th.equal(after[0], before[0]) and th.equal(after[2], before[2])


def test_state_dict_of_a_member_is_sb3s_and_loads_both_ways() -> None:
    reference, ours, obs, actions = _pair()
    ours_state, theirs_state = ours.critic.qf2.state_dict(), reference.critic.qf2.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for key, value in theirs_state.items():
        th.testing.assert_close(ours_state[key], value, rtol=0, atol=0)
    # A separately trained SB3 critic 0 replaces our critic 0 only.
    other = sb3.SAC("MlpPolicy", "Pendulum-v1", seed=1, policy_kwargs=dict(net_arch=[32, 24], n_critics=N_CRITICS))
    ours.critic.q_networks[0].load_state_dict(other.critic.qf0.state_dict())
    reference.critic.qf0.load_state_dict(other.critic.qf0.state_dict())
    with th.no_grad():
        for ours_q, theirs_q in zip(
            _q_of_each_critic(ours, obs, actions), _q_of_each_critic(reference, obs, actions), strict=True
        ):
            th.testing.assert_close(ours_q, theirs_q)
    # And back: SB3 reads our member's state dict.
    reference.critic.qf1.load_state_dict(ours.critic.qf0.state_dict())
    with th.no_grad():
        th.testing.assert_close(
            reference.critic.qf1(th.cat([obs, actions], 1)), ours.critic.qf0(th.cat([obs, actions], 1))
        )
    with pytest.raises(RuntimeError, match="size mismatch"):
        ours.critic.qf0.load_state_dict({k: v.flatten()[1:] for k, v in other.critic.qf0.state_dict().items()})
    with pytest.raises(RuntimeError, match="Missing key"):
        ours.critic.qf0.load_state_dict({})


def test_gradient_through_a_member_reaches_its_slice_only() -> None:
    reference, ours, obs, actions = _pair()
    ours_q = _q_of_each_critic(ours, obs, actions)[1]
    theirs_q = _q_of_each_critic(reference, obs, actions)[1]
    ours_q.square().mean().backward()
    theirs_q.square().mean().backward()
    first = ours.critic.q_networks.layers[0].weight
    th.testing.assert_close(first.grad[1], reference.critic.qf1[0].weight.grad.T)
    assert th.equal(first.grad[0], th.zeros_like(first.grad[0])) and th.equal(
        first.grad[2], th.zeros_like(first.grad[2])
    )
    ours.critic.qf1.zero_grad()
    assert th.equal(first.grad, th.zeros_like(first.grad))


def test_views_register_nothing() -> None:
    """Parameters, their order (the optimizers' order) and the state dict are those of the stacked ensemble."""
    _, ours, obs, actions = _pair()
    names = [name for name, _ in ours.critic.named_parameters()]
    ids = [id(p) for p in ours.critic.parameters()]
    keys = list(ours.critic.state_dict())
    members = [*ours.critic.q_networks, ours.critic.qf0, ours.critic.qf2]
    _q_of_each_critic(ours, obs, actions)
    assert all(isinstance(member, EnsembleMember) for member in members)
    assert [id(p) for p in ours.critic.parameters()] == ids
    assert names == [f"q_networks.{layer}.{kind}" for layer in (0, 2, 4) for kind in ("weight", "bias")]
    assert list(ours.critic.state_dict()) == keys == names
    assert sum(p.numel() for p in ours.critic.parameters()) == N_CRITICS * (4 * 32 + 32 + 32 * 24 + 24 + 24 + 1)


def test_copies_and_saves_keep_working() -> None:
    _, ours, obs, actions = _pair()
    _ = ours.critic.qf0, ours.critic.q_networks[1]
    policy = copy.deepcopy(ours.policy)
    buffer = io.BytesIO()
    th.save(ours.policy, buffer)
    buffer.seek(0)
    loaded = th.load(buffer, weights_only=False)
    with th.no_grad():
        expected = _q_of_each_critic(ours, obs, actions)
        for copied in (policy, loaded):
            for ours_q, copied_q in zip(expected, _q_of_each_critic(copied, obs, actions), strict=True):
                assert th.equal(ours_q, copied_q)
    # A member of the copy is a view of the copy's storage, not of the original's.
    first = ours.critic.q_networks.layers[0].weight
    assert next(policy.critic.qf0.parameters()).data_ptr() != first.data_ptr()


def test_what_cannot_act_on_one_critic_raises() -> None:
    _, ours, _, _ = _pair()
    critic = ours.critic
    with pytest.raises(RuntimeError, match=r"cannot be frozen alone.*critic\.requires_grad_\(False\)"):
        critic.q_networks[0].requires_grad_(False)
    with pytest.raises(RuntimeError, match="leaf"):  # torch refuses to flip the flag of a view
        next(critic.qf0.parameters()).requires_grad = False
    assert all(p.requires_grad for p in critic.parameters())  # nothing was frozen behind the user's back
    with pytest.raises(ValueError, match="non-leaf"):  # an optimizer could not step one slice of a stacked tensor
        th.optim.Adam(critic.qf0.parameters())
    with pytest.raises(RuntimeError, match="cannot be moved or cast alone"):
        critic.qf1.to(th.float64)
    with pytest.raises(RuntimeError, match="cannot be moved or cast alone"):
        critic.qf1.double()
    with pytest.raises(IndexError, match="3 members"):
        critic.q_networks[N_CRITICS]
    with pytest.raises(TypeError, match="layers"):
        critic.q_networks["0"]  # type: ignore[call-overload]
    with pytest.raises(AttributeError):
        critic.qf3  # noqa: B018
    # Without dropout, a member's mode changes nothing, as for SB3's separate linear critics.
    critic.qf0.eval()
    assert critic.training
    dropout = SAC("MlpPolicy", "Pendulum-v1", policy_kwargs=dict(net_arch=[16], dropout_rate=0.1))
    with pytest.raises(RuntimeError, match="dropout mode alone"):
        dropout.critic.qf0.eval()
    assert all(m.training for m in dropout.critic.modules() if isinstance(m, nn.Dropout))
