#!/usr/bin/env bash
# The $100 speedrun: from nothing to a chat model and its report card on one 8-GPU node (8xH100, about 4 hours):
#   FineWeb-edu shards -> tokenizer (train + eval) -> base d20 -> base eval (CORE, bpb) -> midtraining -> chat eval
#   -> SFT -> chat eval -> [RL on GSM8K -> chat eval] -> report card ($NANOCHAT_BASE_DIR/report/report.md)
#
#   bash scripts/speedrun.sh                         # from the repository root; one process drives all local devices
#   WANDB_RUN=speedrun RL=1 bash scripts/speedrun.sh # with wandb logging and the RL stage
#   RECIPE=modern DEPTH=24 bash scripts/speedrun.sh  # nanochat's time-to-GPT-2 leaderboard run (ClimbMix, d24,
#                                                    # data:param 8, vocabulary 32768, the modern model and optimizer)
#   screen -L -Logfile speedrun.log -S speedrun bash scripts/speedrun.sh   # survives a dropped ssh session
#
# Knobs (environment variables):
#   RECIPE=classic        classic (nanochat of Dec 2025: FineWeb-edu, vocabulary 65536, ratio 20) | modern (its
#                         current recipe: ClimbMix, vocabulary 32768, ratio 8, batch from the horizon)
#   DEPTH=20              model depth (width 64 x depth); the scaling tiers: 20 ($100), 26, 32 (run1000.sh);
#                         modern: 24 by default
#   MESH=                 device mesh, e.g. data:8 | fsdp:8 | data:2,fsdp:4 (default: every device on data)
#   DEVICE_BATCH_SIZE     rows of 2048 tokens per device per micro-step (the step accumulates gradients so the
#                         optimizer batch stays 524,288 tokens); by default what XLA's GPU compiler fits in JAX's 75%
#                         of an H100 (59.3 GiB) with REMAT=none, at least 10% to spare (scripts.aot_compile
#                         --topology h100:8; docs/benchmarks.md): classic d20: 32 (39.5 GiB, 33% spare), d26: 16
#                         (34.5 GiB, 42%), d32: 16 (51.9 GiB, 12%); modern d24: 16 (FP8 33.4 GiB, 44%; bf16 32.0
#                         GiB, 46%). On an H200 (105.8 GiB usable) d26, d32 and modern d24 fit twice the rows
#   REMAT=none            what the backward pass keeps of each block: none (matmul and attention outputs) | dots
#                         (matmul outputs: attention runs twice) | full (only the block input: ~1/3 more compute);
#                         train.base compiles its step first and refuses a run that does not fit, naming the largest
#                         DEVICE_BATCH_SIZE that does
#   FP8=1                 modern recipe: FP8 matmuls in base training on H100/H200 (nanochat's leaderboard run); 0: bf16
#   NUM_SHARDS=240        training shards (FineWeb-edu, about 250M characters each; modern: 170 ClimbMix shards)
#   TOKENIZER_CHARS=2000000000   characters to train the tokenizer on
#   RL=0                  1 runs RL on GSM8K after SFT (single host), then its chat eval
#   EXTRA=gpu             which jax to install: gpu (CUDA 12) | tpu | none (use the environment as it is)
#   UNSAFE_SANDBOX=0      1 lets HumanEval's programs run in the weaker unsafe sandbox where the kernel refuses the
#                         code sandbox's namespaces (checked before anything else: python -m nanochat_jax.sandbox
#                         --check)
#   PHASE=all             all | prepare | train | evaluate; several hosts run `prepare` on one host, `train` on every
#                         host (NANOCHAT_MULTIHOST=1, NANOCHAT_BASE_DIR on a filesystem they share), `evaluate` on one
#   NANOCHAT_BASE_DIR     where data, checkpoints and the report go (default ~/.cache/nanochat_jax)
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE="${RECIPE:-classic}"
case "$RECIPE" in
    classic) DEPTH="${DEPTH:-20}"; NUM_SHARDS="${NUM_SHARDS:-240}"
             DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-$([ "$DEPTH" -le 20 ] && echo 32 || echo 16)}"
             VOCAB_SIZE=65536; base_flags=() ;;
    modern) DEPTH="${DEPTH:-24}"; DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-16}"; NUM_SHARDS="${NUM_SHARDS:-170}"
            VOCAB_SIZE=32768; base_flags=(--recipe modern --target-param-data-ratio 8)
            export NANOCHAT_DATASET=climbmix ;;
    *) echo "RECIPE must be classic or modern" >&2; exit 2 ;;
