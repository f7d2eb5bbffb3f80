"""Wall-clock speed benchmark: ``sb3_softac.SAC`` vs ``stable_baselines3.SAC`` (and SBX when installed).

The implementations are trained side by side in one process, on the same environment, with the same
hyper-parameters (library defaults: one gradient step per env step, 256x256 MLPs, batch 256) and the same seed.
sb3_softac runs twice: through its autograd-free update engine (``sb3_softac``, the default wherever it applies)
and forced onto the autograd update (``sb3_softac (autograd)``, ``update_engine="autograd"``).

Besides plain SAC (setting ``SAC``), the high update-to-data settings of sb3_softac's RL Zoo files run next to the
autograd path: ``REDQ`` (``softac_redq.yml``: 10 critics, target over a random pair, actor on the mean, 20 gradient
steps per env step) and ``DroQ`` (``softac_droq.yml``: two critics with dropout 0.01 and layer norm, 20 gradient
steps per env step, the actor and temperature updated once per env step). Their ``learn()`` calls take
``--steps`` / UTD env steps. Who runs which setting (``setting_contenders``, reasons in ``NOT_RUN``):

* ``SAC``: everyone.
* ``DroQ``: sb3_softac (both paths) and SBX, which has the same method: ``sbx.SAC(..., gradient_steps=20,
  policy_delay=20, policy_kwargs=dict(net_arch=[256, 256], n_critics=2, dropout_rate=0.01, layer_norm=True))``,
  everything else equal (batch size, learning rate 3e-4, ``learning_starts``, ``train_freq=1``, tau, gamma). Its
  critics are ``Dense -> Dropout -> LayerNorm -> ReLU`` as ours, its target critics and the critics of its actor
  loss keep dropout active as ours, its target is the minimum over both critics and its actor maximises their
  minimum as ours, and with ``policy_delay = gradient_steps = 20`` it updates the actor and temperature once per
  20 critic updates as ours. SB3's SAC has no critic dropout, layer norm or ``policy_delay``: it cannot run DroQ
  and is timed in the ``SAC`` setting only (compare with its row there, same run).
* ``REDQ``: sb3_softac only. SB3's SAC has ``n_critics`` but no random target subset, no ensemble-mean actor and no
  ``policy_delay``. SBX's SAC has ``n_critics`` and ``policy_delay`` but no subset and no mean actor: with
  ``n_critics=10`` its target takes the minimum over all 10 target critics and its actor the minimum of all 10. That
  is another algorithm (a much more pessimistic target) and another computation: it evaluates 10 target critics
  per target where sb3_softac's engine evaluates the drawn pair only, about a quarter more matmul work per gradient
  step at 256x256 (the report computes it per env from the FLOP floor). Its time would not measure the same update,
  so it is not run.

For every setting and environment the script reports

* env steps/s of a whole ``learn()`` call after a warm-up ``learn()`` (so the random-action phase of
  ``learning_starts`` and one-off allocations are excluded), as the median over alternating repetitions
  (A, B, A, B, ...) plus min/max, and the median of the paired per-repetition ratios;
* the milliseconds per env step spent inside ``train()`` during those ``learn()`` calls, and elsewhere (acting,
  the environment, the replay buffer, callbacks);
* milliseconds per gradient step, timed by calling ``model.train(gradient_steps=G, batch_size=B)`` directly
  on the already-filled replay buffer, median and inter-quartile range over repetitions (for REDQ and DroQ, G is
  rounded up to a multiple of ``policy_delay``: every implementation then does the same number of actor updates
  per call, and SBX, whose jit takes the policy-delay phase as a static argument, reuses one compiled update);
* a summary of the gradient step: sb3_softac's ms against every other implementation's in the same setting (paired
  ratios, e.g. for DroQ the engine against SBX and against the autograd path), with the update path it took;
* a FLOP floor for one SAC gradient step of this network configuration, the time that floor takes at the
  measured fp32 GEMM throughput of this machine (256x256x256 ``torch.mm``) and the implied maximum steps/s.

The report names the CPU model and its vector extensions: the ratios differ between CPUs. ``--threads N`` sets torch's
intra- and inter-op threads to N and pins the process to N CPUs (``--cpu K``: from CPU K on), so that SBX too runs
on N CPUs: with one thread XLA gets its single-thread flags, with more its thread pool sizes itself to the CPUs the
process may use.

Run ``python benchmarks/speed.py`` (about 15 min of CPU time, longer on a busy machine); quick check:
``python benchmarks/speed.py --envs Pendulum-v1 --settings SAC --steps 300 --reps 3 --warmup 300 --grad-steps 50``.
DroQ next to SBX: ``python benchmarks/speed.py --settings DroQ --warmup 200 --reps 3 --grad-reps 3`` (add
``--threads 2`` for two threads).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import gymnasium as gym
import torch
from common import METHOD_FILES, method_hyperparams, package_version, set_torch_threads

DEFAULT_ENVS: tuple[str, ...] = ("Pendulum-v1", "HalfCheetah-v5")
REFERENCE_LABEL = "SB3"
OURS_LABEL = "sb3_softac"
AUTOGRAD_LABEL = "sb3_softac (autograd)"
SBX_LABEL = "SBX"
# What the benchmark takes from the zoo file of each high update-to-data setting (the rest, such as learning_starts
# or the network size, stays the benchmark's own). The files' MuJoCo entry serves every env.
SETTINGS: tuple[str, ...] = ("SAC", *METHOD_FILES)
_SETTING_KEYS = ("gradient_steps", "policy_delay", "critic_subset_size", "actor_q_reduction", "policy_kwargs")
# The constructor arguments and policy_kwargs of sbx.SAC / SACPolicy that a setting may set; a setting needing any
# other cannot run on SBX as it is defined.
_SBX_KEYS = frozenset({"gradient_steps", "policy_delay", "policy_kwargs"})
_SBX_POLICY_KEYS = frozenset({"net_arch", "n_critics", "dropout_rate", "layer_norm"})
#: Why an implementation does not run a setting; the report prints the reasons under the setting's table.
NOT_RUN: dict[str, dict[str, str]] = {
    "SAC": {},
    "DroQ": {
        REFERENCE_LABEL: "stable_baselines3.SAC has no critic dropout, no layer norm and no policy_delay, so it "
        "cannot run DroQ; it is timed in the SAC setting only",
    },
    "REDQ": {
        REFERENCE_LABEL: "stable_baselines3.SAC has n_critics but no random target subset, no ensemble-mean actor "
        "and no policy_delay",
        SBX_LABEL: "sbx.SAC has n_critics and policy_delay but no random target subset and no ensemble-mean actor: "
        "with n_critics=10 its target is the minimum over all 10 target critics and its actor maximises their "
        "minimum, another algorithm (a much more pessimistic target) and another computation: it evaluates all 10 "
        "target critics where sb3_softac's engine evaluates the drawn pair, more matmul work per gradient step by "
        "the FLOP floor ({extra_work}). Its time would not measure the same update",
    },
}
# Vector extensions that matter for fp32/bf16 matrix products, in the order the report lists them.
_VECTOR_FLAGS = (
    *("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16"),
    *("avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm"),
)


@dataclass
class Contender:
    """One SAC implementation under test."""

    label: str
    module: str
    sac_cls: Any
    version: str
    #: extra constructor arguments (``update_engine="autograd"`` for the autograd row)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class EnvResult:
    """Raw timings for one setting on one environment, keyed by contender label."""

    env_id: str
    obs_dim: int
    act_dim: int
    setting: str = "SAC"
    reference: str = REFERENCE_LABEL
    update_path: dict[str, str] = field(default_factory=dict)
    steps_per_s: dict[str, list[float]] = field(default_factory=dict)
    train_ms_per_env_step: dict[str, list[float]] = field(default_factory=dict)
    other_ms_per_env_step: dict[str, list[float]] = field(default_factory=dict)
    gemm_gflops: list[float] = field(default_factory=list)
    ms_per_grad_step: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    #: gradient steps of each timed ``train()`` call (``--grad-steps``, rounded up to a multiple of policy_delay)
    grad_steps: int = 0
    #: the setting as each model was built, read back from it (see ``built_settings``)
    built: dict[str, dict[str, Any]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Threads / CPU pinning
# --------------------------------------------------------------------------------------------------------------


def pick_cpus(allowed: set[int], n_threads: int, cpu: int | None = None) -> list[int]:
    """The CPUs to pin ``n_threads`` threads to: the first ``n_threads`` of ``allowed`` (from ``cpu`` on when given).

    With ``cpu`` given for one thread that CPU is taken even when ``allowed`` lacks it (pinning then fails and
    says so). Fewer CPUs than threads come back when fewer are allowed.
    """
    if cpu is not None and n_threads == 1:
        return [cpu]
    return [core for core in sorted(allowed) if cpu is None or core >= cpu][:n_threads]


@contextlib.contextmanager
def pinned_threads(n_threads: int, cpu: int | None = None) -> Iterator[str]:
    """Set torch intra/inter-op threads to ``n_threads`` and pin the process to ``n_threads`` CPUs.

    The CPUs are those of ``pick_cpus``: from ``cpu`` on when given, otherwise from the first CPU this process may
    run on. Pinning before ``jax`` is imported also holds XLA's thread pool to those CPUs. Yields a human readable
    description of the setting. The previous thread count and CPU affinity are restored on exit (matters when
    ``main`` is called from tests, irrelevant for a command-line run).
    """
    old_threads = torch.get_num_threads()
    old_affinity: set[int] | None = None
    set_torch_threads(n_threads)
    pin = "not pinned"
    if hasattr(os, "sched_setaffinity"):
        try:
            old_affinity = os.sched_getaffinity(0)
            cores = pick_cpus(old_affinity, n_threads, cpu)
            os.sched_setaffinity(0, set(cores))
            pin = f"pinned to CPU{'s' if len(cores) > 1 else ''} {','.join(map(str, cores))}"
            if len(cores) < n_threads:
                pin += f" (only {len(cores)} CPU(s) allowed for {n_threads} threads)"
        except (OSError, ValueError) as exc:  # pragma: no cover - depends on the container
            pin = f"pinning failed ({exc})"
    try:
        yield f"torch threads={torch.get_num_threads()}, {pin}"
    finally:
        torch.set_num_threads(old_threads)
        if old_affinity is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, old_affinity)


def xla_threads(n_threads: int) -> str:
    """How XLA's CPU threads are set (for the report)."""
    if n_threads == 1:
        return f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    return "XLA's default thread pool, sized to the CPUs the process is pinned to"


