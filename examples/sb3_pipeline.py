"""sb3_softac.SAC in an ordinary Stable-Baselines3 pipeline: vectorised envs, evaluation callback, save/load.

Nothing here is specific to sb3_softac except the import: swap it for ``from stable_baselines3 import SAC`` and the
script runs unchanged.

Run (about half a minute on 2 CPU cores; Pendulum-v1 is solved, mean return above -200, after ~10k steps)::

    python examples/sb3_pipeline.py
    python examples/sb3_pipeline.py --timesteps 20000 --log-dir logs/pendulum
"""

import argparse
from pathlib import Path

import torch as th
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_softac import SAC


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="Pendulum-v1", help="Gymnasium environment id with a Box action space")
    parser.add_argument("--timesteps", type=int, default=3_000, help="environment steps to train for")
    parser.add_argument("--log-dir", type=Path, default=Path("logs/sb3_pipeline"), help="where models and logs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress-bar", action="store_true", help="hide the progress bar (needs tqdm and rich)")
    args = parser.parse_args()
    th.set_num_threads(1)  # small networks: one thread is fastest

    # Monitor-wrapped vectorised environments: one to train on, a separately seeded one to evaluate on.
    train_env = make_vec_env(args.env, n_envs=1, seed=args.seed)
    eval_env = make_vec_env(args.env, n_envs=1, seed=args.seed + 1000)

    # Evaluate every ~quarter of the run; the best model so far is kept in <log-dir>/best_model.zip.
    eval_callback = EvalCallback(
        eval_env,
        n_eval_episodes=3,
        eval_freq=max(args.timesteps // 4, 1),
        best_model_save_path=str(args.log_dir),
        log_path=str(args.log_dir),
        deterministic=True,
    )

    model = SAC(
        "MlpPolicy",
        train_env,
        learning_rate=1e-3,
        learning_starts=min(1_000, args.timesteps // 4),
        policy_kwargs=dict(net_arch=[64, 64]),
        seed=args.seed,
        verbose=0,
    )
    model.learn(args.timesteps, callback=eval_callback, progress_bar=not args.no_progress_bar)

    path = args.log_dir / "final_model.zip"
    model.save(path)
    del model

    # Loading needs no environment to predict; pass one to evaluate or to keep training.
    loaded = SAC.load(path, env=eval_env)
    mean_return, std_return = evaluate_policy(loaded, eval_env, n_eval_episodes=5, deterministic=True)
    print(f"Saved to {path}; after {loaded.num_timesteps} steps: mean return {mean_return:.1f} +/- {std_return:.1f}")
    if eval_callback.best_mean_reward > float("-inf"):
        best = eval_callback.best_mean_reward
        print(f"Best evaluation during training: {best:.1f} ({args.log_dir / 'best_model.zip'})")


if __name__ == "__main__":
    main()
