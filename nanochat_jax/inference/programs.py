"""The device side of sampling: the decode state of a batch of rows and the jitted programs over it (prefill,
decode, score), the sampler and the calculator tool the host runs between decode calls. nanochat_jax/inference/engine.py
(Engine) and nanochat_jax/inference/scheduler.py (SlotLoop) drive them.

Every program is a pure function of (graphdef, params, arrays): the graphdef is bound with functools.partial, so a
new set of weights of the same model never recompiles.
"""
import ast
import dataclasses
import operator
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.model.gpt import init_cache

MAX_TOP_K = 200  # top-k is applied among the 200 best logits, so k can change without recompiling
FORCED_SLOTS = 32  # tokens of tool output a row can be forced to emit after one call
TOP_LOGPROBS = 20  # alternatives reported with each token's log-probability (OpenAI's largest top_logprobs)
BIAS_SLOTS = 300  # logit_bias entries a row can hold


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
def _nucleus(logits_BV, top_p_B):
    """Keep the smallest set of most likely tokens whose probability reaches top_p (always at least one)."""
    sorted_desc = -jnp.sort(-logits_BV, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    cutoff_index = jnp.sum(cum < top_p_B[:, None], axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_desc, jnp.minimum(cutoff_index, logits_BV.shape[-1] - 1), axis=-1)
    return jnp.where(logits_BV < cutoff, -jnp.inf, logits_BV)


def sample(logits_BV, keys_B, temperature_B, top_k_B, top_p_B):
    """One token per row with the row's own key: temperature (0 = greedy), top-k (0 = off, else 1..MAX_TOP_K) and
    top-p (1 = off), applied to the logits divided by the temperature."""
    K = min(MAX_TOP_K, logits_BV.shape[-1])
    top_vals, top_ids = jax.lax.top_k(logits_BV, K)
    # (not top_ids[:, 0]: a use of top_k's output outside the conds below makes XLA:CPU sort the whole vocabulary
    # instead of running its TopK kernel, 10x the cost of the step at batch 8)
    greedy = jnp.argmax(logits_BV, axis=-1)
    inv_t = 1.0 / jnp.maximum(temperature_B, 1e-6)[:, None]
    kth = jnp.take_along_axis(top_vals, jnp.clip(top_k_B - 1, 0, K - 1)[:, None], axis=-1)
    after = jnp.take_along_axis(top_vals, jnp.clip(top_k_B, 0, K - 1)[:, None], axis=-1)
    # the k best are a set of their own only where the next one is smaller (a tie at the k-th keeps every tied token)
    separable = jnp.all((top_k_B > 0) & (top_k_B < K) & (after[:, 0] < kth[:, 0]))

    def among_the_best(_):  # every row has a top-k: draw among its k best only (K random numbers, not V)
        vals = jnp.where(jnp.arange(K)[None, :] < top_k_B[:, None], top_vals * inv_t, -jnp.inf)
        vals = jax.lax.cond(jnp.any(top_p_B < 1.0), _nucleus, lambda x, _: x, vals, top_p_B)
        pick = jax.vmap(jax.random.categorical)(keys_B, vals)
        return jnp.take_along_axis(top_ids, pick[:, None], axis=-1)[:, 0]

    def over_the_vocabulary(_):
        scaled = jnp.where((top_k_B[:, None] > 0) & (logits_BV < kth), -jnp.inf, logits_BV) * inv_t
        scaled = jax.lax.cond(jnp.any(top_p_B < 1.0), _nucleus, lambda x, _: x, scaled, top_p_B)
        return jax.vmap(jax.random.categorical)(keys_B, scaled)

    sampled = jax.lax.cond(separable, among_the_best, over_the_vocabulary, None)
    return jnp.where(temperature_B > 0, sampled, greedy).astype(jnp.int32)


def adjust(logits_BV, bias_ids, bias_vals=None, frequency=None, presence=None, counts=None):
    """logit_bias (sparse: ids and values, padding adds 0 to token 0) and the presence/frequency penalties over the
    tokens generated so far. With none set the logits are unchanged, bit for bit. (Also takes a DecodeState.)"""
    if isinstance(bias_ids, DecodeState):
        r = bias_ids
        bias_ids, bias_vals, frequency, presence, counts = r.bias_ids, r.bias_vals, r.frequency, r.presence, r.counts
    rows = jnp.arange(logits_BV.shape[0])[:, None]
    logits_BV = logits_BV.at[rows, bias_ids].add(bias_vals)
    if counts is None:
        return logits_BV
    return logits_BV - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def token_logprobs(logits_BV, token_B):
    """The model's log-probability of each row's token, and its TOP_LOGPROBS most likely tokens (before any
    sampling setting or bias)."""
    logp = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, min(TOP_LOGPROBS, logp.shape[-1]))
    return jnp.take_along_axis(logp, token_B[:, None], axis=-1)[:, 0], top_ids, top_lp


