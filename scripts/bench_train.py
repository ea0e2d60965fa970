"""Time the compiled training step: tokens/s, MFU, peak memory, compile time.

    python -m scripts.bench_train --depth 20 --device-batch-size 32 --max-seq-len 2048      # one GPU, bf16
    python -m scripts.bench_train --depth 4 --device-batch-size 4 --max-seq-len 256         # CPU

Random tokens, one micro-step per optimizer step, every device on the data axis unless --mesh says otherwise.
Needs only jax, flax, optax and numpy.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.common import parse_dtype
from nanochat_jax.gpt import GPT, config_from_depth
from nanochat_jax.optim import build_optimizer
from nanochat_jax.sharding import make_mesh
from nanochat_jax.trainer import Trainer, peak_flops_per_device


def main():
    parser = argparse.ArgumentParser(description="benchmark the training step")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--device-batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after two warm-up steps")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    parser.add_argument("--mesh", default=None)
    parser.add_argument("--remat", choices=["none", "dots", "full"], default="none")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    config = config_from_depth(args.depth, args.vocab_size, args.max_seq_len)
    dtype, mesh = parse_dtype(args.dtype), make_mesh(args.mesh)
    make_model = lambda: GPT(config, rngs=nnx.Rngs(0), dtype=dtype, remat=args.remat)  # noqa: E731
    trainer = Trainer.create(make_model, build_optimizer(config.n_embd), mesh)
    params, opt_state = trainer.init_state(make_model)
    rows = args.device_batch_size * jax.device_count()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab_size, (1, rows, args.max_seq_len + 1), dtype=np.int32)
    batch = jax.device_put({"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}, trainer.batch_sharding())
    lrm, mom = jnp.float32(1.0), jnp.float32(0.95)

    t0 = time.time()
    compiled = trainer.step.lower(params, opt_state, batch, lrm, mom).compile()
    compile_s = time.time() - t0
    for _ in range(2):  # warm-up
        params, opt_state, out = compiled(params, opt_state, batch, lrm, mom)
    float(out["loss"])
    t0 = time.time()
    for _ in range(args.steps):
        params, opt_state, out = compiled(params, opt_state, batch, lrm, mom)
    float(out["loss"])
    dt = (time.time() - t0) / args.steps

    tokens = rows * args.max_seq_len
    peak = peak_flops_per_device()
    mfu = "-" if peak is None else f"{100 * config.flops_per_token() * tokens / dt / (peak * jax.device_count()):.1f}%"
    stats = jax.devices()[0].memory_stats() or {}
    memory = stats.get("peak_bytes_in_use")
    print(f"d{args.depth} ({config.num_params() / 1e6:.1f}M params) | {jax.device_count()} x "
          f"{jax.devices()[0].device_kind} | {jnp.dtype(dtype).name} | remat {args.remat} | batch {rows} x {args.max_seq_len}\n"
          f"compile {compile_s:.1f}s | step {dt * 1000:.1f}ms | {tokens / dt:,.0f} tokens/s | MFU {mfu} | peak memory "
          f"{'-' if memory is None else f'{memory / 2**30:.2f} GiB'}")


if __name__ == "__main__":
    main()
