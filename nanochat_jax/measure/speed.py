"""Speed on random weights, for the benchmark scripts and scripts/device_check.py: the training step (tokens/s,
MFU, compile time, memory), attention (cuDNN against XLA), and the engine (prefill ms, decode tokens/s). Needs only
jax, flax, optax and numpy.
"""
import time
from types import SimpleNamespace
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.measure.aot import DoesNotFit, chip_specs, device_memory_bytes, largest_fitting, memory
from nanochat_jax.model.attention import attention
from nanochat_jax.inference.engine import Engine
from nanochat_jax.model.gpt import GPT
from nanochat_jax.training.optim import build_optimizer
from nanochat_jax.training.trainer import Trainer, peak_flops_per_device
from nanochat_jax.recipes import RECIPES


def special_ids(vocab_size: int) -> SimpleNamespace:
    """Stands in for a tokenizer: the engine only needs the special tokens' ids (the last ids of the vocab)."""
    names = ["<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>", "<|assistant_end|>"]
    return SimpleNamespace(encode_special=lambda name: vocab_size - 1 - names.index(name),
                           get_bos_token_id=lambda: vocab_size - 1 - len(names), get_vocab_size=lambda: vocab_size)


def timed(fn, repeats: int) -> float:
    """Seconds per call of fn() after one call that is not timed (compilation, warm-up)."""
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats


