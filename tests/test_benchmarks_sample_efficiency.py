"""Smoke test of ``benchmarks/sample_efficiency.py`` (tiny budgets, no assertion on returns or timings)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_efficiency.py"


def _load() -> ModuleType:
    name = "bench_sample_efficiency"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # registered so that worker processes could unpickle its jobs
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_settings_configure_what_they_claim() -> None:
    bench = _load()
    budget = bench.BUDGETS["Hopper-v5"]
    sac = bench.setting_kwargs("SAC", budget, 5)
    assert "gradient_steps" not in sac and "critic_subset_size" not in sac
    assert sac["policy_kwargs"] == {"net_arch": list(budget.net_arch)}
    droq = bench.setting_kwargs("DroQ", budget, 5)
    assert droq["gradient_steps"] == droq["policy_delay"] == 5
    assert droq["policy_kwargs"]["dropout_rate"] == 0.01 and droq["policy_kwargs"]["layer_norm"] is True
    redq = bench.setting_kwargs("REDQ", budget, 5)
    assert redq["policy_kwargs"]["n_critics"] == 10 and redq["critic_subset_size"] == 2
    assert redq["gradient_steps"] == redq["policy_delay"] == 5
    with pytest.raises(ValueError, match="unknown setting"):
        bench.setting_kwargs("TD3", budget, 5)


def test_quick_run_writes_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load()
    text = bench.main(["--quick", "--envs", "Pendulum-v1", "--jobs", "1", "--out", str(tmp_path)])
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
    rerendered = bench.main(["--from-json", str(tmp_path / "sample_efficiency_quick.json")])
    assert bench.render_table(runs) in rerendered


def test_confidence_interval() -> None:
    bench = _load()
    mean, half = bench.mean_ci95([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.303 / 3**0.5, rel=1e-3)  # t_{0.975, 2} * s / sqrt(n), s = 1
