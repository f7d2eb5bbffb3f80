"""Networks of SAC: the squashed-Gaussian actor, the critic ensemble and the policy that holds them.

These modules build networks and evaluate them; the distributions' math lives in
:mod:`sb3_softac.distributions` and the objectives in :mod:`sb3_softac.losses`.
"""

import io
import pathlib
import re
from abc import abstractmethod
from collections.abc import Iterable
from typing import Any, NamedTuple, TypeVar

import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import StateDependentNoiseDistribution
from stable_baselines3.common.policies import BaseModel, BasePolicy
from stable_baselines3.common.preprocessing import get_action_dim
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    NatureCNN,
    create_mlp,
    get_actor_critic_arch,
)
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from stable_baselines3.common.utils import get_device
from torch import nn

from sb3_softac import atomic_files, loading, sb3_conversion
from sb3_softac.distributions import (
    SquashedDiagGaussianDistribution,
    categorical_probs,
    clamp_log_std,
    sample_squashed_action,
    sample_squashed_gaussian,
    squashed_gaussian_log_prob,
)
from sb3_softac.networks import EnsembleMLP

# gSDE's per-dimension variance is a quadratic form in the latent features; this floor keeps the
# standard deviation positive when every feature is zero (e.g. all ReLUs inactive).
_SDE_VARIANCE_FLOOR = 1e-6

# SB3's attribute names of the individual critics.
_QF_NAME = re.compile(r"qf(?P<index>0|[1-9][0-9]*)")
SelfSACPolicy = TypeVar("SelfSACPolicy", bound="SACPolicy")


def _network_parameters(network: BaseModel) -> dict[str, Any]:
    """The constructor parameters that every network here shares, for ``_get_constructor_parameters``."""
    return dict(
        net_arch=network.net_arch,
        features_dim=network.features_dim,
        activation_fn=network.activation_fn,
        features_extractor=network.features_extractor,
    )


class GaussianSample(NamedTuple):
    """A continuous policy at a batch of states: one reparameterised action per state.

    The SAC objectives (:mod:`sb3_softac.losses`) estimate expectations over actions with this one
    sample; they take ``probs=None`` for it.
    """

    #: reparameterised squashed actions ``(batch, action_dim)``
    actions: th.Tensor
    #: ``log pi(a|s)`` of those actions ``(batch, 1)``
    log_prob: th.Tensor

    @property
    def probs(self) -> None:
        """None: a sampled action stands for the expectation over actions."""
        return None


class CategoricalSample(NamedTuple):
    """A discrete policy at a batch of states: the probability of every action, for exact expectations."""

    #: ``pi(a|s)`` of every action ``(batch, n_actions)``
    probs: th.Tensor
    #: ``log pi(a|s)`` of every action ``(batch, n_actions)``
    log_prob: th.Tensor

    @property
    def actions(self) -> None:
        """None: the critics are evaluated at every action rather than at a sampled one."""
        return None


#: What the SAC objectives need from the policy at a batch of states (see :class:`SACActor`).
PolicySample = GaussianSample | CategoricalSample


class SACActor(BasePolicy):
    """What the SAC update relies on in an actor; :class:`Actor` and :class:`CategoricalActor` implement it.

    Besides these methods, the policy gives each actor an ``optimizer`` (set by :class:`SACPolicy`).
    """

    optimizer: th.optim.Optimizer

    @abstractmethod
    def evaluate(self, obs: PyTorchObs) -> PolicySample:
        """The policy at each state, as the SAC objectives take it.

        :param obs: observations
        :return: a :class:`GaussianSample` (continuous) or a :class:`CategoricalSample` (discrete)
        """

    @abstractmethod
    def reset_noise(self, batch_size: int = 1) -> None:
        """Draw new exploration noise (gSDE); raises for actors that have none.

        :param batch_size: number of noise draws, one per parallel environment
        """


