#!/bin/bash
# Any config, any size. Defaults: 1 node, 1 task, no GPU (the tiny CPU configs, tests); more
# tasks with --ntasks=N (one node) or --nodes=M --ntasks-per-node=G.
#   sbatch slurm/train.sh configs/demo_fmnist_resnet_ann.yaml train.epochs=2
#   sbatch --nodes=$NODES --gpus-per-node=$GPUS --ntasks-per-node=$GPUS --cpus-per-task=8 \
#       slurm/train.sh configs/ilsvrc_resnet50_sieve.yaml
# Submit from the repository root. Variables: see slurm/common.sh (DATA_ROOT, CKPT_URL, ...).
#SBATCH --job-name=anytime
#SBATCH --nodes=1
#SBATCH --cpus-per-task=1
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
CONFIG=${1:?usage: sbatch slurm/train.sh CONFIG [overrides...]}
shift
source "${REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
launch_training "$@"
