"""benchmarks/speed.py beyond plain SAC: the engine next to the autograd path, the REDQ and DroQ settings, who runs
which setting (SBX on DroQ, nobody but sb3_softac on REDQ), the gradient-step summary, the time inside train(),
the CPU pinning and the CPU's vector extensions."""

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import pytest
import speed

import sb3_softac

LABELS = ("sb3_softac", "sb3_softac (autograd)", "SB3", "SBX")


class FakeSBX(sb3_softac.SAC):
    """Stands in for sbx.SAC (not installed in the test environment): records the arguments it is built with.

    The update methods are sb3_softac's own, so the update path is whatever the engine takes for the setting; the
    benchmark must not report a path for a contender outside sb3_softac.
    """

    built_with: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        type(self).built_with.append(copy.deepcopy(kwargs))  # SB3 writes into the policy_kwargs it is given
        super().__init__(*args, **kwargs)


def _contenders(labels: tuple[str, ...] = LABELS) -> list[speed.Contender]:
    return [speed.Contender(label, "m", None, "0") for label in labels]


def _droq_update_path() -> str:
    """The update path sb3_softac takes on the DroQ setting as the engine stands."""
    kwargs = speed.setting_kwargs("DroQ")
    policy_kwargs = {"net_arch": [16, 16], **kwargs.pop("policy_kwargs")}
    return sb3_softac.SAC("MlpPolicy", gym.make("Pendulum-v1"), policy_kwargs=policy_kwargs, **kwargs).update_path


def test_speed_reports_both_update_paths_and_the_high_utd_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = speed.load_contenders

    def with_fake_sbx(with_sbx: bool, notes: list[str] | None = None) -> list[speed.Contender]:
        return [*real_load(False), speed.Contender("SBX", "fake_sbx", FakeSBX, "0")]

    monkeypatch.setattr(speed, "load_contenders", with_fake_sbx)
    FakeSBX.built_with.clear()
    json_path = tmp_path / "speed.json"
    argv = [
        *("--envs", "Pendulum-v1", "--steps", "40", "--reps", "2", "--warmup", "40", "--learning-starts", "20"),
        *("--grad-steps", "2", "--grad-reps", "2", "--batch-size", "16", "--net-arch", "16", "16"),
        *("--quiet", "--settings", "SAC", "REDQ", "DroQ", "--json", str(json_path)),
    ]
    report = speed.main(argv)
    assert report in capsys.readouterr().out
    assert "vector extensions: " in report
    assert "| Pendulum-v1 | sb3_softac | engine |" in report
    assert "| Pendulum-v1 | sb3_softac (autograd) | autograd |" in report
    assert "speed-up vs sb3_softac (autograd) (learn)" in report
    assert "error" not in report
    raw = json.loads(json_path.read_text())
    results = {result["setting"]: result for result in raw["results"]}
    assert set(results) == {"SAC", "REDQ", "DroQ"}
    # Plain SAC: everyone; DroQ: ours and SBX; REDQ: ours only.
    assert set(results["SAC"]["steps_per_s"]) == set(LABELS)
    assert set(results["DroQ"]["steps_per_s"]) == {"sb3_softac", "sb3_softac (autograd)", "SBX"}
    assert set(results["REDQ"]["steps_per_s"]) == {"sb3_softac", "sb3_softac (autograd)"}
    assert results["REDQ"]["update_path"] == {"sb3_softac": "engine", "sb3_softac (autograd)": "autograd"}
    # DroQ's path is the engine's when it covers dropout critics, and the report says which it was.
    droq_path = _droq_update_path()
    assert results["DroQ"]["update_path"] == {"sb3_softac": droq_path, "sb3_softac (autograd)": "autograd"}
    assert f"| DroQ | Pendulum-v1 | {droq_path} |" in report
    # SBX was built with DroQ's arguments and the shared ones, and reads them back as sb3_softac does.
    droq_kwargs = [kwargs for kwargs in FakeSBX.built_with if kwargs.get("gradient_steps") == 20]
    assert droq_kwargs == [
        dict(
            batch_size=16,
            learning_starts=20,
            policy_kwargs=dict(net_arch=[16, 16], n_critics=2, dropout_rate=0.01, layer_norm=True),
            seed=0,
            verbose=0,
            gradient_steps=20,
            policy_delay=20,
        )
    ]
    built = results["DroQ"]["built"]
    assert built["SBX"] == built["sb3_softac"] == built["sb3_softac (autograd)"]
    assert built["SBX"]["dropout_rate"] == 0.01 and built["SBX"]["policy_delay"] == 20
    # The timed train() calls of REDQ and DroQ do a whole number of policy delays.
    assert results["DroQ"]["grad_steps"] == results["REDQ"]["grad_steps"] == 20
    assert results["SAC"]["grad_steps"] == 2
    # Why SB3 and SBX are missing, in the report and the JSON; SBX's extra REDQ work is computed for the env.
    assert "Not run in setting DroQ:\n\n* SB3: stable_baselines3.SAC has no critic dropout" in report
    assert "* SBX: sbx.SAC has n_critics and policy_delay but no random target subset" in report
    assert "{extra_work}" not in report and "% on Pendulum-v1)" in report
    assert set(raw["not_run"]["REDQ"]) == {"SB3", "SBX"} and set(raw["not_run"]["DroQ"]) == {"SB3"}
    assert raw["not_run"]["SAC"] == {}
    for result in results.values():
        assert "SBX" not in result["update_path"]
        for label, train_ms in result["train_ms_per_env_step"].items():
            assert len(train_ms) == 2 and all(ms > 0 for ms in train_ms), label
            assert all(ms > 0 for ms in result["other_ms_per_env_step"][label]), label