def train_step(config, mesh, dtype, device_batch_size: int, steps: int = 5, remat: str = "none",
               fp8: bool = False) -> dict:
    """The training step on random tokens at the largest power-of-two device batch <= device_batch_size that fits
    in 90% of its memory: compile and step time, tokens/s, MFU (fp8 against the bf16 peak, as nanochat counts it)."""
    make_model = lambda: GPT(config, rngs=nnx.Rngs(0), dtype=dtype, remat=remat, fp8=fp8)  # noqa: E731
    tx = build_optimizer(config.n_embd, recipe=config.recipe, grad_clip=RECIPES[config.recipe].optimizer["grad_clip"])
    trainer = Trainer.create(make_model, tx, mesh)
    T, device = config.sequence_len, jax.devices()[0]
    limit, last = device_memory_bytes(device), {}  # last: the last compile, the one timed when it fits

    def fits_at(batch):
        try:
            last["compiled"], last["seconds"] = trainer.compile_step(batch * mesh.size, T, 1)
        except DoesNotFit:
            return False
        return limit is None or memory(last["compiled"])["peak_bytes"] <= 0.9 * limit  # the allocator keeps some

    batch = largest_fitting(fits_at, device_batch_size)
    if batch is None:
        raise RuntimeError(f"not even one row of {T} tokens fits at d{config.n_layer}")
    rows = batch * mesh.size
    state = trainer.init_state(make_model)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, rows, T + 1), dtype=np.int32)
    data = jax.device_put({"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}, trainer.batch_sharding())

    def step():
        state.params, state.opt_state, out = trainer.run_step(state.params, state.opt_state, data, 1.0, 0.95)
        return out["loss"]

    step_s, peak = timed(step, steps), peak_flops_per_device()
    tok_s = rows * T / step_s
    return {"depth": config.n_layer, "recipe": config.recipe, "fp8": fp8, "parameters": config.num_params(),
            "device_batch_size": batch, "seq_len": T, "compile_s": last["seconds"], "step_s": step_s,
            "tokens_per_s": tok_s,
            "mfu_percent": None if peak is None else 100 * config.flops_per_token() * tok_s / (peak * mesh.size),
            "compiled_peak_bytes": memory(last["compiled"])["peak_bytes"],
            "device_peak_bytes": (device.memory_stats() or {}).get("peak_bytes_in_use")}


def attention_paths(batch: int, seq_len: int, n_head: int, n_kv_head: int, head_dim: int, dtype,
                    repeats: int = 10) -> dict:
    """cuDNN (on a GPU) against our XLA causal attention on random q, k, v, plain and with a window of T/4: the largest
    relative difference of outputs and gradients (of a random projection), and each one's forward+backward ms."""
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, seq_len, n_head, head_dim), dtype)
    k, v = (jax.random.normal(key, (batch, seq_len, n_kv_head, head_dim), dtype) for key in keys[1:3])
    probe = jax.random.normal(keys[3], q.shape, jnp.float32)

    def forward_and_grads(impl, window):
        def loss(q, k, v):
            out = attention(q, k, v, impl=impl, window=window)
            return jnp.sum(out.astype(jnp.float32) * probe), out
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

    out = {"shape": [batch, seq_len, n_head, n_kv_head, head_dim], "dtype": jnp.dtype(dtype).name, "windows": []}
    for window in (None, seq_len // 4):
        xla = forward_and_grads("xla", window)
        row = {"window": window, "xla_ms": 1000 * timed(lambda: xla(q, k, v), repeats)}
        try:
            cudnn = forward_and_grads("cudnn", window)
            (got, got_out), (want, want_out) = cudnn(q, k, v), xla(q, k, v)
            # each difference relative to the largest value of its tensor (the gradients are far from unit size)
            diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) /
                             jnp.maximum(jnp.max(jnp.abs(b.astype(jnp.float32))), 1e-6))
                       for a, b in zip((*got, got_out), (*want, want_out)))
            tolerance = 2e-2 if dtype == jnp.bfloat16 else 1e-4
            row |= {"cudnn_ms": 1000 * timed(lambda: cudnn(q, k, v), repeats), "max_rel_diff": diff,
                    "tolerance": tolerance, "equal": diff <= tolerance}
        except Exception as e:  # no GPU, or no cuDNN for this shape: the XLA path alone
            row |= {"cudnn_ms": None, "cudnn_unavailable": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        out["windows"].append(row)
    return out


def measured_bandwidth(nbytes: int = 2**28, repeats: int = 5) -> float:
    """This machine's memory bandwidth (bytes/s): the best of `repeats` jitted reads of an array far beyond caches."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    return nbytes / min(timed(lambda: total(x), 1) for _ in range(repeats))


def engine_speed(config, dtype, prompt_len: int, batches, decode_tokens: int = 128, chunk: int = 16) -> dict:
    """Prefill ms of one prompt, decode tokens/s at each batch against its bound: a step reads the weights and each
    row's keys and values filled so far, so tokens/s <= rows x bandwidth / those bytes (a chip's peak bandwidth, a
    CPU's measured: no table holds a CPU's peak; our step reads the cache up to its attention length, a bucket)."""
    model = GPT(config, rngs=nnx.Rngs(0), dtype=dtype)
    engine = Engine(model, special_ids(config.vocab_size), chunk=chunk, compute_dtype_weights=True)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, config.vocab_size - 8, prompt_len)]
    never = jnp.array([-1], jnp.int32)  # no pause tokens: every row decodes the whole time
    spec = chip_specs(jax.devices()[0])
    bandwidth = spec[1] if spec else measured_bandwidth() if jax.devices()[0].platform == "cpu" else None
    out = {"prompt_len": prompt_len, "dtype": jnp.dtype(dtype).name, "decode": [], "bandwidth": bandwidth,
           "bandwidth_from": "peak" if spec else "measured" if bandwidth else None}
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(engine.params))
    position_bytes = 2 * config.n_layer * config.n_kv_head * config.head_dim * jnp.dtype(dtype).itemsize  # k and v
    for batch in batches:
        keys = jax.random.split(jax.random.key(0), batch)
        start = lambda: engine.start(prompt, jax.random.clone(keys), decode_tokens + 1, 1.0, None, 1.0)  # noqa: E731
        if batch == batches[0]:
            out["prefill_ms"] = 1000 * timed(lambda: start()[1].last, 3)

        def fresh():  # the prompt's cache in every row, as the slot loop admits a request's samples
            cache, prefilled, _ = start()
            prefilled = jax.tree.map(lambda x: x[:batch], prefilled)  # (start pads the rows to a power of two)
            return prefilled.replace(cache=jax.tree.map(lambda c: jnp.repeat(c, batch, axis=1), cache))

        calls = max(1, decode_tokens // chunk)
        attend = engine.attend_len(prompt_len + calls * chunk + 1)

        def run(state):
            for _ in range(calls):
                state, step_out = engine.decode(engine.params, state, never, steps=chunk, attend_len=attend)
            return step_out["tokens"]

        jax.block_until_ready(run(fresh()))  # compile
        state = jax.block_until_ready(fresh())
        t0 = time.perf_counter()
        jax.block_until_ready(run(state))
        dt = time.perf_counter() - t0
        tok_s = batch * calls * chunk / dt
        filled = prompt_len + calls * chunk / 2  # the mean over the timed steps
        row = {"batch": batch, "tokens_per_s": tok_s, "ms_per_step": 1000 * dt / (calls * chunk),
               "attend_len": attend, "bytes_per_step": int(weight_bytes + batch * position_bytes * filled)}
        if bandwidth is not None:
            bound = batch * bandwidth / row["bytes_per_step"]
            row |= {"bound_tokens_per_s": bound, "fraction_of_bound": tok_s / bound}
        out["decode"].append(row)
    return out