def prefill(graphdef, params, ids_1L, length, keys_N, temperature_N, top_k_N, top_p_N, bias_ids_N, bias_vals_N,
            cache_len: int, row_cache=None, start=0):
    """Run one padded prompt (its `length` real tokens) into a one-row cache; sample the first token of each of N
    rows from it. The cache is a fresh one, or `row_cache` whose first `start` positions already hold the prompt's
    first tokens (a conversation's earlier turns): then ids_1L is the rest of the prompt, written from `start` on.
    Returns (cache, first [N], (logprob [N], top_ids [N, K], top_logprobs [N, K]))."""
    model = nnx.merge(graphdef, params)
    cache = init_cache(model.config, 1, cache_len, model.dtype) if row_cache is None else row_cache
    logits, cache = model.forward_cached(ids_1L, cache, jnp.full(1, start, jnp.int32))
    n = keys_N.shape[0]
    # the first token's draw depends on its position, start + length, as every later draw does on its own
    step_keys = jax.vmap(jax.random.fold_in)(keys_N, jnp.full(n, start + length))
    last = jnp.broadcast_to(logits[0, length - 1], (n, logits.shape[-1]))
    first = sample(adjust(last, bias_ids_N, bias_vals_N), step_keys, temperature_N, top_k_N, top_p_N)
    return cache, first, token_logprobs(last, first)


ROW_FIELDS = ("last", "pos", "active", "budget", "key", "temperature", "top_k", "top_p", "forced", "n_forced",
              "forced_at", "bias_ids", "bias_vals", "presence", "frequency", "counts")


@partial(jax.tree_util.register_dataclass, data_fields=["cache", *ROW_FIELDS], meta_fields=[])
@dataclass(frozen=True)
class DecodeState:
    """Everything the device holds for B decoding rows, as one pytree (donated to every step): the KV cache
    {"k", "v"} [layers, B, kv_heads, max_len, head_dim] (None for rows not yet admitted) and per row: last (the token
    to feed next), pos (its position), active, budget (tokens it may still emit), key, temperature, top_k, top_p,
    the tool's forced tokens (forced [B, FORCED_SLOTS], n_forced, forced_at), logit bias (bias_ids, bias_vals
    [B, BIAS_SLOTS]), presence and frequency penalties and the generated-token counts [B, V] they act on."""
    cache: dict | None
    last: jax.Array
    pos: jax.Array
    active: jax.Array
    budget: jax.Array
    key: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    forced: jax.Array
    n_forced: jax.Array
    forced_at: jax.Array
    bias_ids: jax.Array
    bias_vals: jax.Array
    presence: jax.Array
    frequency: jax.Array
    counts: jax.Array

    def replace(self, **changes) -> "DecodeState":
        return dataclasses.replace(self, **changes)

    @classmethod
    def empty(cls, config, slots: int, max_len: int, dtype) -> "DecodeState":
        """`slots` idle rows and an empty cache."""
        z = jnp.zeros
        return cls(init_cache(config, slots, max_len, dtype), z(slots, jnp.int32), z(slots, jnp.int32), z(slots, bool),
                   z(slots, jnp.int32), jax.random.split(jax.random.key(0), slots), z(slots, jnp.float32),
                   z(slots, jnp.int32), jnp.ones(slots, jnp.float32), z((slots, FORCED_SLOTS), jnp.int32),
                   z(slots, jnp.int32), z(slots, jnp.int32), z((slots, BIAS_SLOTS), jnp.int32),
                   z((slots, BIAS_SLOTS), jnp.float32), z(slots, jnp.float32), z(slots, jnp.float32),
                   z((slots, config.vocab_size), jnp.float32))

    @classmethod
    def new(cls, first, prompt_len: int, budget: int, keys, temperature, top_k, top_p, stop_tokens, vocab_size: int,
            bias=None, presence: float = 0.0, frequency: float = 0.0) -> "DecodeState":
        """n rows just prefilled (no cache of their own yet): first is each row's first token."""
        n = first.shape[0]
        bias_ids, bias_vals = bias_arrays(bias, n)
        return cls(None, first, jnp.full(n, prompt_len, jnp.int32), ~jnp.isin(first, stop_tokens),
                   jnp.full(n, budget, jnp.int32), keys, jnp.full(n, temperature, jnp.float32),
                   jnp.full(n, top_k, jnp.int32), jnp.full(n, top_p, jnp.float32),
                   jnp.zeros((n, FORCED_SLOTS), jnp.int32), jnp.zeros(n, jnp.int32), jnp.zeros(n, jnp.int32),
                   bias_ids, bias_vals, jnp.full(n, presence, jnp.float32), jnp.full(n, frequency, jnp.float32),
                   jnp.zeros((n, vocab_size), jnp.float32).at[jnp.arange(n), first].add(1.0))

    def admit(self, row_cache, prefilled: "DecodeState", i, slot) -> "DecodeState":
        """Row i of `prefilled` (Engine.start's rows) with the one-row prefill cache, into `slot` (one compiled shape
        for every request)."""
        cache = jax.tree.map(lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n, slot, axis=1), self.cache,
                             row_cache)
        fields = {f: getattr(self, f).at[slot].set(jax.lax.dynamic_index_in_dim(getattr(prefilled, f), i, 0, False))
                  for f in ROW_FIELDS}
        return DecodeState(cache, **fields)

    def step(self, model, pause_tokens, steps: int, attend_len: int | None = None):
        """Up to `steps` tokens per row; a row pauses after emitting one of pause_tokens. attend_len: attention reads
        the cache's first attend_len positions (>= every active row's pos + steps; default: all). Returns (state, out):
        out["tokens"] [B, steps] (-1 where a row emitted nothing), out["forced"], out["logprob"] [B, steps],
        out["top_ids"] and out["top_logprobs"] [B, steps, TOP_LOGPROBS]."""
        max_pos = self.cache["k"].shape[3] - 1

        def one(r, _):
            logits, cache = model.forward_cached(r.last[:, None], r.cache, r.pos, attend_len)
            keys = jax.vmap(jax.random.fold_in)(r.key, r.pos + 1)  # a row's draws depend on its own state only
            sampled = sample(adjust(logits[:, -1], r), keys, r.temperature, r.top_k, r.top_p)
            use_forced = r.forced_at < r.n_forced
            forced = jnp.take_along_axis(r.forced, jnp.minimum(r.forced_at, FORCED_SLOTS - 1)[:, None], 1)[:, 0]
            token = jnp.where(use_forced, forced, sampled)
            emit = r.active & (r.budget > 0) & (r.pos < max_pos)
            r = r.replace(cache=cache, last=jnp.where(emit, token, r.last), pos=r.pos + emit, budget=r.budget - emit,
                          forced_at=r.forced_at + (emit & use_forced), active=emit & ~jnp.isin(token, pause_tokens),
                          counts=r.counts.at[jnp.arange(token.shape[0]), token].add(emit.astype(jnp.float32)))
            logprob, top_ids, top_lp = token_logprobs(logits[:, -1], token)
            return r, {"tokens": jnp.where(emit, token, -1), "forced": use_forced, "logprob": logprob,
                       "top_ids": top_ids, "top_logprobs": top_lp}

        state, out = jax.lax.scan(one, self, None, length=steps)
        return state, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), out)


