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
from nanochat_jax.checkpoint import Checkpointer, model_meta
from nanochat_jax.common import get_base_dir, init_distributed, parse_dtype, print0
from nanochat_jax.dataloader import StepBatches, pretraining_batches
from nanochat_jax.dataset import standin_corpus
from nanochat_jax.gpt import config_from_depth
from nanochat_jax.loop import Eval, LoopConfig, bits_per_byte, eval_sums, run
from nanochat_jax.optim import lr_multiplier, muon_momentum
from nanochat_jax.stages import add_run_flags, batch_geometry, make_trainer, resume_or_start, start_wandb
from nanochat_jax.tokenizer import get_token_bytes, get_tokenizer

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="pretrain a nanochat GPT")
    p.add_argument("--depth", type=int, default=20, help="layers; width = 64 x depth, head dim 128")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per device per micro-step")
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: from the flops or data:param target)")
    p.add_argument("--target-flops", type=float, default=-1.0, help="steps from a training-FLOPs budget (-1: off)")
    p.add_argument("--target-param-data-ratio", type=float, default=20, help="tokens per parameter (Chinchilla: 20)")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip (0: off)")
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
    if args.num_iterations == 0 or args.num_iterations < -1:
        p.error("--num-iterations must be positive, or -1 to use --target-flops / --target-param-data-ratio")
    for name in ("depth", "max_seq_len", "device_batch_size", "total_batch_size", "eval_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("eval_every", "sample_every", "save_every"):
        if getattr(args, name) == 0 or getattr(args, name) < -1:
            p.error(f"--{name.replace('_', '-')} must be positive, or -1 to disable")
    if args.num_iterations <= 0 and args.target_flops <= 0 and args.target_param_data_ratio <= 0:
        p.error("no training horizon: give --num-iterations, --target-flops or --target-param-data-ratio")
    return args


def horizon(args, config) -> int:
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (config.flops_per_token() * args.total_batch_size)))
    return max(1, int(args.target_param_data_ratio * config.num_params()) // args.total_batch_size)


def make_sampler(trainer, tokenizer, max_tokens: int = 16, length: int = 64):
    """Greedy completions of SAMPLE_PROMPTS (one fixed-length jitted forward per new token)."""
    forward = jax.jit(lambda params, ids: trainer.model(params)(ids))

    def sample(params):
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())[: length - max_tokens]
            n_prompt = len(ids)
            for _ in range(max_tokens):
                padded = jnp.asarray([ids + [0] * (length - len(ids))])
                ids.append(int(jnp.argmax(forward(params, padded)[0, len(ids) - 1])))
            print0(f"  {prompt!r} -> {tokenizer.decode(ids[n_prompt:])!r}")

    return sample


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
    model_tag = args.model_tag or f"d{args.depth}"
    checkpointer = Checkpointer(os.path.join(get_base_dir(), "base_checkpoints", model_tag))
    train_batches = StepBatches(pretraining_batches(tokenizer, "train", rows_per_process, args.max_seq_len), accum_steps)

    def fresh():
        checkpointer.save_tokenizer(tokenizer)
        return trainer.init_state(make_model)

    params, opt_state, start_step, loop_state, data_state = resume_or_start(
        args.resume, checkpointer, trainer, config, num_iterations, fresh)
    if data_state is not None:
        train_batches.set_state(data_state)

    eval_batches = max(1, args.eval_tokens // (rows_per_process * jax.process_count() * args.max_seq_len))

    def evaluate(params):
        val = pretraining_batches(tokenizer, "val", rows_per_process, args.max_seq_len)
        return {"val_bpb": bits_per_byte(eval_sums(trainer, params, val, eval_batches, token_bytes))}

    wandb_run = start_wandb(args, "nanochat-jax")

    def meta(step, loop_state):
        return model_meta(config, step, val_bpb=loop_state["last_eval"].get("val_bpb"), train_config=vars(args),
                          loop_state=loop_state)

    schedule = lambda step: (lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio,  # noqa: E731
                                           args.final_lr_frac), muon_momentum(step))
    cfg = LoopConfig(num_iterations=num_iterations, flops_per_token=config.flops_per_token(), schedule=schedule,
                     evals=[Eval(args.eval_every, evaluate)], save_every=args.save_every, sample_every=args.sample_every,
                     sample=make_sampler(trainer, tokenizer), meta=meta, wandb_run=wandb_run)
    _, _, loop_state = run(trainer, params, opt_state, train_batches, cfg, checkpointer, start_step, loop_state)
    print0(f"minimum validation bpb {loop_state['min_val_bpb']} | training time "
           f"{loop_state['total_time'] / 60:.2f}m | checkpoints in {checkpointer.directory}")
    report.log("Base model training", vars(args), {
        "checkpoint_dir": checkpointer.directory, "parameters": config.num_params(), "steps": num_iterations,
        "tokens": num_iterations * args.total_batch_size, "minimum validation bpb": loop_state["min_val_bpb"],
        "training time (min)": loop_state["total_time"] / 60, "devices": f"{jax.device_count()} x "
        f"{jax.devices()[0].device_kind}"}, report.standin(standin_corpus()))
    if wandb_run is not None:
        wandb_run.finish()


if __name__ == "__main__":
    main()
