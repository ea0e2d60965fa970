"""Pretrain the base model on the FineWeb-edu shards.

    python -m train.base --depth 20 --mesh data:8                     # the d20 speedrun on 8 GPUs
    python -m train.base --recipe modern --depth 24 --target-param-data-ratio 8 --device-batch-size 16  # time to GPT-2
    python -m train.base --depth 4 --max-seq-len 256 --device-batch-size 4 --total-batch-size 8192 \\
        --num-iterations 50 --eval-every 25 --eval-tokens 16384        # a tiny run on a laptop CPU

Checkpoints and metrics.jsonl go to $NANOCHAT_BASE_DIR/base_checkpoints/<model-tag>/; flags left unset: the recipe's."""
import argparse
import os

import jax
import jax.numpy as jnp

from nanochat_jax.evaluation import report
from nanochat_jax.measure.aot import check_training_memory
from nanochat_jax.evaluation.bits_per_byte import bits_per_byte, loss_sums, print_samples
from nanochat_jax.common import check_writable, get_base_dir, init_distributed, parse_dtype, print0, run_entry_point
from nanochat_jax.data.dataloader import StepBatches, pretraining_batches
from nanochat_jax.data.dataset import check_shards, standin_corpus
from nanochat_jax.model.gpt import config_from_depth
from nanochat_jax.recipes import RECIPES
from nanochat_jax.training.loop import Eval
from nanochat_jax.training.optim import auto_batch
from nanochat_jax.training.stages import Stage, add_optimizer_flags, add_run_flags, check_flags, micro_steps
from nanochat_jax.data.tokenizer import get_token_bytes, get_tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="pretrain a nanochat GPT")
    p.add_argument("--recipe", choices=RECIPES, default="classic", help="classic (nanochat of Dec 2025) or modern "
                   "(its time-to-GPT-2 architecture, optimizer and schedule)")
    p.add_argument("--depth", type=int, default=20, help="layers; width = 64 x depth, head dim 128")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per device per micro-step")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step (classic: 524288; "
                   "modern: -1, from the horizon)")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: from the flops or data:param target)")
    p.add_argument("--target-flops", type=float, default=-1.0, help="steps from a training-FLOPs budget (-1: off)")
    p.add_argument("--target-param-data-ratio", type=float, default=None, help="tokens per parameter (classic: 20, "
                   "all parameters; modern: 12, block matrices + lm_head; the speedrun uses 8)")
    add_optimizer_flags(p)
    p.add_argument("--fp8", action="store_true", help="FP8 training matmuls (fp8.py), for H100/H200-class GPUs")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: classic 0, modern 40")
    p.add_argument("--warmdown-ratio", type=float, default=None, help="default: classic 0.2, modern 0.65")
    p.add_argument("--final-lr-frac", type=float, default=None, help="default: classic 0, modern 0.05")
    p.add_argument("--eval-every", type=int, default=250, help="steps between validation bpb (-1: only at the end)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288)
    p.add_argument("--sample-every", type=int, default=2000, help="steps between greedy samples (-1: only at the end)")
    p.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    p.add_argument("--model-tag", default=None, help="checkpoint directory name (default: d<depth>)")
    add_run_flags(p)
    args = p.parse_args(argv)
    vars(args).update({name: v for name, v in RECIPES[args.recipe].schedule.items() if getattr(args, name) is None})
    if args.total_batch_size == -1 and not RECIPES[args.recipe].batch_from_horizon:
        p.error("--total-batch-size -1 (from the horizon) is the modern recipe's: give a number")
    check_flags(p, args, positive=("depth", "max_seq_len", "device_batch_size", "eval_tokens"),
                every=("eval_every", "sample_every", "save_every", "total_batch_size"), nonnegative=("warmup_steps",))
    if args.num_iterations <= 0 and args.target_flops <= 0 and args.target_param_data_ratio <= 0:
        p.error("no training horizon: give --num-iterations, --target-flops or --target-param-data-ratio")
    return args


HORIZON_UNITS = {"num_params": "parameter", "scaling_params": "scaling parameter"}


def horizon_params(config) -> int:  # what --target-param-data-ratio counts
    return getattr(config, RECIPES[config.recipe].horizon_params)()


def horizon(args, config) -> int:
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (config.flops_per_token() * args.total_batch_size)))
    return max(1, int(args.target_param_data_ratio * horizon_params(config)) // args.total_batch_size)


def modern_sizing(args, config) -> tuple[int, float, float]:
    """The modern recipe's (batch, lr scale, weight decay) from the horizon; the batch: --total-batch-size unless -1."""
    reference = config_from_depth(12, config.vocab_size, config.sequence_len, recipe="modern")
    given = None if args.total_batch_size == -1 else args.total_batch_size
    weight_decay = RECIPES["modern"].optimizer["weight_decay"] if args.weight_decay is None else args.weight_decay
    batch, lr_scale, weight_decay = auto_batch(config.scaling_params(), reference.scaling_params(),
                                               args.target_param_data_ratio, weight_decay, given)
    if given is None:
        print0(f"batch from the horizon: {batch:,} tokens per step")
    return batch, lr_scale, weight_decay


def main(argv=None):
    init_distributed()  # multi-host runs only (NANOCHAT_MULTIHOST=1)
    args = parse_args(argv)
    tokenizer, token_bytes = get_tokenizer(), get_token_bytes()
    try:
        config = config_from_depth(args.depth, tokenizer.get_vocab_size(), args.max_seq_len, recipe=args.recipe)
    except ValueError as e:
        raise SystemExit(f"--depth: {e}") from None
    lr_scale = 1.0
    if RECIPES[args.recipe].batch_from_horizon:
        batch, lr_scale, weight_decay = modern_sizing(args, config)
        args = argparse.Namespace(**(vars(args) | {"total_batch_size": batch, "weight_decay": weight_decay}))
    accum_steps = micro_steps("--total-batch-size", args.total_batch_size, args.device_batch_size, args.max_seq_len)
    num_iterations = horizon(args, config)
    rows_per_process = args.device_batch_size * jax.local_device_count()
    check_shards()  # and the checkpoint directory: before anything compiles, a bad shard or a full disk is one line
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag or f"d{args.depth}")
    if jax.process_index() == 0:
        check_writable(checkpoint_dir, "checkpoints")
    stage = Stage("base", args, config, tokenizer, checkpoint_dir, lr_scale=lr_scale)
    args, trainer = stage.args, stage.trainer
    tokens = num_iterations * args.total_batch_size
    print0(f"{config}\nparameters {config.num_params():,} | FLOPs/token {config.flops_per_token():.3e} | mesh "
           f"{dict(trainer.mesh.shape)} | {jnp.dtype(parse_dtype(args.dtype)).name} | {accum_steps} micro-steps of "
           f"{args.device_batch_size * jax.device_count()} rows | {num_iterations:,} steps, {tokens:,} tokens "
           f"({tokens / horizon_params(config):.2f} per {HORIZON_UNITS[RECIPES[args.recipe].horizon_params]})")
    check_training_memory(trainer, args.device_batch_size, args.max_seq_len, accum_steps)  # before any state is made

    rows = lambda split: pretraining_batches(tokenizer, split, rows_per_process, args.max_seq_len)  # noqa: E731
    train_batches = StepBatches(rows("train"), accum_steps)
    eval_batches = max(1, args.eval_tokens // (rows_per_process * jax.process_count() * args.max_seq_len))

    def val_bpb(model):  # a fresh pass over the same validation rows every time
        return {"val_bpb": bits_per_byte(loss_sums(model, rows("val"), eval_batches, token_bytes))}

    samples = Eval(args.sample_every, lambda model: print_samples(model, tokenizer), at_start=False)
    state = stage.train(train_batches, num_iterations, [Eval(args.eval_every, val_bpb), samples],
                        warmdown_ratio=args.warmdown_ratio, final_lr_frac=args.final_lr_frac,
                        warmup_steps=args.warmup_steps, modern=args.recipe == "modern")
    stage.finish(state, report.BASE_TRAINING, {
        "parameters": config.num_params(), "steps": num_iterations, "tokens": tokens,
        "minimum validation bpb": state.loop.min_val_bpb,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}, standin_corpus())


if __name__ == "__main__":
    run_entry_point(main)
