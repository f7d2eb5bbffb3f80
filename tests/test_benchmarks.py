"""The benchmark scripts in ``benchmarks/`` run end to end with tiny budgets, and their shared module ``common``
(hyperparameters from the packaged zoo files, the evaluation rule, the statistics) computes what it claims.

No assertion on returns or timings. The scripts are imported as modules (``benchmarks/`` is on ``sys.path`` through
pytest's ``pythonpath`` setting), so worker processes can unpickle their jobs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import common
import gymnasium as gym
import memory
import numpy as np
import pytest
import returns
import sample_efficiency
import speed
import stable_baselines3 as sb3
import yaml
from scipy import stats
from stable_baselines3.common.torch_layers import FlattenExtractor
from torch.utils.flop_counter import FlopCounterMode

import sb3_softac
import sb3_softac.hyperparams

TINY_NET = ["--net-arch", "16", "16"]

# ----------------------------------------------------------------------------------------------------------------
# common.py


def _packaged(file_name: str) -> dict:
    return yaml.safe_load((sb3_softac.hyperparams.HYPERPARAMS_DIR / file_name).read_text(encoding="utf-8"))


def test_zoo_hyperparams_are_the_packaged_entries() -> None:
    entry = dict(_packaged("softac.yml")["MountainCarContinuous-v0"])
    del entry["policy"], entry["n_timesteps"]
    entry["policy_kwargs"] = eval(entry["policy_kwargs"], {"dict": dict})  # the RL Zoo's own reading
    assert common.zoo_hyperparams("MountainCarContinuous-v0") == entry
    assert common.zoo_hyperparams("Pendulum-v1") == {"learning_rate": 1e-3}
    assert common.zoo_hyperparams("HalfCheetah-v5") == {"learning_starts": 10_000}
    assert common.zoo_hyperparams("NotListed-v0") == {}  # the file's default entry: SAC's defaults
    redq = common.zoo_hyperparams("Hopper-v5", "softac_redq.yml")
    assert redq["critic_subset_size"] == 2 and redq["policy_kwargs"]["n_critics"] == 10
    assert redq["actor_q_reduction"] == "mean"
    with pytest.raises(KeyError, match="no entry for Pendulum-v1"):
        common.zoo_hyperparams("Pendulum-v1", "softac_redq.yml")
    # A method's file lists MuJoCo tasks only: its MuJoCo entry serves the others.
    assert common.method_hyperparams("REDQ", "Hopper-v5") == redq
    assert common.method_hyperparams("REDQ", "Pendulum-v1") == common.zoo_hyperparams(
        "HalfCheetah-v5", "softac_redq.yml"
    )
    assert common.method_hyperparams("DroQ", "Pendulum-v1")["policy_kwargs"]["dropout_rate"] == 0.01
    with pytest.raises(ValueError, match="unknown method 'TD3'"):
        common.method_hyperparams("TD3")


@pytest.mark.parametrize(
    ("env_id", "named"),
    [("CarRacing-v3", "env_wrapper, n_envs, normalize"), ("LunarLanderContinuous-v3", "learning_rate='lin_7.3e-4'")],
)
def test_zoo_only_settings_are_refused(env_id: str, named: str) -> None:
    with pytest.raises(ValueError, match=f"entry {env_id}: {named}") as info:
        common.zoo_hyperparams(env_id)
    assert "sb3-softac-zoo train" in str(info.value)


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("replay_buffer_class: HerReplayBuffer", "replay_buffer_class='HerReplayBuffer' is interpreted by the RL Zoo"),
        ("learning_rate: lin_1e-3", "learning_rate='lin_1e-3' is interpreted by the RL Zoo"),
        ('policy_kwargs: "dict(activation_fn=nn.ReLU)"', "holds a value that is not a literal"),
        ('policy_kwargs: "[1, 2]"', "expected a 'dict\\(key=literal, ...\\)' expression"),
    ],
)
def test_zoo_values_sac_cannot_take_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str, named: str
) -> None:
    (tmp_path / "softac.yml").write_text(f"Some-v0:\n  policy: 'MlpPolicy'\n  {setting}\n", encoding="utf-8")
    monkeypatch.setattr(sb3_softac.hyperparams, "HYPERPARAMS_DIR", tmp_path)
    with pytest.raises(ValueError, match=named):
        common.zoo_hyperparams("Some-v0")


class _ConstantPolicy:
    """Anything with SB3's ``predict``: always the same action."""

    def __init__(self, action: np.ndarray) -> None:
        self.action = action

    def predict(self, obs: np.ndarray, deterministic: bool = False) -> tuple[np.ndarray, None]:
        return self.action, None


