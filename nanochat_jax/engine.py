"""Inference engine: KV-cached sampling with the calculator tool, nanochat's interface.

    engine = Engine(model, tokenizer)
    for token_column, mask_column in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8):
        ...                                     # one token per sample per step; mask 0 = forced by the tool
    sequences, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

Inside: the prompt is prefilled once (padded to a power-of-two bucket, so new prompt lengths rarely recompile) into a
KV cache [layers, samples, max_len, kv_heads, head_dim] that is broadcast to all samples and donated to every call;
decoding runs `chunk` tokens per jitted call (lax.scan) with sampling on the device. A row that emits
<|python_end|> pauses on the device; between chunks the host evaluates the expression with the calculator and the
row resumes with <|output_start|> result <|output_end|> forced into it (mask 0). A row ends at <|assistant_end|>,
<|bos|>, its token budget or the end of its cache.
"""
import ast
import operator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.gpt import init_cache

MAX_TOP_K = 200  # top-k is applied among the 200 best logits, so k can change without recompiling
FORCED_SLOTS = 32  # tokens of tool output a row can be forced to emit after one call


# ---- the calculator tool
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def _eval_node(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval_node(node.operand)
        if isinstance(value, str):
            raise ValueError("sign of a string")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(left, str) or isinstance(right, str):
            raise ValueError("arithmetic on strings")
        return _OPS[type(node.op)](left, right)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and not node.keywords and len(node.args) == 1):
        target, needle = _eval_node(node.func.value), _eval_node(node.args[0])
        if isinstance(target, str) and isinstance(needle, str):
            return target.count(needle)
    raise ValueError(f"not allowed: {ast.dump(node)[:60]}")


def use_calculator(expr: str):
    """The python tool as nanochat offers it: arithmetic (+ - * / // %, no powers) on numbers, commas in numbers
    ignored, and str.count. Returns the result, or None for anything else. Evaluated by walking the syntax tree:
    nothing is executed."""
    expr = expr.replace(",", "")
    if len(expr) > 200:
        return None
    try:
        return _eval_node(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None


# ---- sampling on the device
def sample(logits_BV, key, temperature_B, top_k_B):
    """Per-row temperature (0 = greedy) and top-k (0 = off, else 1..MAX_TOP_K)."""
    top_vals, _ = jax.lax.top_k(logits_BV, min(MAX_TOP_K, logits_BV.shape[-1]))
    kth = jnp.take_along_axis(top_vals, jnp.clip(top_k_B - 1, 0, top_vals.shape[-1] - 1)[:, None], axis=-1)
    logits_BV = jnp.where((top_k_B[:, None] > 0) & (logits_BV < kth), -jnp.inf, logits_BV)
    scaled = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature_B > 0, sampled, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)


