#!/usr/bin/env bash
# Train sb3_softac.SAC ("softac") with the RL Zoo on Pendulum-v1, replay the agent, and summarise the runs.
#
#   bash examples/zoo_train_enjoy.sh              # a few minutes on 2 CPU cores
#   STEPS=20000 bash examples/zoo_train_enjoy.sh  # the packaged budget for Pendulum-v1
#
# Needs: pip install 'sb3_softac[zoo]' (rl_zoo3) and, for the two summary plots, 'rl_zoo3[plots]'.
set -euo pipefail

read -r -a ZOO <<< "${ZOO:-python -m sb3_softac.zoo}"  # or: ZOO=sb3-softac-zoo
LOGS=${LOGS:-logs/zoo_example}
STEPS=${STEPS:-4000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MPLBACKEND=${MPLBACKEND:-Agg}  # write figures to files instead of opening windows

# Two seeds, hyperparameters from the packaged softac.yml (sb3_softac/hyperparams/; add "-conf my.yml" to use your own),
# evaluated every 1000 steps so that the plot scripts have learning curves to work with.
for seed in 1 2; do
  "${ZOO[@]}" train --algo softac --env Pendulum-v1 -n "$STEPS" --seed "$seed" \
    --eval-freq 1000 --eval-episodes 5 --num-threads 1 -f "$LOGS"
done

# Replay the latest run (logs/zoo_example/softac/Pendulum-v1_2) for two episodes.
"${ZOO[@]}" enjoy --algo softac --env Pendulum-v1 -f "$LOGS" -n 400 --no-render

# Final scores table + pickle, then learning curves from that pickle (needs at least two runs per env).
"${ZOO[@]}" all_plots -a softac -e Pendulum-v1 -f "$LOGS" -o "$LOGS/results" --no-display
"${ZOO[@]}" plot_from_file -i "$LOGS/results.pkl" -o "$LOGS/learning_curves.svg"
echo "Learning curves written to $LOGS/learning_curves.svg"
# A video of the latest run (needs: pip install pygame moviepy):
#   sb3-softac-zoo record_video --algo softac --env Pendulum-v1 -f logs/zoo_example -n 400
# Training-episode rewards (interactive window; needs a display):
#   sb3-softac-zoo plot_train -a softac -e Pendulum-v1 -f logs/zoo_example
