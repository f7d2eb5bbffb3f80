"""The actor contract that the SAC update relies on, the policy's one continuous/discrete decision, and the
compatibility of saved policies with it."""

import pickle

import numpy as np
import pytest
import torch as th
from envs import make_sac
from stable_baselines3.common.policies import BasePolicy

from sb3_softac import SAC
from sb3_softac.policies import (
    Actor,
    CategoricalActor,
    CategoricalSample,
    GaussianSample,
    PolicySample,
    SACActor,
    SACPolicy,
)

# The keyword arguments a SACPolicy file records, as of 0.1.0: files saved then must keep loading.
_SAVED_POLICY_KWARGS = {
    "observation_space",
    "action_space",
    "normalize_images",
    "net_arch",
    "activation_fn",
    "use_sde",
    "log_std_init",
    "use_expln",
    "clip_mean",
    "features_extractor_class",
    "features_extractor_kwargs",
    "optimizer_class",
    "optimizer_kwargs",
    "lr_schedule",
    "n_critics",
    "share_features_extractor",
    "dropout_rate",
    "layer_norm",
}


def _model(env_id: str, **kwargs) -> SAC:
    return make_sac(env_id, policy_kwargs=dict(net_arch=[16, 16]), **kwargs)


def _obs(model: SAC, n: int = 5) -> th.Tensor:
    model.observation_space.seed(0)
    return th.as_tensor(np.stack([model.observation_space.sample() for _ in range(n)]))


def test_both_actors_implement_the_contract() -> None:
    assert issubclass(SACActor, BasePolicy)
    assert SACActor.__abstractmethods__ >= {"evaluate", "reset_noise"}
    for env_id, actor_class in (("Pendulum-v1", Actor), ("CartPole-v1", CategoricalActor)):
        model = _model(env_id)
        assert type(model.actor) is actor_class and isinstance(model.actor, SACActor)
        assert isinstance(model.actor.optimizer, th.optim.Adam)
        assert {id(p) for p in model.actor.parameters()} == {
            id(p) for group in model.actor.optimizer.param_groups for p in group["params"]
        }


def test_an_actor_without_evaluate_cannot_be_built() -> None:
    class Incomplete(SACActor):
        def reset_noise(self, batch_size: int = 1) -> None:
            pass

        def _predict(self, observation, deterministic: bool = False) -> th.Tensor:
            return th.zeros(1)

    model = _model("Pendulum-v1")
    with pytest.raises(TypeError, match="evaluate"):
        Incomplete(model.observation_space, model.action_space)


def test_gaussian_sample_holds_one_action_per_state() -> None:
    model = _model("Pendulum-v1")
    obs = _obs(model)
    th.manual_seed(3)
    sample = model.actor.evaluate(obs)
    assert isinstance(sample, GaussianSample) and isinstance(sample, PolicySample)
    assert sample.probs is None
    assert sample.actions.shape == (5, 1) and sample.log_prob.shape == (5, 1)
    # The same draw as the actor's own sampler, whose log-probability is tested in test_distributions.py.
    th.manual_seed(3)
    actions, log_prob = model.actor.action_log_prob(obs)
    th.testing.assert_close(sample.actions, actions, rtol=0, atol=0)
    th.testing.assert_close(sample.log_prob, log_prob[:, None], rtol=0, atol=0)


def test_categorical_sample_holds_every_action() -> None:
    model = _model("CartPole-v1")
    obs = _obs(model)
    sample = model.actor.evaluate(obs)
    assert isinstance(sample, CategoricalSample) and isinstance(sample, PolicySample)
    assert sample.actions is None
    assert sample.probs.shape == sample.log_prob.shape == (5, 2)
    logits = model.actor.logits(
        model.actor.latent_pi(model.actor.extract_features(obs, model.actor.features_extractor))
    )
    reference = th.distributions.Categorical(logits=logits)
    th.testing.assert_close(sample.probs, reference.probs)
    th.testing.assert_close(sample.log_prob, reference.logits)  # normalised log-probabilities


@pytest.mark.parametrize(("env_id", "discrete"), [("Pendulum-v1", False), ("CartPole-v1", True)])
def test_the_policy_decides_discrete_once_and_passes_sizes_down(env_id: str, discrete: bool) -> None:
    model = _model(env_id)
    policy = model.policy
    assert policy.discrete_actions is discrete
    with pytest.raises(AttributeError):
        policy.discrete_actions = not discrete  # type: ignore[misc]
    if discrete:
        assert policy.actor_kwargs["n_actions"] == 2 and "action_dim" not in policy.actor_kwargs
        assert policy.critic_kwargs["n_actions"] == 2
        assert model.critic.q_networks.layers[-1].out_features == 2  # Q of every action
    else:
        assert policy.actor_kwargs["action_dim"] == 1 and "n_actions" not in policy.actor_kwargs
        assert policy.critic_kwargs["n_actions"] is None
        assert model.critic.q_networks.in_features == 3 + 1  # features and action
        assert model.critic.q_networks.layers[-1].out_features == 1
    for critic in (model.critic, model.critic_target):
        assert critic.n_actions == policy.critic_kwargs["n_actions"]


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_saved_policy_kwargs_keep_their_names_and_load(tmp_path, env_id: str) -> None:
    model = _model(env_id)
    model.policy.save(tmp_path / "policy.pt")
    saved = th.load(tmp_path / "policy.pt", weights_only=False)
    assert set(saved["data"]) == _SAVED_POLICY_KWARGS
    loaded = SACPolicy.load(tmp_path / "policy.pt")
    assert loaded.discrete_actions == model.policy.discrete_actions
    obs = _obs(model).numpy()
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_actors_and_critics_record_their_sizes(tmp_path, env_id: str) -> None:
    """An actor saved alone rebuilds from its own constructor parameters, which now hold the explicit sizes."""
    model = _model(env_id)
    model.actor.save(tmp_path / "actor.pt")
    actor = type(model.actor).load(tmp_path / "actor.pt")
    obs = _obs(model)
    with th.no_grad():
        th.testing.assert_close(actor(obs, deterministic=True), model.actor(obs, deterministic=True))
    critic_parameters = model.critic._get_constructor_parameters()
    assert critic_parameters["n_actions"] == model.policy.critic_kwargs["n_actions"]
    pickle.loads(pickle.dumps(model.policy))  # the contract adds nothing that cannot be pickled
