"""Pretrain the base model on the FineWeb-edu shards.

    python -m train.base --depth 20 --mesh data:8                     # the d20 speedrun on 8 GPUs
    python -m train.base --depth 4 --max-seq-len 256 --device-batch-size 4 --total-batch-size 8192 \\
        --num-iterations 50 --eval-every 25 --eval-tokens 16384        # a tiny run on a laptop CPU

Checkpoints, meta and metrics.jsonl go to $NANOCHAT_BASE_DIR/base_checkpoints/<model-tag>/ (default d<depth>).
"""
import argparse
import os
from dataclasses import asdict

import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax.checkpoint import Checkpointer, model_meta
from nanochat_jax.common import get_base_dir, parse_dtype, print0
from nanochat_jax.dataloader import pretraining_batches
from nanochat_jax.gpt import GPT, config_from_depth
from nanochat_jax.loop import LoopConfig, bits_per_byte, run
from nanochat_jax.optim import build_optimizer, lr_multiplier, muon_momentum
from nanochat_jax.sharding import make_mesh
from nanochat_jax.tokenizer import get_token_bytes, get_tokenizer
from nanochat_jax.trainer import Trainer

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
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this model tag")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="compute dtype (default: by backend)")
    p.add_argument("--mesh", default=None, help="data:8 | fsdp:8 | data:2,fsdp:4 ... (default: all devices on data)")
    p.add_argument("--model-tag", default=None, help="checkpoint directory name (default: d<depth>)")
    p.add_argument("--run", default=None, help="wandb run name (logging is off unless given and wandb is installed)")
    p.add_argument("--seed", type=int, default=0)
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


def batch_geometry(args, num_devices: int) -> int:
    """Gradient-accumulation steps that reach --total-batch-size from --device-batch-size rows on every device."""
    tokens_per_micro_step = args.device_batch_size * args.max_seq_len * num_devices
    if args.total_batch_size % tokens_per_micro_step:
        raise SystemExit(f"--total-batch-size {args.total_batch_size} is not a multiple of device batch x sequence x "
                         f"devices = {args.device_batch_size} x {args.max_seq_len} x {num_devices} = "
                         f"{tokens_per_micro_step}")
    return args.total_batch_size // tokens_per_micro_step


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
    args = parse_args(argv)
    tokenizer, token_bytes = get_tokenizer(), get_token_bytes()
    try:
        config = config_from_depth(args.depth, tokenizer.get_vocab_size(), args.max_seq_len)
    except ValueError as e:
        raise SystemExit(f"--depth: {e}") from None
    mesh, dtype = make_mesh(args.mesh), parse_dtype(args.dtype)
    accum_steps = batch_geometry(args, jax.device_count())
    num_iterations = horizon(args, config)
    rows_per_process = args.device_batch_size * jax.local_device_count()
    print0(f"{config}\nparameters {config.num_params():,} | FLOPs/token {config.flops_per_token():.3e} | mesh "
           f"{dict(mesh.shape)} | {jnp.dtype(dtype).name} | {accum_steps} micro-steps of "
           f"{args.device_batch_size * jax.device_count()} rows | {num_iterations:,} steps, "
           f"{num_iterations * args.total_batch_size:,} tokens ({num_iterations * args.total_batch_size / config.num_params():.2f}"
           f" per parameter)")

    make_model = lambda: GPT(config, rngs=nnx.Rngs(args.seed), dtype=dtype)  # noqa: E731
    tx = build_optimizer(config.n_embd, args.embedding_lr, args.unembedding_lr, args.matrix_lr, args.weight_decay,
                         args.grad_clip)
    trainer = Trainer.create(make_model, tx, mesh)
    model_tag = args.model_tag or f"d{args.depth}"
    checkpointer = Checkpointer(os.path.join(get_base_dir(), "base_checkpoints", model_tag))
    train_batches = pretraining_batches(tokenizer, "train", rows_per_process, args.max_seq_len)

    start_step, loop_state = 0, None
    if args.resume:
        start_step = checkpointer.latest_step()
        if start_step is None:
            raise SystemExit(f"--resume: no checkpoint in {checkpointer.directory}")
        saved = checkpointer.meta(start_step)
        if "loop_state" not in saved:
            raise SystemExit(f"--resume: step {start_step} in {checkpointer.directory} is not a training checkpoint "
                             "(no optimizer or data state; an imported model?)")
        if saved["model_config"] != asdict(config):
            raise SystemExit(f"--resume: {checkpointer.directory} holds a model {saved['model_config']}, but these "
                             f"flags make {asdict(config)}; use the same --depth/--max-seq-len or another --model-tag")
        if start_step > num_iterations:
            raise SystemExit(f"--resume: the checkpoint is at step {start_step}, beyond this run's {num_iterations} "
                             "steps (a smaller --num-iterations or a larger --total-batch-size?)")
        data_states = saved["loop_state"]["data_states"]
        if len(data_states) != jax.process_count():
            raise SystemExit(f"--resume: the run was saved by {len(data_states)} processes, this one has "
                             f"{jax.process_count()}: the data position cannot be split differently")
        state, meta = checkpointer.restore({"params": trainer.abstract_params, "opt_state": trainer.abstract_opt_state},
                                           start_step)
        params, opt_state = state["params"], state["opt_state"]
        loop_state = meta["loop_state"]
        train_batches.set_state(loop_state.pop("data_states")[jax.process_index()])
        print0(f"resumed from step {start_step} of {checkpointer.directory}")
    else:
        if checkpointer.latest_step() is not None:
            raise SystemExit(f"{checkpointer.directory} already holds checkpoints (steps "
                             f"{checkpointer.manager.all_steps()}): continue it with --resume, or pick another "
                             "--model-tag")
        params, opt_state = trainer.init_state(make_model)
        checkpointer.save_tokenizer(tokenizer)

    eval_batches = max(1, args.eval_tokens // (rows_per_process * jax.process_count() * args.max_seq_len))

    def evaluate(params):
        val = pretraining_batches(tokenizer, "val", rows_per_process, args.max_seq_len)
        return {"val_bpb": bits_per_byte(trainer, params, val, eval_batches, token_bytes)}

    wandb_run = None
    if args.run and jax.process_index() == 0:
        try:
            import wandb
            wandb_run = wandb.init(project="nanochat-jax", name=args.run, config=vars(args))
        except ImportError:
            print0("--run given but wandb is not installed: logging to metrics.jsonl only")

    def meta(step, loop_state):
        return model_meta(config, step, val_bpb=loop_state["last_eval"].get("val_bpb"), train_config=vars(args),
                          loop_state=loop_state)

    schedule = lambda step: (lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio,  # noqa: E731
                                           args.final_lr_frac), muon_momentum(step))
    cfg = LoopConfig(num_iterations=num_iterations, tokens_per_step=args.total_batch_size,
                     flops_per_token=config.flops_per_token(), schedule=schedule, eval_every=args.eval_every,
                     save_every=args.save_every, sample_every=args.sample_every, evaluate=evaluate,
                     sample=make_sampler(trainer, tokenizer), meta=meta, wandb_run=wandb_run)
    _, _, loop_state = run(trainer, params, opt_state, train_batches, cfg, checkpointer, start_step, loop_state,
                           accum_steps)
    print0(f"minimum validation bpb {loop_state['min_val_bpb']} | training time "
           f"{loop_state['total_time'] / 60:.2f}m | checkpoints in {checkpointer.directory}")
    if wandb_run is not None:
        wandb_run.finish()


if __name__ == "__main__":
    main()
