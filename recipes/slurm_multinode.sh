#!/bin/bash
# Multi-node DINO training on Slurm: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch --nodes=2 recipes/slurm_multinode.sh recipes/dino_r50_4scale_12ep.py --set data.root=/data/coco
#
# Edit the #SBATCH lines for your cluster. Arguments after the script are passed to launch.py unchanged.
# The output folder must be on a filesystem every node sees (checkpoints are written by rank 0, RNG states by all).
#
# Time limits: GRACE seconds before --time runs out Slurm sends SIGUSR1 to this script (--signal=B:USR1@GRACE). The
# script passes it to the launchers (srun forwards it to them, torchrun's agent to every process); training finishes
# its current step, saves a checkpoint on every process and exits; the script then requeues the job
# (scontrol requeue), and the requeued job runs this same command, which resumes from that checkpoint
# (train.auto_resume). A run that finishes is not requeued. GRACE must cover one training step plus one checkpoint
# save (docs/training.md, "Clusters, time limits and preemption", has measured figures); raise it with the step time.
#SBATCH --job-name=dino
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts the per-GPU processes
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300          # GRACE = 300 s; keep TORCH_ELASTIC_SHUTDOWN_TIMEOUT below it
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued job appends to the same log
#SBATCH --output=%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NUM_MACHINES=${SLURM_NNODES:-1}
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
NUM_PROCESSES=$((NUM_MACHINES * GPUS_PER_NODE))   # accelerate counts processes over all machines
ARGS=$(printf '%q ' "$@")                          # launch.py arguments, quoted for the inner shell

# torchrun's agent (inside accelerate launch) passes on only the signals it handles: SIGUSR1 is not among its
# defaults (without it SIGUSR1 would kill the launcher at once). After passing a signal on it waits
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) for the processes to exit, then SIGKILLs them.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-280}

signalled=0
on_usr1() {
    signalled=1
    echo "slurm_multinode.sh: SIGUSR1 (time limit near): training saves a checkpoint, then job $SLURM_JOB_ID is requeued" >&2
    kill -USR1 "$SRUN_PID" 2>/dev/null || true
}
trap on_usr1 USR1

# One task per node; SLURM_NODEID gives each node its machine rank. \$ delays expansion to the node itself.
# In the background so that this shell can take SIGUSR1 while training runs (bash runs a trap only between commands).
srun --kill-on-bad-exit=1 bash -c "exec accelerate launch \
    --multi_gpu \
    --num_machines $NUM_MACHINES \
    --num_processes $NUM_PROCESSES \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_PROCESS_IP \
    --main_process_port $MAIN_PROCESS_PORT \
    --rdzv_backend static \
    launch.py $ARGS" &
SRUN_PID=$!

# `wait` returns early when the trap runs; wait again until srun has exited (every process saved its checkpoint).
status=0
while :; do
    wait "$SRUN_PID" && status=0 || status=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done

if [ "$signalled" = 1 ] && [ "$status" != 0 ]; then
    scontrol requeue "$SLURM_JOB_ID"   # the requeued job reruns this script: the same command resumes
    exit 0
fi
exit "$status"   # finished (0, no requeue) or failed (the launcher's status)
