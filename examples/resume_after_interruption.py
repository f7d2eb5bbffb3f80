"""Checkpoint a run (model, replay buffer, VecNormalize statistics) and resume it after a crash or a kill.

The script trains until ``--timesteps``. When ``--folder`` already holds checkpoints it resumes from the latest
complete one instead of starting over, so running the same command again after an interruption finishes the run.

Run (about half a minute on 2 CPU cores)::

    python examples/resume_after_interruption.py --simulate-crash-at 1500   # dies abruptly at step 1500
    python examples/resume_after_interruption.py                            # resumes from step 1500, trains to 3000

What comes back is what the run held when the checkpoint was written: weights, optimizer states, entropy
coefficient, step counter, replay buffer and normalisation statistics. Not saved by SB3, hence not restored: the
random generators (``load`` re-seeds them with the model's seed) and the environments (they are reset), so the
resumed run is reproducible but not the same trajectory as an uninterrupted one. ``CheckpointCallback`` also runs
before the transition of its step is stored, so a checkpoint at step N holds N - 1 transitions.
"""

import argparse
import os
import re
from pathlib import Path

import torch as th
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

from sb3_softac import SAC
from sb3_softac.atomic_files import AtomicVecNormalize

PREFIX = "rl_model"  # CheckpointCallback's default name_prefix


def checkpoint_files(folder: Path, step: int) -> tuple[Path, Path, Path]:
    """Model, replay buffer and VecNormalize files that ``CheckpointCallback`` writes at ``step``."""
    return (
        folder / f"{PREFIX}_{step}_steps.zip",
        folder / f"{PREFIX}_replay_buffer_{step}_steps.pkl",
        folder / f"{PREFIX}_vecnormalize_{step}_steps.pkl",
    )


def load_latest_checkpoint(folder: Path, make_env) -> SAC | None:
    """Load the newest checkpoint whose three files are complete; None when there is none.

    Each file is written atomically (``AtomicVecNormalize`` for the statistics), so a process killed while saving
    leaves the newest checkpoint with files missing, never truncated: such a checkpoint is skipped.
    """
    pattern = re.compile(rf"^{PREFIX}_(\d+)_steps\.zip$")
    matches = (pattern.match(path.name) for path in folder.glob("*.zip"))
    steps = sorted((int(match[1]) for match in matches if match is not None), reverse=True)
    for step in steps:
        model_path, buffer_path, vec_normalize_path = checkpoint_files(folder, step)
        if not (buffer_path.is_file() and vec_normalize_path.is_file()):
            continue
        try:
            env = VecNormalize.load(str(vec_normalize_path), make_env())
            model = SAC.load(model_path, env=env)
            model.load_replay_buffer(buffer_path)
        except Exception as error:  # e.g. files written by an older version, in place: fall back to the previous one
            print(f"Skipping the checkpoint at step {step}: {type(error).__name__}: {error}")
            continue
        return model
    return None


class CrashAt(BaseCallback):
    """Stand-in for a power cut or ``kill -9``: leaves the process at once, without any clean-up."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.step:
            print(f"Simulated crash at step {self.num_timesteps}")
            os._exit(1)
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="Pendulum-v1")
    parser.add_argument("--timesteps", type=int, default=3_000, help="total environment steps of the run")
    parser.add_argument("--save-freq", type=int, help="checkpoint every this many steps (default: timesteps / 6)")
    parser.add_argument("--folder", type=Path, default=Path("logs/resume_example"), help="checkpoint folder")
    parser.add_argument("--simulate-crash-at", type=int, help="kill this process once it reaches this step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    th.set_num_threads(1)
    n_envs = 1

    def make_env() -> VecEnv:
        return make_vec_env(args.env, n_envs=n_envs, seed=args.seed)

    model = load_latest_checkpoint(args.folder, make_env)
    if model is None:
        print(f"No checkpoint in {args.folder}: starting a new run")
        model = SAC(
            "MlpPolicy",
            AtomicVecNormalize(make_env(), gamma=0.99),  # VecNormalize, with atomic save() for CheckpointCallback
            learning_rate=1e-3,
            learning_starts=min(1_000, args.timesteps // 4),
            policy_kwargs=dict(net_arch=[64, 64]),
            seed=args.seed,
        )
    else:
        print(f"Resuming from the checkpoint at step {model.num_timesteps} ({model.replay_buffer.size()} transitions)")

    remaining = args.timesteps - model.num_timesteps
    if remaining <= 0:
        print(f"The run already reached {model.num_timesteps} steps")
        return
    save_freq = args.save_freq or max(args.timesteps // 6, 1)
    callbacks: list[BaseCallback] = [
        # save_freq counts calls, and each call is one step of every environment.
        CheckpointCallback(
            max(save_freq // n_envs, 1), str(args.folder), save_replay_buffer=True, save_vecnormalize=True
        )
    ]
    if args.simulate_crash_at is not None:
        callbacks.append(CrashAt(args.simulate_crash_at))
    # reset_num_timesteps=False: continue the step counter, so learn() runs the remaining steps only.
    model.learn(remaining, callback=callbacks, reset_num_timesteps=False)
    print(f"Finished at step {model.num_timesteps}; checkpoints in {args.folder}")


if __name__ == "__main__":
    main()
