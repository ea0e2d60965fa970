"""Size up a model and run it once: config, parameter count, FLOPs per token, and a jitted forward over validation
text with a freshly initialised model (whose loss is ln(vocab), since lm_head starts at zero).

    python -m scripts.model_summary --depth 20                 # nanochat's d20: 561M parameters
    python -m scripts.model_summary --depth 4 --max-seq-len 256 --batch-size 4
"""
import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.common import parse_dtype, print0, run_entry_point
from nanochat_jax.data.dataset import iter_texts
from nanochat_jax.model.gpt import GPT, config_from_depth
from nanochat_jax.model.sharding import batch_sharding, create_sharded, make_mesh
from nanochat_jax.data.tokenizer import get_tokenizer


def validation_rows(tokenizer, batch_size: int, seq_len: int) -> np.ndarray:
    """batch_size rows of seq_len+1 tokens: validation documents, each starting with <|bos|>, laid end to end."""
    need, stream = batch_size * (seq_len + 1), []
    for docs in iter_texts("val"):
        for ids in tokenizer.encode(docs, prepend=tokenizer.get_bos_token_id()):
            stream.extend(ids)
        if len(stream) >= need:
            return np.array(stream[:need], dtype=np.int32).reshape(batch_size, seq_len + 1)
    raise ValueError(f"the validation shard holds fewer than {need} tokens")


def main():
    parser = argparse.ArgumentParser(description="model size, FLOPs and one forward pass")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward (default: one per device)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: by backend")
    parser.add_argument("--mesh", default=None, help="e.g. data:8, fsdp:8, data:2,fsdp:4 (default: all on data)")
    args = parser.parse_args()
    args.batch_size = args.batch_size or jax.device_count()
    if args.batch_size % jax.device_count():
        parser.error(f"--batch-size {args.batch_size} must be a multiple of the {jax.device_count()} devices")

    tokenizer = get_tokenizer()
    config = config_from_depth(args.depth, tokenizer.get_vocab_size(), args.max_seq_len)
    print0(f"{config}\nparameters: {config.num_params():,}  (embedding {config.padded_vocab_size * config.n_embd:,})"
           f"\ntraining FLOPs per token: {config.flops_per_token():.3e}")
    mesh = make_mesh(args.mesh)
    dtype = parse_dtype(args.dtype)
    graphdef, state = create_sharded(lambda: GPT(config, rngs=nnx.Rngs(0), dtype=dtype), mesh)

    rows = jax.device_put(validation_rows(tokenizer, args.batch_size, args.max_seq_len), batch_sharding(mesh))
    loss_fn = jax.jit(lambda state, rows: nnx.merge(graphdef, state)(rows[:, :-1], rows[:, 1:]))
    seconds = []
    for _ in range(2):  # the first call compiles
        t0 = time.time()
        loss = float(loss_fn(state, rows))
        seconds.append(time.time() - t0)
    tokens = args.batch_size * args.max_seq_len
    print0(f"fresh-model validation loss {loss:.4f} (ln vocab = {math.log(config.vocab_size):.4f}) on {tokens:,} tokens"
           f"\nforward: first call {seconds[0]:.2f}s (compile + run), then {seconds[1]:.3f}s = "
           f"{tokens / seconds[1]:,.0f} tokens/s on {len(jax.devices())} {jax.default_backend()} device(s), "
           f"{jnp.dtype(dtype).name}")


if __name__ == "__main__":
    run_entry_point(main)
