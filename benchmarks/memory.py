"""Peak-memory benchmark of a full 1M-transition SAC replay buffer: ``sb3_softac.SAC`` vs ``stable_baselines3.SAC``.

Every case (implementation x ``optimize_memory_usage``) runs in a fresh subprocess, so each peak is its own:

1. import the implementation and torch, read the resident set size (``VmRSS``);
2. build ``SAC("MlpPolicy", HalfCheetah-v5, buffer_size=1_000_000, ...)`` and read ``VmRSS`` again;
3. fill the replay buffer with ``buffer_size`` random transitions and read the peak resident set size
   (``VmHWM`` from ``/proc/self/status``; ``resource.getrusage`` ``ru_maxrss`` where /proc is missing).

Filling does not simulate the environment. ``--fill add`` (default) calls the public
``model.replay_buffer.add(obs, next_obs, action, reward, done, infos)`` once per transition, cycling through a pool
of 1024 pre-generated random transitions (one env, so every argument has a leading batch dimension of 1; an
episode end every 1000 transitions). ``--fill direct`` instead writes random values straight into every numpy
array / torch tensor attribute of the buffer whose first dimension is ``buffer_size`` (faster, but it only sees
storage that is a direct attribute of the buffer). Either way every page of the storage is written, so lazily
allocated (``np.zeros``) storage is counted in full.

SB3 refuses ``optimize_memory_usage=True`` together with the default ``handle_timeout_termination=True``, so the
optimized cases pass ``replay_buffer_kwargs={"handle_timeout_termination": False}`` to both implementations.

Run ``python benchmarks/memory.py`` (about one minute); ``--buffer-size 100000`` for a quicker check.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from common import set_torch_threads

MIB = 1024.0 * 1024.0
REF_MODULE = "stable_baselines3"


# --------------------------------------------------------------------------------------------------------------
# Worker (runs in the fresh subprocess)
# --------------------------------------------------------------------------------------------------------------


def read_status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (e.g. VmRSS, VmHWM), or None when unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_mib() -> float:
    """Current resident set size in MiB (falls back to the peak when /proc is missing)."""
    kib = read_status_kib("VmRSS")
    return kib / 1024.0 if kib is not None else peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB."""
    kib = read_status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
        if sys.platform == "darwin":
            kib //= 1024
    return kib / 1024.0


def _storage(buffer: Any, buffer_size: int) -> list[Any]:
    """Numpy arrays / torch tensors held by the buffer (directly or in a dict attribute), deduplicated."""
    found: dict[int, Any] = {}
    for value in vars(buffer).values():
        candidates = list(value.values()) if isinstance(value, dict) else [value]
        for item in candidates:
            if isinstance(item, np.ndarray | torch.Tensor) and item.ndim >= 1 and item.shape[0] == buffer_size:
                found[id(item)] = item
    return list(found.values())


def storage_mib(buffer: Any, buffer_size: int) -> float:
    """Nominal size (MiB) of the buffer's transition storage."""
    total = 0
    for item in _storage(buffer, buffer_size):
        total += item.nbytes if hasattr(item, "nbytes") else item.numel() * item.element_size()
    return total / MIB


def fill_with_add(buffer: Any, obs_dim: int, act_dim: int, n: int) -> None:
    """``n`` calls of ``buffer.add`` with random transitions cycled from a pre-generated pool."""
    rng = np.random.default_rng(0)
    pool = 1024
    obs = rng.standard_normal((pool, 1, obs_dim))
    next_obs = rng.standard_normal((pool, 1, obs_dim))
    actions = rng.uniform(-1.0, 1.0, (pool, 1, act_dim)).astype(np.float32)
    rewards = rng.standard_normal((pool, 1)).astype(np.float32)
    not_done = np.zeros(1, dtype=np.float32)
    done = np.ones(1, dtype=np.float32)
    infos: list[dict[str, Any]] = [{}]
    for i in range(n):
        j = i % pool
        buffer.add(obs[j], next_obs[j], actions[j], rewards[j], done if i % 1000 == 999 else not_done, infos)


def fill_direct(buffer: Any, buffer_size: int) -> None:
    """Write random values into every storage array of the buffer, in chunks, and mark it full."""
    rng = np.random.default_rng(0)
    chunk = 65_536
    for item in _storage(buffer, buffer_size):
        for start in range(0, buffer_size, chunk):
            part = item[start : start + chunk]
            values = rng.standard_normal(tuple(part.shape)).astype(np.float32)
            if isinstance(part, torch.Tensor):
                part.copy_(torch.from_numpy(values).to(part.dtype))
            else:
                part[...] = values.astype(part.dtype)
    if hasattr(buffer, "full"):
        buffer.full = True


