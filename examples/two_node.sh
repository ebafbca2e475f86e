#!/usr/bin/env bash
# Train one knnformer run on two machines with torchrun's c10d rendezvous (PyTorch's own launcher; knnformer has
# none of its own). Run the same line on both machines, with the same RDZV_HOST (a host name or address of one of
# them that both can reach) and the same DATASTORE and RUN paths, on a shared file system:
#
#   RDZV_HOST=node1 NPROC=4 examples/two_node.sh DATASTORE RUN [--config small --set train.parallel=fsdp ...]
#
# Or under Slurm, one task per node (torchrun starts the ranks):
#
#   #SBATCH --nodes=2 --ntasks-per-node=1 --cpus-per-task=16     (add --gpus-per-node=N on GPU nodes)
#   srun env RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) examples/two_node.sh DS RUN
#
# Every rank draws the same global micro-batch (train.batch_size windows) and keeps its slice, so the run takes
# the steps a one-process run would; train.batch_size must be divisible by NODES x NPROC. gloo on CPUs, NCCL on
# CUDA (each rank takes cuda:LOCAL_RANK). A rank that dies makes torchrun stop the others; collectives give up
# after KNNFORMER_DIST_TIMEOUT seconds (default 300). FSDP checkpoints are written by every rank (DCP) into
# RUN/checkpoints/step-N/, which appears only once all ranks have written: the run folder must be shared.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,20p' "$0" >&2
  exit 2
fi
DATASTORE=$1
RUN=$2
shift 2
: "${RDZV_HOST:?set RDZV_HOST to a host both machines can reach}"
exec torchrun \
  --nnodes="${NODES:-2}" \
  --nproc-per-node="${NPROC:-1}" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="${RDZV_HOST}:${RDZV_PORT:-29400}" \
  --rdzv-id="${RDZV_ID:-knnformer-$(basename "$RUN")}" \
  -m knnformer train "$DATASTORE" --out "$RUN" "$@"