class Actor(SACActor):
    """Tanh-squashed diagonal Gaussian policy.

    The mean and log standard deviation are produced from the state features by an MLP; actions are
    ``tanh(u)`` with ``u`` Gaussian, so they lie in ``[-1, 1]`` and are rescaled to the action bounds
    by :meth:`predict`. With gSDE, the noise is state-dependent (Raffin et al. 2021) and SB3's
    :class:`StateDependentNoiseDistribution` supplies the exploration matrices.

    :param observation_space: observation space
    :param action_space: action space (``Box``)
    :param net_arch: hidden layer sizes of the policy network
    :param features_extractor: network that turns observations into features
    :param features_dim: number of features
    :param action_dim: number of action dimensions
    :param activation_fn: activation function
    :param use_sde: whether to use gSDE instead of independent Gaussian noise
    :param log_std_init: initial value of gSDE's log standard deviation parameter
    :param full_std: gSDE: one standard deviation per (feature, action) pair rather than per feature
    :param use_expln: gSDE: use ``expln`` instead of ``exp`` to keep the standard deviation positive
    :param clip_mean: gSDE: clip the mean to ``[-clip_mean, clip_mean]`` (0 disables it)
    :param normalize_images: whether to divide image observations by 255
    """

    action_space: spaces.Box

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        net_arch: list[int],
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        action_dim: int,
        activation_fn: type[nn.Module] = nn.ReLU,
        use_sde: bool = False,
        log_std_init: float = -3,
        full_std: bool = True,
        use_expln: bool = False,
        clip_mean: float = 2.0,
        normalize_images: bool = True,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            features_extractor=features_extractor,
            normalize_images=normalize_images,
            squash_output=True,
        )
        self.use_sde = use_sde
        self.net_arch = net_arch
        self.features_dim = features_dim
        self.activation_fn = activation_fn
        self.log_std_init = log_std_init
        self.full_std = full_std
        self.use_expln = use_expln
        self.clip_mean = clip_mean
        self.action_dim = action_dim

        self.latent_pi = nn.Sequential(*create_mlp(features_dim, -1, net_arch, activation_fn))
        latent_dim = net_arch[-1] if len(net_arch) > 0 else features_dim
        #: The action distribution, for code written against SB3's actor (the update calls the pure
        #: functions of :mod:`sb3_softac.distributions` directly); with gSDE, SB3's distribution.
        self.action_dist: SquashedDiagGaussianDistribution | StateDependentNoiseDistribution
        self.mu: nn.Module
        self.log_std: nn.Module | nn.Parameter
        if use_sde:
            self.action_dist = StateDependentNoiseDistribution(
                action_dim, full_std=full_std, use_expln=use_expln, learn_features=True, squash_output=True
            )
            self.mu, self.log_std = self.action_dist.proba_distribution_net(
                latent_dim=latent_dim, latent_sde_dim=latent_dim, log_std_init=log_std_init
            )
            if clip_mean > 0.0:
                self.mu = nn.Sequential(self.mu, nn.Hardtanh(min_val=-clip_mean, max_val=clip_mean))
        else:
            self.action_dist = SquashedDiagGaussianDistribution(action_dim)
            self.mu = nn.Linear(latent_dim, action_dim)
            self.log_std = nn.Linear(latent_dim, action_dim)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            _network_parameters(self),
            action_dim=self.action_dim,
            use_sde=self.use_sde,
            log_std_init=self.log_std_init,
            full_std=self.full_std,
            use_expln=self.use_expln,
            clip_mean=self.clip_mean,
        )
        return data

    def _sde_dist(self) -> StateDependentNoiseDistribution:
        if not isinstance(self.action_dist, StateDependentNoiseDistribution):
            raise RuntimeError("This actor does not use gSDE: create the model with use_sde=True.")
        return self.action_dist

    def get_std(self) -> th.Tensor:
        """gSDE only: the standard deviation of the exploration-matrix entries.

        :return: shape ``(latent_dim, action_dim)`` (or ``(latent_dim, 1)`` without ``full_std``)
        """
        assert isinstance(self.log_std, nn.Parameter)
        return self._sde_dist().get_std(self.log_std)

    def reset_noise(self, batch_size: int = 1) -> None:
        """gSDE only: draw new exploration matrices.

        :param batch_size: number of matrices, one per parallel environment
        """
        assert isinstance(self.log_std, nn.Parameter)
        self._sde_dist().sample_weights(self.log_std, batch_size=batch_size)

    def get_action_dist_params(self, obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor, dict[str, th.Tensor]]:
        """Parameters of the action distribution, as SB3's SAC actor returns them.

        :param obs: observations
        :return: the Gaussian mean, the log standard deviation (per sample, or gSDE's parameter
            matrix) and, with gSDE, ``{"latent_sde": features}``
        """
        latent_pi = self.latent_pi(self.extract_features(obs, self.features_extractor))
        mean_actions = self.mu(latent_pi)
        if self.use_sde:
            assert isinstance(self.log_std, nn.Parameter)
            return mean_actions, self.log_std, dict(latent_sde=latent_pi)
        assert isinstance(self.log_std, nn.Module)
        log_std = clamp_log_std(self.log_std(latent_pi))
        return mean_actions, log_std, {}

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        """Squashed actions in ``[-1, 1]``: ``tanh(mean)`` when deterministic, else a sample."""
        if deterministic:
            return th.tanh(self.get_action_dist_params(obs)[0])
        if not self.use_sde:
            return sample_squashed_action(*self.get_action_dist_params(obs)[:2])
        return self.action_log_prob(obs)[0]

    def action_log_prob(self, obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor]:
        """Reparameterised squashed actions and their log-probabilities in the ``[-1, 1]`` space.

        :param obs: observations
        :return: actions of shape ``(batch, action_dim)`` and log-probabilities of shape ``(batch,)``
        """
        mean_actions, log_std, kwargs = self.get_action_dist_params(obs)
        if not self.use_sde:
            return sample_squashed_gaussian(mean_actions, log_std)
        latent_sde = kwargs["latent_sde"]
        dist = self._sde_dist()
        variance = th.mm(latent_sde.square(), dist.get_std(log_std).square()) + _SDE_VARIANCE_FLOOR
        gaussian_actions = mean_actions + dist.get_noise(latent_sde)
        log_prob = squashed_gaussian_log_prob(gaussian_actions, mean_actions, 0.5 * th.log(variance))
        return th.tanh(gaussian_actions), log_prob

    def evaluate(self, obs: PyTorchObs) -> GaussianSample:
        """A reparameterised action and its log-probability at each state, for the SAC objectives."""
        actions, log_prob = self.action_log_prob(obs)
        return GaussianSample(actions, log_prob.reshape(-1, 1))

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self(observation, deterministic)


