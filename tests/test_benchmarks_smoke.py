"""Smoke tests of the benchmark scripts in ``benchmarks/`` with tiny budgets (no timing assertions).

The scripts compare ``sb3_softac.SAC`` with ``stable_baselines3.SAC``. While ``sb3_softac`` is not installed
(early development) the hidden ``--ours-module`` switch puts ``stable_baselines3`` in both slots; once it is
installed it is always used, so an import error in the package fails these tests.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
OURS = "sb3_softac" if importlib.util.find_spec("sb3_softac") is not None else "stable_baselines3"
OURS_LABEL = "sb3_softac" if OURS == "sb3_softac" else f"ours[{OURS}]"
TINY_NET = ["--net-arch", "16", "16"]


def load_script(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as module ``bench_<name>`` (registered so worker processes can unpickle)."""
    module_name = f"bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCH_DIR / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def test_speed_main_prints_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """speed.py runs end to end on Pendulum with a tiny budget and prints both tables."""
    speed = load_script("speed")
    json_path = tmp_path / "speed.json"
    argv = [
        *("--envs", "Pendulum-v1", "--steps", "40", "--reps", "2", "--warmup", "40", "--learning-starts", "20"),
        *("--grad-steps", "2", "--grad-reps", "2", "--batch-size", "16", *TINY_NET),
        *("--quiet", "--no-sbx", "--json", str(json_path), "--ours-module", OURS),
    ]
    report = speed.main(argv)
    out = capsys.readouterr().out
    assert report in out
    for column in (
        "learn steps/s (median)",
        "speed-up vs SB3 (learn)",
        "ms/grad step (median)",
        "GFLOP/grad step",
        "GEMM GFLOP/s",
        "floor ms/grad step",
        "floor max steps/s",
    ):
        assert column in out
    assert f"| Pendulum-v1 | {OURS_LABEL} |" in out
    assert "| Pendulum-v1 | SB3 | " in out
    assert "error" not in out
    raw = json.loads(json_path.read_text())
    timings = raw["results"][0]["steps_per_s"]
    assert set(timings) == {OURS_LABEL, "SB3"}
    assert all(len(v) == 2 for v in timings.values())


def test_speed_flop_floor_against_torch_flop_counter() -> None:
    """The analytic floor plus the work SB3 does on top of it equals torch's matmul FLOP count for one SB3 step."""
    import gymnasium as gym
    from stable_baselines3 import SAC
    from torch.utils.flop_counter import FlopCounterMode

    speed = load_script("speed")
    hidden, batch, obs_dim, act_dim = [32, 24], 16, 3, 1
    model = SAC(
        "MlpPolicy",
        gym.make("Pendulum-v1"),
        learning_starts=10,
        batch_size=batch,
        seed=0,
        policy_kwargs={"net_arch": hidden},
    )
    model.learn(20)
    with FlopCounterMode(display=False) as counter:
        model.train(gradient_steps=1, batch_size=batch)
    floor = speed.sac_step_flops(obs_dim, act_dim, hidden, batch)
    critic = [(obs_dim + act_dim, hidden[0]), (hidden[0], hidden[1]), (hidden[1], 1)]
    # SB3 also computes critic weight gradients in the actor loss and the full first-layer input gradient there.
    extra = 2 * 2 * batch * (sum(i * o for i, o in critic) + obs_dim * hidden[0])
    assert counter.get_total_flops() == pytest.approx(floor + extra)


def test_returns_main_json_png_and_from_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """returns.py trains 2 seeds x 2 algos in a 2-process pool, writes JSON/MD/PNG, and --from-json regenerates."""
    returns = load_script("returns")
    out_dir = tmp_path / "res"
    argv = [
        *("--env", "Pendulum-v1", "--steps", "140", "--seeds", "2", "--eval-every", "70"),
        *("--eval-episodes", "1", "--curve-episodes", "1", "--jobs", "2", *TINY_NET),
        *("--out", str(out_dir), "--ours-module", OURS),
    ]
    returns.main(argv)
    out = capsys.readouterr().out
    for column in ("ours final return (mean +- 95% CI)", "SB3 final return (mean +- 95% CI)", "Welch p"):
        assert column in out
    assert f"| Pendulum-v1 | 140 | 2 | {OURS_LABEL} |" in out
    json_path = out_dir / "returns_Pendulum-v1_140.json"
    runs = json.loads(json_path.read_text())["runs"]
    assert sorted((r["role"], r["seed"]) for r in runs) == [("ours", 0), ("ours", 1), ("ref", 0), ("ref", 1)]
    assert all(r["curve_steps"] == [0, 70, 140] and len(r["final_returns"]) == 1 for r in runs)
    assert (out_dir / "returns_Pendulum-v1_140.md").is_file()
    assert (out_dir / "returns_Pendulum-v1_140.png").stat().st_size > 0

    regen_dir = tmp_path / "regen"
    returns.main(["--from-json", str(json_path), "--out", str(regen_dir)])
    assert "Welch p" in capsys.readouterr().out
    assert (regen_dir / "returns_Pendulum-v1_140.png").is_file()
    assert (regen_dir / "returns_Pendulum-v1_140.md").is_file()


def test_returns_statistics_fallback_matches_scipy() -> None:
    """The own Student-t implementation (used without scipy) agrees with scipy."""
    stats = pytest.importorskip("scipy.stats")
    returns = load_script("returns")
    for df in (1.0, 2.0, 4.0, 7.3, 30.0):
        assert returns.t_ppf(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-6)
        for t in (-3.0, -0.5, 0.0, 1.2, 4.0):
            assert returns.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-9)
    a, b = [1.0, 2.5, 3.0, 2.2, 1.9], [2.0, 3.1, 3.9]
    t_stat = stats.ttest_ind(a, b, equal_var=False)
    va, vb = stats.tvar(a) / len(a), stats.tvar(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert 2.0 * returns.t_cdf(-abs(t_stat.statistic), df) == pytest.approx(t_stat.pvalue, rel=1e-6)
    assert returns.welch_p_value(a, b) == pytest.approx(t_stat.pvalue, rel=1e-6)
    assert math.isnan(returns.welch_p_value([1.0], b))
    assert returns.welch_p_value([1.0, 1.0], [1.0, 1.0]) == 1.0


def test_memory_main_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """memory.py measures all four cases in subprocesses with a small buffer and prints the table."""
    memory = load_script("memory")
    json_path = tmp_path / "memory.json"
    argv = ["--env", "Pendulum-v1", "--buffer-size", "3000", "--json", str(json_path), "--ours-module", OURS]
    memory.main(argv)
    out = capsys.readouterr().out
    for column in ("optimize_memory_usage", "peak RSS after fill (MiB)", "peak - after SAC() (MiB)"):
        assert column in out
    assert "error" not in out
    results = json.loads(json_path.read_text())["results"]
    assert [(r["label"], r["optimize_memory_usage"]) for r in results] == [
        (OURS_LABEL, False),
        (OURS_LABEL, True),
        ("SB3", False),
        ("SB3", True),
    ]
    assert all(r["peak_mib"] >= r["rss_import_mib"] > 0 for r in results)
