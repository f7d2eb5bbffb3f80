"""Sample efficiency of the critic options: SAC vs DroQ-style vs REDQ-style ``sb3_softac.SAC`` at equal env steps.

Three settings of the same class, trained on the same environments with the same seeds and networks, their
hyperparameters read from the RL Zoo files shipped with the package:

* ``SAC``: the environment's ``softac.yml`` entry (the zoo's SAC settings: one gradient step per environment step,
  2 critics, no dropout, no layer norm);
* ``DroQ``: plus the settings of ``softac_droq.yml`` (2 critics with dropout and layer norm, Hiraoka et al. 2022),
  with ``--utd`` gradient steps per environment step and the actor and temperature updated once per environment step;
* ``REDQ``: plus the settings of ``softac_redq.yml`` (10 critics, target minimum over a random pair of them, actor on
  the ensemble mean, Chen et al. 2021), with the same ``--utd`` and actor schedule.

Every run is evaluated at the end on ``--eval-episodes`` deterministic episodes (``common.evaluate``: start states
depend on the run seed only, so all settings see the same ones). The report gives, per env and setting, the mean
final return over seeds with a 95% t confidence interval, and the wall-clock cost per environment step (wall time of
``learn()`` divided by its environment steps: acting, env stepping, replay and gradient steps), over the whole run
and over the learning phase after ``learning_starts``, and the process CPU time per step of the learning phase, with
its ratio to SAC's (CPU time is the steadier measure on a shared machine). Results are written as JSON and a
markdown table under ``--out`` (default ``benchmarks/results/``); ``--from-json`` re-renders them.

Default budgets (sized to take about an hour with ``--jobs 2`` on a 2-core machine): Pendulum-v1 5k steps,
Hopper-v5 8k steps, 3 seeds, UTD 5. ``--quick`` is a smoke run of a few seconds.
Each worker process uses one torch thread.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
from common import (
    DEFAULT_OUT,
    evaluate,
    fmt_number,
    mean_ci95,
    run_jobs,
    set_torch_threads,
    versions,
    write_results_json,
    zoo_hyperparams,
)

from sb3_softac import SAC

SETTINGS = ("SAC", "DroQ", "REDQ")


@dataclass(frozen=True)
class EnvBudget:
    """Training budget and network shared by every setting on one environment (the other hyperparameters come from
    the packaged RL Zoo files, see :func:`setting_kwargs`)."""

    env_id: str
    steps: int
    learning_starts: int
    net_arch: tuple[int, ...]
    batch_size: int = 256


# Hopper-v5: learning_starts cut from the zoo's 10k to 1k to fit the budget (REDQ and DroQ start learning after 5k).
# The networks are smaller than the usual 256 x 256 so that 10 critics at UTD 5 fit in the hour; every setting uses
# the same network.
BUDGETS: dict[str, EnvBudget] = {
    "Pendulum-v1": EnvBudget("Pendulum-v1", 5_000, 100, (64, 64)),
    "Hopper-v5": EnvBudget("Hopper-v5", 8_000, 1_000, (128, 128)),
}
QUICK_BUDGETS: dict[str, EnvBudget] = {
    "Pendulum-v1": EnvBudget("Pendulum-v1", 150, 50, (16, 16), batch_size=32),
    "Hopper-v5": EnvBudget("Hopper-v5", 150, 50, (16, 16), batch_size=32),
}

# The packaged zoo file of each high update-to-data setting. They list MuJoCo tasks only, all with the same settings:
# Hopper-v5's entry stands for them on every environment.
METHOD_FILES = {"DroQ": "softac_droq.yml", "REDQ": "softac_redq.yml"}
METHOD_ENTRY = "Hopper-v5"


def setting_kwargs(setting: str, budget: EnvBudget, utd: int) -> dict[str, Any]:
    """Keyword arguments of ``sb3_softac.SAC`` for one setting on one environment.

    Every setting starts from the environment's entry of the packaged ``softac.yml`` (the zoo's SAC settings, e.g.
    Pendulum's learning rate). DroQ and REDQ add what defines them in their zoo files (critic options, the number
    of critics, the target subset, the actor's rule...), with ``gradient_steps`` scaled to ``utd`` and
    ``policy_delay`` scaled alike (the files update the actor once per environment step). The budget's
    ``learning_starts``, batch size and network apply to all three.

    :param setting: ``SAC``, ``DroQ`` or ``REDQ``
    :param budget: the environment's budget
    :param utd: gradient steps per environment step of DroQ and REDQ
    :return: the constructor arguments
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    kwargs = zoo_hyperparams(budget.env_id)
    policy_kwargs: dict[str, Any] = dict(kwargs.get("policy_kwargs", {}))
    if setting in METHOD_FILES:
        method = zoo_hyperparams(METHOD_ENTRY, METHOD_FILES[setting])
        policy_kwargs.update(method.pop("policy_kwargs", {}))
        zoo_utd, zoo_delay = method.pop("gradient_steps"), method.pop("policy_delay")
        for name in ("learning_rate", "learning_starts", "batch_size", "buffer_size"):  # the zoo's budget
            method.pop(name, None)
        kwargs.update(method, gradient_steps=utd, policy_delay=utd * zoo_delay // zoo_utd)
    policy_kwargs["net_arch"] = list(budget.net_arch)
    kwargs.update(
        learning_starts=budget.learning_starts,
        batch_size=budget.batch_size,
        buffer_size=max(budget.steps, 1_000),
        policy_kwargs=policy_kwargs,
    )
    return kwargs


@dataclass(frozen=True)
class Job:
    """One training run, executed in a worker process."""

    budget: EnvBudget
    setting: str
    seed: int
    utd: int
    eval_episodes: int
    kwargs: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Worker
# ----------------------------------------------------------------------------------------------------------------


def run_job(job: Job) -> dict[str, Any]:
    """Train one model for the budget, time the whole ``learn()``, then evaluate it."""
    set_torch_threads(1)
    # A copy: SB3 writes into the policy_kwargs it is given, and the results record the arguments as given.
    model = SAC("MlpPolicy", gym.make(job.budget.env_id), seed=job.seed, verbose=0, **copy.deepcopy(job.kwargs))
    # Two calls that continue each other (same episode, buffer and schedules): the random-action warm-up, then the
    # learning phase, whose cost per step is the one that matters for long runs.
    # Process CPU time is reported next to wall time: on a shared machine it is the steadier of the two.
    start, cpu_start = time.perf_counter(), time.process_time()
    model.learn(total_timesteps=job.budget.learning_starts)
    warmup_s, warmup_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    model.learn(total_timesteps=job.budget.steps - job.budget.learning_starts, reset_num_timesteps=False)
    learn_s, learn_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    learning_steps = max(int(model.num_timesteps) - job.budget.learning_starts, 1)
    returns = evaluate(model, job.budget.env_id, job.seed, job.eval_episodes)
    return {
        "env_id": job.budget.env_id,
        "steps": int(model.num_timesteps),
        "setting": job.setting,
        "utd": 1 if job.setting == "SAC" else job.utd,
        "seed": job.seed,
        "budget": asdict(job.budget),
        "kwargs": job.kwargs,
        "gradient_steps_done": int(model._n_updates),
        "learn_s": learn_s,
        "ms_per_env_step": 1_000.0 * learn_s / max(int(model.num_timesteps), 1),
        "ms_per_learning_step": 1_000.0 * (learn_s - warmup_s) / learning_steps,
        "learn_cpu_s": learn_cpu_s,
        "cpu_ms_per_learning_step": 1_000.0 * (learn_cpu_s - warmup_cpu_s) / learning_steps,
        "final_returns": returns,
        "final_mean": statistics.fmean(returns),
    }


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def render_table(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one row per (env, setting), plus the per-seed returns."""
    lines = [
        "| env | env steps | setting | UTD | seeds | final return (mean +- 95% CI) | per seed "
        "| wall ms / env step (all) | wall ms / learning step | CPU ms / learning step | CPU cost vs SAC |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    order = list(BUDGETS)
    envs = sorted({run["env_id"] for run in runs}, key=lambda e: (order.index(e) if e in order else len(order), e))
    for env_id in envs:
        by_setting = {
            s: sorted((r for r in runs if r["env_id"] == env_id and r["setting"] == s), key=lambda r: r["seed"])
            for s in SETTINGS
        }
        sac_runs = by_setting["SAC"]
        sac_cpu = statistics.fmean(r["cpu_ms_per_learning_step"] for r in sac_runs) if sac_runs else math.nan
        for setting in SETTINGS:
            group = by_setting[setting]
            if not group:
                continue
            mean, half = mean_ci95([r["final_mean"] for r in group])
            cost = statistics.fmean(r["ms_per_env_step"] for r in group)
            learning_cost = statistics.fmean(r["ms_per_learning_step"] for r in group)
            cpu = statistics.fmean(r["cpu_ms_per_learning_step"] for r in group)
            per_seed = ", ".join(f"{r['final_mean']:.0f}" for r in group)
            lines.append(
                f"| {env_id} | {group[0]['steps']} | {setting} | {group[0]['utd']} | {len(group)} "
                f"| {fmt_number(mean)} +- {fmt_number(half)} | {per_seed} | {fmt_number(cost)} "
                f"| {fmt_number(learning_cost)} | {fmt_number(cpu)} "
                f"| {fmt_number(cpu / sac_cpu, 2)}x |"
            )
    return "\n".join(lines)


def _header(meta: dict[str, Any], runs: Sequence[dict[str, Any]]) -> str:
    budgets = "; ".join(
        f"{b['env_id']}: {b['steps']} steps, learning_starts {b['learning_starts']}, net {list(b['net_arch'])}, "
        f"batch {b['batch_size']}"
        for b in meta["budgets"]
    )
    arguments = {(run["env_id"], run["setting"]): run["kwargs"] for run in runs}
    listed = "\n".join(f"- {env_id} {setting}: `{kwargs}`" for (env_id, setting), kwargs in sorted(arguments.items()))
    return (
        f"Sample efficiency at equal environment steps ({meta['date']}, {meta['jobs']} jobs, 1 torch thread each; "
        f"command: `{meta['command']}`).\n\nBudgets: {budgets}. Arguments of SAC: the packaged zoo files "
        "(softac.yml for every setting, plus softac_droq.yml or softac_redq.yml with gradient_steps = UTD), with the "
        f"budget's learning_starts, batch size and network:\n\n{listed}\n\nFinal return: mean of "
        f"{meta['eval_episodes']} deterministic episodes per seed. Cost: wall time of `learn()` per env step over "
        "the whole run, and wall and process CPU time per env step after learning_starts (a learning step: one env "
        "step plus its UTD gradient steps). On a shared machine wall time depends on the load; CPU time and its "
        "ratio to SAC are the steadier numbers."
    )


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. n-1)")
    parser.add_argument("--utd", type=int, default=5, help="gradient steps per env step of DroQ and REDQ")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1: run in this process)")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="override the env-step budget of every env")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tag", default=None, help="file name stem (default: sample_efficiency[_quick])")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budgets and networks, UTD 2, 2 seeds")
    parser.add_argument("--from-json", type=Path, default=None, help="re-render a saved result file")
    parser.add_argument(
        "--resume", action="store_true", help="keep the finished runs of the result file and run only the others"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.utd, args.eval_episodes = min(args.seeds, 2), 2, 1
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Run (or re-render) the benchmark; return the markdown report."""
    args = parse_args(argv)
    if args.from_json is not None:
        data = json.loads(args.from_json.read_text(encoding="utf-8"))
        text = f"{_header(data['meta'], data['runs'])}\n\n{render_table(data['runs'])}\n"
        print(text)
        return text

    budgets = [(QUICK_BUDGETS if args.quick else BUDGETS)[env_id] for env_id in args.envs]
    if args.steps is not None:
        budgets = [
            dataclasses.replace(b, steps=args.steps, learning_starts=min(b.learning_starts, args.steps // 2))
            for b in budgets
        ]
    jobs = [
        Job(budget, setting, seed, args.utd, args.eval_episodes, setting_kwargs(setting, budget, args.utd))
        for budget in budgets
        for setting in args.settings
        for seed in range(args.seeds)
    ]
    # Longest first (REDQ/DroQ, bigger envs), so that the two workers finish together.
    weight = {"SAC": 1.0, "DroQ": 1.0 + args.utd, "REDQ": 1.0 + 2 * args.utd}
    jobs.sort(key=lambda j: -(j.budget.steps - j.budget.learning_starts) * weight[j.setting])

    tag = args.tag or ("sample_efficiency_quick" if args.quick else "sample_efficiency")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / f"{tag}.json", args.out / f"{tag}.md"
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/sample_efficiency.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "jobs": args.jobs,
        "utd": args.utd,
        "eval_episodes": args.eval_episodes,
        "budgets": [asdict(b) for b in budgets],
        "versions": versions(),
        "cpu_count": os.cpu_count(),
    }
    runs: list[dict[str, Any]] = []
    if args.resume and json_path.is_file():
        planned = {(j.budget.env_id, j.setting, j.seed, j.budget.steps) for j in jobs}
        runs = [
            r
            for r in json.loads(json_path.read_text(encoding="utf-8"))["runs"]
            if (r["env_id"], r["setting"], r["seed"], r["steps"]) in planned and r["utd"] in (1, args.utd)
        ]
        finished = {(r["env_id"], r["setting"], r["seed"]) for r in runs}
        jobs = [j for j in jobs if (j.budget.env_id, j.setting, j.seed) not in finished]
        print(f"resuming: {len(runs)} runs kept, {len(jobs)} to run", file=sys.stderr, flush=True)
    start = time.perf_counter()
    total = len(runs) + len(jobs)

    def done(run: dict[str, Any]) -> None:
        runs.append(run)
        write_results_json(json_path, meta, runs)
        print(
            f"[{time.perf_counter() - start:7.0f}s] {len(runs)}/{total} {run['env_id']} {run['setting']} "
            f"seed {run['seed']}: return {run['final_mean']:.1f}, {run['ms_per_env_step']:.1f} ms/env step",
            file=sys.stderr,
            flush=True,
        )

    run_jobs(run_job, jobs, args.jobs, done)
    meta["total_wall_s"] = time.perf_counter() - start
    write_results_json(json_path, meta, runs)
    text = f"{_header(meta, runs)}\n\n{render_table(runs)}\n\nTotal wall time: {meta['total_wall_s'] / 60:.1f} min.\n"
    md_path.write_text(text, encoding="utf-8")
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
