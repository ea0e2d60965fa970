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
import dataclasses
import operator
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.gpt import init_cache

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
    top_vals, _ = jax.lax.top_k(logits_BV, min(MAX_TOP_K, logits_BV.shape[-1]))
    kth = jnp.take_along_axis(top_vals, jnp.clip(top_k_B - 1, 0, top_vals.shape[-1] - 1)[:, None], axis=-1)
    greedy = jnp.argmax(logits_BV, axis=-1)
    logits_BV = jnp.where((top_k_B[:, None] > 0) & (logits_BV < kth), -jnp.inf, logits_BV)
    scaled = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]
    scaled = jax.lax.cond(jnp.any(top_p_B < 1.0), _nucleus, lambda x, _: x, scaled, top_p_B)
    sampled = jax.vmap(jax.random.categorical)(keys_B, scaled)
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
            cache_len: int):
    """Run one padded prompt into a fresh one-row cache; sample the first token of each of N rows from it.
    Returns (cache, first [N], (logprob [N], top_ids [N, K], top_logprobs [N, K]))."""
    model = nnx.merge(graphdef, params)
    cache = init_cache(model.config, 1, cache_len, model.dtype)
    logits, cache = model.forward_cached(ids_1L, cache, jnp.zeros(1, jnp.int32))
    n = keys_N.shape[0]
    step_keys = jax.vmap(jax.random.fold_in)(keys_N, jnp.full(n, length))
    last = jnp.broadcast_to(logits[0, length - 1], (n, logits.shape[-1]))
    first = sample(adjust(last, bias_ids_N, bias_vals_N), step_keys, temperature_N, top_k_N, top_p_N)
    return cache, first, token_logprobs(last, first)


ROW_FIELDS = ("last", "pos", "active", "budget", "key", "temperature", "top_k", "top_p", "forced", "n_forced",
              "forced_at", "bias_ids", "bias_vals", "presence", "frequency", "counts")


