"""Midtraining: teach the base model the chat format, multiple choice, the calculator tool and spelling.

    python -m train.mid --mesh data:8                  # after train.base, on 8 GPUs
    python -m train.mid --device-batch-size 4 --total-batch-size 4096 --max-seq-len 256 \\
        --num-iterations 20 --eval-every 10 --eval-tokens 8192   # a tiny run on a CPU

nanochat's mixture (SmolTalk, MMLU auxiliary_train, GSM8K, identity conversations x2, SimpleSpelling,
SpellingBee), or with --mixture local generated stand-in tasks only (tasks/local.py: no network needed), rendered
and packed into full rows of --max-seq-len tokens; the loss covers the assistant's tokens (mask 1), or with
--unmasked every token (nanochat e1770a3's midtraining). One epoch by default (its length estimated from a sample
of the mixture), flat learning rate then a linear decay to 0 over the last 20%. Starts from the latest base
checkpoint; writes $NANOCHAT_BASE_DIR/mid_checkpoints/<model tag>/ with metrics.jsonl (validation bpb on the
assistant's tokens).
"""
import argparse

import jax

from nanochat_jax import report
from nanochat_jax.aot import check_training_memory
from nanochat_jax.checkpoint import model_meta
from nanochat_jax.common import init_distributed, print0
from nanochat_jax.conversations import PackedConversations, estimated_tokens
from nanochat_jax.dataloader import StepBatches
from nanochat_jax.loop import Eval, LoopConfig, bits_per_byte, eval_sums, run
from nanochat_jax.optim import lr_multiplier, muon_momentum
from nanochat_jax.stages import (Source, add_chat_stage_flags, batch_geometry, check_flags, start_chat_stage,
                                 start_wandb)
from nanochat_jax.tasks import mixtures
from nanochat_jax.tasks.mixtures import LOCAL_MIXTURE


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="midtrain a base model on chat data")
    add_chat_stage_flags(p, sources=["base"], device_batch_size=32, init_lr_frac=1.0, eval_every=150)
    p.add_argument("--mixture", choices=sorted(mixtures.MIXTURES), default="classic",
                   help="classic: nanochat's data; local: generated stand-in tasks only (no network needed)")
    p.add_argument("--max-seq-len", type=int, default=None, help="row length (default: the model's context)")
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288)
    p.add_argument("--unmasked", action="store_true", help="train (and validate) on every token, as nanochat's "
                   "midtraining did, not only the assistant's")
    args = p.parse_args(argv)
    check_flags(p, args, positive=("device_batch_size", "max_seq_len", "total_batch_size", "eval_tokens"),
                every=("eval_every", "save_every"))
    return args


def main(argv=None):
    init_distributed()  # multi-host runs only (NANOCHAT_MULTIHOST=1)
    args = parse_args(argv)
    source = Source(args.source, args.model_tag, args.step)
    config, tokenizer = source.config, source.tokenizer
    args.max_seq_len = args.max_seq_len or config.sequence_len
    accum_steps = batch_geometry(args, jax.device_count())
    rows = args.device_batch_size * jax.local_device_count()
    train_task, val_task = (make() for make in mixtures.MIXTURES[args.mixture]["mid"])
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    else:
        epoch_tokens = estimated_tokens(train_task, tokenizer)
        num_iterations = max(1, epoch_tokens // args.total_batch_size)
        print0(f"one epoch of {len(train_task):,} conversations is about {epoch_tokens:,} tokens: "
               f"{num_iterations:,} steps")
    stage = start_chat_stage(args, "mid", source, num_iterations)
    trainer, checkpointer = stage.trainer, stage.checkpointer
    print0(f"midtraining {source.directory} (step {source.step}) -> {checkpointer.directory} | "
           f"{len(train_task):,} conversations | {accum_steps} micro-steps of {args.device_batch_size * jax.device_count()}"
           f" rows x {args.max_seq_len} | {num_iterations:,} steps")
    check_training_memory(trainer, args.device_batch_size, args.max_seq_len, accum_steps)
    params, opt_state, start_step, loop_state = stage.params, stage.opt_state, stage.start_step, stage.loop_state
    process = dict(process_index=jax.process_index(), process_count=jax.process_count(), masked=not args.unmasked)
    train_batches = StepBatches(PackedConversations(train_task, tokenizer, rows, args.max_seq_len, **process),
                                accum_steps)
    if stage.data_state is not None:
        train_batches.set_state(stage.data_state)

    eval_batches = max(1, args.eval_tokens // (rows * jax.process_count() * args.max_seq_len))
    token_bytes = tokenizer.token_bytes()

    def evaluate(params):
        val = PackedConversations(val_task, tokenizer, rows, args.max_seq_len, **process)
        return {"val_bpb": bits_per_byte(eval_sums(trainer, params, val, eval_batches, token_bytes))}

    def meta(step, loop_state):
        return model_meta(config, step, val_bpb=loop_state["last_eval"].get("val_bpb"), train_config=vars(args),
                          source=source.info(), loop_state=loop_state)

    wandb_run = start_wandb(args, "nanochat-jax-mid")
    schedule = lambda step: (lr_multiplier(step, num_iterations, warmdown_ratio=0.2), muon_momentum(step))  # noqa: E731
    cfg = LoopConfig(num_iterations=num_iterations, flops_per_token=config.flops_per_token(), schedule=schedule,
                     evals=[Eval(args.eval_every, evaluate)], save_every=args.save_every, meta=meta, wandb_run=wandb_run)
    _, _, loop_state = run(trainer, params, opt_state, train_batches, cfg, checkpointer, start_step, loop_state)
    print0(f"minimum validation bpb {loop_state['min_val_bpb']:.4f} | training time "
           f"{loop_state['total_time'] / 60:.2f}m | checkpoints in {checkpointer.directory}")
    report.log("Midtraining", vars(args), {
        "checkpoint_dir": checkpointer.directory, "conversations": len(train_task), "steps": num_iterations,
        "minimum validation bpb": loop_state["min_val_bpb"], "training time (min)": loop_state["total_time"] / 60},
        report.standin(LOCAL_MIXTURE if args.mixture == "local" else None))
    if wandb_run is not None:
        wandb_run.finish()


if __name__ == "__main__":
    main()
