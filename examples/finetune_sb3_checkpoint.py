"""Fine-tune a stable_baselines3.SAC checkpoint with sb3_softac, then hand the result back to SB3.

``sb3_softac.SAC.load`` reads a zip written by ``stable_baselines3.SAC.save`` (weights, Adam states, entropy
coefficient and step counter carry over) and ``save_as_sb3`` writes one that ``stable_baselines3.SAC.load`` reads.
Without ``--checkpoint`` the script first trains a small SB3 model to have something to start from.

Run (about half a minute on 2 CPU cores)::

    python examples/finetune_sb3_checkpoint.py
    python examples/finetune_sb3_checkpoint.py --checkpoint my_sb3_sac.zip --env Pendulum-v1 --timesteps 20000

A checkpoint trained with the RL Zoo (``python -m rl_zoo3.train --algo sac ...``) works the same way: pass
``--checkpoint logs/sac/<env>_1/<env>.zip``.
"""

import argparse
from pathlib import Path

import numpy as np
import stable_baselines3 as sb3
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_softac import SAC


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="Pendulum-v1", help="Gymnasium environment id the checkpoint was trained on")
    parser.add_argument("--checkpoint", type=Path, help="a stable_baselines3.SAC zip (default: train one first)")
    parser.add_argument("--timesteps", type=int, default=1_500, help="fine-tuning steps (and SB3 pre-training steps)")
    parser.add_argument("--log-dir", type=Path, default=Path("logs/finetune_sb3"), help="where models go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    th.set_num_threads(1)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    env = make_vec_env(args.env, n_envs=1, seed=args.seed)

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.log_dir / "sb3_pretrained.zip"
        print(f"Training stable_baselines3.SAC for {args.timesteps} steps -> {checkpoint}")
        pretrained = sb3.SAC(
            "MlpPolicy",
            env,
            learning_rate=1e-3,
            learning_starts=min(1_000, args.timesteps // 4),
            policy_kwargs=dict(net_arch=[64, 64]),
            seed=args.seed,
        )
        pretrained.learn(args.timesteps)
        pretrained.save(checkpoint)

    # The SB3 archive is converted while loading. Its replay buffer is not part of the zip: save it with
    # sb3_model.save_replay_buffer(...) and restore it with model.load_replay_buffer(...) if you have one.
    model = SAC.load(checkpoint, env=env, seed=args.seed)
    before, _ = evaluate_policy(model, env, n_eval_episodes=3, deterministic=True)
    start = model.num_timesteps
    print(f"Loaded {checkpoint} into sb3_softac at step {start}: mean return {before:.1f}")

    # reset_num_timesteps=False continues the step counter (and the learning-rate schedule) of the checkpoint.
    # learning_starts counts from step 0, so training resumes at once and the first minibatches come from the few
    # transitions collected so far: restore the SB3 replay buffer (see above) to fine-tune on more data from the start.
    model.learn(args.timesteps, reset_num_timesteps=False)
    after, _ = evaluate_policy(model, env, n_eval_episodes=3, deterministic=True)
    print(f"Fine-tuned to step {model.num_timesteps}: mean return {after:.1f}")

    # Back to SB3. This refuses, naming them, sb3_softac-only options that SB3 cannot represent
    # (critic dropout / layer norm, policy_delay, qf_learning_rate, critic_subset_size, discrete actions).
    exported = args.log_dir / "fine_tuned_for_sb3.zip"
    model.save_as_sb3(exported)
    reference = sb3.SAC.load(exported, env=env)
    observations = np.stack([env.observation_space.sample() for _ in range(64)])
    same = np.array_equal(
        reference.predict(observations, deterministic=True)[0], model.predict(observations, deterministic=True)[0]
    )
    print(f"Exported {exported}; SB3 loads it at step {reference.num_timesteps}, same actions: {same}")
    if not same:
        raise SystemExit("the exported model acts differently")


if __name__ == "__main__":
    main()
