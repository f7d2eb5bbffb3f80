"""Soft Actor-Critic on top of SB3's off-policy machinery (``learn``, buffers, callbacks, save/load)."""

import contextlib
import io
import pathlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, ReplayBufferSamples, Schedule
from stable_baselines3.common.utils import get_parameters_by_name, update_learning_rate
from torch import nn

from sb3_softac import atomic_files, compat, loading, sb3_conversion, train_statistics
from sb3_softac.engine import (
    MINIBATCHES_PER_DRAW,
    UPDATE_ENGINES,
    VERIFIED_DEVICES,
    UpdateEngine,
    UpdateSettings,
    denormals_flushed,
    engine_ops,
    unsupported_reason,
)
from sb3_softac.losses import (
    CRITIC_REDUCTIONS,
    CriticReduction,
    actor_loss,
    critic_loss,
    expected_log_prob,
    min_over_critics,
    reduce_critics,
    soft_q_target,
    soft_state_value,
    temperature_loss,
)
from sb3_softac.nonfinite import flag_nonfinite, guarded_copy_, guarded_lerp_, guarded_step, new_flag
from sb3_softac.policies import (
    CnnPolicy,
    Critic,
    MlpPolicy,
    MultiInputPolicy,
    PolicySample,
    SACActor,
    SACPolicy,
)
from sb3_softac.train_statistics import HostRows, TrainStatistics

SelfSAC = TypeVar("SelfSAC", bound="SAC")

# Discrete SAC's automatic target entropy, as a fraction of the maximum entropy log|A|. Christodoulou
# (2019) used 0.98, which keeps the policy close to uniform and stalls learning on many tasks (Xu et al.
# 2021, "Target Entropy Annealing for Discrete Soft Actor-Critic", arXiv:2112.02852; Zhou et al. 2022,
# "Revisiting Discrete Soft Actor-Critic", arXiv:2209.10081); CleanRL's discrete SAC uses 0.89 on Atari.
DISCRETE_TARGET_ENTROPY_SCALE = 0.89


def _parse_ent_coef(ent_coef: str | float) -> tuple[bool, float]:
    """Read ``ent_coef``: ``"auto"``, ``"auto_<initial value>"`` or a non-negative number.

    :return: whether the coefficient is learned, and its (initial) value
    """
    if isinstance(ent_coef, str):
        head, separator, initial = ent_coef.partition("_")
        if head == "auto":
            try:
                value = float(initial) if separator else 1.0
            except ValueError:
                value = float("nan")
            if not value > 0.0 or not np.isfinite(value):
                raise ValueError(
                    f"ent_coef={ent_coef!r} is malformed: write 'auto', or 'auto_<initial value>' with a positive "
                    "initial value such as 'auto_0.1', or give a fixed non-negative number such as 0.2."
                )
            return True, value
    try:
        value = float(ent_coef)
    except (TypeError, ValueError):
        value = float("nan")
    if not value >= 0.0 or not np.isfinite(value):
        raise ValueError(
            f"ent_coef={ent_coef!r} is not valid: give a fixed non-negative number such as 0.2, "
            "or 'auto' / 'auto_<initial value>' to learn it."
        )
    return False, value


def _parse_target_entropy(target_entropy: str | float, policy: SACPolicy) -> float:
    """Read ``target_entropy``, a number or ``"auto"``.

    ``"auto"`` is ``-dim(A)`` for continuous actions (SAC paper, section 5) and
    ``DISCRETE_TARGET_ENTROPY_SCALE * log|A|`` for discrete ones.

    :param target_entropy: the constructor's argument
    :param policy: the policy, which knows whether its actions are discrete
    """
    if isinstance(target_entropy, str) and target_entropy == "auto":
        # The flat size of a Discrete space is its number of actions |A|, that of a Box its dimension.
        size = spaces.flatdim(policy.action_space)
        return DISCRETE_TARGET_ENTROPY_SCALE * float(np.log(size)) if policy.discrete_actions else -float(size)
    if not isinstance(target_entropy, bool):
        with contextlib.suppress(TypeError, ValueError):
            value = float(target_entropy)
            if np.isfinite(value):
                return value
    raise ValueError(f"target_entropy={target_entropy!r} is not valid: give 'auto' (= -action_dim) or a finite number.")


