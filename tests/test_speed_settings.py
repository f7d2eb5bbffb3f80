"""benchmarks/speed.py beyond plain SAC: the engine next to the autograd path, the REDQ and DroQ settings, the time
inside train() and the CPU's vector extensions."""

import json
from pathlib import Path

import pytest
import speed


def test_speed_reports_both_update_paths_and_the_high_utd_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_path = tmp_path / "speed.json"
    argv = [
        *("--envs", "Pendulum-v1", "--steps", "40", "--reps", "2", "--warmup", "40", "--learning-starts", "20"),
        *("--grad-steps", "2", "--grad-reps", "2", "--batch-size", "16", "--net-arch", "16", "16"),
        *("--quiet", "--no-sbx", "--settings", "SAC", "REDQ", "DroQ", "--json", str(json_path)),
    ]
    report = speed.main(argv)
    assert report in capsys.readouterr().out
    assert "vector extensions: " in report
    assert "| Pendulum-v1 | sb3_softac | engine |" in report
    assert "| Pendulum-v1 | sb3_softac (autograd) | autograd |" in report
    assert "speed-up vs sb3_softac (autograd) (learn)" in report
    assert "error" not in report
    results = {result["setting"]: result for result in json.loads(json_path.read_text())["results"]}
    assert set(results) == {"SAC", "REDQ", "DroQ"}
    # REDQ and DroQ run ours only; DroQ's dropout critics are not covered by the engine.
    assert set(results["REDQ"]["steps_per_s"]) == {"sb3_softac", "sb3_softac (autograd)"}
    assert results["REDQ"]["update_path"] == {"sb3_softac": "engine", "sb3_softac (autograd)": "autograd"}
    assert results["DroQ"]["update_path"] == {"sb3_softac": "autograd", "sb3_softac (autograd)": "autograd"}
    for result in results.values():
        for label, train_ms in result["train_ms_per_env_step"].items():
            assert len(train_ms) == 2 and all(ms > 0 for ms in train_ms), label
            assert all(ms > 0 for ms in result["other_ms_per_env_step"][label]), label


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
