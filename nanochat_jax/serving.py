"""Continuous batching for the chat server: one engine loop, a fixed number of decode slots.

A request (a prompt, n samples, sampling settings) waits in a bounded queue; the loop prefills it into free slots
of one shared KV cache [layers, slots, max_len, kv_heads, head_dim] and from then on every decode call advances all
busy slots together. A finished or cancelled request frees its slots at once; a new one joins at the next call.
Each row samples with its own key (seed, sample index), so a seeded request gives the same reply whatever else is
in the batch. Tokens reach the caller through `Request.events` (a queue.Queue, read from any thread) as typed
records: Token (with the model's log-probability and its TOP_LOGPROBS alternatives), Finished, Failed.
"""
import queue
import threading
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.engine import BIAS_SLOTS, FORCED_SLOTS, Engine, _round_up
from nanochat_jax.gpt import init_cache


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Token:
    sample: int
    id: int
    forced: bool  # emitted by the tool, not sampled
    logprob: float  # the model's log-probability of this token
    top: tuple  # ((token id, log-probability), ...) the model's most likely tokens at this position, best first


@dataclass(frozen=True)
class Finished:
    sample: int
    reason: str  # "stop" | "length" | "cancelled"


@dataclass(frozen=True)
class Failed:
    message: str  # the engine failed; the request is over


@dataclass(eq=False)  # compared and hashed by identity
class Request:
    tokens: list[int]
    n: int
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    seed: int
    bias: dict = field(default_factory=dict)  # logit_bias: {token id: -100..100}
    presence: float = 0.0  # penalties over the tokens generated so far
    frequency: float = 0.0
    # Token ... then Finished per sample; Failed if the engine failed
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    slots: list[int] = field(default_factory=list)
    finished: set = field(default_factory=set)
    listener: object = None  # called (from the engine's thread) after each event: e.g. to wake an asyncio task
    wake: object = None  # the server's asyncio.Event for this request

    def cancel(self):
        self.cancelled = True

    def put(self, event):
        self.events.put(event)
        if self.listener is not None:
            try:
                self.listener()
            except RuntimeError:  # (the listener's event loop has closed: nobody is waiting any more)
                pass


def _admit(cache, rows, row_cache, row, slot):
    """Copy a one-row prefill cache and one row's state into `slot` (one compiled shape for every request)."""
    cache = jax.tree.map(lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n, slot, axis=1), cache, row_cache)
    return cache, jax.tree.map(lambda r, n: r.at[slot].set(n), rows, row)


