#!/bin/bash
# Multi-node DINO training on Slurm: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch --nodes=2 recipes/slurm_multinode.sh recipes/dino_r50_4scale_12ep.py --set data.root=/data/coco
#
# Edit the #SBATCH lines for your cluster. Arguments after the script are passed to launch.py unchanged.
# The output folder must be on a filesystem every node sees (checkpoints are written by rank 0, RNG states by all).
#SBATCH --job-name=dino
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts the per-GPU processes
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NUM_MACHINES=${SLURM_NNODES:-1}
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
NUM_PROCESSES=$((NUM_MACHINES * GPUS_PER_NODE))   # accelerate counts processes over all machines
ARGS=$(printf '%q ' "$@")                          # launch.py arguments, quoted for the inner shell

# One task per node; SLURM_NODEID gives each node its machine rank. \$ delays expansion to the node itself.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --multi_gpu \
    --num_machines $NUM_MACHINES \
    --num_processes $NUM_PROCESSES \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_PROCESS_IP \
    --main_process_port $MAIN_PROCESS_PORT \
    --rdzv_backend static \
    launch.py $ARGS"
