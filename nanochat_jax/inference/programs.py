"""The device side of sampling: the decode state of a batch of rows, the sampler, and the pure programs over them
(prefill, decode, score) of (graphdef, params, arrays). `Programs` binds them to one model (the graphdef with
functools.partial: new weights of the same model never recompile) and checks requests; the scheduler runs them."""
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.common import bucket
from nanochat_jax.model.gpt import init_cache

MAX_TOP_K = 200  # top-k is applied among the 200 best logits, so k can change without recompiling
FORCED_SLOTS = 32  # tokens of tool output a row can be forced to emit after one call
TOP_LOGPROBS = 20  # alternatives reported with each token's log-probability (OpenAI's largest top_logprobs)
BIAS_SLOTS = 300  # logit_bias entries a row can hold


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


def adjust(logits_BV, bias_ids, bias_vals, frequency=None, presence=None, counts=None):
    """logit_bias (sparse: ids and values, padding adds 0 to token 0) and the presence/frequency penalties over the
    tokens generated so far. With none set the logits are unchanged, bit for bit."""
    rows = jnp.arange(logits_BV.shape[0])[:, None]
    logits_BV = logits_BV.at[rows, bias_ids].add(bias_vals)
    if counts is None:
        return logits_BV
    return logits_BV - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def token_logprobs(logits_BV, token_B):
    """Each row's token's log-probability and the TOP_LOGPROBS likeliest tokens, before any sampling setting or bias."""
    logp = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, min(TOP_LOGPROBS, logp.shape[-1]))
    return jnp.take_along_axis(logp, token_B[:, None], axis=-1)[:, 0], top_ids, top_lp


def prefill(graphdef, params, ids_1L, length, cache_len: int, row_cache=None, start=0):
    """Run a padded prompt (`length` real tokens) into a one-row cache, fresh or `row_cache` whose first `start`
    positions hold the prompt's start (ids_1L is the rest): (cache, the logits after its last token)."""
    model = nnx.merge(graphdef, params)
    cache = init_cache(model.config, 1, cache_len, model.dtype) if row_cache is None else row_cache
    logits, cache = model.forward_cached(ids_1L, cache, jnp.full(1, start, jnp.int32))
    return cache, logits[0, length - 1]