def test_setting_contenders() -> None:
    contenders = _contenders()
    assert [c.label for c in speed.setting_contenders("SAC", contenders)] == list(LABELS)
    assert [c.label for c in speed.setting_contenders("DroQ", contenders)] == [
        "sb3_softac",
        "sb3_softac (autograd)",
        "SBX",
    ]
    assert [c.label for c in speed.setting_contenders("REDQ", contenders)] == ["sb3_softac", "sb3_softac (autograd)"]
    # Without SBX installed DroQ is ours only.
    assert [c.label for c in speed.setting_contenders("DroQ", _contenders(LABELS[:3]))] == list(LABELS[:2])


def test_sbx_takes_the_droq_arguments_and_refuses_redq_ones() -> None:
    sbx = speed.Contender("SBX", "sbx", None, "0")
    assert speed.contender_kwargs(sbx, "DroQ") == dict(
        gradient_steps=20, policy_delay=20, policy_kwargs=dict(n_critics=2, dropout_rate=0.01, layer_norm=True)
    )
    # REDQ's target subset and mean actor have no SBX counterpart: refused, not dropped.
    with pytest.raises(ValueError, match="actor_q_reduction, critic_subset_size"):
        speed.contender_kwargs(sbx, "REDQ")
    autograd = speed.Contender("sb3_softac (autograd)", "sb3_softac", None, "0", {"update_engine": "autograd"})
    assert speed.contender_kwargs(autograd, "REDQ")["update_engine"] == "autograd"


def test_grad_steps_are_whole_policy_delays() -> None:
    assert speed.setting_grad_steps(100, "DroQ") == 100
    assert speed.setting_grad_steps(101, "DroQ") == 120
    assert speed.setting_grad_steps(2, "REDQ") == 20
    assert speed.setting_grad_steps(2, "SAC") == 2


def test_flop_floor_with_a_target_subset_and_a_policy_delay() -> None:
    plain = speed.sac_step_flops(17, 6, [256, 256], 256)
    assert speed.sac_step_flops(17, 6, [256, 256], 256, 2, 2, 1) == plain
    # Ten critics, two of them in the target, the actor every 20 steps, counted by hand (per sample).
    critic_fwd = 23 * 256 + 256 * 256 + 256
    actor_fwd = 17 * 256 + 256 * 256 + 256 * 12
    actor_bwd = actor_fwd + 256 * 256 + 256 * 12
    critic_bwd = critic_fwd + 256 * 256 + 256
    to_actions = 256 * 256 + 256 + 256 * 6
    critic_update = actor_fwd + 2 * critic_fwd + 10 * (critic_fwd + critic_bwd)
    actor_update = actor_fwd + actor_bwd + 10 * (critic_fwd + to_actions)
    expected = 2 * (critic_update + actor_update / 20)
    assert speed.sac_step_flops(17, 6, [256, 256], 1, 10, 2, 20) == pytest.approx(expected)
    sbx = 2 * (critic_update + 8 * critic_fwd + actor_update / 20)
    assert speed.sbx_redq_extra_work(17, 6, [256, 256]) == pytest.approx(sbx / expected - 1)
    assert 0.2 < speed.sbx_redq_extra_work(17, 6, [256, 256]) < 0.3


