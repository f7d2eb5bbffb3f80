"""Learning-parity benchmark: final returns of ``sb3_softac.SAC`` vs ``stable_baselines3.SAC``.

For every configuration (env, training budget, seeds) both implementations are trained with identical
hyper-parameters (RL-Zoo ``hyperparams/sac.yml`` settings, SB3 defaults otherwise) and identical seeds. Every
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
import concurrent.futures
import contextlib
import datetime
import importlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
REF_MODULE = "stable_baselines3"

# Settings from rl_zoo3 2.x hyperparams/sac.yml. The zoo lists the MuJoCo envs as *-v4 ("mujoco-defaults":
# only learning_starts=10000 on top of SB3's defaults); the same settings are used for *-v5 here.
_MUJOCO = {"learning_starts": 10_000}
ZOO_HYPERPARAMS: dict[str, dict[str, Any]] = {
    "Pendulum-v1": {"learning_rate": 1e-3},
    **{f"{name}-v{v}": dict(_MUJOCO) for name in ("HalfCheetah", "Ant", "Hopper", "Walker2d") for v in (4, 5)},
    **{f"Humanoid-v{v}": dict(_MUJOCO) for v in (4, 5)},
    **{f"Swimmer-v{v}": {**_MUJOCO, "gamma": 0.999} for v in (4, 5)},
}


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
# Statistics (scipy when available, otherwise an own Student-t implementation)
# --------------------------------------------------------------------------------------------------------------


def _betainc_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz algorithm)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return frac


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betainc_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betainc_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t distribution (bisection on :func:`t_cdf`)."""
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _scipy_stats() -> Any:
    """``scipy.stats`` or None."""
    try:
        import scipy.stats
    except ImportError:
        return None
    return scipy.stats


def t_quantile(q: float, df: float) -> float:
    """Student-t quantile, from scipy when installed."""
    stats = _scipy_stats()
    return float(stats.t.ppf(q, df)) if stats is not None else t_ppf(q, df)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95% t confidence interval (nan for fewer than two values)."""
    mean = statistics.fmean(values) if values else math.nan
    if len(values) < 2:
        return mean, math.nan
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, t_quantile(0.975, len(values) - 1) * sem


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's unequal-variance t-test (nan when a group has fewer than two values)."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0.0:
        return 1.0 if diff == 0.0 else 0.0
    stats = _scipy_stats()
    if stats is not None:
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    t_stat = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2.0 * t_cdf(-abs(t_stat), df)


# --------------------------------------------------------------------------------------------------------------
# Training worker
# --------------------------------------------------------------------------------------------------------------


def init_worker() -> None:
    """Per-process setup: one torch thread (intra- and inter-op)."""
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # only allowed once, before inter-op parallel work
        torch.set_num_interop_threads(1)


def evaluate(model: Any, env: Any, n_episodes: int) -> list[float]:
    """Undiscounted returns of ``n_episodes`` deterministic episodes (env RNG continues between calls)."""
    returns = []
    for _ in range(n_episodes):
        obs, _ = env.reset()
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = bool(terminated or truncated)
        returns.append(total)
    return returns


def _make_eval_env(env_id: str, seed: int) -> Any:
    """Evaluation env whose episode start states depend only on the seed (same for both implementations)."""
    import gymnasium as gym

    env = gym.make(env_id)
    env.reset(seed=1_000_000 + seed)
    return env


def run_job(job: Job) -> dict[str, Any]:
    """Train one model in chunks of ``eval_every`` steps, evaluating after each chunk and at the end.

    Training is split into ``learn(chunk, reset_num_timesteps=False)`` calls, which continue the same episode,
    replay buffer and schedules, so that no callback API of the implementation under test is needed.
    """
    import gymnasium as gym

    init_worker()
    sac_cls = importlib.import_module(job.module).SAC
    start = time.perf_counter()
    model = sac_cls("MlpPolicy", gym.make(job.env_id), seed=job.seed, verbose=0, **job.hyperparams)
    curve_env = _make_eval_env(job.env_id, job.seed)
    curve_steps = [0]
    curve_returns = [statistics.fmean(evaluate(model, curve_env, job.curve_episodes))]
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
            curve_returns.append(statistics.fmean(evaluate(model, curve_env, job.curve_episodes)))
    final = evaluate(model, _make_eval_env(job.env_id, job.seed), job.eval_episodes)
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


def fmt_number(value: float, digits: int = 1) -> str:
    """Number or 'n/a' for nan."""
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


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


def write_results_json(path: Path, meta: dict[str, Any], runs: Sequence[dict[str, Any]]) -> None:
    """Atomically (re)write the raw results file."""
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "runs": list(runs)}, fh, indent=1)
    os.replace(tmp, path)


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


def _versions(ours_module: str) -> dict[str, str]:
    """Versions of the packages that matter for the results."""
    out = {"python": platform.python_version()}
    for name, dist in (
        (ours_module, ours_module),
        ("sb3", "stable-baselines3"),
        ("torch", "torch"),
        ("gymnasium", "gymnasium"),
        ("mujoco", "mujoco"),
    ):
        try:
            out[name] = importlib.metadata.version(dist.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = "?"
    return out


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
    # Development switch: module providing the "ours" SAC (e.g. stable_baselines3 to test the script itself).
    parser.add_argument("--ours-module", default="sb3_softac", help=argparse.SUPPRESS)
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
    ours_label = "sb3_softac" if args.ours_module == "sb3_softac" else f"ours[{args.ours_module}]"
    jobs = []
    for config in sorted(configs, key=lambda c: -c.steps):
        hyperparams = dict(ZOO_HYPERPARAMS.get(config.env_id, {}))
        if args.net_arch:
            hyperparams["policy_kwargs"] = {"net_arch": list(args.net_arch)}
        for seed in range(config.seeds):
            for role, label, module in (("ours", ours_label, args.ours_module), ("ref", "SB3", REF_MODULE)):
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


def run_jobs(jobs: Sequence[Job], n_workers: int, on_done: Callable[[dict[str, Any]], None]) -> None:
    """Run jobs in-process (one worker) or in a process pool; ``on_done`` sees each result as it completes."""
    if n_workers <= 1:
        for job in jobs:
            on_done(run_job(job))
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=init_worker) as pool:
        futures = [pool.submit(run_job, job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            on_done(future.result())


def main(argv: Sequence[str] | None = None) -> str:
    """Train (or load with ``--from-json``), print and save the report. Returns the markdown text."""
    args = parse_args(argv)
    init_worker()  # the parent process also uses a single torch thread
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
        "versions": _versions(args.ours_module),
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

    run_jobs(jobs, args.jobs, on_done)
    hyperparams = {job.env_id: job.hyperparams for job in jobs}
    header = (
        f"## SAC final-return parity ({tag})\n\n"
        f"Deterministic return of the final policy, mean over {args.eval_episodes} episodes per seed; "
        f"hyper-parameters on top of the defaults (RL-Zoo sac.yml): {hyperparams}; versions: {meta['versions']}"
    )
    return report(runs, out_dir, tag, header)


if __name__ == "__main__":
    main()