class CategoricalActor(SACActor):
    """Categorical policy over ``Discrete`` actions (discrete SAC, Christodoulou 2019).

    :param observation_space: observation space
    :param action_space: action space (``Discrete``)
    :param net_arch: hidden layer sizes of the policy network
    :param features_extractor: network that turns observations into features
    :param features_dim: number of features
    :param n_actions: number of actions
    :param activation_fn: activation function
    :param normalize_images: whether to divide image observations by 255
    """

    action_space: spaces.Discrete

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Discrete,
        net_arch: list[int],
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        n_actions: int,
        activation_fn: type[nn.Module] = nn.ReLU,
        normalize_images: bool = True,
    ) -> None:
        super().__init__(
            observation_space, action_space, features_extractor=features_extractor, normalize_images=normalize_images
        )
        self.net_arch = net_arch
        self.features_dim = features_dim
        self.n_actions = n_actions
        self.activation_fn = activation_fn
        self.latent_pi = nn.Sequential(*create_mlp(features_dim, -1, net_arch, activation_fn))
        self.logits = nn.Linear(net_arch[-1] if len(net_arch) > 0 else features_dim, n_actions)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(_network_parameters(self), n_actions=self.n_actions)
        return data

    def action_probs(self, obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor]:
        """Probabilities and log-probabilities of every action, each ``(batch, n_actions)``."""
        return categorical_probs(self.logits(self.latent_pi(self.extract_features(obs, self.features_extractor))))

    def evaluate(self, obs: PyTorchObs) -> CategoricalSample:
        """Every action's probability and log-probability at each state, for the SAC objectives."""
        return CategoricalSample(*self.action_probs(obs))

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        """Action indices: the most probable action when deterministic, else a sample."""
        probs, _ = self.action_probs(obs)
        if deterministic:
            return probs.argmax(dim=-1)
        return th.multinomial(probs, 1).squeeze(-1)

    def reset_noise(self, batch_size: int = 1) -> None:
        raise RuntimeError("gSDE is for continuous actions: a categorical policy has no exploration noise to reset.")

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self(observation, deterministic)