@contextlib.contextmanager
def _frozen(parameters: Iterable[nn.Parameter]) -> Iterator[None]:
    """Build graphs that give no gradient to ``parameters`` (but still to their inputs)."""
    frozen = [p for p in parameters if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class SAC(OffPolicyAlgorithm):
    """Soft Actor-Critic (Haarnoja et al. 2018, arXiv:1801.01290 and arXiv:1812.05905).

    A drop-in replacement for ``stable_baselines3.SAC``: the same constructor arguments, defaults,
    attributes, logger keys and saved files, with its own policy classes and a faster update.

    :param policy: the policy model to use (``MlpPolicy``, ``CnnPolicy``, ``MultiInputPolicy``) or class
    :param env: the environment to learn from (a Gymnasium id is created for you)
    :param learning_rate: learning rate of every optimizer, a float or a schedule of the remaining progress
    :param buffer_size: replay buffer size
    :param learning_starts: number of environment steps collected before learning starts
    :param batch_size: minibatch size of each gradient step
    :param tau: Polyak coefficient of the target critics, in ``(0, 1]``
    :param gamma: discount factor
    :param train_freq: update the model every ``train_freq`` steps, or ``(n, "step")`` / ``(n, "episode")``
    :param gradient_steps: gradient steps after each rollout; -1 does as many as environment steps collected
    :param action_noise: optional action noise added during rollouts
    :param replay_buffer_class: replay buffer class (e.g. ``HerReplayBuffer``); chosen for you when None
    :param replay_buffer_kwargs: keyword arguments of the replay buffer
    :param optimize_memory_usage: use the memory-efficient replay buffer variant
    :param n_steps: n-step returns (uses SB3's ``NStepReplayBuffer`` when no buffer class is given)
    :param ent_coef: entropy coefficient ``alpha``: a fixed number, ``"auto"`` to learn it from 1.0,
        or ``"auto_<x>"`` to learn it from ``x``
    :param target_update_interval: update the target critics every this many gradient steps
    :param target_entropy: target entropy of the learned ``alpha``: ``"auto"`` for ``-dim(A)``, or a number
    :param use_sde: use generalized State-Dependent Exploration (gSDE)
    :param sde_sample_freq: draw a new gSDE noise matrix every n steps (-1: only at rollout start)
    :param use_sde_at_warmup: use gSDE instead of uniform sampling before learning starts
    :param stats_window_size: number of episodes the rollout statistics are averaged over
    :param tensorboard_log: tensorboard log directory (None: no tensorboard)
    :param policy_kwargs: keyword arguments of the policy (see :class:`~sb3_softac.policies.SACPolicy`)
    :param verbose: 0 silent, 1 info, 2 debug
    :param seed: random seed
    :param device: device to run on (``"auto"``, ``"cpu"``, ``"cuda"``, ...)
    :param policy_delay: update the actor and the temperature every this many critic updates (1: every one)
    :param qf_learning_rate: learning rate (or schedule) of the critics; None uses ``learning_rate``
    :param critic_subset_size: REDQ's in-target minimisation: the target takes the minimum over this many
        critics drawn at random at each step (Chen et al. 2021). None takes the minimum over all critics, as
        SAC does. It changes the target only: REDQ's actor also needs ``actor_q_reduction="mean"``
    :param actor_q_reduction: how the actor's objective reduces the critics: ``"min"`` (SAC) or ``"mean"``
        of all critics (REDQ's policy update)
    :param update_engine: ``"auto"`` runs the update through the autograd-free :mod:`sb3_softac.engine` where it
        covers the configuration on the CPU, the one device it is verified on (``update_path`` says which path
        runs); ``"engine"`` runs it on any device (and raises where it does not cover the configuration);
        ``"autograd"`` always uses autograd
    :param _init_setup_model: whether to build the networks on creation
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    policy: SACPolicy
    actor: SACActor
    critic: Critic
    critic_target: Critic
    #: The non-finite flag of the running ``train()`` call, a float32 scalar on the device (see
    #: :mod:`sb3_softac.nonfinite`), cleared when the call starts. Every optimizer step and the Polyak update take
    #: ``self._nonfinite``: an update path checks each loss and its gradients with ``flag_nonfinite`` before the
    #: optimizer step, steps through ``guarded_step`` and updates the targets through ``guarded_lerp_`` /
    #: ``guarded_copy_``, and reports the flag in its statistics rows, so that once a value is non-finite no
    #: later update of the call reaches the weights, and the host learns of it at the call's one sync.
    _nonfinite: th.Tensor

    def __init__(
        self,
        policy: str | type[SACPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 3e-4,
        buffer_size: int = 1_000_000,
        learning_starts: int = 100,
        batch_size: int = 256,
        tau: float = 0.005,
        gamma: float = 0.99,
        train_freq: int | tuple[int, str] = 1,
        gradient_steps: int = 1,
        action_noise: ActionNoise | None = None,
        replay_buffer_class: type[ReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        optimize_memory_usage: bool = False,
        n_steps: int = 1,
        ent_coef: str | float = "auto",
        target_update_interval: int = 1,
        target_entropy: str | float = "auto",
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        use_sde_at_warmup: bool = False,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        policy_delay: int = 1,
        qf_learning_rate: float | Schedule | None = None,
        critic_subset_size: int | None = None,
        actor_q_reduction: CriticReduction = "min",
        update_engine: str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        if isinstance(policy, type) and not issubclass(policy, SACPolicy):
            raise TypeError(
                f"policy={policy.__module__}.{policy.__qualname__} is not an sb3_softac policy: this SAC trains "
                "through the actor and critic interface of sb3_softac.policies.SACPolicy. Pass 'MlpPolicy', "
                "'CnnPolicy' or 'MultiInputPolicy' (policy_kwargs covers most customisations: net_arch, "
                "activation_fn, features_extractor_class, optimizer_class, n_critics, ...), or subclass "
                "sb3_softac.policies.SACPolicy."
            )
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau={tau} is outside (0, 1]: use e.g. 0.005 for slow Polyak averaging, 1.0 to copy.")
        if tau == 0.0:
            # SB3 accepts tau=0 (its own tests use it to freeze the targets), so it is allowed, but loudly.
            warnings.warn("tau=0 freezes the target critics: they will never learn.", UserWarning, stacklevel=2)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer, e.g. 256.")
        if gradient_steps < -1:
            raise ValueError(
                f"gradient_steps={gradient_steps} is below -1: give a number of steps >= 0, or -1 to do as many "
                "gradient steps as environment steps collected."
            )
        if target_update_interval < 1:
            raise ValueError(f"target_update_interval={target_update_interval} must be a positive integer.")
        if policy_delay < 1:
            raise ValueError(
                f"policy_delay={policy_delay} must be a positive integer (1 updates the actor every step)."
            )
        if critic_subset_size is not None and critic_subset_size < 1:
            raise ValueError(
                f"critic_subset_size={critic_subset_size} must be a positive integer, or None for all critics."
            )
        if actor_q_reduction not in CRITIC_REDUCTIONS:
            raise ValueError(
                f"actor_q_reduction={actor_q_reduction!r} is not valid: give 'min' (SAC: the actor maximises the "
                "minimum over the critics) or 'mean' (REDQ: the mean of all critics)."
            )
        if update_engine not in UPDATE_ENGINES:
            raise ValueError(
                f"update_engine={update_engine!r} is not one of {UPDATE_ENGINES}: 'auto' uses the fast autograd-free "
                "update wherever it applies on the CPU, 'engine' on any device too, 'autograd' always uses autograd."
            )
        super().__init__(
            policy,
            env,
            learning_rate,
            buffer_size,
            learning_starts,
            batch_size,
            tau,
            gamma,
            train_freq,
            gradient_steps,
            action_noise,
            replay_buffer_class=replay_buffer_class,
            replay_buffer_kwargs=replay_buffer_kwargs,
            optimize_memory_usage=optimize_memory_usage,
            **compat.n_steps_kwargs(n_steps),
            policy_kwargs=policy_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            seed=seed,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            use_sde_at_warmup=use_sde_at_warmup,
            supported_action_spaces=(spaces.Box, spaces.Discrete),
            support_multi_env=True,
        )
        self.target_entropy = target_entropy
        self.ent_coef = ent_coef
        self.target_update_interval = target_update_interval
        self.policy_delay = policy_delay
        self.qf_learning_rate = qf_learning_rate
        self.critic_subset_size = critic_subset_size
        self.actor_q_reduction = actor_q_reduction
        self.update_engine = update_engine
        self.log_ent_coef: th.Tensor | None = None
        self.ent_coef_optimizer: th.optim.Optimizer | None = None
        self.ent_coef_tensor: th.Tensor | None = None
        # The constructor runs ``_setup_model``, so that its checks of the arguments raise from here too.
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        # Read before the replay buffer and the networks are allocated, so that a bad value fails fast.
        learned, value = _parse_ent_coef(self.ent_coef)
        super()._setup_model()
        if self.policy.discrete_actions and (self.use_sde or self.action_noise is not None):
            raise ValueError(
                "use_sde and action_noise perturb continuous actions: a Discrete action space explores through "
                "its categorical policy instead. Remove them."
            )
        self._create_aliases()
        self.target_entropy = _parse_target_entropy(self.target_entropy, self.policy)
        n_critics = self.critic.n_critics
        if self.critic_subset_size is not None and self.critic_subset_size > n_critics:
            raise ValueError(
                f"critic_subset_size={self.critic_subset_size} exceeds n_critics={n_critics}: raise n_critics in "
                "policy_kwargs or lower the subset size."
            )
        self.batch_norm_stats = get_parameters_by_name(self.critic, ["running_"])
        self.batch_norm_stats_target = get_parameters_by_name(self.critic_target, ["running_"])
        self.qf_lr_schedule = None if self.qf_learning_rate is None else compat.float_schedule(self.qf_learning_rate)
        update_learning_rate(self.critic.optimizer, self._critic_lr_schedule()(1))
        self._nonfinite = new_flag(self.device)
        if learned:
            # alpha is optimised through log(alpha), which keeps it positive (see losses.temperature_loss).
            self.log_ent_coef = th.full((1,), np.log(value), device=self.device, requires_grad=True)
            self.ent_coef_optimizer = th.optim.Adam([self.log_ent_coef], lr=self.lr_schedule(1), fused=True)
        else:
            self.ent_coef_tensor = th.tensor(value, device=self.device)
        self._select_update_path()

    def _select_update_path(self) -> None:
        """Set ``update_path``: ``"engine"`` (autograd-free) where chosen and covering the model, else ``"autograd"``.

        A torch release whose private operations the engine cannot use (see :mod:`sb3_softac.torch_ops`) sends the
        model to autograd with a warning. ``update_engine="engine"`` on a configuration the engine does not cover
        raises.
        """
        self._engine = UpdateEngine()
        reason = self._engine_declined()
        if reason is None:
            reason = unsupported_reason(self)
        if reason is not None and self.update_engine == "engine":
            raise ValueError(
                f"update_engine='engine' cannot run this model's update: {reason}. Use update_engine='auto', "
                "which takes the autograd update where the engine does not apply."
            )
        if reason is None:
            ops = engine_ops(self)
            if isinstance(ops, str):
                reason = ops
                warnings.warn(f"SAC update path: autograd ({reason}).", stacklevel=4)
        self.update_path = "engine" if reason is None else "autograd"
        if self.verbose >= 1:
            print(f"SAC update path: {self.update_path}" + ("" if reason is None else f" ({reason})"))

    def _engine_declined(self) -> str | None:
        """Why this model does not try the engine at all, before asking what the engine covers; None if it does."""
        if self.update_engine == "autograd":
            return "update_engine='autograd'"
        if self.update_engine == "auto" and self.device.type not in VERIFIED_DEVICES:
            return f"the engine is verified on the CPU only; update_engine='engine' runs it on {self.device.type} too"
        for method in ("_gradient_step", "_update_actor", "_update_target_critics", "_optimize"):
            if getattr(type(self), method) is not getattr(SAC, method):
                return f"the SAC subclass overrides {method}"
        return None

    def _update_settings(self) -> UpdateSettings:
        return UpdateSettings(
            gamma=self.gamma,
            tau=self.tau,
            target_entropy=float(self.target_entropy),
            critic_subset_size=self.critic_subset_size,
            actor_q_reduction=self.actor_q_reduction,
        )

    def _refresh_update_path(self) -> None:
        """Before each ``train`` call: bind the engine to the model as it is now, or fall back to autograd.

        A model changed since it was built (an optimizer replaced, a hook registered) may leave the engine's
        coverage, and come back into it; each change of path is reported.
        """
        reason = self._engine.begin(self)
        path = "engine" if reason is None else "autograd"
        if path != self.update_path:
            if reason is not None:
                warnings.warn(f"SAC update path: autograd from now on ({reason}).", stacklevel=3)
            elif self.verbose >= 1:
                print("SAC update path: engine from now on")
        self.update_path = path

    def _create_aliases(self) -> None:
        self.actor = self.policy.actor
        self.critic = self.policy.critic
        self.critic_target = self.policy.critic_target

    def _critic_lr_schedule(self) -> Schedule:
        # Looked up at each use: ``lr_schedule`` may be replaced after construction (SB3's own tests do).
        return self.lr_schedule if self.qf_lr_schedule is None else self.qf_lr_schedule

    def _current_ent_coef(self) -> th.Tensor:
        """``alpha`` as a scalar tensor without gradient."""
        if self.log_ent_coef is not None:
            return self.log_ent_coef.detach().exp().squeeze(0)
        assert self.ent_coef_tensor is not None
        return self.ent_coef_tensor

    def train(self, gradient_steps: int, batch_size: int = 64) -> None:
        """Take ``gradient_steps`` SAC updates on minibatches of the replay buffer, then log their statistics.

        Nothing is read back to the host until the end of the call, where the statistics and the non-finite
        flag (see ``_nonfinite``) come back in one transfer. An update with a non-finite loss or gradient is
        not applied, nor is any later one of the call, and the call then raises :class:`FloatingPointError`.

        :param gradient_steps: number of updates
        :param batch_size: minibatch size of each update
        """
        self.policy.set_training_mode(True)
        optimizers = [self.actor.optimizer]
        if self.ent_coef_optimizer is not None:
            optimizers.append(self.ent_coef_optimizer)
        self._update_learning_rate(optimizers)
        update_learning_rate(self.critic.optimizer, self._critic_lr_schedule()(self._current_progress_remaining))

        self._nonfinite.zero_()
        if self._engine_declined() is None:
            self._refresh_update_path()
        engine = self.update_path == "engine"
        settings = self._update_settings() if engine else None
        stats = TrainStatistics(learned_temperature=self.log_ent_coef is not None)
        with denormals_flushed() if engine else contextlib.nullcontext():
            for step, replay_data in enumerate(self._minibatches(gradient_steps, batch_size, engine)):
                n_update = self._n_updates + step
                update_actor = n_update % self.policy_delay == 0
                update_target = n_update % self.target_update_interval == 0
                if settings is not None:
                    rows = self._engine.gradient_step(
                        settings, self._nonfinite, replay_data, update_actor, update_target
                    )
                else:
                    rows = self._gradient_step(replay_data, update_actor)
                    if update_target:
                        self._update_target_critics()
                stats.add(step, *rows)

        host = stats.read()  # the one host sync of the call
        self._raise_if_nonfinite(host)
        self.logger.record("train/n_updates", self._n_updates + gradient_steps, exclude="tensorboard")
        if self.qf_lr_schedule is not None:
            self.logger.record("train/qf_learning_rate", self.qf_lr_schedule(self._current_progress_remaining))
        host.record(self.logger)
        self._n_updates += gradient_steps

    def _minibatches(self, gradient_steps: int, batch_size: int, engine: bool) -> Iterator[ReplayBufferSamples]:
        """The minibatches of one ``train`` call, in order.

        The autograd update draws one at a time. The engine's are drawn together, as SBX does, up to
        ``MINIBATCHES_PER_DRAW`` at a time (with one environment the replay buffer then draws the same indices as
        that many separate draws).
        """
        per_draw = MINIBATCHES_PER_DRAW if engine else 1
        for start in range(0, gradient_steps, per_draw):
            count = min(per_draw, gradient_steps - start)
            samples = self.replay_buffer.sample(batch_size * count, env=self._vec_normalize_env)  # type: ignore[union-attr]
            if count == 1:
                yield samples
            else:
                for index in range(count):
                    yield compat.sample_rows(samples, slice(index * batch_size, (index + 1) * batch_size))

    def _gradient_step(
        self, replay_data: ReplayBufferSamples, update_actor: bool
    ) -> tuple[th.Tensor, th.Tensor | None]:
        """One SAC update: the critics, then (when ``update_actor``) the temperature and the actor.

        The temperature is stepped after the critics, not before as in SB3's SAC, so that a non-finite critic
        loss stops it too; the result is the same, as nothing in between reads the new temperature.

        :param replay_data: the minibatch
        :param update_actor: whether to update the actor and the temperature, or only the critics
        :return: the critic statistics row and, when the actor was updated, the actor statistics row (see
            :mod:`sb3_softac.train_statistics`)
        """
        discounts = compat.discounts(replay_data, self.gamma)
        if self.use_sde:
            # The exploration matrix depends on log_std, which changes at every step.
            self.actor.reset_noise()
        ent_coef = self._current_ent_coef()
        # Drawn before the next actions, in the order of SB3's SAC, so that the random streams match.
        pi = self.actor.evaluate(replay_data.observations) if update_actor else None

        with th.no_grad():
            next_pi = self.actor.evaluate(replay_data.next_observations)
            next_q_values = self.critic_target.q_values(replay_data.next_observations, next_pi.actions)
            next_q_values = min_over_critics(next_q_values, self.critic_subset_size)
            next_value = soft_state_value(next_q_values, next_pi.log_prob, ent_coef, next_pi.probs)
            target_q_values = soft_q_target(replay_data.rewards, replay_data.dones, discounts, next_value)

        current_q_values = self.critic.q_values(replay_data.observations, replay_data.actions)
        loss_q = critic_loss(current_q_values, target_q_values)
        self._optimize(self.critic.optimizer, loss_q)
        critic_row = train_statistics.critic_row(loss_q, ent_coef, current_q_values.mean(), self._nonfinite)
        if pi is None:
            return critic_row, None
        return critic_row, self._update_actor(replay_data, pi, ent_coef)

    def _update_actor(self, replay_data: ReplayBufferSamples, pi: PolicySample, ent_coef: th.Tensor) -> th.Tensor:
        """Step the temperature, then the actor against the freshly updated critics.

        :return: the actor statistics row (see :meth:`_gradient_step`)
        """
        entropy = -expected_log_prob(pi.log_prob, pi.probs).mean()
        ent_coef_loss = None
        if self.log_ent_coef is not None:
            assert self.ent_coef_optimizer is not None
            assert isinstance(self.target_entropy, float)
            ent_coef_loss = temperature_loss(self.log_ent_coef, pi.log_prob, self.target_entropy, pi.probs)
            self._optimize(self.ent_coef_optimizer, ent_coef_loss)
        # The actor's gradient goes through the critics to the actions only, not into their weights.
        with _frozen(self._critic_parameters()):
            q_values_pi = self.critic.q_values(replay_data.observations, pi.actions)
        loss_pi = actor_loss(reduce_critics(q_values_pi, self.actor_q_reduction), pi.log_prob, ent_coef, pi.probs)
        self._optimize(self.actor.optimizer, loss_pi)
        return train_statistics.actor_row(loss_pi, entropy, ent_coef_loss, self._nonfinite)

    def _optimize(self, optimizer: th.optim.Optimizer, loss: th.Tensor) -> None:
        """Step ``optimizer`` on the gradient of ``loss``, unless ``_nonfinite`` is set once they are checked."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        flag_nonfinite(self._nonfinite, [loss], optimizer)
        guarded_step(optimizer, self._nonfinite)

    def _critic_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.critic.optimizer.param_groups for p in group["params"]]

    def _update_target_critics(self) -> None:
        """Polyak averaging ``theta_target <- (1 - tau) theta_target + tau theta``; batch-norm statistics are copied.

        Neither happens once ``_nonfinite`` is set.
        """
        guarded_lerp_(self.critic_target.parameters(), self.critic.parameters(), self.tau, self._nonfinite)
        guarded_copy_(self.batch_norm_stats_target, self.batch_norm_stats, self._nonfinite)

    def _raise_if_nonfinite(self, host: HostRows) -> None:
        """Raise if the call met a non-finite loss or gradient, naming the first one and its gradient step.

        The steps before it were applied and are counted in ``_n_updates``; it and the later ones were not.
        """
        found = host.first_nonfinite()
        if found is None:
            return
        step, what = found
        self._n_updates += step
        raise FloatingPointError(
            f"SAC stopped: {what} at gradient step {self._n_updates + 1} (timestep {self.num_timesteps}). Neither "
            "that update nor any later one was applied, so the model holds its last finite parameters (and saving "
            "it keeps them). Check the environment's observations and rewards for NaN/inf (wrap it in VecCheckNan "
            "to find the source) and for very large magnitudes (try VecNormalize), or lower the learning rate."
        )

    def learn(
        self: SelfSAC,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "SAC",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfSAC:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    @classmethod
    def load(
        cls: type[SelfSAC],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        weights_only: bool = False,
        **kwargs: Any,
    ) -> SelfSAC:
        """Load a model saved by :meth:`save`, or by ``stable_baselines3.SAC.save``.

        Takes the arguments of ``BaseAlgorithm.load``. An SB3 SAC archive is converted on the fly: its
        weights, optimizer states and entropy coefficient carry over, and training can continue. Any other
        archive, and a damaged one, is refused with an error that names what it holds.

        The archive's ``data`` holds pickled objects (the policy class, the spaces, schedules...): a plain load
        runs them, as SB3 does. Entries given in ``custom_objects`` are never unpickled.

        :param weights_only: unpickle nothing, as ``torch.load(weights_only=True)``: the spaces come from ``env``,
            the policy class from this package's classes of the saved name, other settings from the readable
            JSON, the rest from ``custom_objects``; an entry with no such substitute is refused, naming what to
            pass. For files you did not write.
        """
        return loading.load_model(
            cls,
            super().load,
            path,
            env,
            custom_objects,
            weights_only,
            dict(device=device, print_system_info=print_system_info, force_reset=force_reset, **kwargs),
        )

    def save(
        self,
        path: str | pathlib.Path | io.BufferedIOBase,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
    ) -> None:
        """Save the model to a zip archive, atomically (see :mod:`sb3_softac.atomic_files`).

        :param path: where to write (``.zip`` is added to a name without suffix), or a binary stream
        :param exclude: attributes to leave out, besides the default ones
        :param include: attributes to save although excluded by default
        """
        atomic_files.write_atomically(path, lambda file: super(SAC, self).save(file, exclude, include), suffix="zip")

    def save_as_sb3(self, path: str | pathlib.Path | io.BufferedIOBase) -> None:
        """Save the model as a checkpoint that ``stable_baselines3.SAC.load`` reads, with identical actions.

        Written atomically, as :meth:`save` writes.

        :param path: where to write the archive
        :raises ValueError: naming each option that SB3's SAC does not have (discrete actions, critic
            dropout or layer norm, ``policy_delay``, ``qf_learning_rate``, ``critic_subset_size``...)
        """
        buffer = io.BytesIO()
        super().save(buffer)
        buffer.seek(0)
        sb3_conversion.softac_archive_to_sb3(buffer, path, type(self))

    def save_replay_buffer(self, path: str | pathlib.Path | io.BufferedIOBase) -> None:
        """Pickle the replay buffer, atomically (``.pkl`` is added to a name without suffix).

        :param path: where to write, or a binary stream
        """
        atomic_files.write_atomically(path, lambda file: super(SAC, self).save_replay_buffer(file), suffix="pkl")

    def load_replay_buffer(self, path: str | pathlib.Path | io.BufferedIOBase, truncate_last_traj: bool = True) -> None:
        """Load a replay buffer pickled by :meth:`save_replay_buffer`, after checking that it fits this model.

        The file is unpickled (plain pickle, as in SB3): load only buffers you trust.

        :param path: the pickled buffer
        :param truncate_last_traj: ``HerReplayBuffer``: treat the last trajectory as finished (see SB3)
        :raises ValueError: when the buffer was saved for other observation or action shapes, or another number
            of environments; the model keeps its previous buffer
        """
        # A model may hold no buffer (SB3's own tests delete it before loading one); a refused buffer restores that.
        previous = getattr(self, "replay_buffer", None)
        super().load_replay_buffer(path, truncate_last_traj)
        try:
            loading.check_replay_buffer_fits(self.replay_buffer, self, path)
        except ValueError:
            self.replay_buffer = previous
            raise

    def _excluded_save_params(self) -> list[str]:
        return [
            *super()._excluded_save_params(),
            "actor",
            "critic",
            "critic_target",
            "_nonfinite",
            "update_path",
            "_engine",
        ]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts = ["policy", "actor.optimizer", "critic.optimizer"]
        if self.ent_coef_optimizer is not None:
            state_dicts.append("ent_coef_optimizer")
            return state_dicts, ["log_ent_coef"]
        return state_dicts, ["ent_coef_tensor"]
