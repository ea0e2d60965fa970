"""Engine speed on random weights: prefill time and decode tokens/s per batch and depth; needs only jax, flax, optax,
numpy. Alone: the jitted programs, no stop tokens, against the memory-bandwidth bound (measure/speed.py); --nanochat:
both engines' generate() on the same weights and prompt (temperature 1, top-k 50, the host loop included).

    python -m scripts.bench_decode --depths 12 20 --prompt-len 512                             # GPU (bf16)
    python -m scripts.bench_decode --depths 4 --prompt-len 128 --batches 1 8 [--nanochat /tmp/nanochat]   # CPU
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

from nanochat_jax.measure import speed
from nanochat_jax.common import parse_dtype
from nanochat_jax.model.gpt import config_from_depth


def generate_speed(engine, prompt, batch: int, max_tokens: int) -> float:
    """Tokens per second of engine.generate (nanochat's interface) over the tokens it emitted."""
    t0, emitted = time.perf_counter(), 0
    for column, _ in engine.generate(prompt, num_samples=batch, max_tokens=max_tokens, temperature=1.0, top_k=50,
                                     seed=42):
        emitted += len(column)
    return emitted / (time.perf_counter() - t0)


def against_nanochat(args):
    sys.path.insert(0, os.path.abspath(args.nanochat))
    import torch
    from nanochat.engine import Engine as TorchEngine

    from nanochat_jax.inference.engine import Engine
    from scripts import random_pair
    torch.set_num_threads(args.torch_threads or os.cpu_count())
    for depth in args.depths:
        heads, length = max(1, depth * 64 // 128), args.prompt_len + args.decode_tokens + 16
        tokenizer, ref_tokenizer, ref_model, model = random_pair(n_layer=depth, n_head=heads, n_kv_head=heads,
                                                                 n_embd=depth * 64, sequence_len=length)
        text = "The chemical symbol of gold is " * 200
        prompt = [tokenizer.get_bos_token_id(), *tokenizer.encode(text)][:args.prompt_len]
        ours, ref = Engine(model, tokenizer, chunk=args.chunk), TorchEngine(ref_model, ref_tokenizer)
        for batch in args.batches:
            ours.scheduler_for(batch).warm_up()  # compile every program first, as the server and the CLI do at start-up
            generate_speed(ours, prompt, batch, 8)  # and the prefill for `batch` samples
            # ours first: torch's threads keep spinning for a while after its last op and would share the cores
            mine = generate_speed(ours, prompt, batch, args.decode_tokens)
            with torch.no_grad():
                generate_speed(ref, prompt, batch, 8)  # (its first call's overheads, for fairness)
                theirs = generate_speed(ref, prompt, batch, args.decode_tokens)
            time.sleep(1)
            print(f"d{depth} batch {batch:3d}: nanochat {theirs:8,.1f} tokens/s | ours {mine:8,.1f} tokens/s | "
                  f"ratio {mine / theirs:.2f}")


def programs(args):
    dtype = parse_dtype(args.dtype)
    print(f"{jax.devices()[0].device_kind} | {jnp.dtype(dtype).name} | prompt {args.prompt_len} tokens")
    for depth in args.depths:
        config = config_from_depth(depth, args.vocab_size, sequence_len=args.prompt_len + args.decode_tokens + 16)
        out = speed.engine_speed(config, dtype, args.prompt_len, args.batches, args.decode_tokens, args.chunk)
        for row in out["decode"]:
            bound = row.get("fraction_of_bound")
            print(f"d{depth} ({config.num_params() / 1e6:.0f}M) batch {row['batch']:3d}: prefill "
                  f"{out['prefill_ms']:8.1f} ms | decode {row['tokens_per_s']:10,.0f} tokens/s "
                  f"({row['ms_per_step']:.2f} ms/step, attention over {row['attend_len']})"
                  + ("" if bound is None else f" | {100 * bound:.0f}% of the bandwidth bound ("
                     f"{row['bytes_per_step'] / 1e6:,.0f} MB a step at {out['bandwidth'] / 1e9:,.1f} GB/s, "
                     f"{out['bandwidth_from']})"))


def main(argv=None):
    parser = argparse.ArgumentParser(description="benchmark prefill and decode")
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 20])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=256, help="tokens per timed decode (chunks of --chunk)")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    parser.add_argument("--nanochat", default=None, help="a nanochat checkout (e1770a3): compare with its Engine")
    parser.add_argument("--torch-threads", type=int, default=None, help="with --nanochat (default: every core)")
    args = parser.parse_args(argv)
    (against_nanochat if args.nanochat else programs)(args)


if __name__ == "__main__":
    main()
