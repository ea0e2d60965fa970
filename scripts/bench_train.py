"""Time the compiled training step: tokens/s, MFU, peak memory, compile time. Random tokens, one micro-step per
optimizer step, every device on the data axis unless --mesh says otherwise; needs only jax, flax, optax and numpy.

    python -m scripts.bench_train --depth 20 --device-batch-size 32 --max-seq-len 2048      # one GPU, bf16
    python -m scripts.bench_train --recipe modern --depth 24 --vocab-size 32768 --device-batch-size 16 --fp8
"""
import argparse

import jax
import jax.numpy as jnp

from nanochat_jax.measure import speed
from nanochat_jax.common import parse_dtype
from nanochat_jax.model.gpt import config_from_depth
from nanochat_jax.recipes import RECIPES
from nanochat_jax.model.sharding import make_mesh


def main(argv=None):
    parser = argparse.ArgumentParser(description="benchmark the training step")
    parser.add_argument("--recipe", choices=RECIPES, default="classic")
    parser.add_argument("--fp8", action="store_true", help="FP8 matmuls (nanochat_jax.model.fp8)")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--device-batch-size", type=int, default=32, help="the largest fitting power of two <= this")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up step")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    parser.add_argument("--mesh", default=None)
    parser.add_argument("--remat", choices=["none", "dots", "full"], default="none")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    config = config_from_depth(args.depth, args.vocab_size, args.max_seq_len, recipe=args.recipe)
    dtype = parse_dtype(args.dtype)
    r = speed.train_step(config, make_mesh(args.mesh), dtype, args.device_batch_size, args.steps, args.remat, args.fp8)
    memory = r["device_peak_bytes"]
    mfu = "-" if r["mfu_percent"] is None else f"{r['mfu_percent']:.1f}%"
    print(f"d{args.depth} {args.recipe}{' fp8' if args.fp8 else ''} ({config.num_params() / 1e6:.1f}M params) | "
          f"{jax.device_count()} x {jax.devices()[0].device_kind} | {jnp.dtype(dtype).name} | remat {args.remat} | "
          f"batch {r['device_batch_size']} x {jax.device_count()} x {args.max_seq_len}\n"
          f"compile {r['compile_s']:.1f}s | step {r['step_s'] * 1000:.1f}ms | {r['tokens_per_s']:,.0f} tokens/s | "
          f"MFU {mfu} | peak memory {'-' if memory is None else f'{memory / 2**30:.2f} GiB'}")


if __name__ == "__main__":
    main()
