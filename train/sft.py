"""Supervised finetuning: one conversation per row, the loss on the assistant's tokens only.

    python -m train.sft --mesh data:8                  # after train.mid, on 8 GPUs
    python -m train.sft --device-batch-size 2 --target-examples-per-step 16 --num-iterations 20 \\
        --eval-every 10 --eval-steps 4 --eval-metrics-max-problems 64   # a tiny run on a CPU

nanochat's SFT mixture (ARC-Easy, ARC-Challenge, GSM8K, SmolTalk 10K, identity conversations, SimpleSpelling 300,
SpellingBee 300), or with --mixture local generated stand-in tasks only (no network needed), each conversation
cropped to the context and padded (padding is never a target); learning rates x 0.02 decaying linearly to 0 over one
epoch. Every --eval-every steps the SmolTalk validation loss, every --eval-metrics-every steps MMLU and ARC-Easy
accuracy (with --mixture local: the stand-ins' validation loss, Arithmetic and SpellingBee accuracy). Starts from the
latest mid checkpoint (or --source base); writes $NANOCHAT_BASE_DIR/chatsft_checkpoints/<model tag>/ with metrics.jsonl.
"""
import argparse

import jax

from nanochat_jax.evaluation import report
from nanochat_jax.evaluation.bits_per_byte import loss_sums
from nanochat_jax.training.chat_batches import PaddedConversations
from nanochat_jax.evaluation.chat_tasks import categorical_outcomes, generative_outcomes
from nanochat_jax.common import init_distributed, print0, run_entry_point
from nanochat_jax.data.dataloader import StepBatches
from nanochat_jax.inference.engine import Engine
from nanochat_jax.training.loop import Eval, Plan, run
from nanochat_jax.training.optim import Schedule
from nanochat_jax.training.stages import (add_chat_stage_flags, begin_run, check_flags, epoch_steps, open_chat_stage, run_meta,
                                 start_wandb)
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
                                   "eval_steps", "eval_metrics_max_problems"), every=("eval_every", "save_every"))
    if args.eval_metrics_every < -1:
        p.error("--eval-metrics-every must be positive, -1 or 0")
    return args


def main(argv=None):
    init_distributed()  # multi-host runs only (NANOCHAT_MULTIHOST=1)
    args = parse_args(argv)
    examples_per_micro_step = args.device_batch_size * jax.device_count()  # one conversation per row
    if args.target_examples_per_step % examples_per_micro_step:
        raise SystemExit(f"--target-examples-per-step {args.target_examples_per_step} is not a multiple of device "
                         f"batch x devices = {args.device_batch_size} x {jax.device_count()}")
    accum_steps = args.target_examples_per_step // examples_per_micro_step
    source, trainer, checkpointer = open_chat_stage(args, "sft")
    config, tokenizer = source.config, source.tokenizer
    rows_per_process = args.device_batch_size * jax.local_device_count()
    mixture = mixtures.MIXTURES[args.mixture]
    train_task, val_task = mixture.sft_train(), mixture.sft_val()
    num_iterations = epoch_steps(args, len(train_task), args.target_examples_per_step)
    print0(f"SFT {source.directory} (step {source.step}) -> {checkpointer.directory} | {len(train_task):,} "
           f"conversations | {accum_steps} micro-steps of {examples_per_micro_step} rows | {num_iterations:,} steps")

    # data: one conversation per row, each micro-batch padded to a bucketed length
    process = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                   max_tokens=args.max_seq_len + 1)
    train_batches = StepBatches(PaddedConversations(train_task, tokenizer, rows_per_process, args.max_seq_len,
                                                    **process), accum_steps)
    state = begin_run(args, trainer, checkpointer, train_batches, tokenizer, config, num_iterations, source=source)
    token_bytes = tokenizer.token_bytes()

    def val_loss(model):
        val = PaddedConversations(val_task, tokenizer, rows_per_process, args.max_seq_len, **process)
        sums = loss_sums(model, val, args.eval_steps, token_bytes)
        return {"val_loss": sums["nats"] / max(sums["tokens"], 1)}

    metric_tasks, engines = {}, []  # loaded on first use; one engine, so its programs compile once

    def accuracy(model):
        if not metric_tasks:
            metric_tasks.update({metric: CHAT_TASKS[name].make("test") for metric, name in mixture.sft_metrics.items()})
            engines.append(Engine(model, tokenizer))
        engines[0].use(model)
        results = {}
        for metric, task in metric_tasks.items():
            if task.eval_type == "categorical":
                outcomes = categorical_outcomes(model, tokenizer, task, 2 * args.device_batch_size,
                                                args.eval_metrics_max_problems)
            else:
                outcomes = [o[0] for o in generative_outcomes(engines[0], tokenizer, task,
                                                              max_new_tokens=128,
                                                              max_problems=args.eval_metrics_max_problems)]
            results[metric] = float(sum(outcomes) / len(outcomes))
        return results

    evals = [Eval(args.eval_every, val_loss)]
    if args.eval_metrics_every:  # as nanochat: not before training
        evals.append(Eval(args.eval_metrics_every, accuracy, at_start=False))
    wandb_run = start_wandb(args, "nanochat-jax-sft")
    plan = Plan(num_iterations, Schedule(num_iterations, warmdown_ratio=1.0, momentum=0.95), config.flops_per_token(),
                evals, args.save_every, run_meta(args, config, source), wandb_run)
    state = run(trainer, state, train_batches, plan, checkpointer)

    print0(" | ".join(f"{k} {v:.4f}" for k, v in state.loop.last_eval.items()) +
           f" | training time {state.loop.total_time / 60:.2f}m | checkpoints in {checkpointer.directory}")
    report.log(report.SFT, vars(args), {"checkpoint_dir": checkpointer.directory, "conversations": len(train_task),
                                        "steps": num_iterations, **state.loop.last_eval,
                                        "training time (min)": state.loop.total_time / 60},
               report.standin(mixture.standin))
    if wandb_run is not None:
        wandb_run.finish()


if __name__ == "__main__":
    run_entry_point(main)
