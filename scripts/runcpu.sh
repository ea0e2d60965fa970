#!/usr/bin/env bash
# The nanochat-jax pipeline at a tiny size on a laptop CPU, in a few minutes.
# Run from the repository root, with the package installed:  bash scripts/runcpu.sh
# So far: data -> tokenizer (train + eval) -> base pretraining of a d4 model -> a reply from the engine.
# The chat stages, evals and the report join as they land.
set -euo pipefail
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat_jax}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
data="$NANOCHAT_BASE_DIR/base_data"

# 1. data: FineWeb-edu shards if present or downloadable, else a stand-in corpus built from Python's own docs
if [ "$(ls "$data"/*.parquet 2>/dev/null | wc -l)" -lt 2 ]; then
    python -m scripts.download_data -n 2 || {
        echo "runcpu: no network to fetch FineWeb-edu; building a LOCAL STAND-IN corpus from Python's docstrings"
        python -m scripts.local_corpus
    }
fi

# 2. tokenizer: a small vocabulary suits a tiny model and a tiny corpus
python -m tokenizer.train --vocab-size 8192 --max-chars 50000000
python -m tokenizer.eval

# 3. pretraining: a d4 GPT for 50 steps of 4096 tokens (validation bpb every 25 steps)
python -m train.base --depth 4 --max-seq-len 256 --device-batch-size 4 --total-batch-size 4096 \
    --num-iterations 50 --eval-every 25 --eval-tokens 16384 --sample-every -1

# 4. talk to it (a base model: it continues text rather than chats)
python -m serve.cli -i base -p "The capital of France is" -t 0 -m 24