def test_evaluate_starts_from_the_seeded_states() -> None:
    model = _ConstantPolicy(np.array([0.5], np.float32))
    expected = []
    env = gym.make("Pendulum-v1")
    for episode in range(3):
        env.reset(seed=1_000_000 + 1_000 * 2 + episode)  # run seed 2, episode i
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(model.action)
            total += float(reward)
            done = terminated or truncated
        expected.append(total)
    assert common.evaluate(model, "Pendulum-v1", 2, 3) == pytest.approx(expected, rel=1e-12)
    assert common.evaluate(model, "Pendulum-v1", 2, 3) == common.evaluate(model, "Pendulum-v1", 2, 3)
    assert common.evaluate(model, "Pendulum-v1", 3, 3) != common.evaluate(model, "Pendulum-v1", 2, 3)
    with pytest.raises(ValueError, match="n_episodes=0"):
        common.evaluate(model, "Pendulum-v1", 2, 0)


def test_statistics() -> None:
    mean, half = common.mean_ci95([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.303 / 3**0.5, rel=1e-3)  # t_{0.975, 2} * s / sqrt(n), s = 1
    assert math.isnan(common.mean_ci95([1.0])[1])

    # Welch's statistic and degrees of freedom by hand, then the two-sided tail of Student's t.
    a, b = [1.0, 2.5, 3.0, 2.2, 1.9], [2.0, 3.1, 3.9]
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t_stat = (np.mean(a) - np.mean(b)) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert common.welch_p_value(a, b) == pytest.approx(2.0 * stats.t.sf(abs(t_stat), df), rel=1e-9)
    assert math.isnan(common.welch_p_value([1.0], b))
    assert common.welch_p_value([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert common.welch_p_value([1.0, 1.0], [2.0, 2.0]) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# speed.py


def test_speed_main_prints_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """speed.py runs end to end on Pendulum with a tiny budget and prints both tables."""
    json_path = tmp_path / "speed.json"
    argv = [
        *("--envs", "Pendulum-v1", "--steps", "40", "--reps", "2", "--warmup", "40", "--learning-starts", "20"),
        *("--grad-steps", "2", "--grad-reps", "2", "--batch-size", "16", *TINY_NET),
        *("--quiet", "--no-sbx", "--settings", "SAC", "--json", str(json_path)),
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
    assert "| Pendulum-v1 | sb3_softac |" in out
    assert "| Pendulum-v1 | SB3 | " in out
    assert "error" not in out
    raw = json.loads(json_path.read_text())
    timings = raw["results"][0]["steps_per_s"]
    assert set(timings) == {"sb3_softac", "sb3_softac (autograd)", "SB3"}
    assert all(len(v) == 2 for v in timings.values())


def test_speed_flop_floor_against_torch_flop_counter() -> None:
    """The analytic floor plus the work SB3 does on top of it equals torch's matmul FLOP count for one SB3 step."""
    hidden, batch, obs_dim, act_dim = [32, 24], 16, 3, 1
    model = sb3.SAC(
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


# ----------------------------------------------------------------------------------------------------------------
# returns.py


def test_returns_main_json_png_and_from_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """returns.py trains 2 seeds x 2 algos in a 2-process pool, writes JSON/MD/PNG, and --from-json regenerates."""
    out_dir = tmp_path / "res"
    argv = [
        *("--env", "Pendulum-v1", "--steps", "140", "--seeds", "2", "--eval-every", "70"),
        *("--eval-episodes", "1", "--curve-episodes", "1", "--jobs", "2", *TINY_NET),
        *("--out", str(out_dir)),
    ]
    returns.main(argv)
    out = capsys.readouterr().out
    for column in ("ours final return (mean +- 95% CI)", "SB3 final return (mean +- 95% CI)", "Welch p"):
        assert column in out
    assert "| Pendulum-v1 | 140 | 2 | sb3_softac |" in out
    json_path = out_dir / "returns_Pendulum-v1_140.json"
    runs = json.loads(json_path.read_text())["runs"]
    assert sorted((r["role"], r["seed"]) for r in runs) == [("ours", 0), ("ours", 1), ("ref", 0), ("ref", 1)]
    assert all(r["curve_steps"] == [0, 70, 140] and len(r["final_returns"]) == 1 for r in runs)
    # Both implementations get the packaged zoo settings of Pendulum-v1 (learning rate 1e-3) and the tiny network.
    assert all(r["hyperparams"] == {"learning_rate": 1e-3, "policy_kwargs": {"net_arch": [16, 16]}} for r in runs)
    assert (out_dir / "returns_Pendulum-v1_140.md").is_file()
    assert (out_dir / "returns_Pendulum-v1_140.png").stat().st_size > 0

    regen_dir = tmp_path / "regen"
    returns.main(["--from-json", str(json_path), "--out", str(regen_dir)])
    assert "Welch p" in capsys.readouterr().out
    assert (regen_dir / "returns_Pendulum-v1_140.png").is_file()
    assert (regen_dir / "returns_Pendulum-v1_140.md").is_file()


def test_paths_preset_builds_engine_and_autograd_jobs_on_the_droq_settings() -> None:
    """--preset droq-paths: per seed one engine and one autograd job, the same DroQ hyperparameters for both."""
    tag, configs = returns.build_configs(returns.parse_args(["--preset", "droq-paths"]))
    assert tag == "droq-paths"
    assert configs == [returns.Config("Pendulum-v1", 2000, 5, 250, "DroQ", "paths", 500)]
    custom = ["--env", "Pendulum-v1", "--steps", "2000", "--seeds", "5", "--setting", "DroQ", "--compare", "paths"]
    custom_tag, custom_configs = returns.build_configs(
        returns.parse_args([*custom, "--learning-starts", "500", "--eval-every", "250"])
    )
    assert custom_configs == configs and custom_tag == "Pendulum-v1_2000_DroQ_paths"

    jobs = returns.build_jobs(configs, returns.parse_args(["--preset", "droq-paths"]))
    assert [(job.seed, job.role, job.label, job.impl_kwargs) for job in jobs[:2]] == [
        (0, "ours", "sb3_softac (engine)", {"update_engine": "auto"}),
        (0, "ref", "sb3_softac (autograd)", {"update_engine": "autograd"}),
    ]
    assert len(jobs) == 10 and sorted({job.seed for job in jobs}) == [0, 1, 2, 3, 4]
    assert all(job.module == "sb3_softac" and job.setting == "DroQ" and job.compare == "paths" for job in jobs)
    # softac_droq.yml's MuJoCo entry (Pendulum has none), learning_starts overridden, for both sides alike.
    droq = _packaged("softac_droq.yml")["HalfCheetah-v5"]
    expected = {key: value for key, value in droq.items() if key not in ("policy", "n_timesteps")}
    expected["policy_kwargs"] = eval(expected["policy_kwargs"], {"dict": dict})
    expected["learning_starts"] = 500
    assert all(job.hyperparams == expected for job in jobs)
    assert expected["gradient_steps"] == expected["policy_delay"] == 20
    assert expected["policy_kwargs"]["dropout_rate"] == 0.01 and expected["policy_kwargs"]["layer_norm"] is True

    strict = returns.build_jobs(configs, returns.parse_args(["--preset", "droq-paths", "--engine-mode", "engine"]))
    assert [job.impl_kwargs["update_engine"] for job in strict[:2]] == ["engine", "autograd"]
    sb3_args = returns.parse_args(["--env", "Pendulum-v1"])
    sb3_jobs = returns.build_jobs([returns.Config("Pendulum-v1", 10, 1, 10)], sb3_args)
    assert [(job.label, job.impl_kwargs) for job in sb3_jobs] == [("sb3_softac", {}), ("SB3", {})]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--env", "Pendulum-v1", "--setting", "DroQ"], "stable_baselines3.SAC cannot run DroQ"),
        (["--preset", "droq-paths", "--compare", "sb3"], "use either --preset or"),
        (["--compare", "paths"], "need --env"),
    ],
)
def test_returns_refuses_inconsistent_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        returns.parse_args(argv)
    assert message in capsys.readouterr().err


def _run(role: str, seed: int, path: str | None, final: float, **extra: object) -> dict:
    label = {"ours": "sb3_softac (engine)", "ref": "sb3_softac (autograd)"}[role]
    return {
        **dict(env_id="Pendulum-v1", steps=2000, seed=seed, role=role, label=label, setting="DroQ", compare="paths"),
        **dict(update_path=path, final_mean=final, train_s=60.0, curve_steps=[0, 2000], curve_returns=[0.0, final]),
        **extra,
    }


def test_paths_report_marks_the_path_each_run_took() -> None:
    runs = [
        _run("ours", 0, "engine", -150.0),
        _run("ours", 1, "engine", -160.0),
        _run("ref", 0, "autograd", -155.0),
        _run("ref", 1, "autograd", -165.0),
    ]
    text = returns.render_table(runs)
    assert "| engine final return (mean +- 95% CI) | autograd final return (mean +- 95% CI) |" in text
    assert "| Pendulum-v1 | 2000 | 2 | DroQ | -155.0 +- 63.5 | -160.0 +- 63.5 | 5.0 | 0.553 |" in text
    assert text.splitlines()[4].endswith("| engine x2 / autograd x2 |")
    assert "| Pendulum-v1 | 2000 | sb3_softac (engine) | 1 | -160.0 | 60 | DroQ | engine |" in text
    assert "Not an engine-vs-autograd comparison" not in text

    # A run whose engine side fell back (at the start, or during training) is marked, with the reason.
    runs[1] = _run("ours", 1, "autograd", -160.0, engine_declined="critic dropout is covered by autograd only")
    runs[0] = _run("ours", 0, "engine -> autograd", -150.0, update_path_warnings=["SAC update path: autograd (x)"])
    text = returns.render_table(runs)
    assert "| autograd x1, engine -> autograd x1 / autograd x2 |" in text
    assert "| Pendulum-v1 | 2000 | sb3_softac (engine) | 0 | -150.0 | 60 | DroQ | engine -> autograd |" in text
    assert (
        "**Not an engine-vs-autograd comparison**: 2 of 2 runs of sb3_softac (engine) (DroQ on Pendulum-v1, 2000 "
        "steps) did not take the engine throughout (autograd x1, engine -> autograd x1), so they compare autograd "
        "with autograd. Why: SAC update path: autograd (x) / critic dropout is covered by autograd only"
    ) in text
    assert returns.path_summary(["engine", "engine", "autograd", "autograd"]) == "engine -> autograd"
    assert returns.path_summary(["engine", "engine"]) == "engine"


class _OwnFlatten(FlattenExtractor):
    """A features extractor the update engine does not take (it takes FlattenExtractor itself only)."""


def test_run_job_records_a_fallback_and_why() -> None:
    job = returns.Job(
        *("Pendulum-v1", 30, 0, "ours", "sb3_softac (engine)", "sb3_softac"),
        dict(learning_starts=20, batch_size=16, policy_kwargs=dict(net_arch=[8], features_extractor_class=_OwnFlatten)),
        *(15, 1, 1, "SAC", "paths", {"update_engine": "auto"}),
    )
    result = returns.run_job(job)
    assert result["update_path"] == "autograd" and result["update_paths"] == ["autograd"] * 3
    assert "features extractor _OwnFlatten" in result["engine_declined"]
    plain = returns.run_job(dataclasses.replace(job, hyperparams=dict(learning_starts=20, batch_size=16)))
    assert plain["update_path"] == "engine" and plain["engine_declined"] is None


def test_returns_paths_comparison_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--compare paths --setting DroQ: JSON with every run's update path, the table, the curves."""
    argv = [
        *("--env", "Pendulum-v1", "--steps", "40", "--seeds", "2", "--eval-every", "20", "--learning-starts", "30"),
        *("--setting", "DroQ", "--compare", "paths", "--eval-episodes", "1", "--curve-episodes", "1"),
        *("--jobs", "1", *TINY_NET, "--out", str(tmp_path)),
    ]
    text = returns.main(argv)
    assert text in capsys.readouterr().out
    runs = json.loads((tmp_path / "returns_Pendulum-v1_40_DroQ_paths.json").read_text())["runs"]
    assert sorted((r["label"], r["seed"]) for r in runs) == [
        ("sb3_softac (autograd)", 0),
        ("sb3_softac (autograd)", 1),
        ("sb3_softac (engine)", 0),
        ("sb3_softac (engine)", 1),
    ]
    hyperparams = runs[0]["hyperparams"]
    assert all(r["hyperparams"] == hyperparams for r in runs) and hyperparams["learning_starts"] == 30
    # The engine side takes what the engine covers of DroQ today; the autograd side always autograd.
    policy_kwargs = dict(hyperparams["policy_kwargs"])
    expected = sb3_softac.SAC(
        "MlpPolicy", gym.make("Pendulum-v1"), **{**hyperparams, "policy_kwargs": policy_kwargs}
    ).update_path
    paths = {r["label"]: r["update_path"] for r in runs}
    assert paths == {"sb3_softac (engine)": expected, "sb3_softac (autograd)": "autograd"}
    assert f"| {expected} x2 / autograd x2 |" in text
    assert ("Not an engine-vs-autograd comparison" in text) == (expected != "engine")
    assert (tmp_path / "returns_Pendulum-v1_40_DroQ_paths.png").stat().st_size > 0
    assert (tmp_path / "returns_Pendulum-v1_40_DroQ_paths.md").is_file()


# ----------------------------------------------------------------------------------------------------------------
# memory.py


def test_memory_main_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """memory.py measures all four cases in subprocesses with a small buffer and prints the table."""
    json_path = tmp_path / "memory.json"
    argv = ["--env", "Pendulum-v1", "--buffer-size", "3000", "--json", str(json_path)]
    memory.main(argv)
    out = capsys.readouterr().out
    for column in ("optimize_memory_usage", "peak RSS after fill (MiB)", "peak - after SAC() (MiB)"):
        assert column in out
    assert "error" not in out
    results = json.loads(json_path.read_text())["results"]
    assert [(r["label"], r["optimize_memory_usage"]) for r in results] == [
        ("sb3_softac", False),
        ("sb3_softac", True),
        ("SB3", False),
        ("SB3", True),
    ]
    assert all(r["peak_mib"] >= r["rss_import_mib"] > 0 for r in results)


# ----------------------------------------------------------------------------------------------------------------
# sample_efficiency.py


def test_settings_configure_what_they_claim() -> None:
    budget = sample_efficiency.BUDGETS["Hopper-v5"]
    sac = sample_efficiency.setting_kwargs("SAC", budget, 5)
    assert "gradient_steps" not in sac and "critic_subset_size" not in sac
    assert sac["policy_kwargs"] == {"net_arch": list(budget.net_arch)}
    assert sac["learning_starts"] == budget.learning_starts  # the budget's, not the zoo's 10k
    droq = sample_efficiency.setting_kwargs("DroQ", budget, 5)
    assert droq["gradient_steps"] == droq["policy_delay"] == 5
    assert droq["policy_kwargs"]["dropout_rate"] == 0.01 and droq["policy_kwargs"]["layer_norm"] is True
    assert droq["policy_kwargs"]["net_arch"] == list(budget.net_arch)
    redq = sample_efficiency.setting_kwargs("REDQ", budget, 5)
    assert redq["policy_kwargs"]["n_critics"] == 10 and redq["critic_subset_size"] == 2
    assert redq["actor_q_reduction"] == "mean"
    assert redq["gradient_steps"] == redq["policy_delay"] == 5
    # On Pendulum every setting takes the zoo's learning rate for it (1e-3).
    pendulum = sample_efficiency.BUDGETS["Pendulum-v1"]
    for setting in sample_efficiency.SETTINGS:
        assert sample_efficiency.setting_kwargs(setting, pendulum, 5)["learning_rate"] == 1e-3
    with pytest.raises(ValueError, match="unknown setting"):
        sample_efficiency.setting_kwargs("TD3", budget, 5)


def test_quick_run_writes_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = sample_efficiency.main(["--quick", "--envs", "Pendulum-v1", "--jobs", "1", "--out", str(tmp_path)])
    assert text in capsys.readouterr().out
    for setting in ("SAC", "DroQ", "REDQ"):
        assert f"| Pendulum-v1 | 150 | {setting} |" in text
    assert "| 1.00x |" in text  # the SAC row is the cost reference
    data = json.loads((tmp_path / "sample_efficiency_quick.json").read_text())
    runs = data["runs"]
    assert len(runs) == 6 and {r["seed"] for r in runs} == {0, 1}
    for run in runs:
        assert run["steps"] == 150
        # 100 learning steps after learning_starts=50, at 1 (SAC) or 2 (UTD) gradient steps each.
        assert run["gradient_steps_done"] == 100 * run["utd"]
        assert run["ms_per_env_step"] > 0 and len(run["final_returns"]) == 1
    assert (tmp_path / "sample_efficiency_quick.md").read_text().strip().endswith("min.")
    # Re-rendering from the JSON gives the same table.
    rerendered = sample_efficiency.main(["--from-json", str(tmp_path / "sample_efficiency_quick.json")])
    assert sample_efficiency.render_table(runs) in rerendered


def test_steps_override_shortens_every_budget(tmp_path: Path) -> None:
    argv = ["--quick", "--envs", "Pendulum-v1", "--settings", "SAC", "--seeds", "1", "--steps", "80", "--jobs", "1"]
    sample_efficiency.main([*argv, "--out", str(tmp_path)])
    (run,) = json.loads((tmp_path / "sample_efficiency_quick.json").read_text())["runs"]
    assert run["steps"] == 80
    assert run["budget"]["learning_starts"] == 40  # at most half of the new budget
    assert run["gradient_steps_done"] == 40
