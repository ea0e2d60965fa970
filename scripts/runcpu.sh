#!/usr/bin/env bash
# The whole nanochat-jax pipeline at a tiny size on a laptop CPU, in minutes:
#   data -> tokenizer (train + eval) -> base d4 -> base eval -> midtraining -> chat eval -> SFT -> chat eval
#   -> RL -> chat eval -> a chat reply -> the report card ($NANOCHAT_BASE_DIR/report/report.md).
# Run from the repository root, with the package installed:
#   bash scripts/runcpu.sh            # about 15 minutes on 2 cores offline; CORE adds about 5 with the eval bundle
#   bash scripts/runcpu.sh --long     # about an hour: a 6-layer model, longer stages
#   bash scripts/runcpu.sh --smoke    # the smallest size (what CI runs): every stage runs, nothing learns much
# With no network and no downloaded data it says so and runs on LOCAL STAND-INS built here: a corpus of Python's own
# docstrings (scripts/local_corpus.py) and generated chat tasks (nanochat_jax/tasks/local.py: identity, arithmetic
# word problems, spelling); the report card labels them. MIXTURE=local|classic chooses the chat data yourself.
# The models are tiny and know nothing, but each stage shows its effect in the report card: base bpb against the
# unigram level, the share of well-formed replies and calculator calls after midtraining, and the local tasks'
# accuracies against their chance levels after each chat stage; the run ends with a question and the answer.
# Everything goes to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat_jax) under the model tag "runcpu"; a new run
# retrains the tokenizer there and, once its data has been read, moves the last runcpu run's checkpoints to
# previous_runs/runcpu-<time>/ and its report to report/previous/<time>/ (nothing is deleted).
set -euo pipefail
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat_jax}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# compiled programs are reused across the stages' processes (the chat evals compile the same engine) and across runs
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$NANOCHAT_BASE_DIR/jax_cache}"
base="$NANOCHAT_BASE_DIR"
say() { echo; echo "=== runcpu: $*"; }

case "${1:-}" in
    "")  # about 15 minutes: every stage moves what it is meant to (see the report card)
        depth=4 seq=256 vocab=4096 chars=50000000 base_steps=120 base_eval=60 eval_tokens=32768
        core_per_task=11 mid_steps=160 mid_batch=4096 sft_steps=30 sft_examples=16 rl_steps=6 rl_tokens=64
        problems=32 new_tokens=128 stage_eval=80 ;;
    --long)  # about an hour: a wider model, longer stages
        depth=6 seq=256 vocab=8192 chars=50000000 base_steps=300 base_eval=100 eval_tokens=65536
        core_per_task=20 mid_steps=300 mid_batch=4096 sft_steps=60 sft_examples=16 rl_steps=20 rl_tokens=64
        problems=64 new_tokens=128 stage_eval=100 ;;
    --smoke)  # the smallest size that runs every stage
        depth=2 seq=128 vocab=2048 chars=2000000 base_steps=8 base_eval=-1 eval_tokens=2048
        core_per_task=11 mid_steps=4 mid_batch=1024 sft_steps=3 sft_examples=4 rl_steps=2 rl_tokens=16
        problems=4 new_tokens=16 stage_eval=-1 ;;
    *) echo "usage: bash scripts/runcpu.sh [--long | --smoke]" >&2; exit 2 ;;
esac

# whether nanochat's data can be downloaded: decides the corpus, the chat data and CORE
if python -m scripts.online; then online=1; else online=0; fi
[ "$online" = 1 ] || say "no network (huggingface.co unreachable): whatever data is missing gets a LOCAL STAND-IN"
if [ -z "${MIXTURE:-}" ]; then
    MIXTURE=$([ "$online" = 1 ] && echo classic || echo local)
fi
case "$MIXTURE" in
    classic) chat_tasks="ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval|SpellingBee" rl_task=GSM8K ;;
    local) chat_tasks="Arithmetic|LocalSpellingBee|LocalSimpleSpelling" rl_task=Arithmetic
           say "chat data: the LOCAL STAND-IN mixture (generated identity, arithmetic and spelling conversations)" ;;
    *) echo "MIXTURE must be local or classic, got $MIXTURE" >&2; exit 2 ;;
esac
# HumanEval's programs run in the code sandbox: find out now whether it works here (UNSAFE_SANDBOX=1 opts in to the
# weaker unsafe mode where the kernel refuses namespaces)
sandbox=(); [ "${UNSAFE_SANDBOX:-0}" = 1 ] && sandbox=(--unsafe-sandbox)
if [[ "$chat_tasks" == *HumanEval* ]]; then
    python -m nanochat_jax.sandbox --check "${sandbox[@]}" || exit 1
fi

python -m scripts.report reset  # (the first write: a read-only or full base directory stops the run here)

say "1/10 data: FineWeb-edu shards if present or downloadable, else a stand-in corpus of Python's docstrings"
if [ "$(ls "$base"/base_data/*.parquet 2>/dev/null | wc -l)" -lt 2 ]; then
    if [ "$online" = 1 ] && python -m scripts.download_data -n 2; then :; else
        say "could not get FineWeb-edu: building a LOCAL STAND-IN corpus from Python's standard-library docstrings"
        python -m scripts.local_corpus
    fi