def decode(graphdef, params, state: DecodeState, pause_tokens, steps: int, attend_len: int | None = None):
    """DecodeState.step with the model rebuilt from its parameters (the jitted entry point)."""
    return state.step(nnx.merge(graphdef, params), pause_tokens, steps, attend_len)


def attend_buckets(max_len: int, smallest: int = 256) -> list[int]:
    """The attention lengths decode calls use: powers of two from `smallest`, then max_len (one compiled decode
    program each; a call takes the first that covers every active row)."""
    sizes = [smallest]
    while sizes[-1] < max_len:
        sizes.append(min(2 * sizes[-1], max_len))
    return [s for s in sizes if s <= max_len] or [max_len]


def score(graphdef, params, ids_1L):
    """Per position i: the model's log-probability of token i+1 and its top alternatives (the last position's
    entries are meaningless: nothing follows it)."""
    model = nnx.merge(graphdef, params)
    logits = model(ids_1L)[0]
    nxt = jnp.concatenate([ids_1L[0, 1:], ids_1L[0, -1:]])
    return token_logprobs(logits, nxt)


def row_cache(state: DecodeState, slot):
    """One slot's row of the state's KV cache, [layers, 1, kv_heads, max_len, head_dim] (a copy)."""
    return jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=1), state.cache)


def bias_arrays(bias, n: int):
    """{token id: value} -> (ids, values) [n, BIAS_SLOTS] (padding: token 0, value 0)."""
    items = sorted((bias or {}).items())
    if len(items) > BIAS_SLOTS:
        raise ValueError(f"logit_bias takes at most {BIAS_SLOTS} tokens")
    ids = np.zeros(BIAS_SLOTS, np.int32)
    vals = np.zeros(BIAS_SLOTS, np.float32)
    for i, (t, v) in enumerate(items):
        ids[i], vals[i] = t, v
    return jnp.broadcast_to(jnp.asarray(ids), (n, BIAS_SLOTS)), jnp.broadcast_to(jnp.asarray(vals), (n, BIAS_SLOTS))
