#!/usr/bin/env bash
# The speedrun on a TPU v5e slice: the pipeline of scripts/speedrun.sh with jax[tpu], parameters and optimizer state
# sharded over the chips (FSDP: a v5e chip has 16 GB), every block recomputed in the backward pass (REMAT=full) and
# 16 rows per chip (gradient accumulation keeps the optimizer batch at 524,288 tokens). Every knob of speedrun.sh
# applies (DEPTH, MESH, DEVICE_BATCH_SIZE, REMAT, RL, ...). What fits, by the TPU compiler (docs/benchmarks.md):
# d20 on a v5e-8 needs 7.1 of the 15.75 GiB per chip at these settings, 8.6 GiB to spare (DEVICE_BATCH_SIZE=32
# fits too, 13.0 GiB, and is estimated faster; REMAT=none and REMAT=dots fit 8 rows, 11.8 and 9.7 GiB, estimated
# slower than REMAT=full at 16).
#
# One host (v5litepod-8: 8 chips), on the TPU VM:
#   bash scripts/speedrun_tpu.sh
# Several hosts (v5litepod-16 and up): NANOCHAT_BASE_DIR must be one filesystem that every host mounts at the same
# path (Filestore NFS, or a GCS bucket through gcsfuse), and the repository must be on every host. Then:
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=0   --command "cd nanochat-jax && PHASE=prepare  bash scripts/speedrun_tpu.sh"
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command "cd nanochat-jax && PHASE=train NANOCHAT_MULTIHOST=1 MESH=fsdp:16 bash scripts/speedrun_tpu.sh"
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=0   --command "cd nanochat-jax && PHASE=evaluate bash scripts/speedrun_tpu.sh"
# (with NANOCHAT_MULTIHOST=1 every process calls jax.distributed.initialize(), which finds its peers on Cloud TPU;
# MESH must cover all chips of the slice.) The chat evaluations and RL run on one host.
set -euo pipefail
export EXTRA="${EXTRA:-tpu}"
export MESH="${MESH:-fsdp:8}"
export DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-16}"
export REMAT="${REMAT:-full}"
exec bash "$(dirname "$0")/speedrun.sh"
