#!/usr/bin/env bash
# The $1000 tier: a d32 model (about 1.9B parameters) on one 8xH100 node, about 33 hours; the same pipeline as
# scripts/speedrun.sh with more data, a bigger tokenizer budget and 16 rows per GPU (two micro-steps: the optimizer
# still sees 524,288 tokens per step). XLA's GPU compiler plans 51.9 GiB per H100 for that step, 12% below JAX's
# 59.3 GiB (scripts.aot_compile --topology h100:8 --depth 32 --device-batch-size 16; 8 rows: 30.7 GiB). Every knob of
# speedrun.sh still applies.
#
#   bash scripts/run1000.sh
#   MESH=fsdp:8 bash scripts/run1000.sh      # shard parameters and optimizer state too, when memory is short
set -euo pipefail
export DEPTH="${DEPTH:-32}"
export DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-16}"
export NUM_SHARDS="${NUM_SHARDS:-800}"
export TOKENIZER_CHARS="${TOKENIZER_CHARS:-4000000000}"
exec bash "$(dirname "$0")/speedrun.sh"