def configure_jax_threads(n_threads: int) -> None:
    """Ask XLA for single-threaded CPU execution; must run before ``jax`` is imported."""
    if n_threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        extra = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()


# --------------------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------------------


def load_contenders(with_sbx: bool, notes: list[str] | None = None) -> list[Contender]:
    """Import the SAC classes: ours (engine, then autograd) first, SB3 (the reference), SBX last when importable.

    :param with_sbx: whether to try SBX
    :param notes: receives a line saying why SBX is missing, when it is
    """
    ours = importlib.import_module("sb3_softac")
    contenders = [
        Contender(OURS_LABEL, "sb3_softac", ours.SAC, package_version("sb3_softac")),
        Contender(AUTOGRAD_LABEL, "sb3_softac", ours.SAC, package_version("sb3_softac"), {"update_engine": "autograd"}),
    ]
    sb3 = importlib.import_module("stable_baselines3")
    contenders.append(Contender(REFERENCE_LABEL, "stable_baselines3", sb3.SAC, package_version("stable_baselines3")))
    if with_sbx:
        try:
            sbx = importlib.import_module("sbx")
        except Exception as exc:  # sbx/jax may fail in many ways; it is optional
            if notes is not None:
                notes.append(f"SBX not run: importing sbx failed ({type(exc).__name__}: {exc})")
        else:
            contenders.append(Contender(SBX_LABEL, "sbx", sbx.SAC, package_version("sbx")))
    elif notes is not None:
        notes.append("SBX not run (--no-sbx)")
    return contenders


