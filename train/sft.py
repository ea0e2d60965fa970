"""Supervised finetuning: one conversation per row, the loss on the assistant's tokens only.

    python -m train.sft --mesh data:8                  # after train.mid, on 8 GPUs
    python -m train.sft --device-batch-size 2 --target-examples-per-step 16 --num-iterations 20 \\
        --eval-every 10 --eval-steps 4 --eval-metrics-max-problems 64   # a tiny run on a CPU

A conversation per row, cropped and padded; learning rates x 0.02, down linearly to 0 over one epoch by default."""
import argparse

import jax

from nanochat_jax.evaluation import report
from nanochat_jax.evaluation.bits_per_byte import loss_sums
from nanochat_jax.training.chat_batches import PaddedConversations
from nanochat_jax.evaluation.chat_tasks import categorical_outcomes, generative_outcomes
from nanochat_jax.common import init_distributed, print0, run_entry_point
from nanochat_jax.data.dataloader import StepBatches
from nanochat_jax.training.loop import Eval
from nanochat_jax.training.stages import Stage, add_chat_stage_flags, check_flags, epoch_steps, micro_steps
from nanochat_jax.tasks import mixtures
from nanochat_jax.tasks.registry import CHAT_TASKS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="finetune a chat model on conversations")
    add_chat_stage_flags(p, sources=["base", "mid"], device_batch_size=4, init_lr_frac=0.02, eval_every=100)
    p.add_argument("--mixture", choices=sorted(mixtures.MIXTURES), default="classic",
                   help="classic: nanochat's data; local: generated stand-in tasks only (no network needed)")
    p.add_argument("--target-examples-per-step", type=int, default=32, help="conversations per optimizer step")
    p.add_argument("--num-epochs", type=int, default=1, help="epochs when --num-iterations is -1")
    p.add_argument("--max-seq-len", type=int, default=None, help="longest row (default: the model's context)")
    p.add_argument("--eval-steps", type=int, default=100, help="validation batches per evaluation")
    p.add_argument("--eval-metrics-every", type=int, default=200,
                   help="steps between MMLU/ARC-Easy accuracy (-1: only at the end, 0: never)")
    p.add_argument("--eval-metrics-max-problems", type=int, default=1024)
    args = p.parse_args(argv)
    check_flags(p, args, positive=("device_batch_size", "target_examples_per_step", "num_epochs", "max_seq_len",
                                   "eval_steps", "eval_metrics_max_problems"))
    if args.eval_metrics_every < -1:
        p.error("--eval-metrics-every must be positive, -1 or 0")
    return args


def main(argv=None):
    init_distributed()  # multi-host runs only (NANOCHAT_MULTIHOST=1)
    stage = Stage.chat("sft", parse_args(argv))
    args, tokenizer = stage.args, stage.tokenizer
    accum_steps = micro_steps("--target-examples-per-step", args.target_examples_per_step, args.device_batch_size)
    rows_per_process = args.device_batch_size * jax.local_device_count()
    mixture = mixtures.MIXTURES[args.mixture]
    train_task, val_task = mixture.sft_train(), mixture.sft_val()
    num_iterations = epoch_steps(args, len(train_task), args.target_examples_per_step)
    print0(f"SFT {stage.source.directory} (step {stage.source.step}) -> {stage.checkpointer.directory} | "
           f"{len(train_task):,} conversations | {accum_steps} micro-steps of "
           f"{args.device_batch_size * jax.device_count()} rows | {num_iterations:,} steps")

    def rows(task):
        return PaddedConversations(task, tokenizer, rows_per_process, args.max_seq_len, max_tokens=args.max_seq_len + 1,
                                   process_index=jax.process_index(), process_count=jax.process_count())

    train_batches = StepBatches(rows(train_task), accum_steps)
    token_bytes = tokenizer.token_bytes()

    def val_loss(model):
        sums = loss_sums(model, rows(val_task), args.eval_steps, token_bytes)
        return {"val_loss": sums["nats"] / max(sums["tokens"], 1)}

    metric_tasks = {}  # loaded on first use

    def accuracy(model):
        if not metric_tasks:
            metric_tasks.update({metric: CHAT_TASKS[name].make("test") for metric, name in mixture.sft_metrics.items()})
        results = {}
        for metric, task in metric_tasks.items():
            if task.eval_type == "categorical":
                outcomes = categorical_outcomes(model, tokenizer, task, 2 * args.device_batch_size,
                                                args.eval_metrics_max_problems)
            else:
                outcomes = [o[0] for o in generative_outcomes(stage.engine(model), tokenizer, task, max_new_tokens=128,
                                                              max_problems=args.eval_metrics_max_problems)]
            results[metric] = float(sum(outcomes) / len(outcomes))
        return results

    evals = [Eval(args.eval_every, val_loss)]
    if args.eval_metrics_every:  # as nanochat: not before training
        evals.append(Eval(args.eval_metrics_every, accuracy, at_start=False))
    state = stage.train(train_batches, num_iterations, evals, warmdown_ratio=1.0, momentum=0.95)
    stage.finish(state, report.SFT, {"conversations": len(train_task), "steps": num_iterations,
                                     **state.loop.last_eval}, mixture.standin)


if __name__ == "__main__":
    run_entry_point(main)
