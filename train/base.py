"""Pretrain the base model on the FineWeb-edu shards.

    python -m train.base --depth 20 --mesh data:8                     # the d20 speedrun on 8 GPUs
    python -m train.base --depth 4 --max-seq-len 256 --device-batch-size 4 --total-batch-size 8192 \\
        --num-iterations 50 --eval-every 25 --eval-tokens 16384        # a tiny run on a laptop CPU

Checkpoints, meta and metrics.jsonl go to $NANOCHAT_BASE_DIR/base_checkpoints/<model-tag>/ (default d<depth>).
"""
import argparse
import os

import jax
import jax.numpy as jnp

from nanochat_jax import report
from nanochat_jax.aot import check_training_memory
from nanochat_jax.base_eval import bits_per_byte, loss_sums, print_samples
from nanochat_jax.checkpoint import Checkpointer
from nanochat_jax.common import get_base_dir, init_distributed, parse_dtype, print0
from nanochat_jax.dataloader import StepBatches, pretraining_batches
from nanochat_jax.dataset import standin_corpus
from nanochat_jax.gpt import config_from_depth
from nanochat_jax.loop import Eval, Plan, run
from nanochat_jax.optim import Schedule
from nanochat_jax.stages import (add_optimizer_flags, add_run_flags, batch_geometry, begin_run, check_flags,
                                 make_trainer, run_meta, start_wandb)
from nanochat_jax.tokenizer import get_token_bytes, get_tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="pretrain a nanochat GPT")
    p.add_argument("--depth", type=int, default=20, help="layers; width = 64 x depth, head dim 128")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per device per micro-step")
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: from the flops or data:param target)")
    p.add_argument("--target-flops", type=float, default=-1.0, help="steps from a training-FLOPs budget (-1: off)")
    p.add_argument("--target-param-data-ratio", type=float, default=20, help="tokens per parameter (Chinchilla: 20)")
    add_optimizer_flags(p, grad_clip=1.0)
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--warmdown-ratio", type=float, default=0.2)
    p.add_argument("--final-lr-frac", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=250, help="steps between validation bpb (-1: only at the end)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288)
    p.add_argument("--sample-every", type=int, default=2000, help="steps between greedy samples (-1: only at the end)")
    p.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    p.add_argument("--model-tag", default=None, help="checkpoint directory name (default: d<depth>)")
    add_run_flags(p)
    args = p.parse_args(argv)
    check_flags(p, args, positive=("depth", "max_seq_len", "device_batch_size", "total_batch_size", "eval_tokens"),
                every=("eval_every", "sample_every", "save_every"))
    if args.num_iterations <= 0 and args.target_flops <= 0 and args.target_param_data_ratio <= 0:
        p.error("no training horizon: give --num-iterations, --target-flops or --target-param-data-ratio")
    return args


def horizon(args, config) -> int:
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (config.flops_per_token() * args.total_batch_size)))
    return max(1, int(args.target_param_data_ratio * config.num_params()) // args.total_batch_size)


def main(argv=None):
    init_distributed()  # multi-host runs only (NANOCHAT_MULTIHOST=1)
    args = parse_args(argv)
    tokenizer, token_bytes = get_tokenizer(), get_token_bytes()
    try:
        config = config_from_depth(args.depth, tokenizer.get_vocab_size(), args.max_seq_len)
    except ValueError as e:
        raise SystemExit(f"--depth: {e}") from None
    accum_steps = batch_geometry(args, jax.device_count())
    num_iterations = horizon(args, config)
    rows_per_process = args.device_batch_size * jax.local_device_count()
    trainer, make_model = make_trainer(args, config)
    print0(f"{config}\nparameters {config.num_params():,} | FLOPs/token {config.flops_per_token():.3e} | mesh "
           f"{dict(trainer.mesh.shape)} | {jnp.dtype(parse_dtype(args.dtype)).name} | {accum_steps} micro-steps of "
           f"{args.device_batch_size * jax.device_count()} rows | {num_iterations:,} steps, "
           f"{num_iterations * args.total_batch_size:,} tokens ({num_iterations * args.total_batch_size / config.num_params():.2f}"
           f" per parameter)")
    # compile the step now: print its memory per device, refuse a run that will not fit (before any state is made)
    check_training_memory(trainer, args.device_batch_size, args.max_seq_len, accum_steps)

    # data: this process's packed rows of the train shards, accum_steps micro-batches per step
    train_batches = StepBatches(pretraining_batches(tokenizer, "train", rows_per_process, args.max_seq_len), accum_steps)
    checkpointer = Checkpointer(os.path.join(get_base_dir(), "base_checkpoints", args.model_tag or f"d{args.depth}"))
    state = begin_run(args, trainer, checkpointer, train_batches, tokenizer, config, num_iterations,
                      make_model=make_model)

    eval_batches = max(1, args.eval_tokens // (rows_per_process * jax.process_count() * args.max_seq_len))

    def val_bpb(model):  # a fresh pass over the same validation rows every time
        val = pretraining_batches(tokenizer, "val", rows_per_process, args.max_seq_len)
        return {"val_bpb": bits_per_byte(loss_sums(model, val, eval_batches, token_bytes))}

    wandb_run = start_wandb(args, "nanochat-jax")
    plan = Plan(num_iterations, Schedule(num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac),
                config.flops_per_token(), save_every=args.save_every, meta=run_meta(args, config), wandb_run=wandb_run,
                evals=[Eval(args.eval_every, val_bpb),
                       Eval(args.sample_every, lambda model: print_samples(model, tokenizer), at_start=False)])
    state = run(trainer, state, train_batches, plan, checkpointer)

    print0(f"minimum validation bpb {state.loop.min_val_bpb} | training time "
           f"{state.loop.total_time / 60:.2f}m | checkpoints in {checkpointer.directory}")
    report.log(report.BASE_TRAINING, vars(args), {
        "checkpoint_dir": checkpointer.directory, "parameters": config.num_params(), "steps": num_iterations,
        "tokens": num_iterations * args.total_batch_size, "minimum validation bpb": state.loop.min_val_bpb,
        "training time (min)": state.loop.total_time / 60, "devices": f"{jax.device_count()} x "
        f"{jax.devices()[0].device_kind}"}, report.standin(standin_corpus()))
    if wandb_run is not None:
        wandb_run.finish()


if __name__ == "__main__":
    main()
