"""What the benchmark scripts share: torch thread setup, package versions, the process pool, hyperparameters read
from the packaged RL Zoo files, the one evaluation rule, the statistics of the reports and the results file.

The scripts import it as a sibling module (``from common import ...``): ``python benchmarks/<script>.py`` puts this
folder first on ``sys.path``, and the tests add it through pytest's ``pythonpath`` setting.
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import importlib.metadata
import inspect
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import gymnasium as gym
import scipy.stats
import torch
import yaml

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

JobT = TypeVar("JobT")

# ----------------------------------------------------------------------------------------------------------------
# Process set-up and provenance
# ----------------------------------------------------------------------------------------------------------------


def set_torch_threads(n_threads: int) -> None:
    """Use ``n_threads`` torch threads, intra-op and (where still allowed) inter-op.

    :param n_threads: number of threads
    """
    torch.set_num_threads(n_threads)
    with contextlib.suppress(RuntimeError):  # torch allows it only before the first inter-op parallel work
        torch.set_num_interop_threads(n_threads)


# Distribution names of the modules whose name differs from the name pip knows them by.
_DISTRIBUTIONS = {"sb3_softac": "sb3-softac", "stable_baselines3": "stable-baselines3", "sbx": "sbx-rl"}


def package_version(module: str) -> str:
    """
    :param module: an importable module name, e.g. ``sb3_softac``
    :return: the ``__version__`` of the module when it is imported (the code that actually runs, also from a
        source checkout), else the installed distribution's version, else ``"?"``
    """
    version = getattr(sys.modules.get(module), "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return "?"


def versions() -> dict[str, str]:
    """:return: the versions of Python and of the packages that matter for the results"""
    modules = ("sb3_softac", "stable_baselines3", "torch", "gymnasium", "mujoco")
    return {"python": platform.python_version(), **{module: package_version(module) for module in modules}}


def run_jobs(
    work: Callable[[JobT], dict[str, Any]],
    jobs: Sequence[JobT],
    n_workers: int,
    on_done: Callable[[dict[str, Any]], None],
) -> None:
    """Run ``work(job)`` for every job, in this process or in a pool of worker processes.

    :param work: a module-level function (workers must be able to unpickle it)
    :param jobs: its inputs, picklable
    :param n_workers: worker processes; 1 or less runs the jobs here, one after the other
    :param on_done: sees each result as soon as it is ready (e.g. to rewrite the results file)
    """
    if n_workers <= 1:
        for job in jobs:
            on_done(work(job))
        return
    # fork where available: the workers inherit the imported modules (and sys.path) of the parent.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context(method)) as pool:
        for future in concurrent.futures.as_completed([pool.submit(work, job) for job in jobs]):
            on_done(future.result())


# ----------------------------------------------------------------------------------------------------------------
# Hyperparameters from the packaged RL Zoo files
# ----------------------------------------------------------------------------------------------------------------

# Zoo keys that are not constructor arguments: the policy name (the benchmarks always use "MlpPolicy") and the zoo's
# training budget (each benchmark sets its own).
_BUDGET_KEYS = frozenset({"policy", "n_timesteps"})


def _parse_dict_expression(text: str, where: str) -> dict[str, Any]:
    """
    :param text: a zoo value such as ``"dict(net_arch=[64, 64], use_expln=True)"``
    :param where: file and entry, for the error message
    :return: the dictionary, built without evaluating code (keyword values must be literals)
    """
    node = ast.parse(text, mode="eval").body
    if not (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args
    ):
        raise ValueError(f"{where}: expected a 'dict(key=literal, ...)' expression, got {text!r}")
    try:
        return {str(keyword.arg): ast.literal_eval(keyword.value) for keyword in node.keywords}
    except ValueError as error:
        raise ValueError(f"{where}: {text!r} holds a value that is not a literal ({error})") from None


def zoo_hyperparams(env_id: str, file_name: str = "softac.yml") -> dict[str, Any]:
    """Constructor arguments of ``SAC`` for ``env_id`` from one of the hyperparameter files shipped with sb3_softac.

    The entry of ``env_id`` is used, or the ``default`` entry when the file has one and ``env_id`` is not listed.
    ``policy_kwargs`` strings become dictionaries. Settings that only the RL Zoo understands (environment wrappers,
    normalisation, several envs, ``lin_`` schedules, classes named by strings) are refused: a benchmark that
    dropped them would train something else than the file describes.

    :param env_id: Gymnasium id
    :param file_name: ``softac.yml`` (SAC, the same settings as the zoo's ``sac.yml``), ``softac_droq.yml`` or
        ``softac_redq.yml``
    :return: keyword arguments for ``SAC(...)``, JSON-serialisable
    :raises KeyError: when the file lists neither ``env_id`` nor a ``default`` entry
    :raises ValueError: for settings the plain constructor cannot take
    """
    # Imported here, not at the top: memory.py's workers import this module and measure the memory of the one
    # implementation they import, which must not include sb3_softac when it is SB3's turn.
    from sb3_softac import SAC
    from sb3_softac.hyperparams import HYPERPARAMS_DIR

    path = HYPERPARAMS_DIR / file_name
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    key = env_id if env_id in entries else "default"
    if key not in entries:
        raise KeyError(f"{path} has no entry for {env_id} and no 'default' entry")
    where = f"{path}, entry {key}"
    settings = {name: value for name, value in entries[key].items() if name not in _BUDGET_KEYS}
    parameters = inspect.signature(SAC.__init__).parameters
    zoo_only = sorted(name for name in settings if name not in parameters)
    if zoo_only:
        raise ValueError(
            f"{where}: {', '.join(zoo_only)} are RL Zoo settings, not arguments of SAC; the benchmarks build SAC "
            "directly. Run this environment through `sb3-softac-zoo train` instead."
        )
    for name, value in list(settings.items()):
        if name.endswith("_kwargs") and isinstance(value, str):
            settings[name] = _parse_dict_expression(value, f"{where}, {name}")
        # Other strings are SAC's own values ("auto" for ent_coef, "mean" for actor_q_reduction...), which SAC checks.
        elif isinstance(value, str) and (value.startswith("lin_") or name.endswith("_class")):
            raise ValueError(
                f"{where}: {name}={value!r} is interpreted by the RL Zoo (a schedule or a class path), not by SAC; "
                "run this environment through `sb3-softac-zoo train` instead."
            )
    return settings


# The packaged zoo file of each high update-to-data method. They list MuJoCo tasks only, all with the same settings
# (one YAML anchor per file): the HalfCheetah-v5 entry stands for them on an environment the file does not list.
METHOD_FILES = {"REDQ": "softac_redq.yml", "DroQ": "softac_droq.yml"}
METHOD_ENTRY = "HalfCheetah-v5"


def method_hyperparams(method: str, env_id: str = METHOD_ENTRY) -> dict[str, Any]:
    """Constructor arguments of ``SAC`` for a high update-to-data method, from its packaged zoo file.

    :param method: ``DroQ`` or ``REDQ`` (a key of ``METHOD_FILES``)
    :param env_id: Gymnasium id; its own entry when the file lists it, else the ``METHOD_ENTRY`` entry (the
        files' MuJoCo settings, e.g. for Pendulum-v1)
    :return: keyword arguments for ``SAC(...)``, the whole entry (budget settings such as ``learning_starts``
        included), JSON-serialisable
    :raises ValueError: for an unknown method
    """
    if method not in METHOD_FILES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_FILES)}")
    try:
        return zoo_hyperparams(env_id, METHOD_FILES[method])
    except KeyError:
        return zoo_hyperparams(METHOD_ENTRY, METHOD_FILES[method])


# ----------------------------------------------------------------------------------------------------------------
# The evaluation rule
# ----------------------------------------------------------------------------------------------------------------

# Evaluation episodes start from seeds far above the training seeds (0, 1, ...), so they never replay a training
# episode's start state.
EVAL_SEED_OFFSET = 1_000_000
MAX_EVAL_EPISODES = 1_000


def evaluate(model: Any, env_id: str, run_seed: int, n_episodes: int) -> list[float]:
    """Undiscounted returns of ``n_episodes`` deterministic episodes on a fresh environment.

    Episode ``i`` starts from ``reset(seed=EVAL_SEED_OFFSET + MAX_EVAL_EPISODES * run_seed + i)``: every
    implementation, setting and evaluation of one run seed sees the same start states, and different run seeds
    different ones.

    :param model: anything with SB3's ``predict``
    :param env_id: Gymnasium id
    :param run_seed: the seed the model was trained with
    :param n_episodes: number of episodes, at most ``MAX_EVAL_EPISODES``
    :return: one return per episode
    """
    if not 0 < n_episodes <= MAX_EVAL_EPISODES:
        raise ValueError(f"n_episodes={n_episodes}: evaluate between 1 and {MAX_EVAL_EPISODES} episodes")
    env = gym.make(env_id)
    returns = []
    for episode in range(n_episodes):
        obs, _ = env.reset(seed=EVAL_SEED_OFFSET + MAX_EVAL_EPISODES * run_seed + episode)
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = bool(terminated or truncated)
        returns.append(total)
    env.close()
    return returns


# ----------------------------------------------------------------------------------------------------------------
# Statistics and reports
# ----------------------------------------------------------------------------------------------------------------


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """
    :param values: one number per seed
    :return: the mean and the half-width ``t(0.975, n - 1) * sd / sqrt(n)`` of the two-sided 95% t confidence
        interval (nan for fewer than two values)
    """
    mean = statistics.fmean(values) if values else math.nan
    if len(values) < 2:
        return mean, math.nan
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(scipy.stats.t.ppf(0.975, len(values) - 1)) * sem


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """
    :param a: one number per seed of the first group
    :param b: one number per seed of the second group
    :return: the two-sided p-value of Welch's unequal-variance t-test; nan when a group has fewer than two values;
        1 for two constant, equal groups and 0 for two constant, different ones (where the statistic is undefined)
    """
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if statistics.variance(a) + statistics.variance(b) == 0.0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    return float(scipy.stats.ttest_ind(a, b, equal_var=False).pvalue)


def fmt_number(value: float, digits: int = 1) -> str:
    """
    :param value: a number, possibly nan
    :param digits: decimals
    :return: the number formatted, or ``n/a`` for nan
    """
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def write_results_json(path: Path, meta: dict[str, Any], runs: Sequence[dict[str, Any]]) -> None:
    """(Re)write the raw results atomically, so that an interrupted benchmark leaves a complete file.

    :param path: the JSON file
    :param meta: what the run was (command, budgets, versions...)
    :param runs: one dictionary per finished run
    """
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "runs": list(runs)}, fh, indent=1)
    os.replace(tmp, path)