fi

say "2/10 tokenizer: a small vocabulary for a tiny model"
python -m tokenizer.train --vocab-size "$vocab" --max-chars "$chars"
python -m tokenizer.eval

# the inputs are checked (the tokenizer read every shard): only now is the last runcpu run moved aside, never deleted
kept="$base/previous_runs/runcpu-$(date +%Y%m%d-%H%M%S)"
for stage in base mid chatsft chatrl; do
    if [ -d "$base/${stage}_checkpoints/runcpu" ]; then
        mkdir -p "$kept/${stage}_checkpoints"
        mv "$base/${stage}_checkpoints/runcpu" "$kept/${stage}_checkpoints/runcpu"
    fi
done
[ -d "$kept" ] && echo "runcpu: the last runcpu run's checkpoints are kept in $kept (delete it when done with it)"

say "3/10 base pretraining: d$depth, $base_steps steps of 4096 tokens"
python -m train.base --model-tag runcpu --depth "$depth" --max-seq-len "$seq" --device-batch-size 4 \
    --total-batch-size 4096 --num-iterations "$base_steps" --eval-every "$base_eval" --eval-tokens "$eval_tokens" \
    --sample-every -1

say "4/10 base evaluation: bpb against the unigram level, samples, CORE (with the eval bundle), chat tasks"
core=(--max-per-task "$core_per_task")
if [ ! -f "$base/eval_bundle/core.yaml" ] && [ "$online" = 0 ]; then
    say "no eval bundle at $base/eval_bundle and no network: CORE is skipped (see README: Evaluation)"
    core=(--no-core)
fi
python -m evals.base -g runcpu "${core[@]}" --eval-tokens "$eval_tokens" --device-batch-size 4 --batch-size 8
# the chat tasks before any chat training: the column midtraining is measured against
python -m evals.chat -g runcpu -i base -a "$chat_tasks" -x "$problems" -m "$new_tokens" "${sandbox[@]}"

say "5/10 midtraining ($MIXTURE chat data): $mid_steps steps"
python -m train.mid --model-tag runcpu --mixture "$MIXTURE" --device-batch-size 4 --total-batch-size "$mid_batch" \
    --max-seq-len "$seq" --num-iterations "$mid_steps" --eval-every "$stage_eval" --eval-tokens "$eval_tokens"

say "6/10 chat evaluation of the midtrained model"
python -m evals.chat -g runcpu -i mid -a "$chat_tasks" -x "$problems" -m "$new_tokens" "${sandbox[@]}"

say "7/10 supervised finetuning ($MIXTURE chat data): $sft_steps steps"
python -m train.sft --model-tag runcpu --mixture "$MIXTURE" --device-batch-size 4 \
    --target-examples-per-step "$sft_examples" --max-seq-len "$seq" --num-iterations "$sft_steps" \
    --eval-every "$stage_eval" --eval-steps 2 --eval-metrics-every -1 --eval-metrics-max-problems "$problems"

say "8/10 chat evaluation of the SFT model"
python -m evals.chat -g runcpu -i sft -a "$chat_tasks" -x "$problems" -m "$new_tokens" "${sandbox[@]}"

say "9/10 reinforcement learning on $rl_task: $rl_steps steps, then its chat evaluation"
python -m train.rl --model-tag runcpu --task "$rl_task" --examples-per-step 2 --num-samples 4 --device-batch-size 2 \
    --max-new-tokens "$rl_tokens" --num-iterations "$rl_steps" --eval-every -1 --eval-examples 4
python -m evals.chat -g runcpu -i rl -a "$chat_tasks" -x "$problems" -m "$new_tokens" "${sandbox[@]}"

say "10/10 a question for the final model, and the report card"
if [ "$MIXTURE" = local ]; then  # one of the generated arithmetic problems' templates, with new numbers
    question="Nora has 38 shells and gets 25 more. How many shells does Nora have now?"
    expect="a $depth-layer model trained for minutes on 2 CPU cores: it learns the chat format, calculator calls and \
the templates of its generated tasks (arithmetic word problems, spelling) before anything else; it knows no facts \
and holds no real conversation"
else
    question="What is 12 plus 7?"
    expect="a $depth-layer model trained for minutes on 2 CPU cores: it learns the chat format and fluent-looking \
text before anything else, and it knows no facts"
fi
reply="$base/report/final_reply.txt"
python -m serve.cli -g runcpu -i rl -p "$question" -t 0 -m 64 2>/dev/null | tee "$reply"
python -m scripts.report expect --line "$expect" --chat-file "$reply" --scores-of rl
python -m scripts.report generate
where=""; [ "$base" != "$HOME/.cache/nanochat_jax" ] && where="NANOCHAT_BASE_DIR=$base "
say "done. Next: chat with the final model in the terminal, or on a page in the browser"
echo "  ${where}python -m serve.cli -g runcpu -i rl"
echo "  ${where}python -m serve.web -g runcpu -i rl      # then open http://127.0.0.1:8000"