def _round_up(n: int, base: int) -> int:
    return -(-n // base) * base


class Engine:
    def __init__(self, model, tokenizer, chunk: int = 16):
        self.graphdef, self.params = nnx.split(model)
        self.config, self.dtype = model.config, model.dtype
        self.tokenizer, self.chunk = tokenizer, chunk
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stops = (special("<|assistant_end|>"), tokenizer.get_bos_token_id())
        self._prefill = jax.jit(self._prefill_fn)  # its cache grows to num_samples rows: nothing to donate
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,), static_argnames="steps")

    # ---- jitted pieces
    def _prefill_fn(self, params, cache, ids_1L, length, key, temperature, top_k, num_samples_zeros):
        """Prefill one padded prompt, broadcast its cache to every sample, sample each sample's first token."""
        model = nnx.merge(self.graphdef, params)
        logits, cache = model.forward_cached(ids_1L, cache, jnp.zeros(1, jnp.int32))
        n = num_samples_zeros.shape[0]
        cache = jax.tree.map(lambda c: jnp.broadcast_to(c, (c.shape[0], n) + c.shape[2:]), cache)
        last_logits = jnp.broadcast_to(logits[0, length - 1], (n, logits.shape[-1]))
        return cache, sample(last_logits, key, jnp.full(n, temperature), jnp.full(n, top_k, jnp.int32))

    def _decode_fn(self, params, cache, rows, key, steps: int):
        """rows: dict of per-row arrays [B]: last (the token to feed next), pos (its position), active, budget
        (tokens this row may still emit), temperature, top_k, forced [B, FORCED_SLOTS], n_forced, forced_at.
        Emits up to `steps` tokens per row; a row pauses after a stop token or <|python_end|>."""
        model = nnx.merge(self.graphdef, params)
        pause = jnp.array((self.python_end,) + self.stops, jnp.int32)
        max_pos = cache["k"].shape[2] - 1

        def step(carry, step_key):
            cache, r = carry
            logits, cache = model.forward_cached(r["last"][:, None], cache, r["pos"])
            sampled = sample(logits[:, -1], step_key, r["temperature"], r["top_k"])
            use_forced = r["forced_at"] < r["n_forced"]
            forced = jnp.take_along_axis(r["forced"], jnp.minimum(r["forced_at"], FORCED_SLOTS - 1)[:, None], 1)[:, 0]
            token = jnp.where(use_forced, forced, sampled)
            emit = r["active"] & (r["budget"] > 0) & (r["pos"] < max_pos)
            r = dict(r, last=jnp.where(emit, token, r["last"]), pos=r["pos"] + emit,
                     budget=r["budget"] - emit, forced_at=r["forced_at"] + (emit & use_forced),
                     active=emit & ~jnp.isin(token, pause))
            return (cache, r), (jnp.where(emit, token, -1), use_forced)

        (cache, rows), (tokens, forced) = jax.lax.scan(step, (cache, rows), jax.random.split(key, steps))
        return cache, rows, tokens.T, forced.T  # [B, steps]; -1 where a row emitted nothing

    # ---- host side
    def _cache_len(self, prompt_len: int, max_tokens: int) -> int:
        return _round_up(prompt_len + max_tokens + 1, 256)

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Streams (token_column, mask_column): one token per sample per step (mask 1 sampled, 0 forced by the
        tool). A finished sample repeats its stop token with mask 0 until all have finished."""
        if not tokens or not all(isinstance(t, (int, np.integer)) for t in tokens):
            raise ValueError("tokens must be a non-empty list of token ids")
        if temperature < 0 or (top_k is not None and not 1 <= top_k <= MAX_TOP_K):
            raise ValueError(f"temperature must be >= 0 and top_k in 1..{MAX_TOP_K}")
        context = self.config.sequence_len
        room = context - len(tokens)
        if room < 1:
            raise ValueError(f"the prompt has {len(tokens)} tokens; the model's context is {context}")
        max_tokens = room if max_tokens is None else min(max_tokens, room)
        bucket = max(16, 1 << (len(tokens) - 1).bit_length())
        cache_len = self._cache_len(bucket, max_tokens)
        cache = init_cache(self.config, 1, cache_len, self.dtype)
        ids = jnp.asarray([list(tokens) + [0] * (bucket - len(tokens))], jnp.int32)
        key = jax.random.key(seed)
        key, prefill_key = jax.random.split(key)
        cache, first = self._prefill(self.params, cache, ids, len(tokens), prefill_key, jnp.float32(temperature),
                                     jnp.int32(top_k or 0), jnp.zeros(num_samples))
        first = np.asarray(first)
        queues = [[(int(t), 1)] for t in first]  # per sample: (token, mask) not yet yielded
        history = [list(tokens) + [int(t)] for t in first]
        pending = [int(t) == self.python_end for t in first]  # rows waiting for the tool
        done = [False] * num_samples
        rows = {"last": jnp.asarray(first), "pos": jnp.full(num_samples, len(tokens), jnp.int32),
                "active": jnp.asarray([int(t) not in self.stops + (self.python_end,) for t in first]),
                "budget": jnp.full(num_samples, max_tokens - 1, jnp.int32),
                "temperature": jnp.full(num_samples, temperature, jnp.float32),
                "top_k": jnp.full(num_samples, top_k or 0, jnp.int32),
                "forced": jnp.zeros((num_samples, FORCED_SLOTS), jnp.int32),
                "n_forced": jnp.zeros(num_samples, jnp.int32), "forced_at": jnp.zeros(num_samples, jnp.int32)}
        emitted = 0
        while True:
            while all(queues):  # a full column is ready
                column = [q.pop(0) for q in queues]
                yield [t for t, _ in column], [m for _, m in column]
                emitted += 1
                for i, (t, _) in enumerate(column):
                    done[i] = done[i] or t in self.stops
                    if done[i] and not queues[i]:
                        queues[i].append((t if t in self.stops else self.stops[0], 0))
                if all(done) or emitted >= max_tokens:
                    return
            rows = self._resume_tool_calls(rows, history, pending)
            if not bool(jnp.any(rows["active"])):
                return  # every unfinished row is out of budget or cache
            key, chunk_key = jax.random.split(key)
            cache, rows, chunk_tokens, chunk_forced = self._decode(self.params, cache, rows, chunk_key,
                                                                   steps=self.chunk)
            for i, (row_tokens, row_forced) in enumerate(zip(np.asarray(chunk_tokens), np.asarray(chunk_forced))):
                for t, f in zip(row_tokens, row_forced):
                    if t >= 0:
                        queues[i].append((int(t), 0 if f else 1))
                        history[i].append(int(t))
                        pending[i] = int(t) == self.python_end and not f

    def _resume_tool_calls(self, rows, history, pending):
        """Rows paused on <|python_end|>: evaluate the expression since the last <|python_start|> and force
        <|output_start|> result <|output_end|> into the row (nothing when the calculator refuses it)."""
        calls = [i for i, waiting in enumerate(pending) if waiting]
        if not calls:
            return rows
        forced, n_forced = np.asarray(rows["forced"]).copy(), np.asarray(rows["n_forced"]).copy()
        forced_at, active, budget = np.asarray(rows["forced_at"]).copy(), np.asarray(rows["active"]).copy(), \
            np.asarray(rows["budget"])
        for i in calls:
            pending[i] = False
            seq = history[i]
            starts = [j for j, t in enumerate(seq) if t == self.python_start]
            result = use_calculator(self.tokenizer.decode(seq[starts[-1] + 1:-1])) if starts else None
            inject = [] if result is None else self.tokenizer.encode(str(result))[:FORCED_SLOTS - 2]
            inject = [self.output_start] + inject + [self.output_end] if result is not None else []
            forced[i, :len(inject)], n_forced[i], forced_at[i] = inject, len(inject), 0
            active[i] = budget[i] > 0
        return dict(rows, active=jnp.asarray(active), forced=jnp.asarray(forced), n_forced=jnp.asarray(n_forced),
                    forced_at=jnp.asarray(forced_at))

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """(sequences, masks): each the prompt followed by its completion, without the final stop token."""
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        finished = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (t, m) in enumerate(zip(column, mask_column)):
                if finished[i]:
                    continue
                if t in self.stops:
                    finished[i] = True
                else:
                    sequences[i].append(t)
                    masks[i].append(m)
            if all(finished):
                break
        return sequences, masks
