"""Midtraining: teach the base model the chat format, multiple choice, the calculator tool and spelling.

    python -m train.mid --mesh data:8                  # after train.base, on 8 GPUs
    python -m train.mid --device-batch-size 4 --total-batch-size 4096 --max-seq-len 256 \\
        --num-iterations 20 --eval-every 10 --eval-tokens 8192   # a tiny run on a CPU

Conversations packed into rows, the loss on the assistant's tokens (--unmasked: all); lr flat, to 0 in the last 20%."""
import argparse

import jax

from nanochat_jax.evaluation import report
from nanochat_jax.measure.aot import check_training_memory
from nanochat_jax.evaluation.bits_per_byte import bits_per_byte, loss_sums
from nanochat_jax.training.chat_batches import PackedConversations, estimated_tokens
from nanochat_jax.common import init_distributed, print0, run_entry_point
from nanochat_jax.data.dataloader import StepBatches
from nanochat_jax.training.loop import Eval
from nanochat_jax.training.stages import Stage, add_chat_stage_flags, check_flags, micro_steps
from nanochat_jax.tasks import mixtures


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="midtrain a base model on chat data")
    add_chat_stage_flags(p, sources=["base"], device_batch_size=32, init_lr_frac=1.0, eval_every=150)
    p.add_argument("--mixture", choices=sorted(mixtures.MIXTURES), default="classic",
                   help="classic: nanochat's data; local: generated stand-in tasks only (no network needed)")
    p.add_argument("--max-seq-len", type=int, default=None, help="row length (default: the model's context)")
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288)
    p.add_argument("--unmasked", action="store_true", help="the loss on every token (old nanochat), not only the reply")
    args = p.parse_args(argv)
    check_flags(p, args, positive=("device_batch_size", "max_seq_len", "total_batch_size", "eval_tokens"))
    return args


def main(argv=None):
    init_distributed()  # multi-host runs only (NANOCHAT_MULTIHOST=1)
    stage = Stage.chat("mid", parse_args(argv))
    args, tokenizer, trainer = stage.args, stage.tokenizer, stage.trainer
    accum_steps = micro_steps("--total-batch-size", args.total_batch_size, args.device_batch_size, args.max_seq_len)
    rows_per_process = args.device_batch_size * jax.local_device_count()
    mixture = mixtures.MIXTURES[args.mixture]
    train_task, val_task = mixture.mid_train(), mixture.mid_val()
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    else:
        epoch_tokens = estimated_tokens(train_task, tokenizer)
        num_iterations = max(1, epoch_tokens // args.total_batch_size)
        print0(f"one epoch of {len(train_task):,} conversations is about {epoch_tokens:,} tokens: "
               f"{num_iterations:,} steps")
    print0(f"midtraining {stage.source.directory} (step {stage.source.step}) -> {stage.checkpointer.directory} | "
           f"{len(train_task):,} conversations | {accum_steps} micro-steps of "
           f"{args.device_batch_size * jax.device_count()} rows x {args.max_seq_len} | {num_iterations:,} steps")
    check_training_memory(trainer, args.device_batch_size, args.max_seq_len, accum_steps)

    def rows(task):
        return PackedConversations(task, tokenizer, rows_per_process, args.max_seq_len, masked=not args.unmasked,
                                   process_index=jax.process_index(), process_count=jax.process_count())

    train_batches = StepBatches(rows(train_task), accum_steps)
    eval_batches = max(1, args.eval_tokens // (rows_per_process * jax.process_count() * args.max_seq_len))
    token_bytes = tokenizer.token_bytes()

    def val_bpb(model):
        return {"val_bpb": bits_per_byte(loss_sums(model, rows(val_task), eval_batches, token_bytes))}

    state = stage.train(train_batches, num_iterations, [Eval(args.eval_every, val_bpb)], warmdown_ratio=0.2)
    stage.finish(state, report.MIDTRAINING, {"conversations": len(train_task), "steps": num_iterations,
                                             "minimum validation bpb": state.loop.min_val_bpb}, mixture.standin)


if __name__ == "__main__":
    run_entry_point(main)