def _result(setting: str, path: str, ms: dict[str, list[float]]) -> speed.EnvResult:
    result = speed.EnvResult("Pendulum-v1", 3, 1, setting)
    result.update_path = {"sb3_softac": path, "sb3_softac (autograd)": "autograd"}
    for label, values in ms.items():
        result.ms_per_grad_step[label] = values
        result.steps_per_s[label] = [100.0] * len(values)
        result.train_ms_per_env_step[label] = [1.0] * len(values)
        result.other_ms_per_env_step[label] = [1.0] * len(values)
    result.gemm_gflops = [50.0]
    return result


def _args() -> argparse.Namespace:
    return speed.parse_args(["--reps", "1", "--grad-reps", "1", "--net-arch", "256", "256"])


def test_grad_step_summary_gives_the_engine_against_sbx_and_autograd() -> None:
    contenders = _contenders()
    results = [
        _result("SAC", "engine", {"sb3_softac": [1.0], "sb3_softac (autograd)": [3.0], "SB3": [4.0], "SBX": [2.0]}),
        _result("DroQ", "engine", {"sb3_softac": [2.0], "sb3_softac (autograd)": [5.0], "SBX": [1.0]}),
    ]
    report = speed.render_report(results, contenders, _args(), "header")
    header = (
        "| setting | env | sb3_softac path | sb3_softac ms | sb3_softac (autograd) ms | SB3 ms | SBX ms "
        "| sb3_softac vs sb3_softac (autograd) | sb3_softac vs SB3 | sb3_softac vs SBX |"
    )
    assert header in report
    assert "| SAC | Pendulum-v1 | engine | 1.00 | 3.00 | 4.00 | 2.00 | 3.00x | 4.00x | 2.00x |" in report
    assert "| DroQ | Pendulum-v1 | engine | 2.00 | 5.00 | not run | 1.00 | 2.50x | not run | 0.50x |" in report
    assert "compares autograd with autograd" not in report
    # The FLOP floor stays the plain SAC table.
    assert report.count("| Pendulum-v1 | 3 | 1 |") == 1


def test_grad_step_summary_flags_an_engine_row_that_ran_autograd() -> None:
    results = [_result("DroQ", "autograd", {"sb3_softac": [2.0], "sb3_softac (autograd)": [2.0], "SBX": [1.0]})]
    report = speed.render_report(results, _contenders(), _args(), "header")
    assert "| DroQ | Pendulum-v1 | autograd | 2.00 | 2.00 | not run | 1.00 | 1.00x | not run | 0.50x |" in report
    assert "Note: in setting DroQ on Pendulum-v1 sb3_softac took the autograd update" in report
    assert "FLOP floor" not in report  # no plain SAC row to take it from


def test_pinning_takes_as_many_cpus_as_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    assert speed.pick_cpus({0, 1, 2, 3}, 2) == [0, 1]
    assert speed.pick_cpus({0, 1, 2, 3}, 2, cpu=2) == [2, 3]
    assert speed.pick_cpus({3, 1}, 1) == [1]
    assert speed.pick_cpus({1}, 2) == [1]
    assert speed.pick_cpus({0, 1}, 1, cpu=5) == [5]  # as asked: pinning then fails and says so
    pinned: list[set[int]] = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: pinned.append(set(cpus)), raising=False)
    with speed.pinned_threads(2) as info:
        assert info.endswith("pinned to CPUs 0,1")
    with speed.pinned_threads(4, cpu=1) as info:
        assert info.endswith("pinned to CPUs 1,2 (only 2 CPU(s) allowed for 4 threads)")
    assert pinned == [{0, 1}, {0, 1, 2}, {1, 2}, {0, 1, 2}]  # each pin, then the affinity restored


def test_settings_take_their_method_from_the_zoo_files() -> None:
    redq = speed.setting_kwargs("REDQ")
    assert redq == dict(
        gradient_steps=20,
        policy_delay=20,
        critic_subset_size=2,
        actor_q_reduction="mean",
        policy_kwargs=dict(n_critics=10),
    )
    droq = speed.setting_kwargs("DroQ")
    assert droq["gradient_steps"] == 20 and droq["policy_kwargs"] == dict(
        n_critics=2, dropout_rate=0.01, layer_norm=True
    )
    assert speed.setting_kwargs("SAC") == {}


def test_vector_extensions_are_read_from_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Test CPU\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f amx_tile\n")
    real_open = open

    def fake_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    assert speed._vector_extensions() == "sse4_2 avx avx2 fma avx512f amx_tile"
    assert speed._cpu_model() == "Test CPU"
