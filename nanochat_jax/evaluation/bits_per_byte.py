"""Base-model evaluation for training's validation losses and `python -m evals.base`: summed loss and bits per byte
over batches of rows (split over the batch axes), and greedy samples of a few prompts. Bits per byte as nanochat's
evaluate_bpb counts it: the nats over every target whose token has bytes (special tokens have 0) / (ln 2 x bytes).
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.common import bucket, print0
from nanochat_jax.data.dataloader import to_global_array
from nanochat_jax.model.sharding import batch_sharding, make_mesh

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


@partial(jax.jit, static_argnums=(0, 1))
def _sums(graphdef, mesh, params, batch, token_bytes):
    y = batch["targets"]
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # kernels in shard_map (splash) see the mesh
        loss = nnx.merge(graphdef, params)(batch["inputs"], y, loss_reduction="none")
    n_bytes = jnp.where(y >= 0, token_bytes[jnp.maximum(y, 0)], 0)
    return {"nats": loss.sum(), "tokens": jnp.sum(y >= 0),
            "bpb_nats": jnp.sum(jnp.where(n_bytes > 0, loss, 0.0)), "bytes": jnp.sum(n_bytes)}


def loss_sums(model, batches, num_batches: int, token_bytes) -> dict:
    """{"nats", "tokens", "bpb_nats", "bytes"} summed over num_batches batches ({"inputs", "targets"} [rows, T],
    this process's rows; target -1 is not counted) drawn from `batches`."""
    graphdef, params = nnx.split(model)
    # the mesh the params live on (a model built eagerly, not placed: every device on the data axis)
    mesh = getattr(getattr(jax.tree.leaves(params)[0], "sharding", None), "mesh", None) or make_mesh()
    sharding, token_bytes = batch_sharding(mesh), jnp.asarray(token_bytes)
    totals = {}
    for _ in range(num_batches):
        micro = next(batches)
        batch = {name: to_global_array(micro[name], sharding) for name in ("inputs", "targets")}
        for name, value in _sums(graphdef, mesh, params, batch, token_bytes).items():
            totals[name] = totals.get(name, 0) + value.item()
    return totals


def bits_per_byte(sums: dict) -> float:
    return float("inf") if sums["bytes"] == 0 else sums["bpb_nats"] / (np.log(2) * sums["bytes"])


def unigram_bpb(train_batches, val_batches, num_batches: int, token_bytes, vocab_size: int) -> float:
    """Bits per byte (over loss_sums' tokens, this process's rows) of each validation target at its add-one smoothed
    frequency in 4 x num_batches training batches: the best guess without context, which a model should beat."""
    token_bytes = np.asarray(token_bytes)
    counts = np.ones(vocab_size)
    for _ in range(4 * num_batches):
        targets = np.asarray(next(train_batches)["targets"]).ravel()
        np.add.at(counts, targets[targets >= 0], 1)
    logp = np.log(counts / counts.sum())
    nats = total_bytes = 0.0
    for _ in range(num_batches):
        targets = np.asarray(next(val_batches)["targets"]).ravel()
        targets = targets[targets >= 0]
        counted = targets[token_bytes[targets] > 0]
        nats, total_bytes = nats - logp[counted].sum(), total_bytes + token_bytes[counted].sum()
    return bits_per_byte({"bpb_nats": nats, "bytes": total_bytes})


@partial(jax.jit, static_argnums=0)
def _next_token(graphdef, params, ids_1T, at):
    return jnp.argmax(nnx.merge(graphdef, params)(ids_1T)[0, at])


def print_samples(model, tokenizer, max_tokens: int = 16) -> dict:
    """Greedy completions of SAMPLE_PROMPTS, printed (one forward of the whole bucketed row per new token: slow, but
    no cache to get wrong). Returns {}: an Eval that only prints."""
    graphdef, params = nnx.split(model)
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        n_prompt, length = len(ids), bucket(len(ids) + max_tokens)
        for _ in range(max_tokens):
            padded = jnp.asarray([ids + [0] * (length - len(ids))])
            ids.append(int(_next_token(graphdef, params, padded, len(ids) - 1)))
        print0(f"  {prompt!r} -> {tokenizer.decode(ids[n_prompt:])!r}")
    return {}
