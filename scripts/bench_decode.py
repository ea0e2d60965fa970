"""Engine speed: prefill time and decode tokens/s at batch 1 and batch 32, per depth.

    python -m scripts.bench_decode --depths 12 20 --prompt-len 512        # GPU (bf16)
    python -m scripts.bench_decode --depths 4 --prompt-len 128 --batches 1 8   # CPU

Random weights and tokens; stop tokens are ignored so every row decodes the whole time. Needs only jax, flax,
optax and numpy.
"""
import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax.common import parse_dtype
from nanochat_jax.engine import Engine
from nanochat_jax.gpt import GPT, config_from_depth


class _Ids:
    """Stands in for a tokenizer: the engine only needs the special token ids (the last ids of the vocab)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode_special(self, name: str) -> int:
        return self.vocab_size - 1 - ["<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
                                      "<|assistant_end|>"].index(name)

    def get_bos_token_id(self) -> int:
        return self.vocab_size - 6


def timed(fn, repeats: int) -> float:
    out = fn()
    jax.block_until_ready(out)
    t0 = time.time()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.time() - t0) / repeats


def main():
    parser = argparse.ArgumentParser(description="benchmark prefill and decode")
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 20])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=256, help="tokens per timed decode (chunks of --chunk)")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    args = parser.parse_args()
    dtype = parse_dtype(args.dtype)
    print(f"{jax.devices()[0].device_kind} | {jnp.dtype(dtype).name} | prompt {args.prompt_len} tokens")
    for depth in args.depths:
        config = config_from_depth(depth, args.vocab_size, sequence_len=args.prompt_len + args.decode_tokens + 16)
        model = GPT(config, rngs=nnx.Rngs(0), dtype=dtype)
        engine = Engine(model, _Ids(args.vocab_size), chunk=args.chunk)
        prompt = list(range(1, args.prompt_len + 1))
        cache_len = -(-(args.prompt_len + args.decode_tokens + 1) // 256) * 256
        never = jnp.array([-1], jnp.int32)  # no pause tokens: every row keeps decoding
        for batch in args.batches:
            keys = jax.random.split(jax.random.key(0), batch)
            start = lambda: engine.start(prompt, jax.random.clone(keys), args.decode_tokens + 1, 1.0, None, 1.0,  # noqa
                                         cache_len)
            prefill_s = timed(start, 3)

            def fresh():  # the prompt's cache in every row, as the slot loop admits a request's samples
                cache, rows, _ = start()
                return rows.replace(cache=jax.tree.map(lambda c: jnp.repeat(c, batch, axis=1), cache))
            state = fresh()
            steps = args.decode_tokens // args.chunk

            def run():
                nonlocal state
                for _ in range(steps):
                    state, out = engine.decode(engine.params, state, never, steps=args.chunk)
                return out["tokens"]

            run()  # compile
            state = fresh()
            t0 = time.time()
            jax.block_until_ready(run())
            dt = time.time() - t0
            print(f"d{depth} ({config.num_params() / 1e6:.0f}M) batch {batch:3d}: prefill {prefill_s * 1000:8.1f} ms | "
                  f"decode {batch * steps * args.chunk / dt:10,.0f} tokens/s ({dt / (steps * args.chunk) * 1000:.2f} "
                  f"ms/step)")


if __name__ == "__main__":
    main()