@partial(jax.tree_util.register_dataclass, data_fields=["cache", *ROW_FIELDS], meta_fields=[])
@dataclass(frozen=True)
class DecodeState:
    """Everything the device holds for B decoding rows, as one pytree (donated to every step): the KV cache
    {"k", "v"} [layers, B, max_len, kv_heads, head_dim] (None for rows not yet admitted) and per row: last (the token
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
    def empty(cls, config, rows: int, max_len: int, dtype) -> "DecodeState":
        """B idle rows and an empty cache."""
        z = jnp.zeros
        return cls(init_cache(config, rows, max_len, dtype), z(rows, jnp.int32), z(rows, jnp.int32), z(rows, bool),
                   z(rows, jnp.int32), jax.random.split(jax.random.key(0), rows), z(rows, jnp.float32),
                   z(rows, jnp.int32), jnp.ones(rows, jnp.float32), z((rows, FORCED_SLOTS), jnp.int32),
                   z(rows, jnp.int32), z(rows, jnp.int32), z((rows, BIAS_SLOTS), jnp.int32),
                   z((rows, BIAS_SLOTS), jnp.float32), z(rows, jnp.float32), z(rows, jnp.float32),
                   z((rows, config.vocab_size), jnp.float32))

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

    def admit(self, row_cache, rows: "DecodeState", i, slot) -> "DecodeState":
        """Row i of `rows` with the one-row prefill cache, into `slot` (one compiled shape for every request)."""
        cache = jax.tree.map(lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n, slot, axis=1), self.cache,
                             row_cache)
        fields = {f: getattr(self, f).at[slot].set(jax.lax.dynamic_index_in_dim(getattr(rows, f), i, 0, False))
                  for f in ROW_FIELDS}
        return DecodeState(cache, **fields)

    def step(self, model, pause_tokens, steps: int):
        """Up to `steps` tokens per row; a row pauses after emitting one of pause_tokens. Returns (state, out):
        out["tokens"] [B, steps] (-1 where a row emitted nothing), out["forced"], out["logprob"] [B, steps],
        out["top_ids"] and out["top_logprobs"] [B, steps, TOP_LOGPROBS]."""
        max_pos = self.cache["k"].shape[2] - 1

        def one(r, _):
            logits, cache = model.forward_cached(r.last[:, None], r.cache, r.pos)
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


def decode(graphdef, params, state: DecodeState, pause_tokens, steps: int):
    """DecodeState.step with the model rebuilt from its parameters (the jitted entry point)."""
    return state.step(nnx.merge(graphdef, params), pause_tokens, steps)


def score(graphdef, params, ids_1L):
    """Per position i: the model's log-probability of token i+1 and its top alternatives (the last position's
    entries are meaningless: nothing follows it)."""
    model = nnx.merge(graphdef, params)
    logits = model(ids_1L)[0]
    nxt = jnp.concatenate([ids_1L[0, 1:], ids_1L[0, -1:]])
    return token_logprobs(logits, nxt)


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


def _round_up(n: int, base: int) -> int:
    return -(-n // base) * base


class Engine:
    def __init__(self, model, tokenizer, chunk: int = 16, compute_dtype_weights: bool = False):
        """compute_dtype_weights: keep the weights in the model's compute dtype (bf16 on GPU/TPU) rather than
        casting the fp32 master weights at every matmul of every step (serving: half the weight reads)."""
        self.graphdef, self.params = nnx.split(model)
        self.config, self.dtype = model.config, model.dtype
        if compute_dtype_weights and jnp.dtype(self.dtype) != jnp.float32:
            self.params = jax.tree.map(lambda p: p.astype(self.dtype) if jnp.issubdtype(p.dtype, jnp.floating)
                                       else p, self.params)
        self.tokenizer, self.chunk = tokenizer, chunk
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stops = (special("<|assistant_end|>"), tokenizer.get_bos_token_id())
        self.pause_tokens = jnp.array((self.python_end,) + self.stops, jnp.int32)
        self.prefill = jax.jit(partial(prefill, self.graphdef), static_argnames="cache_len")
        self.decode = jax.jit(partial(decode, self.graphdef), donate_argnums=(1,), static_argnames="steps")
        self.admit = jax.jit(DecodeState.admit, donate_argnums=(0,))
        self._score = jax.jit(partial(score, self.graphdef))
        self.max_len = _round_up(self.config.sequence_len + 1, 256)  # one cache length: a conversation never recompiles

    def check_request(self, tokens, max_tokens, temperature, top_k, top_p=1.0) -> int:
        """Validates a request; returns the token budget that fits the model's context."""
        if not tokens or not all(isinstance(t, (int, np.integer)) for t in tokens):
            raise ValueError("tokens must be a non-empty list of token ids")
        if temperature < 0 or (top_k is not None and not 1 <= top_k <= MAX_TOP_K) or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0, top_k in 1..{MAX_TOP_K}, top_p in (0, 1]")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        room = self.config.sequence_len - len(tokens)
        if room < 1:
            raise ValueError(f"the prompt has {len(tokens)} tokens; the model's context is {self.config.sequence_len}")
        return room if max_tokens is None else min(max_tokens, room)

    def start(self, tokens, keys, max_tokens, temperature, top_k, top_p, cache_len, bias=None, presence=0.0,
              frequency=0.0):
        """Prefill a prompt for len(keys) rows: (one-row cache, rows ready for decode once the cache is broadcast to
        the rows, (logprob, top_ids, top_logprobs) of each row's first token)."""
        # prompt lengths share a few compiled shapes: powers of two (within the cache)
        bucket = min(max(16, 1 << (len(tokens) - 1).bit_length()), cache_len)
        ids = jnp.asarray([list(tokens) + [0] * (bucket - len(tokens))], jnp.int32)
        n = keys.shape[0]
        padded = 1 << (n - 1).bit_length()  # sample counts share a few compiled shapes too
        keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (padded - n,))]) if padded > n else keys
        bias_ids, bias_vals = bias_arrays(bias, padded)
        cache, first, info = self.prefill(self.params, ids, len(tokens), keys,
                                          jnp.full(padded, temperature, jnp.float32),
                                          jnp.full(padded, top_k or 0, jnp.int32), jnp.full(padded, top_p, jnp.float32),
                                          bias_ids, bias_vals, cache_len=cache_len)
        keys, first = keys[:n], first[:n]
        rows = DecodeState.new(first, len(tokens), max_tokens - 1, keys, temperature, top_k or 0, top_p,
                               jnp.asarray(self.stops + (self.python_end,)), self.config.vocab_size, bias, presence,
                               frequency)
        return cache, rows, jax.tree.map(lambda x: x[:n], info)

    def score(self, tokens) -> list[tuple[float, tuple]]:
        """The model's view of a given text: for each token after the first, (its log-probability given those
        before it, ((id, log-probability), ...) the TOP_LOGPROBS likeliest tokens at that position)."""
        if len(tokens) < 2:
            return []
        bucket = max(16, 1 << (len(tokens) - 1).bit_length())
        ids = jnp.asarray([list(tokens) + [0] * (bucket - len(tokens))], jnp.int32)
        logprob, top_ids, top_lp = (np.asarray(x) for x in self._score(self.params, ids))
        n = len(tokens) - 1
        return [(float(logprob[i]), tuple((int(a), float(b)) for a, b in zip(top_ids[i], top_lp[i])))
                for i in range(n)]

    def check_sampling(self, bias=None, presence=0.0, frequency=0.0):
        """Validates logit_bias ({token id: -100..100}) and the presence/frequency penalties (-2..2)."""
        for token, value in (bias or {}).items():
            if not isinstance(token, (int, np.integer)) or not 0 <= token < self.tokenizer.get_vocab_size():
                raise ValueError(f"logit_bias: {token!r} is not a token id of this model")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias: the bias of token {token} must be in -100..100")
        if len(bias or {}) > BIAS_SLOTS:
            raise ValueError(f"logit_bias takes at most {BIAS_SLOTS} tokens")
        if not -2 <= presence <= 2 or not -2 <= frequency <= 2:
            raise ValueError("presence_penalty and frequency_penalty must be in -2..2")

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Streams (token_column, mask_column): one token per sample per step (mask 1 sampled, 0 forced by the
        tool). A finished sample repeats its stop token with mask 0 until all have finished. A one-request client
        of the slot loop that serving runs (nanochat_jax/serving.py), with a slot per sample."""
        from nanochat_jax.serving import Failed, Finished, Request, SlotLoop
        max_tokens = self.check_request(tokens, max_tokens, temperature, top_k)
        loop = SlotLoop(self, slots=num_samples, chunk=self.chunk)
        request = loop.submit(Request(list(tokens), num_samples, max_tokens, temperature, top_k, 1.0, seed))
        queues = [[] for _ in range(num_samples)]  # per sample: (token, mask) not yet yielded
        finished, emitted = [False] * num_samples, 0
        try:
            while True:
                while not request.events.empty():
                    event = request.events.get_nowait()
                    if isinstance(event, Failed):
                        raise RuntimeError(event.message)
                    if isinstance(event, Finished):
                        finished[event.sample] = True
                        if event.token is not None:
                            queues[event.sample].append((event.token, 1))
                    else:
                        queues[event.sample].append((event.id, 0 if event.forced else 1))
                while all(queues):  # a full column is ready
                    column = [q.pop(0) for q in queues]
                    yield [t for t, _ in column], [m for _, m in column]
                    emitted += 1
                    for i, (t, _) in enumerate(column):
                        if t in self.stops and not queues[i]:
                            queues[i].append((t, 0))  # a finished sample repeats its stop token
                    if emitted >= max_tokens or all(finished) and all(t in self.stops for t, _ in column):
                        return
                if all(finished) and request.events.empty():
                    return  # (out of budget or cache: no full column will come)
                loop.tick()
        finally:
            request.cancel()

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