def first_rows(last_V, keys_N, prompt_len, budget, temperature, top_k, top_p, bias_ids, bias_vals, presence,
               frequency, pause_tokens):
    """The N rows a prompt starts, from the logits after its last token: (their DecodeState without a cache, the
    first tokens' token_logprobs). Apart from prefill, so that the sampler is not compiled per prompt length."""
    n = keys_N.shape[0]
    # the first token's draw depends on its position, the prompt's length, as every later draw does on its own
    step_keys = jax.vmap(jax.random.fold_in)(keys_N, jnp.full(n, prompt_len))
    last = jnp.broadcast_to(last_V, (n, last_V.shape[-1]))
    bias = jnp.broadcast_to(bias_ids, (n, BIAS_SLOTS)), jnp.broadcast_to(bias_vals, (n, BIAS_SLOTS))
    settings = jnp.full(n, temperature, jnp.float32), jnp.full(n, top_k, jnp.int32), jnp.full(n, top_p, jnp.float32)
    first = sample(adjust(last, *bias), step_keys, *settings)
    rows = DecodeState.new(first, prompt_len, budget, keys_N, temperature, top_k, top_p, pause_tokens,
                           last_V.shape[-1], (bias_ids, bias_vals), presence, frequency)
    return rows, token_logprobs(last, first)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the device holds for B decoding rows, one pytree donated to every step."""
    cache: dict | None  # the KV cache (None for rows not yet admitted)
    last: jax.Array  # [B] the token to feed next
    pos: jax.Array  # [B] its position
    active: jax.Array
    budget: jax.Array  # [B] tokens the row may still emit
    key: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    forced: jax.Array  # [B, FORCED_SLOTS] the tool's tokens to emit: n_forced of them, the next at forced_at
    n_forced: jax.Array
    forced_at: jax.Array
    bias_ids: jax.Array  # [B, BIAS_SLOTS] logit bias
    bias_vals: jax.Array
    presence: jax.Array
    frequency: jax.Array
    counts: jax.Array  # [B, V] each token's count so far (the penalties)

    def replace(self, **changes) -> "DecodeState":
        return dataclasses.replace(self, **changes)

    @classmethod
    def empty(cls, config, slots: int, max_len: int, dtype) -> "DecodeState":
        idle = cls.new(jnp.zeros(slots, jnp.int32), 0, 0, jax.random.split(jax.random.key(0), slots), 0.0, 0, 1.0,
                       jnp.zeros(0, jnp.int32), config.vocab_size)
        return idle.replace(cache=init_cache(config, slots, max_len, dtype), active=jnp.zeros(slots, bool),
                            counts=jnp.zeros((slots, config.vocab_size), jnp.float32))

    @classmethod
    def new(cls, first, prompt_len: int, budget: int, keys, temperature, top_k, top_p, stop_tokens, vocab_size: int,
            bias=None, presence: float = 0.0, frequency: float = 0.0) -> "DecodeState":
        """n rows just prefilled (no cache of their own yet): first is each row's first token; bias: bias_arrays'."""
        n = first.shape[0]
        bias_ids, bias_vals = bias_arrays(None) if bias is None else bias
        return cls(None, first, jnp.full(n, prompt_len, jnp.int32), ~jnp.isin(first, stop_tokens),
                   jnp.full(n, budget, jnp.int32), keys, jnp.full(n, temperature, jnp.float32),
                   jnp.full(n, top_k, jnp.int32), jnp.full(n, top_p, jnp.float32),
                   jnp.zeros((n, FORCED_SLOTS), jnp.int32), jnp.zeros(n, jnp.int32), jnp.zeros(n, jnp.int32),
                   jnp.broadcast_to(bias_ids, (n, BIAS_SLOTS)), jnp.broadcast_to(bias_vals, (n, BIAS_SLOTS)),
                   jnp.full(n, presence, jnp.float32), jnp.full(n, frequency, jnp.float32),
                   jnp.zeros((n, vocab_size), jnp.float32).at[jnp.arange(n), first].add(1.0))

    def admit(self, row_cache, prefilled: "DecodeState", i, slot) -> "DecodeState":
        """Row i of Programs.start's rows, with its one-row cache, into `slot` (one compiled shape for all)."""
        cache = jax.tree.map(lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n, slot, axis=1), self.cache,
                             row_cache)
        fields = {f: getattr(self, f).at[slot].set(jax.lax.dynamic_index_in_dim(getattr(prefilled, f), i, 0, False))
                  for f in ROW_FIELDS}
        return DecodeState(cache, **fields)

    def row_cache(self, slot):  # one slot's row of the KV cache, [layers, 1, kv_heads, max_len, head_dim] (a copy)
        return jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=1), self.cache)

    def step(self, model, pause_tokens, steps: int, attend_len: int | None = None):
        """Up to `steps` tokens per row; a row pauses after emitting one of pause_tokens. Attention reads the cache's
        first attend_len positions (>= every active row's pos + steps; default: all). Returns (state, out): tokens,
        forced, logprob [B, steps] (token -1 where a row emitted nothing), top_ids, top_logprobs [B, steps, K]."""
        max_pos = self.cache["k"].shape[3] - 1

        def one(r, _):
            logits, cache = model.forward_cached(r.last[:, None], r.cache, r.pos, attend_len)
            keys = jax.vmap(jax.random.fold_in)(r.key, r.pos + 1)  # a row's draws depend on its own state only
            logits_BV = adjust(logits[:, -1], r.bias_ids, r.bias_vals, r.frequency, r.presence, r.counts)
            sampled = sample(logits_BV, keys, r.temperature, r.top_k, r.top_p)
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
    return state.step(nnx.merge(graphdef, params), pause_tokens, steps, attend_len)