def setting_kwargs(setting: str) -> dict[str, Any]:
    """Constructor arguments that define ``setting`` (none for plain SAC), from sb3_softac's zoo files."""
    if setting == "SAC":
        return {}
    settings = method_hyperparams(setting)
    kwargs = {key: value for key, value in settings.items() if key in _SETTING_KEYS}
    kwargs["policy_kwargs"] = {k: v for k, v in kwargs.get("policy_kwargs", {}).items() if k != "net_arch"}
    return kwargs


def contender_kwargs(contender: Contender, setting: str) -> dict[str, Any]:
    """The constructor arguments of ``setting`` for ``contender`` (plus its own, e.g. ``update_engine``).

    SBX takes the same argument names as sb3_softac for what it has (``gradient_steps``, ``policy_delay``,
    ``n_critics``, ``dropout_rate``, ``layer_norm``); a setting that needs anything else is refused for it rather
    than silently dropped.
    """
    kwargs = {**setting_kwargs(setting), **contender.kwargs}
    if contender.label == SBX_LABEL:
        missing = sorted(set(kwargs) - _SBX_KEYS) + sorted(set(kwargs.get("policy_kwargs", {})) - _SBX_POLICY_KEYS)
        if missing:
            raise ValueError(f"sbx.SAC has no counterpart of {', '.join(missing)} (setting {setting})")
    return kwargs


