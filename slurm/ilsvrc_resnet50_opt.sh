#!/bin/bash
# ILSVRC-2012: plain ResNet-50 (timm's resnet50, one exit), the OPT reference for relative
# errors. configs/ilsvrc_resnet50_opt.yaml, one process per GPU.
#   sbatch slurm/ilsvrc_resnet50_opt.sh [overrides...]
#   sbatch --nodes=4 --gpus-per-node=8 slurm/ilsvrc_resnet50_opt.sh
#       (one process per GPU, the config's global batch of 256 split over them;
#       --nodes=1-2 takes as many nodes as are free, and fewer after a requeue). CPUs per
#       process: --cpus-per-gpu=N (--cpus-per-task conflicts with the script's own)
# Submit from the repository root. DATA_ROOT, CKPT_URL, CKPT_ENDPOINT_URL, OUT_DIR: see
# slurm/common.sh. Requeued on preemption or 5 minutes before the time limit; resumes itself.
#SBATCH --job-name=ilsvrc_resnet50_opt
#SBATCH --nodes=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-gpu=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
CONFIG=${CONFIG:-configs/ilsvrc_resnet50_opt.yaml}
source "${REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
launch_training "$@"
