#!/usr/bin/env bash
# Two RL Zoo workers tuning sb3_softac.SAC ("softac") on Pendulum-v1 in ONE shared Optuna study.
#
#   bash examples/optuna_two_workers.sh   # a few minutes on 2 CPU cores (tiny budgets, for illustration)
#
# The study lives in an Optuna journal file (a --storage path ending in ".log"), which is enough for workers on one
# machine (or on a shared file system). For several machines use a database URL instead (docs/zoo-and-tuning.md).
# The workers start together on a fresh storage: the first creates the study, the other joins it (no manual step).
# Needs: pip install 'sb3_softac[zoo]' 'rl_zoo3[plots]' (the zoo writes its study report with pandas).
set -euo pipefail

read -r -a ZOO <<< "${ZOO:-python -m sb3_softac.zoo}"  # or: ZOO=sb3-softac-zoo
OUT=${OUT:-logs/optuna_example}
STORAGE=${STORAGE:-$OUT/study.log}
STUDY=${STUDY:-softac-pendulum}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

# --n-trials counts per worker: 2 workers x 3 trials = 6 trials in the study.
# Per trial: 2000 steps, evaluated twice (for the median pruner) on 3 episodes.
tune=(train --algo softac --env Pendulum-v1 -optimize
      --storage "$STORAGE" --study-name "$STUDY"
      -n 2000 --n-trials 3 --n-startup-trials 2 --n-evaluations 2 --eval-episodes 3
      --sampler tpe --pruner median --num-threads 1 --no-optim-plots)

pids=()
for worker in 1 2; do
  # Each worker gets its own log folder: the zoo names its report after the current second.
  "${ZOO[@]}" "${tune[@]}" -f "$OUT/worker$worker" > "$OUT/worker$worker.txt" 2>&1 &
  pids+=("$!")
done
for pid in "${pids[@]}"; do
  wait "$pid"
done
echo "Both workers finished; their output is in $OUT/worker{1,2}.txt"

python - "$STORAGE" "$STUDY" <<'PY'
import sys

import optuna

storage_path, study_name = sys.argv[1:]
storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage_path))
study = optuna.load_study(study_name=study_name, storage=storage)
states = [trial.state.name for trial in study.trials]
print(f"{len(study.trials)} trials in '{study_name}': {states}")
print(f"best trial #{study.best_trial.number}: mean reward {study.best_value:.1f}, params {study.best_params}")
PY

# Retrain with the hyperparameters of trial number N of this study (rl_zoo3 ignores --trial-id 0):
#   sb3-softac-zoo train --algo softac --env Pendulum-v1 \
#       --storage logs/optuna_example/study.log --study-name softac-pendulum --trial-id N
