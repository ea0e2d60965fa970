"""Inference engine: KV-cached sampling with the calculator tool, nanochat's interface.

    engine = Engine(model, tokenizer)
    for token_column, mask_column in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8):
        ...                                     # one token per sample per step; mask 0 = forced by the tool
    sequences, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

Inside: the prompt is prefilled once (padded to a power-of-two bucket, so new prompt lengths rarely recompile) into a
KV cache [layers, samples, kv_heads, max_len, head_dim] that is broadcast to all samples and donated to every call;
decoding runs `chunk` tokens per jitted call (lax.scan) with sampling on the device. A row that emits
<|python_end|> pauses on the device; between chunks the host evaluates the expression with the calculator and the
row resumes with <|output_start|> result <|output_end|> forced into it (mask 0). A row ends at <|assistant_end|>,
<|bos|>, its token budget or the end of its cache.
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.common import bucket
from nanochat_jax.inference.programs import (BIAS_SLOTS, MAX_TOP_K, DecodeState, attend_buckets, bias_arrays, decode, prefill,
                                   row_cache, score)
from nanochat_jax.inference.scheduler import Failed, Finished, Request, SlotLoop, Token


def _round_up(n: int, base: int) -> int:
    return -(-n // base) * base


class Engine:
    def __init__(self, model, tokenizer, chunk: int = 16, compute_dtype_weights: bool = False):
        """compute_dtype_weights: keep the weights in the model's compute dtype (bf16 on GPU/TPU) rather than
        casting the fp32 master weights at every matmul of every step (serving: half the weight reads)."""
        self.graphdef, _ = nnx.split(model)
        self.config, self.dtype, self.compute_dtype_weights = model.config, model.dtype, compute_dtype_weights
        self.use(model)
        self.tokenizer, self.chunk = tokenizer, chunk
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stops = (special("<|assistant_end|>"), tokenizer.get_bos_token_id())
        self.pause_tokens = jnp.array((self.python_end,) + self.stops, jnp.int32)
        self.prefill = jax.jit(partial(prefill, self.graphdef), static_argnames="cache_len")
        self.decode = jax.jit(partial(decode, self.graphdef), donate_argnums=(1,),
                              static_argnames=("steps", "attend_len"))
        self.admit = jax.jit(DecodeState.admit, donate_argnums=(0,))
        self.row_cache = jax.jit(row_cache)
        self._score = jax.jit(partial(score, self.graphdef))
        self.max_len = _round_up(self.config.sequence_len + 1, 256)  # one cache length: a conversation never recompiles
        self.attend_buckets = attend_buckets(self.max_len)
        self.loops = {}  # num_samples -> the SlotLoop generate() keeps (see loop_for)

    def attend_len(self, longest: int) -> int:
        """The attention length for a decode call whose rows reach at most `longest` positions."""
        return next((b for b in self.attend_buckets if b >= longest), self.max_len)

    def use(self, model):
        """Sample from `model`'s weights from now on (RL: the policy after each step); the same architecture, so
        nothing recompiles."""
        graphdef, params = nnx.split(model)
        if graphdef != self.graphdef:
            raise ValueError("Engine.use: a model of another architecture than the engine was built for")
        if self.compute_dtype_weights and jnp.dtype(self.dtype) != jnp.float32:
            params = jax.tree.map(lambda p: p.astype(self.dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                                  params)
        self.params = params
        self.weights_version = getattr(self, "weights_version", -1) + 1  # caches made with other weights are stale

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
              frequency=0.0, reuse=None):
        """Prefill a prompt for len(keys) rows: (one-row cache, `prefilled`: a DecodeState of those rows without a
        cache, ready for decode once admitted, (logprob, top_ids, top_logprobs) of each row's first token).
        The rows are padded to a power of two (copies of the first key): take the first len(keys); every shape then
        comes from a few buckets, so a new sample count compiles nothing, not even an eager op.
        reuse: (row cache, n) where the row cache already holds the prompt's first n tokens: only the rest is run."""
        row, done = reuse if reuse is not None else (None, 0)
        rest = list(tokens[done:])
        # prompt lengths share a few compiled shapes: powers of two (within the cache: a write past its end would
        # be moved back by XLA onto positions that hold the prompt)
        length = bucket(len(rest), maximum=cache_len - done)
        ids = jnp.asarray([rest + [0] * (length - len(rest))], jnp.int32)
        n = keys.shape[0]
        padded = bucket(n, minimum=1)  # sample counts share a few compiled shapes too
        keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (padded - n,))]) if padded > n else keys
        bias_ids, bias_vals = bias_arrays(bias, padded)
        cache, first, info = self.prefill(self.params, ids, len(rest), keys,
                                          jnp.full(padded, temperature, jnp.float32),
                                          jnp.full(padded, top_k or 0, jnp.int32), jnp.full(padded, top_p, jnp.float32),
                                          bias_ids, bias_vals, cache_len=cache_len, row_cache=row, start=done)
        prefilled = DecodeState.new(first, len(tokens), max_tokens - 1, keys, temperature, top_k or 0, top_p,
                                    jnp.asarray(self.stops + (self.python_end,)), self.config.vocab_size, bias,
                                    presence, frequency)
        return cache, prefilled, info

    def score(self, tokens) -> list[tuple[float, tuple]]:
        """The model's view of a given text: for each token after the first, (its log-probability given those
        before it, ((id, log-probability), ...) the TOP_LOGPROBS likeliest tokens at that position)."""
        if len(tokens) < 2:
            return []
        ids = jnp.asarray([list(tokens) + [0] * (bucket(len(tokens)) - len(tokens))], jnp.int32)
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

    def loop_for(self, num_samples: int) -> SlotLoop:
        """The kept slot loop with num_samples slots, or a new one when that one is in use (a generator still open)."""
        loop = self.loops.get(num_samples)
        if loop is None or loop.busy_slots() or not loop.waiting.empty():
            loop = self.loops[num_samples] = SlotLoop(self, slots=num_samples, chunk=self.chunk)
        return loop

    def warm_up(self) -> int:
        """Compile one-sample generation at every prompt length and attention length (SlotLoop.warm_up)."""
        return self.loop_for(1).warm_up()

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Streams (token_column, mask_column): one token per sample per step (mask 1 sampled, 0 forced by the
        tool). A finished sample repeats its stop token with mask 0 until all have finished. A one-request client
        of the slot loop that serving runs (nanochat_jax/inference/scheduler.py), with a slot per sample; one loop per sample
        count is kept while idle, so the next call (the next turn of a chat) starts from the cache this one left."""
        max_tokens = self.check_request(tokens, max_tokens, temperature, top_k)
        loop = self.loop_for(num_samples)
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

    def complete_many(self, prompts, num_samples=1, max_tokens=None, temperature=0.0, top_k=None, seeds=None,
                      rows: int = 32, keep_stop: bool = False):
        """Completions of many prompts, decoded side by side: up to `rows` decode rows (rows // num_samples prompts)
        in flight at once, a finished prompt's slots going to the next (continuous batching, as the server does).
        Returns, per prompt, num_samples completions (token lists without the prompt and the stop token), the same
        as generate_batch with seed seeds[i] gives for prompt i alone (up to float rounding in batched matmuls).
        keep_stop: end a completion that stopped with its stop token (one that ran out of budget has none)."""
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        budgets = [self.check_request(p, max_tokens, temperature, top_k) for p in prompts]
        loop = self.loop_for(max(num_samples, bucket(rows // num_samples, minimum=1) * num_samples))
        capacity = loop.n_slots // num_samples
        completions = [[[] for _ in range(num_samples)] for _ in prompts]
        in_flight, next_prompt = {}, 0
        try:
            while next_prompt < len(prompts) or in_flight:
                while next_prompt < len(prompts) and len(in_flight) < capacity:
                    request = Request(list(prompts[next_prompt]), num_samples, budgets[next_prompt], temperature,
                                      top_k, 1.0, seeds[next_prompt])
                    in_flight[loop.submit(request)] = next_prompt
                    next_prompt += 1
                loop.tick()
                for request, i in list(in_flight.items()):
                    while not request.events.empty():
                        event = request.events.get_nowait()
                        if isinstance(event, Failed):
                            raise RuntimeError(event.message)
                        if isinstance(event, Token):
                            completions[i][event.sample].append(event.id)
                        elif isinstance(event, Finished) and keep_stop and event.token is not None:
                            completions[i][event.sample].append(event.token)
                    if len(request.finished) == num_samples:
                        del in_flight[request]
        finally:
            for request in in_flight:
                request.cancel()
        return completions

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
