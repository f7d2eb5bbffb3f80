"""Learning-parity benchmark: final returns of ``sb3_softac.SAC`` vs ``stable_baselines3.SAC``, or of sb3_softac's
update engine vs its autograd update.

Two comparisons (``--compare``):

* ``sb3`` (default): ``sb3_softac.SAC`` vs ``stable_baselines3.SAC``, plain SAC.
* ``paths``: ``sb3_softac.SAC`` through its autograd-free update engine (``sb3_softac (engine)``:
  ``update_engine="auto"``, the engine wherever it covers the model; ``--engine-mode engine`` raises instead where it
  does not) vs the same model forced onto the autograd update (``sb3_softac (autograd)``,
  ``update_engine="autograd"``). Every run records ``update_path`` (the path it took, after every chunk of
  training) in the JSON and the report shows it, so that a run whose "engine" side fell back to autograd shows:
  the report then says that row compares autograd with autograd.

Settings (``--setting``): ``SAC`` (the environment's entry of the packaged ``softac.yml``, which holds the RL Zoo's
``sac.yml`` settings; SB3 defaults for environments it does not list), or ``DroQ`` / ``REDQ`` (``paths`` only: SB3's
SAC cannot run them), the whole entry of ``softac_droq.yml`` / ``softac_redq.yml`` for the env, their MuJoCo entry
for an env they do not list (Pendulum-v1): UTD 20, ``policy_delay`` 20, batch 256, learning rate 3e-4,
``learning_starts`` 5000, 256x256 networks and the method's critics. ``--learning-starts`` overrides
``learning_starts`` (5000 would leave nothing of a short Pendulum budget).

For every configuration (env, training budget, seeds) both sides are trained with identical hyper-parameters and
identical seeds. Every ``--eval-every`` steps the deterministic policy is evaluated (``--curve-episodes`` episodes)
for the learning curve; at the end it is evaluated on ``--eval-episodes`` (default 10) episodes. Per configuration
the script reports the mean final return over seeds with a 95% t-confidence interval for each implementation, and
the two-sided Welch t-test p-value of the difference; it writes a markdown table, a learning-curve PNG (mean +- 95%
CI band) and the raw per-seed results as JSON (``--from-json`` regenerates table and plots without training).

Presets: ``--preset pendulum`` (Pendulum-v1, 20k steps, 5 seeds), ``--preset mujoco`` (HalfCheetah-v5, 50k steps,
3 seeds), ``--preset all`` (both, default). Custom: ``--env Hopper-v5 --steps 50000 --seeds 3``.
Jobs (one per implementation x seed) run in ``--jobs`` worker processes, each with one torch thread.

``--preset droq-paths``: DroQ through the engine vs through autograd on Pendulum-v1, 2000 env steps with
``learning_starts=500``, 5 seeds per path, a curve point every 250 steps; the same as
``--env Pendulum-v1 --steps 2000 --seeds 5 --setting DroQ --compare paths --learning-starts 500 --eval-every 250``.
Sized for about 40 min of wall time with ``--jobs 2`` on 2 cores: 1500 learning steps x UTD 20 = 30,000 gradient
steps per run, at ~20 ms per autograd DroQ step (256x256, batch 256, one thread) 10 min per autograd run, at ~10 ms
5 min per engine run, 75 min of CPU in all; the jobs alternate paths seed by seed, so two workers finish after
about 40 min (evaluation, acting and the environment add well under a minute per run). The budget
is small: it tests that both paths learn alike from the same seeds, not how well DroQ ends up doing on Pendulum.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib
import json
import math
import os
import statistics
import sys
import time
import warnings
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
    method_hyperparams,
    run_jobs,
    set_torch_threads,
    versions,
    welch_p_value,
    write_results_json,
    zoo_hyperparams,
)

# (role, label, module, extra constructor arguments) of the two sides of each comparison, "ours" first. The
# engine side of "paths" gets --engine-mode as its update_engine.
COMPARISONS: dict[str, tuple[tuple[str, str, str, dict[str, Any]], ...]] = {
    "sb3": (("ours", "sb3_softac", "sb3_softac", {}), ("ref", "SB3", "stable_baselines3", {})),
    "paths": (
        ("ours", "sb3_softac (engine)", "sb3_softac", {"update_engine": "auto"}),
        ("ref", "sb3_softac (autograd)", "sb3_softac", {"update_engine": "autograd"}),
    ),
}
IMPLEMENTATIONS = tuple(impl[:3] for impl in COMPARISONS["sb3"])
# How the report names the two sides of each comparison, and what it compares.
SIDE_NAMES = {"sb3": ("ours", "SB3"), "paths": ("engine", "autograd")}
CAPTIONS = {
    "sb3": "sb3_softac.SAC vs stable_baselines3.SAC:",
    "paths": "sb3_softac.SAC through its update engine vs through its autograd update (same model, same seeds):",
}
SETTINGS = ("SAC", "DroQ", "REDQ")


@dataclass(frozen=True)
class Config:
    """One comparison: env, training budget, number of seeds, evaluation schedule, setting and sides."""

    env_id: str
    steps: int
    seeds: int
    eval_every: int
    setting: str = "SAC"
    compare: str = "sb3"
    #: overrides the setting's learning_starts when not None
    learning_starts: int | None = None


PRESETS: dict[str, list[Config]] = {
    "pendulum": [Config("Pendulum-v1", 20_000, 5, 2_000)],
    "mujoco": [Config("HalfCheetah-v5", 50_000, 3, 5_000)],
    "droq-paths": [Config("Pendulum-v1", 2_000, 5, 250, setting="DroQ", compare="paths", learning_starts=500)],
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
    setting: str = "SAC"
    compare: str = "sb3"
    #: constructor arguments of this side only (``update_engine`` for the paths comparison)
    impl_kwargs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Training worker
# --------------------------------------------------------------------------------------------------------------


def run_job(job: Job) -> dict[str, Any]:
    """Train one model in chunks of ``eval_every`` steps, evaluating after each chunk and at the end.

    Training is split into ``learn(chunk, reset_num_timesteps=False)`` calls, which continue the same episode,
    replay buffer and schedules, so that no callback API of the implementation under test is needed.

    sb3_softac models also record the update path they took (``update_path``, see :func:`path_summary`): after
    construction and after every chunk (a model can leave the engine during training, with a warning, which is
    recorded too), and, when the engine was asked for and not taken, why (the error ``update_engine="engine"``
    raises for this configuration).
    """
    set_torch_threads(1)
    sac_cls = importlib.import_module(job.module).SAC
    start = time.perf_counter()
    # A copy: SB3 writes into the policy_kwargs it is given, and the results record the arguments as given.
    hyperparams = {**copy.deepcopy(job.hyperparams), **job.impl_kwargs}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sac_cls("MlpPolicy", gym.make(job.env_id), seed=job.seed, verbose=0, **hyperparams)
        paths = [model.update_path] if hasattr(model, "update_path") else []
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
            if paths:
                paths.append(model.update_path)
            if done < job.steps:
                curve_steps.append(done)
                curve_returns.append(statistics.fmean(evaluate(model, job.env_id, job.seed, job.curve_episodes)))
        final = evaluate(model, job.env_id, job.seed, job.eval_episodes)
    path_warnings = list(dict.fromkeys(str(w.message) for w in caught if "update path" in str(w.message)))
    for warning in caught:  # the others stay visible
        if "update path" not in str(warning.message):
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    curve_steps.append(done)
    curve_returns.append(statistics.fmean(final))
    fell_back = job.impl_kwargs.get("update_engine") == "auto" and "autograd" in paths
    return {
        **asdict(job),
        "update_path": path_summary(paths) if paths else None,
        "update_paths": paths,
        "update_path_warnings": path_warnings,
        "engine_declined": _engine_declined(job, hyperparams) if fell_back else None,
        "trained_steps": done,
        "curve_steps": curve_steps,
        "curve_returns": curve_returns,
        "final_returns": final,
        "final_mean": statistics.fmean(final),
        "train_s": train_s,
        "wall_s": time.perf_counter() - start,
    }


def path_summary(paths: Sequence[str]) -> str:
    """One word for the update paths a run took: ``engine`` or ``autograd`` when it kept one, else the sequence
    of paths it went through (``engine -> autograd``)."""
    changes = [path for index, path in enumerate(paths) if index == 0 or path != paths[index - 1]]
    return " -> ".join(changes)


def _engine_declined(job: Job, hyperparams: dict[str, Any]) -> str | None:
    """Why the engine does not take this configuration: the error of ``update_engine="engine"`` (None: it takes it)."""
    sac_cls = importlib.import_module(job.module).SAC
    try:
        sac_cls(
            "MlpPolicy", gym.make(job.env_id), seed=job.seed, verbose=0, **{**hyperparams, "update_engine": "engine"}
        )
    except ValueError as error:
        return str(error)
    return None


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


GroupKey = tuple[str, str, str, int]  # compare, setting, env, steps


def _kind(run: dict[str, Any]) -> tuple[str, str]:
    """(comparison, setting) of a run; runs recorded before both existed are SB3 comparisons of plain SAC."""
    return str(run.get("compare", "sb3")), str(run.get("setting", "SAC"))


def _order(run: dict[str, Any]) -> tuple[Any, ...]:
    """Sort key: comparisons and settings in their declared order, then env, steps, role and seed."""
    compare, setting = _kind(run)
    kind = (list(COMPARISONS).index(compare) if compare in COMPARISONS else len(COMPARISONS), compare)
    place = (SETTINGS.index(setting) if setting in SETTINGS else len(SETTINGS), setting)
    return (*kind, *place, run["env_id"], run["steps"], run["role"], run["seed"])


def _groups(runs: Sequence[dict[str, Any]]) -> dict[GroupKey, dict[str, list[dict[str, Any]]]]:
    """Runs grouped by (comparison, setting, env, steps) then by role, each list sorted by seed."""
    grouped: dict[GroupKey, dict[str, list[dict[str, Any]]]] = {}
    for run in sorted(runs, key=_order):
        grouped.setdefault((*_kind(run), run["env_id"], run["steps"]), {}).setdefault(run["role"], []).append(run)
    return grouped


def _label(runs: Sequence[dict[str, Any]], default: str) -> str:
    """Display label of a group of runs."""
    return str(runs[0]["label"]) if runs else default


def path_cell(runs: Sequence[dict[str, Any]]) -> str:
    """The update paths a group of runs took, counted: ``engine x5``, ``autograd x3, engine x2``; ``-`` for runs
    without one (SB3's, or recorded before the paths were)."""
    counts: dict[str, int] = {}
    for run in runs:
        path = run.get("update_path") or "-"
        counts[path] = counts.get(path, 0) + 1
    if set(counts) == {"-"}:
        return "-"
    return ", ".join(f"{path} x{count}" for path, count in sorted(counts.items()))


def fallback_notes(runs: Sequence[dict[str, Any]]) -> list[str]:
    """One warning per paths comparison whose engine side did not run the engine throughout, with the reason."""
    notes = []
    for (compare, setting, env_id, steps), by_role in _groups(runs).items():
        engine_side = by_role.get("ours", [])
        if compare != "paths" or not engine_side:
            continue
        off = [run for run in engine_side if run.get("update_path") != "engine"]
        if not off:
            continue
        reasons = list(
            dict.fromkeys(
                reason
                for run in off
                for reason in [run.get("engine_declined"), *run.get("update_path_warnings", [])]
                if reason
            )
        )
        notes.append(
            f"**Not an engine-vs-autograd comparison**: {len(off)} of {len(engine_side)} runs of "
            f"{_label(engine_side, 'the engine side')} ({setting} on {env_id}, {steps} steps) did not take the engine "
            f"throughout ({path_cell(off)}), so they compare autograd with autograd."
            + (f" Why: {' / '.join(reasons)}" if reasons else "")
        )
    return notes


def render_table(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown summary table per comparison, warnings for engine runs that fell back, and a per-seed table."""
    groups = _groups(runs)
    lines: list[str] = []
    per_seed = [
        "| env | steps | algo | seed | final return (mean of eval episodes) | train s | setting | update path |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    for compare in dict.fromkeys(key[0] for key in groups):
        a, b = SIDE_NAMES.get(compare, ("ours", "ref"))
        fourth = "algo (ours)" if compare == "sb3" else "setting"
        paths = "update path (ours)" if compare == "sb3" else f"update path ({a} side / {b} side)"
        if lines:
            lines.append("")
        lines += [
            CAPTIONS.get(compare, f"{compare}:"),
            "",
            f"| env | steps | seeds | {fourth} | {a} final return (mean +- 95% CI) | {b} final return (mean +- 95% CI) "
            f"| diff {a} - {b} | Welch p | train min/run {a} / {b} | {paths} |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for (kind, setting, env_id, steps), by_role in groups.items():
            if kind != compare:
                continue
            ours, ref = by_role.get("ours", []), by_role.get("ref", [])
            ours_vals = [r["final_mean"] for r in ours]
            ref_vals = [r["final_mean"] for r in ref]
            o_mean, o_ci = mean_ci95(ours_vals)
            r_mean, r_ci = mean_ci95(ref_vals)
            p_value = welch_p_value(ours_vals, ref_vals)
            o_min = statistics.fmean(r["train_s"] for r in ours) / 60 if ours else math.nan
            r_min = statistics.fmean(r["train_s"] for r in ref) / 60 if ref else math.nan
            path = path_cell(ours) if compare == "sb3" else f"{path_cell(ours)} / {path_cell(ref)}"
            lines.append(
                f"| {env_id} | {steps} | {max(len(ours), len(ref))} "
                f"| {_label(ours, 'ours') if compare == 'sb3' else setting} "
                f"| {fmt_number(o_mean)} +- {fmt_number(o_ci)} | {fmt_number(r_mean)} +- {fmt_number(r_ci)} "
                f"| {fmt_number(o_mean - r_mean)} "
                f"| {fmt_number(p_value, 3)} | {fmt_number(o_min)} / {fmt_number(r_min)} | {path} |"
            )
            for run in ours + ref:
                per_seed.append(
                    f"| {env_id} | {steps} | {run['label']} | {run['seed']} | {run['final_mean']:.1f} "
                    f"| {run['train_s']:.0f} | {setting} | {run.get('update_path') or '-'} |"
                )
    notes = fallback_notes(runs)
    return "\n".join(lines) + "".join(f"\n\n{note}" for note in notes) + "\n\nPer seed:\n\n" + "\n".join(per_seed)


def curve_file_name(compare: str, setting: str, env_id: str, steps: int) -> str:
    """The PNG of one group: ``returns_ENV_STEPS.png`` for SB3 on plain SAC, else with setting and comparison."""
    if (compare, setting) == ("sb3", "SAC"):
        return f"returns_{env_id}_{steps}.png"
    return f"returns_{env_id}_{steps}_{setting}_{compare}.png"


def plot_curves(runs: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per group: mean deterministic return vs env steps with a 95% CI band per side of the comparison;
    an sb3_softac side's legend says which update path its runs took."""
    # Imported here: only a run that plots needs matplotlib, and the file backend must be chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (compare, setting, env_id, steps), by_role in _groups(runs).items():
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
            taken = path_cell(group)
            label = f"{_label(group, role)}" + ("" if taken == "-" else f" [path: {taken}]") + f" (n={len(group)})"
            ax.plot(xs, means, color=color, label=label)
            ax.fill_between(
                xs,
                [m - h for m, h in zip(means, half, strict=True)],
                [m + h for m, h in zip(means, half, strict=True)],
                color=color,
                alpha=0.2,
            )
        ax.set_title(f"{setting} on {env_id}, {steps} steps (mean +- 95% CI over seeds)")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("deterministic episode return")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / curve_file_name(compare, setting, env_id, steps)
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
    parser.add_argument(
        "--compare", choices=sorted(COMPARISONS), default=None, help="sb3: vs SB3 (default); paths: engine vs autograd"
    )
    parser.add_argument("--setting", choices=SETTINGS, default=None, help="SAC (default), or DroQ / REDQ with paths")
    parser.add_argument("--learning-starts", type=int, default=None, help="override learning_starts (both sides)")
    parser.add_argument(
        "--engine-mode",
        choices=("auto", "engine"),
        default="auto",
        help="update_engine of the engine side of --compare paths: auto (default) falls back to autograd where the "
        "engine does not cover the model, and the report says so; engine raises instead",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None, help="only regenerate table/plots")
    args = parser.parse_args(argv)
    custom = (args.env, args.steps, args.seeds, args.compare, args.setting)
    if args.from_json is None and args.preset is not None and any(v is not None for v in custom):
        parser.error("use either --preset or --env/--steps/--seeds/--compare/--setting")
    if args.env is None and any(v is not None for v in custom[1:]):
        parser.error("--steps/--seeds/--compare/--setting need --env")
    if (args.compare or "sb3") == "sb3" and (args.setting or "SAC") != "SAC":
        parser.error(f"stable_baselines3.SAC cannot run {args.setting}: compare the update paths (--compare paths)")
    return args


def build_configs(args: argparse.Namespace) -> tuple[str, list[Config]]:
    """Output tag and the configs to run (``--eval-every`` and ``--learning-starts`` override a preset's)."""
    if args.env is None:
        preset = args.preset or "all"
        configs = PRESETS[preset]
        if args.eval_every is not None:
            configs = [dataclasses.replace(c, eval_every=args.eval_every) for c in configs]
        if args.learning_starts is not None:
            configs = [dataclasses.replace(c, learning_starts=args.learning_starts) for c in configs]
        return preset, configs
    steps = args.steps or 20_000
    setting, compare = args.setting or "SAC", args.compare or "sb3"
    config = Config(
        args.env, steps, args.seeds or 3, args.eval_every or max(1, steps // 10), setting, compare, args.learning_starts
    )
    tag = f"{args.env}_{steps}" if (setting, compare) == ("SAC", "sb3") else f"{args.env}_{steps}_{setting}_{compare}"
    return tag, [config]


def config_hyperparams(config: Config, net_arch: Sequence[int] | None = None) -> dict[str, Any]:
    """The constructor arguments both sides of ``config`` share.

    SAC: the env's entry of the packaged ``softac.yml``. DroQ / REDQ: the whole entry of ``softac_droq.yml`` /
    ``softac_redq.yml`` for the env (their MuJoCo entry where they do not list it). Then the config's
    ``learning_starts`` and ``net_arch`` where given.
    """
    if config.setting == "SAC":
        hyperparams = zoo_hyperparams(config.env_id)
    else:
        hyperparams = method_hyperparams(config.setting, config.env_id)
    if config.learning_starts is not None:
        hyperparams["learning_starts"] = config.learning_starts
    if net_arch:
        hyperparams["policy_kwargs"] = {**hyperparams.get("policy_kwargs", {}), "net_arch": list(net_arch)}
    return hyperparams


def build_jobs(configs: Sequence[Config], args: argparse.Namespace) -> list[Job]:
    """Jobs ordered by config (longest budget first) then seed, alternating the two sides of the comparison."""
    jobs = []
    for config in sorted(configs, key=lambda c: -c.steps):
        hyperparams = config_hyperparams(config, args.net_arch)
        for seed in range(config.seeds):
            for role, label, module, impl_kwargs in COMPARISONS[config.compare]:
                kwargs = dict(impl_kwargs)
                if config.compare == "paths" and role == "ours":
                    kwargs["update_engine"] = args.engine_mode
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
                        config.setting,
                        config.compare,
                        kwargs,
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
            f"seed {result['seed']}: final {result['final_mean']:.1f} (train {result['train_s']:.0f}s"
            + (f", update path {result['update_path']})" if result["update_path"] else ")"),
            file=sys.stderr,
            flush=True,
        )

    run_jobs(run_job, jobs, args.jobs, on_done)
    hyperparams = {
        job.env_id if job.setting == "SAC" else f"{job.env_id} {job.setting}": job.hyperparams for job in jobs
    }
    sides = sorted({f"{job.label}: {job.impl_kwargs}" for job in jobs if job.impl_kwargs})
    header = (
        f"## SAC final-return parity ({tag})\n\n"
        f"Deterministic return of the final policy, mean over {args.eval_episodes} episodes per seed; "
        f"hyper-parameters on top of the defaults (packaged softac.yml = RL Zoo sac.yml; DroQ / REDQ: "
        f"softac_droq.yml / softac_redq.yml): {hyperparams}; "
        + (f"per side: {'; '.join(sides)}; " if sides else "")
        + f"versions: {meta['versions']}"
    )
    return report(runs, out_dir, tag, header)


if __name__ == "__main__":
    main()