class BatchedEngine:
    def __init__(self, engine: Engine, slots: int = 8, max_waiting: int = 64, chunk: int = 8):
        self.engine, self.n_slots, self.chunk = engine, slots, chunk
        self.max_len = _round_up(engine.config.sequence_len + 1, 256)
        self.waiting: queue.Queue = queue.Queue(max_waiting)
        self.owner: list[Request | None] = [None] * slots
        self.history: list[list[int]] = [[] for _ in range(slots)]
        self.pending = [False] * slots
        self.stats = {"requests_served": 0, "tokens_generated": 0}
        self.admit = jax.jit(_admit, donate_argnums=(0, 1))
        self._admitting = None  # the request being prefilled (told if that fails)
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)

    # ---- public
    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def submit(self, request: Request) -> Request:
        if request.n > self.n_slots:
            raise ValueError(f"n={request.n} is more than the server's {self.n_slots} decode slots")
        request.max_tokens = self.engine.check_request(request.tokens, request.max_tokens, request.temperature,
                                                       request.top_k, request.top_p)
        self.engine.check_sampling(request.bias, request.presence, request.frequency)
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"the queue is full ({self.waiting.maxsize} waiting requests)") from None
        self._wake.set()
        return request

    def busy_slots(self) -> int:
        return sum(owner is not None for owner in self.owner)

    # ---- the loop
    def _empty_state(self):
        e, zeros = self.engine, jnp.zeros
        cache = init_cache(e.config, self.n_slots, self.max_len, e.dtype)
        rows = {"last": zeros(self.n_slots, jnp.int32), "pos": zeros(self.n_slots, jnp.int32),
                "active": zeros(self.n_slots, bool), "budget": zeros(self.n_slots, jnp.int32),
                "key": jax.random.split(jax.random.key(0), self.n_slots), "temperature": zeros(self.n_slots, jnp.float32),
                "top_k": zeros(self.n_slots, jnp.int32), "top_p": jnp.ones(self.n_slots, jnp.float32),
                "forced": zeros((self.n_slots, FORCED_SLOTS), jnp.int32), "n_forced": zeros(self.n_slots, jnp.int32),
                "forced_at": zeros(self.n_slots, jnp.int32), "bias_ids": zeros((self.n_slots, BIAS_SLOTS), jnp.int32),
                "bias_vals": zeros((self.n_slots, BIAS_SLOTS), jnp.float32),
                "presence": zeros(self.n_slots, jnp.float32), "frequency": zeros(self.n_slots, jnp.float32),
                "counts": zeros((self.n_slots, e.config.vocab_size), jnp.float32)}
        return cache, rows

    def _loop(self):
        e = self.engine
        cache, rows = self._empty_state()
        while not self._stop:
            try:
                cache, rows = self._admit_waiting(cache, rows)
                rows = self._release_cancelled(rows)
                if self.busy_slots() == 0:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                rows = e.resume_tool_calls(rows, self.history, self.pending)
                cache, rows, out = e.decode(e.params, cache, rows, e.pause_tokens, steps=self.chunk)
                rows = self._deliver(rows, jax.tree.map(np.asarray, out))
            except Exception as error:  # never let one bad batch take the server down
                message = f"engine error: {type(error).__name__}: {error}"
                for request in {o for o in self.owner if o is not None} | ({self._admitting} - {None}):
                    request.put(Failed(message))
                self.owner, self.pending, self._admitting = [None] * self.n_slots, [False] * self.n_slots, None
                cache, rows = self._empty_state()  # the old buffers may have been donated to the failed call

    def _admit_waiting(self, cache, rows):
        e = self.engine
        with self.waiting.mutex:  # cancelled requests leave the queue wherever they are
            for request in [r for r in self.waiting.queue if r.cancelled]:
                self.waiting.queue.remove(request)
        while not self.waiting.empty():
            request = self.waiting.queue[0]
            free = [s for s, owner in enumerate(self.owner) if owner is None]
            if len(free) < request.n:
                break
            self._admitting = self.waiting.get_nowait()
            slots = free[:request.n]
            keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(request.seed), jnp.arange(request.n))
            row_cache, new_rows, info = e.start(request.tokens, keys, request.max_tokens, request.temperature,
                                                request.top_k, request.top_p, self.max_len, request.bias,
                                                request.presence, request.frequency)
            for i, slot in enumerate(slots):
                cache, rows = self.admit(cache, rows, row_cache, jax.tree.map(lambda r: r[i], new_rows), slot)
            self._admitting = None
            request.slots = slots
            first = np.asarray(new_rows["last"])
            logprob, top_ids, top_lp = (np.asarray(x) for x in info)
            for i, slot in enumerate(slots):
                self.owner[slot] = request
                self.history[slot] = list(request.tokens) + [int(first[i])]
                self.pending[slot] = int(first[i]) == e.python_end
                self._emit(request, Token(i, int(first[i]), False, float(logprob[i]), _top(top_ids[i], top_lp[i])))
            rows = self._finish_rows(rows, request)
        return cache, rows

    def _emit(self, request, token: Token):
        if token.sample in request.finished:
            return
        if token.id in self.engine.stops:
            self._finish(request, token.sample, "stop")
            return
        request.put(token)
        self.stats["tokens_generated"] += 1

    def _finish(self, request, sample, reason):
        if sample not in request.finished:
            request.finished.add(sample)
            request.put(Finished(sample, reason))
            if len(request.finished) == request.n:
                self.stats["requests_served"] += 1

    def _finish_rows(self, rows, request):
        """Free the slots of samples that are finished, or out of budget (finish reason 'length')."""
        budget = np.asarray(rows["budget"])
        free = []
        for i, slot in enumerate(request.slots):
            if self.owner[slot] is not request:
                continue
            if i not in request.finished and budget[slot] <= 0 and not self.pending[slot]:
                self._finish(request, i, "length")
            if i in request.finished:
                self.owner[slot], self.pending[slot] = None, False
                free.append(slot)
        if free:
            rows = dict(rows, active=rows["active"].at[jnp.asarray(free)].set(False))
        return rows

    def _release_cancelled(self, rows):
        for request in {owner for owner in self.owner if owner is not None and owner.cancelled}:
            for i in range(request.n):
                self._finish(request, i, "cancelled")
            rows = self._finish_rows(rows, request)
        return rows

    def _deliver(self, rows, out):
        for slot, owner in enumerate(self.owner):
            if owner is None:
                continue
            sample = owner.slots.index(slot)
            for step, t in enumerate(out["tokens"][slot]):
                if t >= 0:
                    forced = bool(out["forced"][slot, step])
                    self.history[slot].append(int(t))
                    self.pending[slot] = int(t) == self.engine.python_end and not forced
                    self._emit(owner, Token(sample, int(t), forced, float(out["logprob"][slot, step]),
                                            _top(out["top_ids"][slot, step], out["top_logprobs"][slot, step])))
        for request in {owner for owner in self.owner if owner is not None}:
            rows = self._finish_rows(rows, request)
        return rows


def _top(ids, logprobs) -> tuple:
    return tuple((int(i), float(lp)) for i, lp in zip(ids, logprobs))