class Critic(BaseModel):
    """Ensemble of ``n_critics`` soft Q-networks, evaluated as one module in one call.

    For ``Box`` actions each network maps ``(s, a)`` to ``Q_i(s, a)``; for ``Discrete`` actions it maps
    ``s`` to the values ``Q_i(s, .)`` of every action (discrete SAC).

    The networks are one stacked :class:`~sb3_softac.networks.EnsembleMLP`, ``q_networks``, whose
    state-dict keys are ``q_networks.<layer>.weight``. As in SB3, ``q_networks[i]`` and ``qf<i>`` are
    critic ``i`` alone (an :class:`~sb3_softac.networks.EnsembleMember`: it takes SB3's ``qf<i>`` input,
    the features concatenated with the actions for ``Box``, the features for ``Discrete``), and
    ``len(q_networks) == n_critics``.

    :param observation_space: observation space
    :param action_space: action space (``Box`` or ``Discrete``)
    :param net_arch: hidden layer sizes of each Q-network
    :param features_extractor: network that turns observations into features
    :param features_dim: number of features
    :param n_actions: number of actions of a ``Discrete`` space, whose critics output every action's value;
        None for a ``Box`` space, whose critics take the action as input
    :param activation_fn: activation function
    :param normalize_images: whether to divide image observations by 255
    :param n_critics: number of Q-networks
    :param share_features_extractor: whether the features extractor is the actor's; it then gets no
        gradient from the critic loss
    :param dropout_rate: dropout probability in the hidden layers (DroQ); 0 disables it
    :param layer_norm: whether to add layer normalisation in the hidden layers (DroQ)
    """

    features_extractor: BaseFeaturesExtractor
    q_networks: EnsembleMLP

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box | spaces.Discrete,
        net_arch: list[int],
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        n_actions: int | None,
        activation_fn: type[nn.Module] = nn.ReLU,
        normalize_images: bool = True,
        n_critics: int = 2,
        share_features_extractor: bool = False,
        dropout_rate: float = 0.0,
        layer_norm: bool = False,
    ) -> None:
        super().__init__(
            observation_space, action_space, features_extractor=features_extractor, normalize_images=normalize_images
        )
        self.net_arch = net_arch
        self.features_dim = features_dim
        self.activation_fn = activation_fn
        self.n_critics = n_critics
        self.share_features_extractor = share_features_extractor
        self.dropout_rate = dropout_rate
        self.layer_norm = layer_norm
        self.n_actions = n_actions
        self.q_networks = EnsembleMLP(
            n_critics,
            features_dim + get_action_dim(action_space) if n_actions is None else features_dim,
            1 if n_actions is None else n_actions,
            net_arch,
            activation_fn,
            dropout_rate=dropout_rate,
            layer_norm=layer_norm,
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            _network_parameters(self),
            n_actions=self.n_actions,
            n_critics=self.n_critics,
            share_features_extractor=self.share_features_extractor,
            dropout_rate=self.dropout_rate,
            layer_norm=self.layer_norm,
        )
        return data

    def q_values(self, obs: PyTorchObs, actions: th.Tensor | None = None) -> th.Tensor:
        """All critics' values, stacked.

        :param obs: observations
        :param actions: continuous actions in the ``[-1, 1]`` space ``(batch, action_dim)``, or discrete action
            indices ``(batch, 1)``; None (discrete only) for the values of every action
        :return: ``(n_critics, batch, 1)`` for given actions, ``(n_critics, batch, n_actions)`` for every action
        """
        # A shared features extractor is trained by the actor loss only.
        with th.set_grad_enabled(th.is_grad_enabled() and not self.share_features_extractor):
            features = self.extract_features(obs, self.features_extractor)
        if self.n_actions is None:
            if actions is None:
                raise ValueError("A critic of continuous actions needs the actions to evaluate.")
            return self.q_networks(th.cat([features, actions], dim=1))
        q_values = self.q_networks(features)
        if actions is None:
            return q_values
        indices = actions.long().reshape(1, -1, 1).expand(q_values.shape[0], -1, 1)
        return q_values.gather(-1, indices)

    def forward(self, obs: PyTorchObs, actions: th.Tensor | None = None) -> tuple[th.Tensor, ...]:
        """One tensor per critic, as SB3's ``ContinuousCritic`` returns them."""
        return tuple(self.q_values(obs, actions).unbind(dim=0))

    def q1_forward(self, obs: PyTorchObs, actions: th.Tensor | None = None) -> th.Tensor:
        """The first critic's values only, as SB3's ``ContinuousCritic.q1_forward`` returns them."""
        return self.q_values(obs, actions)[0]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # SB3 registers critic i as ``qf<i>``; here it is a view of member i of the stacked ensemble.
            match = _QF_NAME.fullmatch(name)
            if match is None or int(match["index"]) >= self.n_critics:
                raise
            return self.q_networks[int(match["index"])]