esac
MESH="${MESH:-}"
REMAT="${REMAT:-none}"
TOKENIZER_CHARS="${TOKENIZER_CHARS:-2000000000}"
RL="${RL:-0}"
EXTRA="${EXTRA:-gpu}"
PHASE="${PHASE:-all}"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat_jax}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$NANOCHAT_BASE_DIR"
tag="d$DEPTH"
mesh=(); [ -n "$MESH" ] && mesh=(--mesh "$MESH")
run=(); [ -n "${WANDB_RUN:-}" ] && run=(--run "$WANDB_RUN")
say() { echo; echo "=== speedrun $(date '+%H:%M:%S'): $*"; }
case "$PHASE" in all|prepare|train|evaluate) ;; *) echo "PHASE must be all|prepare|train|evaluate" >&2; exit 2 ;; esac

# the environment: a virtual environment with this package and the accelerator's jax
if [ "$EXTRA" != none ]; then
    [ -d .venv ] || python3 -m venv .venv
    . .venv/bin/activate
    pip install --quiet --upgrade pip
    pip install --quiet -e ".[$EXTRA]"
fi
# the chat evaluations run HumanEval's programs in the code sandbox: find out now, not after hours of training
sandbox=(); [ "${UNSAFE_SANDBOX:-0}" = 1 ] && sandbox=(--unsafe-sandbox)
if [ "$PHASE" = all ] || [ "$PHASE" = evaluate ]; then
    python -m nanochat_jax.sandbox --check "${sandbox[@]}" || {
        echo "the code sandbox is not available (above: why, and the fix); or UNSAFE_SANDBOX=1 to opt in" >&2; exit 1; }
fi
if [ "${NANOCHAT_MULTIHOST:-0}" != 1 ]; then  # (a multi-host process sees its peers only after jax.distributed)
    python -c "import jax; print(f'jax {jax.__version__}: {jax.device_count()} x {jax.devices()[0].device_kind}')"
fi

prepare() {
    python -m scripts.report reset
    say "data: the first 8 shards now, the other $((NUM_SHARDS - 8)) in the background while the tokenizer trains"
    python -m scripts.download_data -n 8
    python -m scripts.download_data -n "$NUM_SHARDS" > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
    download=$!
    say "tokenizer: $VOCAB_SIZE tokens on $TOKENIZER_CHARS characters"
    python -m tokenizer.train --max-chars "$TOKENIZER_CHARS" --vocab-size "$VOCAB_SIZE"
    python -m tokenizer.eval
    identity="$NANOCHAT_BASE_DIR/task_data/identity/identity_conversations.jsonl"
    if [ ! -f "$identity" ]; then  # nanochat's synthetic identity conversations (midtraining and SFT)
        mkdir -p "$(dirname "$identity")"
        curl -fsSL -o "$identity.tmp" https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl
        mv "$identity.tmp" "$identity"
    fi
    say "waiting for the shard download (log: $NANOCHAT_BASE_DIR/download.log)"
    wait "$download" || { cat "$NANOCHAT_BASE_DIR/download.log"; exit 1; }
}

train() {
    fp8=()  # the modern recipe's FP8 matmuls where the GPU has FP8 tensor cores (Hopper: H100, H200)
    if [ "$RECIPE" = modern ] && [ "${FP8:-1}" = 1 ] && [ "$EXTRA" != tpu ] && python -c "import jax, sys
sys.exit(not any(g in jax.local_devices()[0].device_kind for g in ('H100', 'H200')))" 2>/dev/null; then fp8=(--fp8); fi
    say "base model d$DEPTH, the $RECIPE recipe (its data:parameter ratio sets the steps)${fp8:+, FP8 matmuls}"
    python -m train.base "${base_flags[@]}" --depth "$DEPTH" --device-batch-size "$DEVICE_BATCH_SIZE" \
        --remat "$REMAT" "${fp8[@]}" "${mesh[@]}" "${run[@]}"
    say "base evaluation: CORE, train/val bits per byte, samples"
    python -m evals.base -g "$tag" --batch-size 64 "${mesh[@]}"
    say "midtraining"
    python -m train.mid --model-tag "$tag" --device-batch-size "$DEVICE_BATCH_SIZE" --remat "$REMAT" "${mesh[@]}" \
        "${run[@]}"
    say "supervised finetuning"
    python -m train.sft --model-tag "$tag" --remat "$REMAT" "${mesh[@]}" "${run[@]}"
}

evaluate() {
    say "chat evaluation: mid, then SFT"
    python -m evals.chat -g "$tag" -i mid "${sandbox[@]}"
    python -m evals.chat -g "$tag" -i sft "${sandbox[@]}"
    if [ "$RL" = 1 ]; then
        say "reinforcement learning on GSM8K, then its chat evaluation"
        python -m train.rl --model-tag "$tag" "${run[@]}"
        python -m evals.chat -g "$tag" -i rl "${sandbox[@]}"
    fi
    say "report card"
    python -m scripts.report generate
    echo "chat with it: python -m serve.web -g $tag  (or python -m serve.cli -g $tag)"
}

case "$PHASE" in
    all) prepare; train; evaluate ;;
    prepare) prepare ;;
    train) train ;;
    evaluate) evaluate ;;
esac
