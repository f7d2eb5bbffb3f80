"""Tests of the RL Zoo integration (``sb3_softac.zoo``, ``hyperparams/softac.yml``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("rl_zoo3", reason="the zoo integration needs rl_zoo3 (pip install 'sb3_softac[zoo]')")

import rl_zoo3
import rl_zoo3.enjoy
import rl_zoo3.exp_manager
import rl_zoo3.hyperparams_opt
import rl_zoo3.train
import rl_zoo3.utils
import stable_baselines3

import sb3_softac
from sb3_softac import SAC, zoo

REPO_ROOT = Path(__file__).resolve().parents[1]
ZOO_SAC_YML = Path(rl_zoo3.__file__).parent / "hyperparams" / "sac.yml"
MUJOCO_V4_IDS = ("HalfCheetah-v4", "Ant-v4", "Hopper-v4", "Walker2d-v4", "Humanoid-v4", "Swimmer-v4")
try:  # Optuna's journal operation code for "create trial" (private enum, stable value 4 in Optuna 3.x-5.x).
    from optuna.storages.journal._storage import JournalOperation

    _CREATE_TRIAL_OP_CODE = int(JournalOperation.CREATE_TRIAL)
except ImportError:  # pragma: no cover
    _CREATE_TRIAL_OP_CODE = 4
# Timeout of each zoo subprocess, generous for slow CI machines (they take ~5-20 s on 2 cores).
SUBPROCESS_TIMEOUT = 180


@dataclass
class ZooRun:
    """Outcome of one ``python -m sb3_softac.zoo`` call."""

    returncode: int
    stdout: str
    stderr: str


def _subprocess_env() -> dict[str, str]:
    """:return: environment for zoo subprocesses: single-threaded, headless, same ``sb3_softac`` as this process."""
    env = dict(os.environ)
    package_parent = str(Path(sb3_softac.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return env


def _zoo_command(*args: str) -> list[str]:
    """
    :param args: script name and its arguments
    :return: command line running the zoo wrapper with the current interpreter
    """
    return [sys.executable, "-m", "sb3_softac.zoo", *args]


def run_zoo(*args: str, cwd: Path) -> ZooRun:
    """
    Run ``python -m sb3_softac.zoo ARGS`` to completion.

    :param args: script name and its arguments
    :param cwd: working directory (relative log folders end up there)
    :return: exit status and captured output
    """
    completed = subprocess.run(
        _zoo_command(*args),
        cwd=cwd,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    return ZooRun(completed.returncode, completed.stdout, completed.stderr)


def assert_ok(run: ZooRun) -> None:
    """
    :param run: a finished zoo call
    :raises AssertionError: with the end of its output when it failed
    """
    assert run.returncode == 0, (
        f"exit status {run.returncode}\n--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}"
    )


def load_yaml(path: Path) -> Any:
    """
    :param path: a YAML file written by the zoo (may hold Python objects, e.g. OrderedDict)
    :return: its content
    """
    with open(path) as file:
        return yaml.load(file, Loader=yaml.UnsafeLoader)


def typed(settings: dict[str, Any]) -> dict[str, tuple[Any, type]]:
    """
    :param settings: hyperparameters of one environment
    :return: the same with each value paired with its type, so that ``1e6`` (float) differs from ``1000000`` (int)
    """
    return {key: (value, type(value)) for key, value in settings.items()}


# --------------------------------------------------------------------------------------------------------------------
# Command line wrapper
# --------------------------------------------------------------------------------------------------------------------


def test_unknown_script_gives_clear_error(tmp_path: Path) -> None:
    run = run_zoo("trian", "--algo", "softac", cwd=tmp_path)
    assert run.returncode == 2
    assert "unknown script 'trian'" in run.stderr
    for script in zoo.SCRIPTS:
        assert script in run.stderr
    assert "Traceback" not in run.stderr


def test_help_and_missing_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert zoo.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out
    assert "softac" in out
    assert zoo.main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_console_script_entry_point() -> None:
    try:
        distribution = metadata.distribution("sb3_softac")
    except metadata.PackageNotFoundError:
        pytest.skip("sb3_softac is not installed, no console scripts to check")
    scripts = {entry.name: entry.value for entry in distribution.entry_points if entry.group == "console_scripts"}
    assert scripts.get("sb3-softac-zoo") == "sb3_softac.zoo:main"


# --------------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------------


def test_registration_adds_softac_and_keeps_sac() -> None:
    algos_before = dict(rl_zoo3.utils.ALGOS)
    samplers_before = dict(rl_zoo3.hyperparams_opt.HYPERPARAMS_SAMPLER)
    converters_before = dict(rl_zoo3.hyperparams_opt.HYPERPARAMS_CONVERTER)

    zoo.register()
    zoo.register()  # idempotent

    algos = rl_zoo3.utils.ALGOS
    assert SAC is not stable_baselines3.SAC
    assert algos["softac"] is SAC
    assert algos["sac"] is stable_baselines3.SAC
    # Nothing else changed.
    assert {key: value for key, value in algos.items() if key != "softac"} == {
        key: value for key, value in algos_before.items() if key != "softac"
    }
    samplers = rl_zoo3.hyperparams_opt.HYPERPARAMS_SAMPLER
    converters = rl_zoo3.hyperparams_opt.HYPERPARAMS_CONVERTER
    assert samplers["softac"] is samplers["sac"] is samplers_before["sac"]
    assert converters["softac"] is converters["sac"] is converters_before["sac"]
    assert set(samplers) - set(samplers_before) <= {"softac"}
    assert set(converters) - set(converters_before) <= {"softac"}

    # The scripts hold references to these very tables (no private copies that would miss "softac").
    assert rl_zoo3.ALGOS is algos
    assert rl_zoo3.train.ALGOS is algos
    assert rl_zoo3.enjoy.ALGOS is algos
    assert rl_zoo3.exp_manager.ALGOS is algos
    assert rl_zoo3.exp_manager.HYPERPARAMS_SAMPLER is samplers
    assert rl_zoo3.exp_manager.HYPERPARAMS_CONVERTER is converters


@pytest.mark.parametrize(
    ("args", "expected_conf"),
    [
        (["--algo", "softac"], "DEFAULT"),
        (["--algo=softac", "--env", "Pendulum-v1"], "DEFAULT"),
        (["--al", "softac", "-params", "learning_rate:0.1"], "DEFAULT"),
        (["-params", "learning_rate:0.1", "--algo", "softac"], "DEFAULT"),
        (["--algo", "softac", "-conf", "mine.yml"], None),
        (["--algo", "softac", "--conf-file", "mine.yml"], None),
        (["--algo", "softac", "--conf-file=mine.yml"], None),
        (["--conf", "mine.yml", "--algo", "softac"], None),
        (["--algo", "sac"], None),
        ([], None),
    ],
)
def test_default_conf_file_injection(args: list[str], expected_conf: str | None) -> None:
    result = zoo.with_default_conf_file(args)
    if expected_conf is None:
        assert result == args
    else:
        assert result == ["--conf-file", str(zoo.default_hyperparams_path()), *args]


def test_inference_loader_restores_table(tmp_path: Path) -> None:
    model = SAC("MlpPolicy", "Pendulum-v1", buffer_size=5000, learning_starts=0)
    model.save(tmp_path / "agent")
    zoo.register()
    with zoo._inference_loader():
        loaded = rl_zoo3.utils.ALGOS["softac"].load(tmp_path / "agent.zip", device="cpu")
    assert type(loaded) is SAC
    assert loaded.buffer_size == 1
    assert rl_zoo3.utils.ALGOS["softac"] is SAC


def test_optimize_refuses_a_minimizing_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    optuna = pytest.importorskip("optuna")
    storage_path = tmp_path / "study.log"
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage_path)))
    optuna.create_study(storage=journal, study_name="created-minimizing")  # Optuna's default direction
    optuna.create_study(storage=journal, study_name="created-maximizing", direction="maximize")
    common = ["--algo", "softac", "--env", "Pendulum-v1", "-optimize", "--storage", str(storage_path)]

    assert zoo.main(["train", *common, "--study-name", "created-minimizing"]) == 2
    assert "direction 'minimize'" in capsys.readouterr().err
    assert zoo._study_direction_error([*common, "--study-name", "created-maximizing"]) is None
    assert zoo._study_direction_error([*common, "--study-name", "not-created-yet"]) is None
    missing_file = [*common[:-1], str(tmp_path / "missing.log"), "--study-name", "x"]
    assert zoo._study_direction_error(missing_file) is None


# --------------------------------------------------------------------------------------------------------------------
# Hyperparameter file
# --------------------------------------------------------------------------------------------------------------------


def test_packaged_file_is_the_repository_copy() -> None:
    path = zoo.default_hyperparams_path()
    assert path.name == "softac.yml"
    canonical = REPO_ROOT / "hyperparams" / "softac.yml"
    if canonical.is_file():  # running from a checkout
        assert path.read_bytes() == canonical.read_bytes()


def test_every_zoo_sac_env_has_identical_settings() -> None:
    with open(ZOO_SAC_YML) as file:
        zoo_sac = yaml.safe_load(file)
    with open(zoo.default_hyperparams_path()) as file:
        ours = yaml.safe_load(file)

    assert "default" in ours
    missing = sorted(set(zoo_sac) - set(ours))
    assert not missing, f"environments of {ZOO_SAC_YML} missing from softac.yml: {missing}"
    different = [env_id for env_id in zoo_sac if typed(ours[env_id]) != typed(zoo_sac[env_id])]
    assert not different, f"settings differ from {ZOO_SAC_YML} for: {different}"


def test_mujoco_v5_mirrors_v4() -> None:
    with open(zoo.default_hyperparams_path()) as file:
        ours = yaml.safe_load(file)
    v4_ids = {env_id for env_id in ours if env_id.endswith("-v4")}
    assert v4_ids == set(MUJOCO_V4_IDS)
    for v4_id in v4_ids:
        v5_id = v4_id[: -len("v4")] + "v5"
        assert v5_id in ours, v5_id
        assert typed(ours[v5_id]) == typed(ours[v4_id]), v5_id


# --------------------------------------------------------------------------------------------------------------------
# End-to-end runs of the zoo scripts
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainedRun:
    """A ``train --algo softac`` run on Pendulum-v1 with the packaged hyperparameters."""

    workdir: Path
    run: ZooRun
    run_dir: Path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """:return: one small training run shared by the tests below (about 10 s)"""
    workdir = tmp_path_factory.mktemp("zoo_train")
    run = run_zoo(
        "train",
        "--algo",
        "softac",
        "--env",
        "Pendulum-v1",
        "-n",
        "500",
        "--seed",
        "0",
        "--eval-freq",
        "-1",
        "--num-threads",
        "1",
        "-f",
        "logs",
        cwd=workdir,
    )
    assert_ok(run)
    return TrainedRun(workdir, run, workdir / "logs" / "softac" / "Pendulum-v1_1")


def test_train_uses_packaged_hyperparams(trained_run: TrainedRun) -> None:
    default_path = str(zoo.default_hyperparams_path())
    assert f"Loading hyperparameters from: {default_path}" in trained_run.run.stdout
    params_dir = trained_run.run_dir / "Pendulum-v1"
    assert load_yaml(params_dir / "args.yml")["conf_file"] == default_path
    # config.yml holds the file's entry (before the -n override).
    config = dict(load_yaml(params_dir / "config.yml"))
    assert config == {"policy": "MlpPolicy", "n_timesteps": 20000, "learning_rate": 0.001}


def test_trained_model_is_softac(trained_run: TrainedRun) -> None:
    model = SAC.load(trained_run.run_dir / "Pendulum-v1.zip", device="cpu")
    assert type(model) is SAC
    assert model.lr_schedule(1.0) == pytest.approx(0.001)
    assert model.num_timesteps == 500


def test_enjoy_trained_agent(trained_run: TrainedRun) -> None:
    run = run_zoo(
        "enjoy",
        "--algo",
        "softac",
        "--env",
        "Pendulum-v1",
        "-f",
        "logs",
        "-n",
        "250",
        "--no-render",
        "--num-threads",
        "1",
        cwd=trained_run.workdir,
    )
    assert_ok(run)
    assert "Pendulum-v1_1/Pendulum-v1.zip" in run.stdout
    assert "Mean reward:" in run.stdout


def test_conf_file_overrides_packaged_file(tmp_path: Path) -> None:
    custom = tmp_path / "custom.yml"
    custom.write_text(
        textwrap.dedent(
            """\
            Pendulum-v1:
              policy: 'MlpPolicy'
              n_timesteps: 300
              learning_rate: 0.0042
              learning_starts: 50
              batch_size: 32
              policy_kwargs: "dict(net_arch=[16])"
            """
        )
    )
    # No -n: the step budget itself comes from the custom file.
    run = run_zoo(
        "train",
        "--algo",
        "softac",
        "--env",
        "Pendulum-v1",
        "-conf",
        str(custom),
        "--seed",
        "0",
        "--eval-freq",
        "-1",
        "--num-threads",
        "1",
        "-f",
        "logs",
        cwd=tmp_path,
    )
    assert_ok(run)
    assert f"Loading hyperparameters from: {custom}" in run.stdout
    run_dir = tmp_path / "logs" / "softac" / "Pendulum-v1_1"
    assert load_yaml(run_dir / "Pendulum-v1" / "args.yml")["conf_file"] == str(custom)
    model = SAC.load(run_dir / "Pendulum-v1.zip", device="cpu")
    assert type(model) is SAC
    assert model.num_timesteps == 300
    assert model.lr_schedule(1.0) == pytest.approx(0.0042)
    assert model.batch_size == 32


def test_unlisted_env_uses_default_entry(tmp_path: Path) -> None:
    # An environment id that no hyperparameter file lists.
    (tmp_path / "softac_test_envs.py").write_text(
        textwrap.dedent(
            """\
            import gymnasium as gym

            gym.register(
                "SoftacTestPendulum-v0",
                entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv",
                max_episode_steps=50,
            )
            """
        )
    )
    run = run_zoo(
        "train",
        "--algo",
        "softac",
        "--env",
        "SoftacTestPendulum-v0",
        "--gym-packages",
        "softac_test_envs",
        "-n",
        "150",
        "--seed",
        "0",
        "--eval-freq",
        "-1",
        "--num-threads",
        "1",
        "-f",
        str(tmp_path / "logs"),
        cwd=tmp_path,
    )
    assert_ok(run)
    assert "Using 'default' hyperparameters" in run.stdout
    params_dir = tmp_path / "logs" / "softac" / "SoftacTestPendulum-v0_1" / "SoftacTestPendulum-v0"
    assert dict(load_yaml(params_dir / "config.yml")) == {"policy": "MlpPolicy", "n_timesteps": 1e6}


def test_optimize_two_workers_share_one_study(tmp_path: Path) -> None:
    pytest.importorskip("pandas", reason="rl_zoo3 writes the optimization report with pandas (rl_zoo3[plots])")
    optuna = pytest.importorskip("optuna")

    n_trials = 2
    storage = tmp_path / "optuna" / "study.log"
    study_name = "softac-pendulum-test"
    workers = [
        subprocess.Popen(
            _zoo_command(
                "train",
                "--algo",
                "softac",
                "--env",
                "Pendulum-v1",
                "-optimize",
                "-n",
                "300",
                # Few gradient steps per trial: the test is about the shared study, not about learning.
                "-params",
                "learning_starts:250",
                "--n-trials",
                str(n_trials),
                "--n-startup-trials",
                "1",
                "--n-evaluations",
                "1",
                "--eval-episodes",
                "1",
                "--num-threads",
                "1",
                "--sampler",
                "random",
                "--pruner",
                "none",
                "--no-optim-plots",
                "--storage",
                str(storage),
                "--study-name",
                study_name,
                "-f",
                f"logs_worker{index}",
            ),
            cwd=tmp_path,
            env=_subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    outputs = []
    for worker in workers:
        try:
            output, _ = worker.communicate(timeout=SUBPROCESS_TIMEOUT)
        finally:
            if worker.poll() is None:
                worker.kill()
        outputs.append(output)
        assert worker.returncode == 0, output[-3000:]

    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage)))
    study = optuna.load_study(study_name=study_name, storage=journal)
    assert len(study.trials) == 2 * n_trials
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(trial.state in finished for trial in study.trials)
    # The zoo's SAC search space was used.
    assert all("one_minus_gamma" in trial.params for trial in study.trials)
    assert "--algo softac" in study.user_attrs["command"]

    # Every process appends to the journal under its own random worker id ("<uuid>-<thread id>"):
    # both workers must have created n_trials trials each.
    creators: Counter[str] = Counter()
    with open(storage) as file:
        for line in file:
            entry = json.loads(line)
            if entry["op_code"] == _CREATE_TRIAL_OP_CODE:
                creators[entry["worker_id"].rsplit("-", 1)[0]] += 1
    assert sorted(creators.values()) == [n_trials, n_trials], creators
    for output in outputs:
        assert "Number of finished trials:" in output