def setting_grad_steps(grad_steps: int, setting: str) -> int:
    """Gradient steps of a timed ``train()`` call: ``grad_steps`` rounded up to a multiple of the policy delay."""
    delay = int(setting_kwargs(setting).get("policy_delay", 1))
    return -(-grad_steps // delay) * delay


def built_settings(model: Any) -> dict[str, Any]:
    """What defines the settings, read back from a built model (sb3_softac and SBX name them alike; SB3 lacks some)."""
    policy = model.policy
    n_critics = getattr(policy, "n_critics", None)
    if n_critics is None:  # SB3 keeps it in the critic's arguments only
        n_critics = getattr(policy, "critic_kwargs", {}).get("n_critics")
    return {
        "gradient_steps": model.gradient_steps,
        "policy_delay": getattr(model, "policy_delay", None),
        "n_critics": n_critics,
        "dropout_rate": getattr(policy, "dropout_rate", None),
        "layer_norm": getattr(policy, "layer_norm", None),
        "critic_subset_size": getattr(model, "critic_subset_size", None),
        "actor_q_reduction": getattr(model, "actor_q_reduction", None),
        "batch_size": model.batch_size,
        "learning_rate": model.learning_rate,
        "tau": model.tau,
        "gamma": model.gamma,
        "learning_starts": model.learning_starts,
        "train_freq": [model.train_freq.frequency, str(model.train_freq.unit.value)],
    }


def make_model(contender: Contender, env_id: str, args: argparse.Namespace, setting: str = "SAC") -> Any:
    """Build a SAC model with the shared hyper-parameters of this benchmark and those of ``setting``."""
    kwargs = contender_kwargs(contender, setting)
    policy_kwargs = {"net_arch": list(args.net_arch), **kwargs.pop("policy_kwargs", {})}
    return contender.sac_cls(
        "MlpPolicy",
        gym.make(env_id),
        batch_size=args.batch_size,
        learning_starts=args.learning_starts,
        policy_kwargs=policy_kwargs,
        seed=args.seed,
        verbose=0,
        **kwargs,
    )


class _TrainTimer:
    """Wraps a model's ``train`` to add up the wall-clock time spent inside it."""

    def __init__(self, model: Any) -> None:
        self.seconds = 0.0
        self._train = model.train
        model.train = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._train(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


# --------------------------------------------------------------------------------------------------------------
# FLOP floor
# --------------------------------------------------------------------------------------------------------------


def _layers(in_dim: int, hidden: Sequence[int], out_dim: int) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of every linear layer of an MLP."""
    sizes = [in_dim, *hidden, out_dim]
    return list(itertools.pairwise(sizes))


def _macs(layers: Sequence[tuple[int, int]]) -> int:
    """Multiply-adds of one forward pass (per sample) through ``layers``."""
    return sum(fan_in * fan_out for fan_in, fan_out in layers)


def sac_step_flops(
    obs_dim: int,
    act_dim: int,
    hidden: Sequence[int],
    batch_size: int,
    n_critics: int = 2,
    target_critics: int | None = None,
    policy_delay: int = 1,
) -> float:
    """Minimal matmul FLOPs of one SAC gradient step (2 FLOPs per multiply-add).

    Counted per sample, then multiplied by the batch size:

    * actor forward on ``obs`` (policy loss, entropy-coefficient loss) and its backward
      (weight gradients of every layer, input gradients of every layer but the first);
    * actor forward on ``next_obs`` (target, no backward);
    * target critics forward on (``next_obs``, next action);
    * critics forward on (``obs``, buffer action) plus backward for the critic loss (weight gradients of every
      layer, input gradients of every layer but the first);
    * critics forward on (``obs``, policy action) plus the backward to the actions only for the actor loss
      (input gradients, and for the first layer only the action columns; no critic weight gradients).

    Biases, activations, log-prob / tanh-squashing math, the optimiser update and the Polyak update are
    O(parameters) or O(batch x width) element-wise work and are left out, so this is a floor, not an estimate.

    ``target_critics`` is the number of target critics one target evaluates (``n_critics`` when None; REDQ's
    engine evaluates only its random subset). With ``policy_delay`` the actor's forward and backward on ``obs``
    and the actor loss through the critics happen once every ``policy_delay`` steps and are averaged over them.
    """
    actor = _layers(obs_dim, hidden, 2 * act_dim)  # mean and log-std heads fused: same multiply-adds
    critic = _layers(obs_dim + act_dim, hidden, 1)
    actor_fwd = _macs(actor)
    critic_fwd = _macs(critic)
    actor_bwd = actor_fwd + _macs(actor[1:])
    critic_bwd = critic_fwd + _macs(critic[1:])
    critic_bwd_to_actions = _macs(critic[1:]) + critic[0][1] * act_dim
    critic_update = (
        actor_fwd  # actor on next_obs
        + (n_critics if target_critics is None else target_critics) * critic_fwd  # target critics
        + n_critics * (critic_fwd + critic_bwd)  # critic loss
    )
    actor_update = (
        actor_fwd  # actor on obs
        + actor_bwd
        + n_critics * (critic_fwd + critic_bwd_to_actions)  # actor loss through the critics
    )
    return 2.0 * (critic_update + actor_update / policy_delay) * batch_size


def sbx_redq_extra_work(obs_dim: int, act_dim: int, hidden: Sequence[int]) -> float:
    """How much more matmul work an SBX step with REDQ's 10 critics does than sb3_softac's REDQ step (fraction).

    SBX evaluates all 10 target critics per target; sb3_softac's engine the drawn ones (``critic_subset_size``).
    Both update the actor every ``policy_delay`` steps.
    """
    redq = setting_kwargs("REDQ")
    n_critics, delay = int(redq["policy_kwargs"]["n_critics"]), int(redq["policy_delay"])
    ours = sac_step_flops(obs_dim, act_dim, hidden, 1, n_critics, int(redq["critic_subset_size"]), delay)
    sbx = sac_step_flops(obs_dim, act_dim, hidden, 1, n_critics, n_critics, delay)
    return sbx / ours - 1.0


def measure_gemm_gflops(size: int = 256, blocks: int = 3, per_block: int = 200) -> float:
    """Median fp32 ``torch.mm`` throughput (GFLOP/s) at ``size``^3 under the current torch thread setting."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    out = torch.empty(size, size)
    for _ in range(per_block):
        torch.mm(a, b, out=out)
    rates = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(per_block):
            torch.mm(a, b, out=out)
        elapsed = time.perf_counter() - start
        rates.append(2.0 * size**3 * per_block / elapsed / 1e9)
    return statistics.median(rates)


# --------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------


def _space_dim(space: Any) -> int:
    """Flattened size of a Box space."""
    shape = getattr(space, "shape", None) or (1,)
    dim = 1
    for size in shape:
        dim *= int(size)
    return dim


def setting_contenders(setting: str, contenders: Sequence[Contender]) -> list[Contender]:
    """Who runs ``setting``: everyone for plain SAC; sb3_softac (engine and autograd) and SBX for DroQ;
    sb3_softac only for REDQ (the reasons are in ``NOT_RUN``)."""
    return [c for c in contenders if c.label not in NOT_RUN[setting]]


def bench_env(
    env_id: str, contenders: Sequence[Contender], args: argparse.Namespace, setting: str = "SAC"
) -> EnvResult:
    """Time ``learn()`` and ``train()`` of every contender on ``env_id`` with alternating repetitions."""
    probe = gym.make(env_id)
    result = EnvResult(env_id, _space_dim(probe.observation_space), _space_dim(probe.action_space), setting)
    probe.close()
    contenders = setting_contenders(setting, contenders)
    labels = [c.label for c in contenders]
    result.reference = REFERENCE_LABEL if REFERENCE_LABEL in labels else AUTOGRAD_LABEL
    # A high update-to-data setting does gradient_steps updates per env step: as many updates per learn() as SAC.
    steps = max(1, args.steps // int(setting_kwargs(setting).get("gradient_steps", 1)))
    grad_steps = result.grad_steps = setting_grad_steps(args.grad_steps, setting)

    models: dict[str, Any] = {}
    timers: dict[str, _TrainTimer] = {}
    for contender in contenders:
        try:
            model = make_model(contender, env_id, args, setting)
            model.learn(total_timesteps=args.warmup)
        except Exception as exc:  # report and keep benchmarking the others
            result.errors[contender.label] = f"{type(exc).__name__}: {exc}"
            continue
        models[contender.label] = model
        timers[contender.label] = _TrainTimer(model)
        result.built[contender.label] = built_settings(model)
        if contender.module == "sb3_softac":
            result.update_path[contender.label] = model.update_path
        for timings in (result.steps_per_s, result.train_ms_per_env_step, result.other_ms_per_env_step):
            timings[contender.label] = []
        result.ms_per_grad_step[contender.label] = []
        _log(args, f"  {contender.label}: warm-up of {args.warmup} steps done")

    for rep in range(args.reps):
        for label, model in models.items():
            before, in_train = int(model.num_timesteps), timers[label].seconds
            start = time.perf_counter()
            model.learn(total_timesteps=steps, reset_num_timesteps=False)
            elapsed = time.perf_counter() - start
            done, in_train = int(model.num_timesteps) - before, timers[label].seconds - in_train
            result.steps_per_s[label].append(done / elapsed)
            result.train_ms_per_env_step[label].append(1e3 * in_train / done)
            result.other_ms_per_env_step[label].append(1e3 * (elapsed - in_train) / done)
        _log(args, f"  learn rep {rep + 1}/{args.reps}: " + _fmt_last(result.steps_per_s, "steps/s"))

    for model in models.values():  # untimed: first call may allocate / JIT-compile for this G
        model.train(gradient_steps=grad_steps, batch_size=args.batch_size)
    for rep in range(args.grad_reps):
        # GEMM throughput sampled between the timed train() calls, so the floor sees the same machine state
        result.gemm_gflops.append(measure_gemm_gflops(blocks=1))
        for label, model in models.items():
            start = time.perf_counter()
            model.train(gradient_steps=grad_steps, batch_size=args.batch_size)
            elapsed = time.perf_counter() - start
            result.ms_per_grad_step[label].append(1e3 * elapsed / grad_steps)
        _log(args, f"  train rep {rep + 1}/{args.grad_reps}: " + _fmt_last(result.ms_per_grad_step, "ms/grad step"))
    for label, model in models.items():  # a model may leave the engine during the run: say so
        if label in result.update_path and model.update_path != result.update_path[label]:
            result.update_path[label] += f", then {model.update_path}"
    return result


def _fmt_last(values: dict[str, list[float]], unit: str) -> str:
    """Progress line with the latest value of every contender."""
    return ", ".join(f"{label} {vals[-1]:.2f}" for label, vals in values.items() if vals) + f" {unit}"


def _log(args: argparse.Namespace, message: str) -> None:
    """Progress output on stderr (stdout carries only the report)."""
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartile (inclusive method; the value itself for a single sample)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _paired_ratios(ours: Sequence[float], ref: Sequence[float], invert: bool) -> list[float]:
    """Per-repetition speed-ups vs the reference (``ref/ours`` for times, ``ours/ref`` for rates)."""
    return [(r / o) if invert else (o / r) for o, r in zip(ours, ref, strict=False) if o > 0 and r > 0]


def _fmt_ratio(ratios: Sequence[float]) -> str:
    """Median paired ratio with its range."""
    if not ratios:
        return "n/a"
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}x"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def render_report(
    results: Sequence[EnvResult],
    contenders: Sequence[Contender],
    args: argparse.Namespace,
    header: str,
) -> str:
    """Markdown report: a throughput table per setting, the gradient-step summary and the FLOP-floor table."""
    lines = [header]
    for setting in dict.fromkeys(res.setting for res in results):
        lines += _throughput_table([res for res in results if res.setting == setting], contenders)
        lines += _not_run_notes(setting, [res for res in results if res.setting == setting], contenders, args)
    lines += _grad_step_summary(results, contenders)
    if any(res.setting == "SAC" for res in results):
        lines += _floor_table(results, contenders, args)
    lines += [
        "",
        f"learn: {args.reps} alternating repetitions of learn({args.steps}, reset_num_timesteps=False) after a "
        f"{args.warmup}-step warm-up learn (learning_starts={args.learning_starts}); speed-ups are medians of "
        "paired per-repetition ratios (range in brackets). grad step: "
        f"{args.grad_reps} repetitions of train(gradient_steps={args.grad_steps}, batch_size={args.batch_size}), "
        "the gradient steps rounded up to a multiple of policy_delay for REDQ and DroQ. "
        "path: the update sb3_softac ran (its update_path). REDQ and DroQ: the settings of softac_redq.yml and "
        "softac_droq.yml, learn() calls of --steps / UTD env steps, speed-ups against sb3_softac's autograd path.",
    ]
    return "\n".join(lines)


def _floor_table(results: Sequence[EnvResult], contenders: Sequence[Contender], args: argparse.Namespace) -> list[str]:
    """The FLOP floor of a plain SAC step per env, and how far above it every implementation is."""
    lines = [
        "",
        f"FLOP floor per gradient step (matmuls only) at the fp32 GEMM throughput of 256x256x256 torch.mm with "
        f"{args.threads} thread(s), median of samples taken between the timed train() calls:",
        "",
        "| env | obs dim | act dim | GFLOP/grad step | GEMM GFLOP/s | floor ms/grad step | floor max steps/s "
        + "".join(f"| {c.label} ms / floor " for c in contenders)
        + "|",
        "|---|---:|---:|---:|---:|---:|---:" + "|---:" * len(contenders) + "|",
    ]
    for res in results:
        if res.setting != "SAC":
            continue
        flops = sac_step_flops(res.obs_dim, res.act_dim, args.net_arch, args.batch_size)
        gemm_gflops = statistics.median(res.gemm_gflops) if res.gemm_gflops else math.nan
        floor_ms = 1e3 * flops / (gemm_gflops * 1e9)
        cells = []
        for contender in contenders:
            timings = res.ms_per_grad_step.get(contender.label)
            cells.append(f"{statistics.median(timings) / floor_ms:.1f}x" if timings else "n/a")
        lines.append(
            f"| {res.env_id} | {res.obs_dim} | {res.act_dim} | {flops / 1e9:.3f} | {gemm_gflops:.1f} "
            f"| {floor_ms:.2f} "
            f"| {1e3 / floor_ms:.0f} | " + " | ".join(cells) + " |"
        )
    return lines


def not_run_reasons(
    setting: str, results: Sequence[EnvResult], contenders: Sequence[Contender], net_arch: Sequence[int]
) -> dict[str, str]:
    """Why each loaded implementation missing from ``setting`` does not run it (``NOT_RUN``, with the extra matmul
    work of SBX on REDQ computed for every env of ``results``)."""
    reasons = {}
    for contender in contenders:
        reason = NOT_RUN[setting].get(contender.label)
        if reason is None:
            continue
        if "{extra_work}" in reason:
            extra = ", ".join(
                f"+{100 * sbx_redq_extra_work(res.obs_dim, res.act_dim, net_arch):.0f}% on {res.env_id}"
                for res in results
                if res.setting == setting
            )
            reason = reason.format(extra_work=extra or "no env run")
        reasons[contender.label] = reason
    return reasons


def _not_run_notes(
    setting: str, results: Sequence[EnvResult], contenders: Sequence[Contender], args: argparse.Namespace
) -> list[str]:
    """The markdown lines of ``not_run_reasons``."""
    reasons = not_run_reasons(setting, results, contenders, args.net_arch)
    notes = [f"* {label}: {reason}." for label, reason in reasons.items()]
    return ["", f"Not run in setting {setting}:", "", *notes] if notes else []


def _grad_step_summary(results: Sequence[EnvResult], contenders: Sequence[Contender]) -> list[str]:
    """sb3_softac's ms per gradient step against every other implementation's, per setting and env."""
    others = [c.label for c in contenders if c.label != OURS_LABEL]
    lines = [
        "",
        f"Gradient step: ms/grad step (median) of {OURS_LABEL} (the engine where it covers the model; path says "
        "which update ran) and of the others, and the paired ratios other ms / "
        f"{OURS_LABEL} ms (> 1: {OURS_LABEL} faster; median, range in brackets):",
        "",
        f"| setting | env | {OURS_LABEL} path | {OURS_LABEL} ms "
        + "".join(f"| {label} ms " for label in others)
        + "".join(f"| {OURS_LABEL} vs {label} " for label in others)
        + "|",
        "|---|---|---|---:" + "|---:" * (2 * len(others)) + "|",
    ]
    fallbacks = []
    for res in results:
        ours = res.ms_per_grad_step.get(OURS_LABEL, [])
        path = res.update_path.get(OURS_LABEL, "")
        if ours and path != "engine":
            fallbacks.append(res)
        times, ratios = [], []
        for label in others:
            theirs = res.ms_per_grad_step.get(label, [])
            if label in NOT_RUN[res.setting]:
                times.append("not run")
                ratios.append("not run")
            elif label in res.errors or not theirs or not ours:
                times.append("error" if label in res.errors else "n/a")
                ratios.append("n/a")
            else:
                times.append(f"{statistics.median(theirs):.2f}")
                ratios.append(_fmt_ratio(_paired_ratios(ours, theirs, invert=True)))
        ours_ms = f"{statistics.median(ours):.2f}" if ours else res.errors.get(OURS_LABEL, "n/a")
        lines.append(f"| {res.setting} | {res.env_id} | {path} | {ours_ms} | " + " | ".join(times + ratios) + " |")
    for res in fallbacks:
        lines += [
            "",
            f"Note: in setting {res.setting} on {res.env_id} {OURS_LABEL} took the {res.update_path.get(OURS_LABEL)} "
            f"update (the engine does not cover this configuration), so its ratio against {AUTOGRAD_LABEL} compares "
            "autograd with autograd.",
        ]
    return lines


def _throughput_table(results: Sequence[EnvResult], contenders: Sequence[Contender]) -> list[str]:
    """One markdown table of env steps/s, time in and out of ``train()`` and ms per gradient step."""
    reference = results[0].reference
    lines = [
        "",
        f"Setting {results[0].setting}:",
        "",
        f"| env | algo | path | learn steps/s (median) | steps/s min-max | speed-up vs {reference} (learn) "
        "| ms in train() / env step | ms elsewhere / env step "
        f"| ms/grad step (median) | ms/grad step IQR | speed-up vs {reference} (grad step) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        ref_rate = res.steps_per_s.get(reference, [])
        ref_ms = res.ms_per_grad_step.get(reference, [])
        for contender in contenders:
            label = contender.label
            if label in res.errors:
                lines.append(f"| {res.env_id} | {label} | | error: {res.errors[label]} | | | | | | | |")
                continue
            if label not in res.steps_per_s:
                continue
            rates = res.steps_per_s[label]
            ms = res.ms_per_grad_step[label]
            q1, q3 = _quartiles(ms)
            is_ref = label == reference
            learn_ratio = "1.00x (ref)" if is_ref else _fmt_ratio(_paired_ratios(rates, ref_rate, invert=False))
            grad_ratio = "1.00x (ref)" if is_ref else _fmt_ratio(_paired_ratios(ms, ref_ms, invert=True))
            lines.append(
                f"| {res.env_id} | {label} | {res.update_path.get(label, '')} | {statistics.median(rates):.1f} "
                f"| {min(rates):.1f}-{max(rates):.1f} | {learn_ratio} "
                f"| {statistics.median(res.train_ms_per_env_step[label]):.2f} "
                f"| {statistics.median(res.other_ms_per_env_step[label]):.2f} "
                f"| {statistics.median(ms):.2f} | {q1:.2f}-{q3:.2f} | {grad_ratio} |"
            )
    return lines


def _cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, or the platform's processor string."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _vector_extensions() -> str:
    """The CPU's SIMD and matrix extensions that matter for the matrix products (``flags`` / ``Features``)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(flag for flag in _VECTOR_FLAGS if flag in flags) or "none of the listed"
    return "unknown"


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("extra_envs", nargs="*", metavar="ENV_ID", help="extra Gymnasium ids to benchmark")
    parser.add_argument("--envs", nargs="+", default=None, help=f"replace the default envs {list(DEFAULT_ENVS)}")
    parser.add_argument(
        "--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS), help="SAC, REDQ, DroQ (default: all)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads, pinned to as many CPUs (default 1)")
    parser.add_argument(
        "--cpu", type=int, default=None, help="CPU to pin to, the first of --threads CPUs (default: first allowed)"
    )
    parser.add_argument("--steps", type=int, default=1000, help="env steps per measured learn() (default 1000)")
    parser.add_argument("--reps", type=int, default=5, help="alternating learn() repetitions (default 5)")
    parser.add_argument("--warmup", type=int, default=500, help="env steps of the untimed warm-up learn() (500)")
    parser.add_argument("--grad-steps", type=int, default=100, help="gradient steps per timed train() (100)")
    parser.add_argument("--grad-reps", type=int, default=5, help="timed train() repetitions (default 5)")
    parser.add_argument("--batch-size", type=int, default=256, help="SAC batch size (default 256, as SB3)")
    parser.add_argument("--net-arch", type=int, nargs="+", default=[256, 256], help="hidden sizes (256 256)")
    parser.add_argument("--learning-starts", type=int, default=100, help="random-action steps (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed shared by all implementations (default 0)")
    parser.add_argument("--no-sbx", action="store_true", help="skip SBX even when it is installed")
    parser.add_argument("--json", default=None, help="also write raw timings to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = parser.parse_args(argv)
    if args.warmup <= args.learning_starts:
        parser.error("--warmup must exceed --learning-starts so that the timed learn() is all training")
    if min(args.steps, args.reps, args.grad_steps, args.grad_reps, args.threads) < 1:
        parser.error("--steps, --reps, --grad-steps, --grad-reps and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark, print the markdown report on stdout and return it."""
    args = parse_args(argv)
    envs = list(dict.fromkeys([*(args.envs or DEFAULT_ENVS), *args.extra_envs]))
    configure_jax_threads(args.threads)
    notes: list[str] = []
    with pinned_threads(args.threads, args.cpu) as thread_info:
        contenders = load_contenders(with_sbx=not args.no_sbx, notes=notes)
        if any(c.label == SBX_LABEL for c in contenders):
            thread_info += f"; jax {package_version('jax')}, {xla_threads(args.threads)}"
        _log(args, f"{thread_info}; contenders: {[c.label for c in contenders]}")
        results = []
        for setting in args.settings:
            for env_id in envs:
                _log(args, f"{setting}, {env_id}:")
                results.append(bench_env(env_id, contenders, args, setting))
    header = (
        "## SAC speed: " + " vs ".join(f"{c.label} {c.version}" for c in contenders) + "\n\n"
        f"CPU: {_cpu_model()} (vector extensions: {_vector_extensions()}); {thread_info}; torch {torch.__version__}; "
        f"Python {platform.python_version()}; "
        f"net_arch={list(args.net_arch)}, batch_size={args.batch_size}, seed={args.seed}"
        + "".join(f"\n\n{note}." for note in notes)
    )
    report = render_report(results, contenders, args, header)
    print(report, flush=True)
    if args.json:
        payload = {
            "args": vars(args),
            "contenders": [
                {"label": c.label, "module": c.module, "version": c.version, "kwargs": c.kwargs} for c in contenders
            ],
            "not_run": {
                setting: not_run_reasons(setting, results, contenders, args.net_arch) for setting in args.settings
            },
            "results": [asdict(r) for r in results],
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