def decode_rows(graphdef, params, state: DecodeState, rows, real, pause_tokens, steps: int, attend_len: int):
    """decode on the rows `rows` [b] only: the busy ones, then free ones as padding (`real` False: they write nothing
    back). Each row's cache is copied up to attend_len and back (contiguous copies, not a scatter); out: in `rows`."""
    def take(x, axis, length=None):  # the b rows of x along `axis` (the cache: its first `length` positions)
        parts = [jax.lax.dynamic_index_in_dim(x, r, axis, keepdims=True) for r in rows]
        if length:  # positions are the cache entry's last axis but one (k, v) or its last (smear's tokens)
            parts = [jax.lax.slice_in_dim(p, 0, length, axis=p.ndim - 2 if p.ndim == 5 else p.ndim - 1)
                     for p in parts]
        return jnp.concatenate(parts, axis)

    def put(x, new, axis):  # write rows back, padding first: a real row's write is never undone
        for j in reversed(range(rows.shape[0])):
            start = [0] * x.ndim
            start[axis] = rows[j]
            row = jax.lax.dynamic_slice_in_dim(new, j, 1, axis)  # (the cache: its first attend_len positions)
            old = jax.lax.dynamic_slice(x, start, row.shape)
            x = jax.lax.dynamic_update_slice(x, jnp.where(real[j], row, old), start)
        return x

    sub = DecodeState({k: take(c, 1, attend_len) for k, c in state.cache.items()},
                      **{f: take(getattr(state, f), 0) for f in ROW_FIELDS})
    # (every real row stays within attend_len in this call: its positions end below longest + steps)
    sub, out = sub.step(nnx.merge(graphdef, params), pause_tokens, steps)
    return DecodeState({k: put(c, sub.cache[k], 1) for k, c in state.cache.items()},
                       **{f: put(getattr(state, f), getattr(sub, f), 0) for f in ROW_FIELDS}), out


def score(graphdef, params, ids_1L):
    """Per position i: the log-probability of token i+1 and its top alternatives (the last position's: meaningless)."""
    logits = nnx.merge(graphdef, params)(ids_1L)[0]
    nxt = jnp.concatenate([ids_1L[0, 1:], ids_1L[0, -1:]])
    return token_logprobs(logits, nxt)


ROW_FIELDS = tuple(f.name for f in dataclasses.fields(DecodeState) if f.name != "cache")


def bias_arrays(bias):
    """{token id: value} -> (ids, values) [BIAS_SLOTS] (padding: token 0, value 0)."""
    ids, vals = np.zeros(BIAS_SLOTS, np.int32), np.zeros(BIAS_SLOTS, np.float32)
    for j, (token, value) in enumerate(sorted((bias or {}).items())):
        ids[j], vals[j] = token, value
    return ids, vals


def top_pairs(ids, logprobs) -> tuple:
    return tuple((int(i), float(lp)) for i, lp in zip(ids, logprobs))


