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

from nanochat_jax.chat_eval import categorical_outcomes, generative_outcomes
from nanochat_jax import report
from nanochat_jax.checkpoint import model_meta
from nanochat_jax.common import init_distributed, print0
from nanochat_jax.conversations import PaddedConversations
from nanochat_jax.dataloader import StepBatches
from nanochat_jax.engine import Engine
from nanochat_jax.loop import Eval, LoopConfig, eval_sums, run
from nanochat_jax.optim import lr_multiplier
from nanochat_jax.stages import Source, add_chat_stage_flags, check_flags, start_chat_stage, start_wandb
from nanochat_jax.tasks import mixtures
from nanochat_jax.tasks.mixtures import LOCAL_MIXTURE
from nanochat_jax.tasks.choice import ARC, MMLU
from nanochat_jax.tasks.local import EVAL_TASKS


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
    source = Source(args.source, args.model_tag, args.step)
    config, tokenizer = source.config, source.tokenizer
    args.max_seq_len = args.max_seq_len or config.sequence_len
    rows = args.device_batch_size * jax.local_device_count()
    examples_per_micro_step = args.device_batch_size * jax.device_count()
    if args.target_examples_per_step % examples_per_micro_step:
        raise SystemExit(f"--target-examples-per-step {args.target_examples_per_step} is not a multiple of device "
                         f"batch x devices = {args.device_batch_size} x {jax.device_count()}")
    accum_steps = args.target_examples_per_step // examples_per_micro_step
    train_task, val_task = (make() for make in mixtures.MIXTURES[args.mixture]["sft"])
    num_iterations = args.num_iterations if args.num_iterations > 0 else \
        max(1, len(train_task) // args.target_examples_per_step * args.num_epochs)
    stage = start_chat_stage(args, "sft", source, num_iterations)
    trainer, checkpointer = stage.trainer, stage.checkpointer
    print0(f"SFT {source.directory} (step {source.step}) -> {checkpointer.directory} | {len(train_task):,} "
           f"conversations | {accum_steps} micro-steps of {examples_per_micro_step} rows | {num_iterations:,} steps")
    params, opt_state, start_step, loop_state = stage.params, stage.opt_state, stage.start_step, stage.loop_state
    process = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                   max_tokens=args.max_seq_len + 1)
    train_batches = StepBatches(PaddedConversations(train_task, tokenizer, rows, args.max_seq_len, **process),
                                accum_steps)
    if stage.data_state is not None:
        train_batches.set_state(stage.data_state)
    token_bytes = tokenizer.token_bytes()

    def val_loss(params):
        val = PaddedConversations(val_task, tokenizer, rows, args.max_seq_len, **process)
        sums = eval_sums(trainer, params, val, args.eval_steps, token_bytes)
        return {"val_loss": sums["nats"] / max(sums["tokens"], 1)}

    metric_tasks = {}

    def outcomes(model, task):
        if task.eval_type == "categorical":
            return categorical_outcomes(model, tokenizer, task, 2 * args.device_batch_size,
                                        args.eval_metrics_max_problems)
        return [o[0] for o in generative_outcomes(Engine(model, tokenizer), tokenizer, task, max_new_tokens=128,
                                                  max_problems=args.eval_metrics_max_problems)]

    def accuracy(params):
        if not metric_tasks:  # loaded on first use
            if args.mixture == "local":  # the stand-ins' own test splits, generative
                metric_tasks.update(arithmetic_acc=EVAL_TASKS["Arithmetic"](),
                                    spelling_acc=EVAL_TASKS["LocalSpellingBee"]())
            else:
                metric_tasks.update(mmlu_acc=MMLU(split="test"), arc_easy_acc=ARC("ARC-Easy", split="test"))
        model = trainer.model(params)
        return {name: float(sum(o) / len(o)) for name, task in metric_tasks.items() for o in [outcomes(model, task)]}

    evals = [Eval(args.eval_every, val_loss)]
    if args.eval_metrics_every:  # as nanochat: not before training
        evals.append(Eval(args.eval_metrics_every, accuracy, at_start=False))

    def meta(step, loop_state):
        return model_meta(config, step, **loop_state["last_eval"], train_config=vars(args), source=source.info(),
                          loop_state=loop_state)

    wandb_run = start_wandb(args, "nanochat-jax-sft")
    schedule = lambda step: (lr_multiplier(step, num_iterations, warmdown_ratio=1.0), 0.95)  # noqa: E731
    cfg = LoopConfig(num_iterations=num_iterations, flops_per_token=config.flops_per_token(), schedule=schedule,
                     evals=evals, save_every=args.save_every, meta=meta, wandb_run=wandb_run)
    _, _, loop_state = run(trainer, params, opt_state, train_batches, cfg, checkpointer, start_step, loop_state)
    print0(" | ".join(f"{k} {v:.4f}" for k, v in loop_state["last_eval"].items()) +
           f" | training time {loop_state['total_time'] / 60:.2f}m | checkpoints in {checkpointer.directory}")
    report.log("Chat SFT", vars(args), {"checkpoint_dir": checkpointer.directory, "conversations": len(train_task),
                                        "steps": num_iterations, **loop_state["last_eval"],
                                        "training time (min)": loop_state["total_time"] / 60},
               report.standin(LOCAL_MIXTURE if args.mixture == "local" else None))
    if wandb_run is not None:
        wandb_run.finish()


if __name__ == "__main__":
    main()
