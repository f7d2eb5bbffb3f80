"""The example scripts run to completion (with a tiny budget) in a fresh interpreter, as a user would run them."""

from pathlib import Path

import pytest
from envs import REPO_ROOT, run_python

EXAMPLES = REPO_ROOT / "examples"


def _run(script: str, *args: str, cwd: Path, expected_returncode: int = 0) -> str:
    return run_python(str(EXAMPLES / script), *args, cwd=cwd, expected_returncode=expected_returncode).stdout


def test_sb3_pipeline(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    pytest.importorskip("rich")
    output = _run("sb3_pipeline.py", "--timesteps", "200", "--log-dir", "logs", cwd=tmp_path)
    assert "after 200 steps" in output
    assert (tmp_path / "logs" / "final_model.zip").is_file()
    assert (tmp_path / "logs" / "best_model.zip").is_file()
    assert (tmp_path / "logs" / "evaluations.npz").is_file()


def test_finetune_sb3_checkpoint(tmp_path: Path) -> None:
    output = _run("finetune_sb3_checkpoint.py", "--timesteps", "200", "--log-dir", "logs", cwd=tmp_path)
    assert "into sb3_softac at step 200" in output
    assert "same actions: True" in output
    assert (tmp_path / "logs" / "fine_tuned_for_sb3.zip").is_file()


def test_resume_after_interruption(tmp_path: Path) -> None:
    args = ("--timesteps", "300", "--save-freq", "50", "--folder", "checkpoints")
    crashed = _run(
        "resume_after_interruption.py", *args, "--simulate-crash-at", "150", cwd=tmp_path, expected_returncode=1
    )
    assert "starting a new run" in crashed and "Simulated crash at step 150" in crashed
    assert not (tmp_path / "checkpoints" / "rl_model_200_steps.zip").exists()

    resumed = _run("resume_after_interruption.py", *args, cwd=tmp_path)
    assert "Resuming from the checkpoint at step 150 (149 transitions)" in resumed
    assert "Finished at step 300" in resumed
    assert (tmp_path / "checkpoints" / "rl_model_vecnormalize_300_steps.pkl").is_file()