class Programs:
    """`use(model)` swaps in new weights of the same architecture (RL's policy after each step)."""

    def __init__(self, model, tokenizer, compute_dtype_weights: bool = False):  # (see Engine)
        self.graphdef, _ = nnx.split(model)
        self.config, self.dtype, self.compute_dtype_weights = model.config, model.dtype, compute_dtype_weights
        self.vocab_size = tokenizer.get_vocab_size()
        self.weights_version = -1
        self.use(model)
        self.bos = tokenizer.get_bos_token_id()
        self.python_end = tokenizer.encode_special("<|python_end|>")
        self.stops = (tokenizer.encode_special("<|assistant_end|>"), self.bos)
        self.pause_tokens = jnp.array((self.python_end,) + self.stops, jnp.int32)
        self.prefill = jax.jit(partial(prefill, self.graphdef), static_argnames="cache_len")
        self.first_rows = jax.jit(first_rows)
        donated_state = dict(donate_argnums=(1,), static_argnames=("steps", "attend_len"))
        self.decode = jax.jit(partial(decode, self.graphdef), **donated_state)
        self.decode_rows = jax.jit(partial(decode_rows, self.graphdef), **donated_state)
        self.admit = jax.jit(DecodeState.admit, donate_argnums=(0,))
        self.row_cache = jax.jit(DecodeState.row_cache)
        self.sample_keys = jax.jit(jax.vmap(jax.random.fold_in, (None, 0)))
        self._score = jax.jit(partial(score, self.graphdef))
        self.max_len = -(-(self.config.sequence_len + 1) // 256) * 256  # one cache length: a chat never recompiles
        # the decode programs' attention lengths (a call takes the first that covers it): 256, 512, ..., max_len
        self.attend_buckets = sorted({min(256 << i, self.max_len) for i in range(self.max_len.bit_length())})
        self.empty = jax.jit(lambda slots: DecodeState.empty(self.config, slots, self.max_len, self.dtype),
                             static_argnums=0)  # a scheduler's idle state (one program, not an eager op per field)

    def use(self, model):
        graphdef, params = nnx.split(model)
        if graphdef != self.graphdef:
            raise ValueError("a model of another architecture than the engine was built for")
        if self.compute_dtype_weights and jnp.dtype(self.dtype) != jnp.float32:
            params = jax.tree.map(lambda p: p.astype(self.dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                                  params)
        self.params = params
        self.weights_version += 1  # cache rows made with other weights are stale

    def attend_len(self, longest: int) -> int:
        return next((b for b in self.attend_buckets if b >= longest), self.max_len)

    def check_request(self, tokens, max_tokens, temperature, top_k, top_p=1.0, bias=None, presence=0.0,
                      frequency=0.0) -> int:
        """Validates a request; returns the token budget that fits the model's context."""
        if not tokens or not all(isinstance(t, (int, np.integer)) and 0 <= t < self.vocab_size for t in tokens):
            raise ValueError(f"tokens must be a non-empty list of token ids (0..{self.vocab_size - 1})")
        if temperature < 0 or (top_k is not None and not 1 <= top_k <= MAX_TOP_K) or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0, top_k in 1..{MAX_TOP_K}, top_p in (0, 1]")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        room = self.config.sequence_len - len(tokens)
        if room < 1:
            raise ValueError(f"the prompt has {len(tokens)} tokens; the model's context is {self.config.sequence_len}")
        for token, value in (bias or {}).items():
            if not isinstance(token, (int, np.integer)) or not 0 <= token < self.vocab_size:
                raise ValueError(f"logit_bias: {token!r} is not a token id of this model")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias: the bias of token {token} must be in -100..100")
        if len(bias or {}) > BIAS_SLOTS:
            raise ValueError(f"logit_bias takes at most {BIAS_SLOTS} tokens")
        if not -2 <= presence <= 2 or not -2 <= frequency <= 2:
            raise ValueError("presence_penalty and frequency_penalty must be in -2..2")
        return room if max_tokens is None else min(max_tokens, room)

    def start(self, tokens, keys, max_tokens, temperature, top_k, top_p, bias=None, presence=0.0, frequency=0.0,
              reuse=None):
        """Prefill a prompt for len(keys) rows: (one-row cache, their DecodeState without a cache, token_logprobs of
        the first tokens). The rows are padded to a power of two (copies of the first key; take the first len(keys)):
        a new sample count compiles nothing. reuse: (row cache, n): the cache holds the prompt's first n tokens."""
        row, done = reuse or (None, 0)
        rest = list(tokens[done:])
        # prompt lengths share a few compiled shapes: powers of two (within the cache: a write past its end would
        # be moved back by XLA onto positions that hold the prompt)
        length = bucket(len(rest), maximum=self.max_len - done)
        ids = np.asarray([rest + [0] * (length - len(rest))], np.int32)  # (jnp.asarray of a list: an eager convert)
        n, padded = keys.shape[0], bucket(keys.shape[0], minimum=1)
        keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (padded - n,))]) if padded > n else keys
        cache, last = self.prefill(self.params, ids, len(rest), cache_len=self.max_len, row_cache=row, start=done)
        prefilled, info = self.first_rows(last, keys, len(tokens), max_tokens - 1, temperature, top_k or 0, top_p,
                                          *bias_arrays(bias), presence, frequency, self.pause_tokens)
        return cache, prefilled, info

    def score(self, tokens) -> list[tuple[float, tuple]]:
        if len(tokens) < 2:
            return []
        ids = np.asarray([list(tokens) + [0] * (bucket(len(tokens)) - len(tokens))], np.int32)
        logprob, top_ids, top_lp = (np.asarray(x) for x in self._score(self.params, ids))
        return [(float(logprob[i]), top_pairs(top_ids[i], top_lp[i])) for i in range(len(tokens) - 1)]
