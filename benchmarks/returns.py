"""Learning-parity benchmark: final returns of ``sb3_softac.SAC`` vs ``stable_baselines3.SAC``.

For every configuration (env, training budget, seeds) both implementations are trained with identical
hyper-parameters (the environment's entry of the packaged ``softac.yml``, which holds the RL Zoo's ``sac.yml``
settings; SB3 defaults for environments it does not list) and identical seeds. Every
``--eval-every`` steps the deterministic policy is evaluated (``--curve-episodes`` episodes) for the learning curve;
at the end it is evaluated on ``--eval-episodes`` (default 10) episodes. Per configuration the script reports
the mean final return over seeds with a 95% t-confidence interval for each implementation, and the two-sided
Welch t-test p-value of the difference; it writes a markdown table, a learning-curve PNG (mean +- 95% CI band)
and the raw per-seed results as JSON (``--from-json`` regenerates table and plots without training).

Presets: ``--preset pendulum`` (Pendulum-v1, 20k steps, 5 seeds), ``--preset mujoco`` (HalfCheetah-v5, 50k steps,
3 seeds), ``--preset all`` (both, default). Custom: ``--env Hopper-v5 --steps 50000 --seeds 3``.
Jobs (one per implementation x seed) run in ``--jobs`` worker processes, each with one torch thread.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
    welch_p_value,
    write_results_json,
    zoo_hyperparams,
)

# (role, label, module) of the two implementations, ours first.
IMPLEMENTATIONS = (("ours", "sb3_softac", "sb3_softac"), ("ref", "SB3", "stable_baselines3"))


@dataclass(frozen=True)
class Config:
    """One comparison: env, training budget, number of seeds, evaluation schedule."""

    env_id: str
    steps: int
    seeds: int
    eval_every: int


PRESETS: dict[str, list[Config]] = {
    "pendulum": [Config("Pendulum-v1", 20_000, 5, 2_000)],
    "mujoco": [Config("HalfCheetah-v5", 50_000, 3, 5_000)],
}
PRESETS["all"] = PRESETS["mujoco"] + PRESETS["pendulum"]


@dataclass(frozen=True)
class Job:
    """One training run (picklable, executed in a worker process)."""

    env_id: str
    steps: int
    seed: int
    role: str  # "ours" or "ref"
    label: str
    module: str
    hyperparams: dict[str, Any]
    eval_every: int
    eval_episodes: int
    curve_episodes: int


# --------------------------------------------------------------------------------------------------------------
# Training worker
# --------------------------------------------------------------------------------------------------------------


def run_job(job: Job) -> dict[str, Any]:
    """Train one model in chunks of ``eval_every`` steps, evaluating after each chunk and at the end.

    Training is split into ``learn(chunk, reset_num_timesteps=False)`` calls, which continue the same episode,
    replay buffer and schedules, so that no callback API of the implementation under test is needed.
    """
    set_torch_threads(1)
    sac_cls = importlib.import_module(job.module).SAC
    start = time.perf_counter()
    # A copy: SB3 writes into the policy_kwargs it is given, and the results record the arguments as given.
    hyperparams = copy.deepcopy(job.hyperparams)
    model = sac_cls("MlpPolicy", gym.make(job.env_id), seed=job.seed, verbose=0, **hyperparams)
    curve_steps = [0]
    curve_returns = [statistics.fmean(evaluate(model, job.env_id, job.seed, job.curve_episodes))]
    train_s = 0.0
    done = 0
    while done < job.steps:
        chunk = min(job.eval_every, job.steps - done)
        t0 = time.perf_counter()
        model.learn(total_timesteps=chunk, reset_num_timesteps=done == 0)
        train_s += time.perf_counter() - t0
        done = int(model.num_timesteps)
        if done < job.steps:
            curve_steps.append(done)
            curve_returns.append(statistics.fmean(evaluate(model, job.env_id, job.seed, job.curve_episodes)))
    final = evaluate(model, job.env_id, job.seed, job.eval_episodes)
    curve_steps.append(done)
    curve_returns.append(statistics.fmean(final))
    return {
        **asdict(job),
        "trained_steps": done,
        "curve_steps": curve_steps,
        "curve_returns": curve_returns,
        "final_returns": final,
        "final_mean": statistics.fmean(final),
        "train_s": train_s,
        "wall_s": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def _groups(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, int], dict[str, list[dict[str, Any]]]]:
    """Runs grouped by (env, steps) then by role, each list sorted by seed."""
    grouped: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    for run in sorted(runs, key=lambda r: (r["env_id"], r["steps"], r["role"], r["seed"])):
        grouped.setdefault((run["env_id"], run["steps"]), {}).setdefault(run["role"], []).append(run)
    return grouped


def _label(runs: Sequence[dict[str, Any]], default: str) -> str:
    """Display label of a group of runs."""
    return str(runs[0]["label"]) if runs else default


def render_table(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown summary table plus a per-seed table."""
    lines = [
        "| env | steps | seeds | algo (ours) | ours final return (mean +- 95% CI) | SB3 final return (mean +- 95% CI) "
        "| diff ours - SB3 | Welch p | train min/run ours / SB3 |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    per_seed = [
        "| env | steps | algo | seed | final return (mean of eval episodes) | train s |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for (env_id, steps), by_role in _groups(runs).items():
        ours, ref = by_role.get("ours", []), by_role.get("ref", [])
        ours_vals = [r["final_mean"] for r in ours]
        ref_vals = [r["final_mean"] for r in ref]
        o_mean, o_ci = mean_ci95(ours_vals)
        r_mean, r_ci = mean_ci95(ref_vals)
        p_value = welch_p_value(ours_vals, ref_vals)
        o_min = statistics.fmean(r["train_s"] for r in ours) / 60 if ours else math.nan
        r_min = statistics.fmean(r["train_s"] for r in ref) / 60 if ref else math.nan
        lines.append(
            f"| {env_id} | {steps} | {max(len(ours), len(ref))} | {_label(ours, 'ours')} "
            f"| {fmt_number(o_mean)} +- {fmt_number(o_ci)} | {fmt_number(r_mean)} +- {fmt_number(r_ci)} "
            f"| {fmt_number(o_mean - r_mean)} "
            f"| {fmt_number(p_value, 3)} | {fmt_number(o_min)} / {fmt_number(r_min)} |"
        )
        for run in ours + ref:
            per_seed.append(
                f"| {env_id} | {steps} | {run['label']} | {run['seed']} | {run['final_mean']:.1f} "
                f"| {run['train_s']:.0f} |"
            )
    return "\n".join(lines) + "\n\nPer seed:\n\n" + "\n".join(per_seed)


def plot_curves(runs: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per (env, steps): mean deterministic return vs env steps with a 95% CI band per implementation."""
    # Imported here: only a run that plots needs matplotlib, and the file backend must be chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (env_id, steps), by_role in _groups(runs).items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for role, color in (("ours", "tab:blue"), ("ref", "tab:orange")):
            group = by_role.get(role, [])
            if not group:
                continue
            n_points = min(len(r["curve_steps"]) for r in group)
            xs = [statistics.fmean(r["curve_steps"][i] for r in group) for i in range(n_points)]
            stats = [mean_ci95([r["curve_returns"][i] for r in group]) for i in range(n_points)]
            means = [m for m, _ in stats]
            half = [0.0 if math.isnan(h) else h for _, h in stats]
            ax.plot(xs, means, color=color, label=f"{_label(group, role)} (n={len(group)})")
            ax.fill_between(
                xs,
                [m - h for m, h in zip(means, half, strict=True)],
                [m + h for m, h in zip(means, half, strict=True)],
                color=color,
                alpha=0.2,
            )
        ax.set_title(f"SAC on {env_id}, {steps} steps (mean +- 95% CI over seeds)")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("deterministic episode return")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"returns_{env_id}_{steps}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def report(runs: Sequence[dict[str, Any]], out_dir: Path, tag: str, header: str) -> str:
    """Print and save the markdown report; write the learning-curve PNGs."""
    text = f"{header}\n\n{render_table(runs)}\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plot_curves(runs, out_dir)
    (out_dir / f"returns_{tag}.md").write_text(text, encoding="utf-8")
    print(text + "\nLearning curves: " + ", ".join(str(p) for p in pngs), flush=True)
    return text


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="predefined configs (default all)")
    parser.add_argument("--env", default=None, help="custom env id (instead of a preset)")
    parser.add_argument("--steps", type=int, default=None, help="custom training budget in env steps")
    parser.add_argument("--seeds", type=int, default=None, help="custom number of seeds (0..N-1)")
    parser.add_argument("--eval-every", type=int, default=None, help="learning-curve eval period (default steps/10)")
    parser.add_argument("--eval-episodes", type=int, default=10, help="final deterministic eval episodes (10)")
    parser.add_argument("--curve-episodes", type=int, default=5, help="episodes per learning-curve point (5)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        help="parallel worker processes (default: available CPUs)",
    )
    parser.add_argument("--net-arch", type=int, nargs="+", default=None, help="override hidden sizes (both algos)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None, help="only regenerate table/plots")
    args = parser.parse_args(argv)
    custom = (args.env, args.steps, args.seeds)
    if args.from_json is None and args.preset is not None and any(v is not None for v in custom):
        parser.error("use either --preset or --env/--steps/--seeds")
    if args.env is None and (args.steps is not None or args.seeds is not None):
        parser.error("--steps/--seeds need --env")
    return args


def build_configs(args: argparse.Namespace) -> tuple[str, list[Config]]:
    """Output tag and the configs to run."""
    if args.env is None:
        preset = args.preset or "all"
        configs = PRESETS[preset]
        if args.eval_every is not None:
            configs = [Config(c.env_id, c.steps, c.seeds, args.eval_every) for c in configs]
        return preset, configs
    steps = args.steps or 20_000
    config = Config(args.env, steps, args.seeds or 3, args.eval_every or max(1, steps // 10))
    return f"{args.env}_{steps}", [config]


def build_jobs(configs: Sequence[Config], args: argparse.Namespace) -> list[Job]:
    """Jobs ordered by config (longest budget first) then seed, alternating implementations."""
    jobs = []
    for config in sorted(configs, key=lambda c: -c.steps):
        hyperparams = zoo_hyperparams(config.env_id)
        if args.net_arch:
            hyperparams["policy_kwargs"] = {**hyperparams.get("policy_kwargs", {}), "net_arch": list(args.net_arch)}
        for seed in range(config.seeds):
            for role, label, module in IMPLEMENTATIONS:
                jobs.append(
                    Job(
                        config.env_id,
                        config.steps,
                        seed,
                        role,
                        label,
                        module,
                        hyperparams,
                        config.eval_every,
                        args.eval_episodes,
                        args.curve_episodes,
                    )
                )
    return jobs


def main(argv: Sequence[str] | None = None) -> str:
    """Train (or load with ``--from-json``), print and save the report. Returns the markdown text."""
    args = parse_args(argv)
    set_torch_threads(1)  # the parent process too
    out_dir: Path = args.out
    if args.from_json is not None:
        runs: list[dict[str, Any]] = []
        metas = []
        for path in args.from_json:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
            runs += payload["runs"]
            metas.append(payload.get("meta", {}))
        tag = "_".join(Path(p).stem.removeprefix("returns_") for p in args.from_json)
        header = f"## SAC final-return parity (from {', '.join(str(p) for p in args.from_json)})"
        if metas and "versions" in metas[0]:
            header += f"\n\nversions: {metas[0]['versions']}"
        return report(runs, out_dir, tag, header)

    tag, configs = build_configs(args)
    jobs = build_jobs(configs, args)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"returns_{tag}.json"
    meta = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "configs": [asdict(c) for c in configs],
        "eval_episodes": args.eval_episodes,
        "curve_episodes": args.curve_episodes,
        "versions": versions(),
    }
    runs = []
    start = time.perf_counter()
    print(f"{len(jobs)} jobs on {args.jobs} worker(s); raw results -> {json_path}", file=sys.stderr, flush=True)

    def on_done(result: dict[str, Any]) -> None:
        runs.append(result)
        write_results_json(json_path, meta, runs)
        print(
            f"[{len(runs)}/{len(jobs)} {time.perf_counter() - start:.0f}s] {result['env_id']} {result['label']} "
            f"seed {result['seed']}: final {result['final_mean']:.1f} (train {result['train_s']:.0f}s)",
            file=sys.stderr,
            flush=True,
        )

    run_jobs(run_job, jobs, args.jobs, on_done)
    hyperparams = {job.env_id: job.hyperparams for job in jobs}
    header = (
        f"## SAC final-return parity ({tag})\n\n"
        f"Deterministic return of the final policy, mean over {args.eval_episodes} episodes per seed; "
        f"hyper-parameters on top of the defaults (packaged softac.yml = RL Zoo sac.yml): {hyperparams}; "
        f"versions: {meta['versions']}"
    )
    return report(runs, out_dir, tag, header)


if __name__ == "__main__":
    main()