def _plain_module(module: nn.Module) -> bool:
    """Whether ``module.train(mode)`` only sets ``module.training`` (and recurses): neither method overridden."""
    return type(module).train is nn.Module.train and type(module).__setattr__ is nn.Module.__setattr__


def _plain_mode_switch(network: BaseModel) -> bool:
    """Whether ``network.set_training_mode(mode)`` is SB3's, which calls ``network.train(mode)`` and nothing else."""
    return type(network).set_training_mode is BaseModel.set_training_mode


class SACPolicy(BasePolicy):
    """Actor, critic ensemble and target critic ensemble of SAC.

    Accepts the keyword arguments of SB3's ``SACPolicy``, plus the critic options ``dropout_rate``
    and ``layer_norm``.

    :param observation_space: observation space
    :param action_space: action space
    :param lr_schedule: learning rate schedule (its value at progress 1 initialises the optimizers)
    :param net_arch: hidden layer sizes, a list shared by actor and critics or ``dict(pi=[...], qf=[...])``
    :param activation_fn: activation function
    :param use_sde: whether to use gSDE
    :param log_std_init: initial value of gSDE's log standard deviation
    :param use_expln: gSDE: use ``expln`` instead of ``exp``
    :param clip_mean: gSDE: clip the mean to ``[-clip_mean, clip_mean]``
    :param features_extractor_class: features extractor class
    :param features_extractor_kwargs: keyword arguments of the features extractor
    :param normalize_images: whether to divide image observations by 255
    :param optimizer_class: optimizer class
    :param optimizer_kwargs: optimizer keyword arguments, besides the learning rate
    :param n_critics: number of critics
    :param share_features_extractor: whether actor and critics share the features extractor
    :param dropout_rate: critic dropout probability (DroQ); 0 keeps plain SAC
    :param layer_norm: critic layer normalisation (DroQ); False keeps plain SAC
    """

    actor: SACActor
    critic: Critic
    critic_target: Critic

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box | spaces.Discrete,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        use_sde: bool = False,
        log_std_init: float = -3,
        use_expln: bool = False,
        clip_mean: float = 2.0,
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        n_critics: int = 2,
        share_features_extractor: bool = False,
        dropout_rate: float = 0.0,
        layer_norm: bool = False,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            features_extractor_class,
            features_extractor_kwargs,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            normalize_images=normalize_images,
            squash_output=True,
        )
        if n_critics < 1:
            raise ValueError(f"n_critics must be at least 1, got {n_critics}.")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
        if net_arch is None:
            net_arch = [256, 256]
        actor_arch, critic_arch = get_actor_critic_arch(net_arch)

        self.net_arch = net_arch
        self.activation_fn = activation_fn
        self.use_sde = use_sde
        self.log_std_init = log_std_init
        self.use_expln = use_expln
        self.clip_mean = clip_mean
        self.n_critics = n_critics
        self.share_features_extractor = share_features_extractor
        self.dropout_rate = dropout_rate
        self.layer_norm = layer_norm
        # The one place that tells continuous from discrete actions: everything below gets explicit sizes.
        n_actions = int(action_space.n) if isinstance(action_space, spaces.Discrete) else None
        self._discrete_actions = n_actions is not None
        common = dict(
            observation_space=self.observation_space,
            action_space=self.action_space,
            activation_fn=activation_fn,
            normalize_images=normalize_images,
        )
        self.actor_kwargs: dict[str, Any] = dict(common, net_arch=actor_arch)
        if n_actions is not None:
            self.actor_kwargs.update(n_actions=n_actions)
        else:
            self.actor_kwargs.update(
                action_dim=get_action_dim(action_space),
                use_sde=use_sde,
                log_std_init=log_std_init,
                use_expln=use_expln,
                clip_mean=clip_mean,
            )
        self.critic_kwargs: dict[str, Any] = dict(
            common,
            n_actions=n_actions,
            net_arch=critic_arch,
            n_critics=n_critics,
            share_features_extractor=share_features_extractor,
            dropout_rate=dropout_rate,
            layer_norm=layer_norm,
        )
        self._build(lr_schedule)

    @property
    def discrete_actions(self) -> bool:
        """Whether the action space is ``Discrete`` (categorical actor, critics valuing every action)."""
        return self._discrete_actions

    def _make_optimizer(self, params: Iterable[nn.Parameter], lr: float) -> th.optim.Optimizer:
        kwargs = dict(self.optimizer_kwargs)
        # A fused Adam step is one kernel instead of a dozen per parameter tensor; it is the same update.
        if self.optimizer_class in (th.optim.Adam, th.optim.AdamW) and not {"fused", "foreach"} & kwargs.keys():
            kwargs["fused"] = True
        return self.optimizer_class(params, lr=lr, **kwargs)  # type: ignore[call-arg]

    def _build(self, lr_schedule: Schedule) -> None:
        self.actor = self.make_actor()
        self.actor.optimizer = self._make_optimizer(self.actor.parameters(), lr_schedule(1))

        if self.share_features_extractor:
            self.critic = self.make_critic(features_extractor=self.actor.features_extractor)
            # The shared extractor is optimised with the actor only.
            critic_parameters = [p for n, p in self.critic.named_parameters() if not n.startswith("features_extractor")]
        else:
            self.critic = self.make_critic()
            critic_parameters = list(self.critic.parameters())
        self.critic.optimizer = self._make_optimizer(critic_parameters, lr_schedule(1))

        self.critic_target = self.make_critic()
        self.critic_target.load_state_dict(self.critic.state_dict())
        # Target networks never train: batch norm uses the statistics copied from the critics. The Q-networks'
        # own dropout stays active, as in DroQ (Hiraoka et al. 2022), whose targets come from dropout critics.
        self.critic_target.set_training_mode(False)
        for module in self.critic_target.q_networks.modules():
            if isinstance(module, nn.Dropout):
                module.train(True)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            dict(
                net_arch=self.net_arch,
                activation_fn=self.activation_fn,
                use_sde=self.use_sde,
                log_std_init=self.log_std_init,
                use_expln=self.use_expln,
                clip_mean=self.clip_mean,
                features_extractor_class=self.features_extractor_class,
                features_extractor_kwargs=self.features_extractor_kwargs,
                normalize_images=self.normalize_images,
                optimizer_class=self.optimizer_class,
                optimizer_kwargs=self.optimizer_kwargs,
                lr_schedule=self._dummy_schedule,
                n_critics=self.n_critics,
                share_features_extractor=self.share_features_extractor,
                dropout_rate=self.dropout_rate,
                layer_norm=self.layer_norm,
            )
        )
        return data

    def reset_noise(self, batch_size: int = 1) -> None:
        """gSDE only: draw new exploration matrices for the actor.

        :param batch_size: number of matrices, one per parallel environment
        """
        self.actor.reset_noise(batch_size=batch_size)

    def make_actor(self, features_extractor: BaseFeaturesExtractor | None = None) -> SACActor:
        actor_kwargs = self._update_features_extractor(self.actor_kwargs, features_extractor)
        actor_class: type[SACActor] = CategoricalActor if self.discrete_actions else Actor
        return actor_class(**actor_kwargs).to(self.device)

    def make_critic(self, features_extractor: BaseFeaturesExtractor | None = None) -> Critic:
        critic_kwargs = self._update_features_extractor(self.critic_kwargs, features_extractor)
        return Critic(**critic_kwargs).to(self.device)

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self._predict(obs, deterministic=deterministic)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self.actor(observation, deterministic)

    def set_training_mode(self, mode: bool) -> None:
        """Put the actor and the critics (not the target critics) in training or evaluation mode.

        :param mode: True for training mode
        """
        # This runs up to three times per env step (train(), collect_rollouts(), predict()), and nn.Module.train()
        # sets each flag through the slow nn.Module.__setattr__. Every flag is read, so that a submodule
        # switched on its own is still switched back; when all are already in ``mode`` (predict's call), nothing
        # is written.
        modules = [*self.actor.modules(), *self.critic.modules()]
        if self.training == mode and all(module.training == mode for module in modules):
            return
        if _plain_mode_switch(self.actor) and _plain_mode_switch(self.critic) and all(map(_plain_module, modules)):
            # What nn.Module.train() does for modules that override neither train() nor __setattr__, a third of
            # its cost.
            for module in modules:
                object.__setattr__(module, "training", mode)
        else:
            self.actor.set_training_mode(mode)
            self.critic.set_training_mode(mode)
        self.training = mode

    # Policy-only files, as SB3's ``policy.save`` / ``Policy.load`` (read by loading.py, converted by
    # sb3_conversion.py).

    def save(self, path: str | pathlib.Path | io.BufferedIOBase) -> None:
        """Save the policy alone (its constructor arguments and weights), atomically.

        :param path: the file to write (no suffix is added, as in SB3), or a binary stream
        """
        # BaseModel.save hands its argument to torch.save, which takes a binary file object too.
        atomic_files.write_atomically(path, lambda file: BasePolicy.save(self, file))  # type: ignore[arg-type]

    def save_as_sb3(self, path: str | pathlib.Path | io.BufferedIOBase) -> None:
        """Save the policy alone as ``stable_baselines3.sac.policies.SACPolicy.load`` reads it, atomically.

        :param path: the file to write, or a binary stream
        :raises ValueError: naming each option SB3's SAC policy lacks (discrete actions, critic dropout or
            layer norm, a custom policy class)
        """
        saved = sb3_conversion.policy_file_for_sb3(self)
        atomic_files.write_atomically(path, lambda file: th.save(saved, file))  # type: ignore[arg-type]

    @classmethod
    def load(
        cls: type[SelfSACPolicy], path: str | pathlib.Path | io.BufferedIOBase, device: th.device | str = "auto"
    ) -> SelfSACPolicy:
        """Load a policy file written by :meth:`save`, or by SB3's SAC policy ``save`` (converted on load).

        The file is unpickled (``torch.load(weights_only=False)``, as in SB3): load only files you trust.

        :param path: the policy file
        :param device: where to put the policy
        :raises ValueError: when the file is no policy file, or holds NaN or inf weights
        """
        device = get_device(device)
        kwargs, state = loading.read_policy_file(path, device)
        policy = cls(**kwargs)
        policy.load_state_dict(state)
        return policy.to(device)


MlpPolicy = SACPolicy


class CnnPolicy(SACPolicy):
    """:class:`SACPolicy` whose default features extractor is SB3's ``NatureCNN``, for images."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", NatureCNN)
        super().__init__(*args, **kwargs)


class MultiInputPolicy(SACPolicy):
    """:class:`SACPolicy` whose default features extractor is SB3's ``CombinedExtractor``, for dicts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", CombinedExtractor)
        super().__init__(*args, **kwargs)
