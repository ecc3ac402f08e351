#!/usr/bin/env bash
# Stitch separately trained members into an EANN (python -m pipeline assemble) on one GPU node.
#
#   MEMBERS="s3://ckpt/r50/checkpoints s3://ckpt/r101/checkpoints s3://ckpt/r152/checkpoints" \
#   VAL_DIR=/datasets/imagenet OUT_URL=s3://ckpt/eann/resnet-b2 \
#   ENDPOINT_URL=https://minio.example:9000 sbatch slurm/eann_assemble.sh
#
# MEMBERS   checkpoint URLs, cheapest first or in any order (assemble sorts them by cost)
# VAL_DIR   data root holding the held-out split (SPLIT, default val) in the ImageNet layout
# OUT_URL   folder URL for eann.safetensors, eann.json and the plots
# Optional: ENDPOINT_URL (S3-compatible server), SPLIT, BUDGETED (points of the budgeted-batch
# curve, default 8; 0 = off), AMP (none|bf16|fp16, default none), PYTHON, and anything after the
# script name is passed on (dotted overrides such as data.batch_size=128 data.workers=8).
# Credentials come from the usual AWS_* variables / ~/.aws / instance role, never from here.
#SBATCH --job-name=eann-assemble
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail

: "${MEMBERS:?set MEMBERS to the checkpoint URLs of the members, separated by spaces}"
: "${VAL_DIR:?set VAL_DIR to the data root that holds the held-out split}"
: "${OUT_URL:?set OUT_URL to the folder URL the EANN is written to}"
PYTHON=${PYTHON:-python}
args=(assemble --members ${MEMBERS} --val "${VAL_DIR}" --out "${OUT_URL}"
      --split "${SPLIT:-val}" --amp "${AMP:-none}" --budgeted "${BUDGETED:-8}")
if [[ -n "${ENDPOINT_URL:-}" ]]; then
  args+=(--endpoint-url "${ENDPOINT_URL}")
fi

cd "${SLURM_SUBMIT_DIR:-.}"
echo "$(date -u +%FT%TZ) job ${SLURM_JOB_ID:-local} on $(hostname): ${PYTHON} -m pipeline ${args[*]} $*"
# One process: assembly evaluates every exit of every member once; `srun` gives it the allocated
# GPU. Outside SLURM (bash slurm/eann_assemble.sh on a workstation) it runs directly.
launch=()
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  launch=(srun --ntasks=1)
fi
"${launch[@]}" "${PYTHON}" -m pipeline "${args[@]}" "$@"