def run_case(module: str, env_id: str, buffer_size: int, optimize: bool, fill: str) -> dict[str, Any]:
    """Measure one case in the current process (meant to be a fresh subprocess)."""
    set_torch_threads(1)
    sac_cls = importlib.import_module(module).SAC
    env = gym.make(env_id)
    obs_dim = int(env.observation_space.shape[0])  # type: ignore[index]
    act_dim = int(env.action_space.shape[0])  # type: ignore[index]
    rss_import = current_rss_mib()
    kwargs: dict[str, Any] = {"buffer_size": buffer_size, "seed": 0, "verbose": 0}
    if optimize:
        kwargs["optimize_memory_usage"] = True
        kwargs["replay_buffer_kwargs"] = {"handle_timeout_termination": False}
    model = sac_cls("MlpPolicy", env, **kwargs)
    rss_model = current_rss_mib()
    buffer = model.replay_buffer
    start = time.perf_counter()
    if fill == "add":
        fill_with_add(buffer, obs_dim, act_dim, buffer_size)
    else:
        fill_direct(buffer, buffer_size)
    fill_s = time.perf_counter() - start
    return {
        "module": module,
        "optimize_memory_usage": optimize,
        "handle_timeout_termination": getattr(buffer, "handle_timeout_termination", not optimize),
        "rss_import_mib": rss_import,
        "rss_model_mib": rss_model,
        "peak_mib": peak_rss_mib(),
        "storage_mib": storage_mib(buffer, buffer_size),
        "fill_s": fill_s,
        "obs_dtype": str(getattr(getattr(buffer, "observations", None), "dtype", "?")),
    }


# --------------------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------------------


def spawn_case(module: str, args: argparse.Namespace, optimize: bool) -> dict[str, Any]:
    """Run one case in a fresh Python subprocess and parse its JSON line."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_worker",
        "--_module",
        module,
        "--env",
        args.env,
        "--buffer-size",
        str(args.buffer_size),
        "--fill",
        args.fill,
    ]
    if optimize:
        cmd.append("--_optimize")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"module": module, "optimize_memory_usage": optimize, "error": error}


def render(results: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    """Markdown table of all cases."""
    lines = [
        f"## SAC replay-buffer memory: {args.env}, buffer_size={args.buffer_size}, fill={args.fill}",
        "",
        "| algo | optimize_memory_usage | handle_timeout_termination | obs dtype | RSS after import (MiB) "
        "| RSS after SAC() (MiB) | peak RSS after fill (MiB) | peak - after SAC() (MiB) | peak - after import (MiB) "
        "| storage nbytes (MiB) | fill s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        label = res["label"]
        if "error" in res:
            lines.append(f"| {label} | {res['optimize_memory_usage']} | | error: {res['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {label} | {res['optimize_memory_usage']} | {res['handle_timeout_termination']} | {res['obs_dtype']} "
            f"| {res['rss_import_mib']:.0f} | {res['rss_model_mib']:.0f} | {res['peak_mib']:.0f} "
            f"| {res['peak_mib'] - res['rss_model_mib']:.0f} | {res['peak_mib'] - res['rss_import_mib']:.0f} "
            f"| {res['storage_mib']:.0f} | {res['fill_s']:.1f} |"
        )
    lines += [
        "",
        "Each row is a fresh process. 'peak - after SAC()' is what filling the buffer added; 'peak - after import' "
        "adds the model construction (networks, optimisers, torch/gymnasium initialisation); "
        "'storage nbytes' is the nominal size of the buffer arrays found as attributes of model.replay_buffer.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v5", help="env id (default HalfCheetah-v5)")
    parser.add_argument("--buffer-size", type=int, default=1_000_000, help="transitions (default 1000000)")
    parser.add_argument("--fill", choices=("add", "direct"), default="add", help="how to fill (default add)")
    parser.add_argument("--json", default=None, help="also write raw results to this JSON file")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_module", default=REF_MODULE, help=argparse.SUPPRESS)
    parser.add_argument("--_optimize", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    """Run every case in its own subprocess, print the markdown table and return it."""
    args = parse_args(argv)
    if args._worker:
        print(json.dumps(run_case(args._module, args.env, args.buffer_size, args._optimize, args.fill)), flush=True)
        return ""
    results = []
    for label, module in (("sb3_softac", "sb3_softac"), ("SB3", REF_MODULE)):
        for optimize in (False, True):
            print(f"{label} optimize_memory_usage={optimize} ...", file=sys.stderr, flush=True)
            results.append({"label": label, **spawn_case(module, args, optimize)})
    table = render(results, args)
    print(table, flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=2)
    return table


if __name__ == "__main__":
    main()
