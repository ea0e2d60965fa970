"""The slot loop: the one owner of the decode state, for the chat server and for Engine.generate alike.

A request (a prompt, n samples, sampling settings) waits in a bounded queue; the loop prefills it into free slots of
one DecodeState (the KV cache [layers, slots, kv_heads, max_len, head_dim] and the rows' sampling state) and from
then on every decode call advances all busy slots together. Between calls the loop runs the tool: a row paused on
<|python_end|> gets the calculator's result forced into it. A finished or cancelled request frees its slots at
once; a new one joins at the next call. Each row samples with its own key (seed, sample index), so a seeded request
gives the same reply whatever else is in the batch.

`SlotLoop.tick()` is one round (admit, tool calls, one decode call, delivery); `BatchedEngine` runs ticks on a
thread of its own for the server, and `Engine.generate` runs them itself for one request. Tokens reach the caller
through `Request.events` (a queue.Queue, read from any thread) as typed records: Token (with the model's
log-probability and its TOP_LOGPROBS alternatives), Finished, Failed.

A freed slot keeps its cache row: the next turn of the same conversation, whose prompt starts with the tokens that
row holds, is admitted there and prefills only the new tokens (time to first token does not grow with the turns).
"""
import itertools
import queue
import threading
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.common import bucket
from nanochat_jax.inference.programs import FORCED_SLOTS, DecodeState, use_calculator

MIN_REUSE = 16  # prompt tokens a parked cache row must hold for a request to start from it


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
    token: int | None = None  # the stop token that ended it ("stop")


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
    events: queue.Queue = field(default_factory=queue.Queue)  # Token ... then Finished per sample; or Failed
    cancelled: bool = False
    slots: list[int] = field(default_factory=list)
    finished: set = field(default_factory=set)
    listener: object = None  # called (from the loop's thread) after each event: e.g. to wake an asyncio task
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


@dataclass
class Slot:
    """What the host keeps for one busy slot: its request and sample, the row's tokens so far (for the tool), and
    whether it waits for a tool result."""
    request: Request
    sample: int
    history: list[int]
    waiting_for_tool: bool = False


class SlotLoop:
    """Decode slots over one engine.Engine (its programs and checks); see the module docstring."""

    def __init__(self, engine, slots: int = 8, max_waiting: int = 64, chunk: int = 8):
        self.engine, self.n_slots, self.chunk = engine, slots, chunk
        self.waiting: queue.Queue = queue.Queue(max_waiting)
        self.slots: list[Slot | None] = [None] * slots
        self.stats = {"requests_served": 0, "tokens_generated": 0, "prompt_tokens_reused": 0}
        self.state = DecodeState.empty(engine.config, slots, engine.max_len, engine.dtype)
        self._admitting = None  # the request being prefilled (told if that fails)
        # per free slot: (the tokens its cache row still holds, the engine's weights version, when it was freed)
        self.parked: list[tuple | None] = [None] * slots
        self._freed = itertools.count()

    def submit(self, request: Request) -> Request:
        if request.n > self.n_slots:
            raise ValueError(f"n={request.n} is more than the {self.n_slots} decode slots")
        request.max_tokens = self.engine.check_request(request.tokens, request.max_tokens, request.temperature,
                                                       request.top_k, request.top_p)
        self.engine.check_sampling(request.bias, request.presence, request.frequency)
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"the queue is full ({self.waiting.maxsize} waiting requests)") from None
        return request

    def busy_slots(self) -> int:
        return sum(s is not None for s in self.slots)

    def warm_up(self) -> int:
        """Compile what requests will need before the first one comes: the prefill at every prompt-length bucket
        (one sample; fresh, and onto a parked row), the admission and the decode step at every attention length.
        Run it before `start()`. Returns how many prompts it ran."""
        e, length, ran = self.engine, 16, 0
        while True:
            n = min(length, e.config.sequence_len - 1)
            self.parked = [None] * self.n_slots  # a fresh prefill each time (the last prompt is a prefix of this one)
            request = self.submit(Request([e.tokenizer.get_bos_token_id()] * n, 1, 1, 0.0, None, 1.0, 0))
            while len(request.finished) < request.n:
                if not self.tick() and self.waiting.empty():
                    break
            ran += 1
            if n >= e.config.sequence_len - 1 or length >= e.max_len:
                break
            length *= 2
        length, keys = 16, jax.random.split(jax.random.key(0), 1)
        while length < e.max_len:  # the prefill of a later turn's new tokens onto a parked row, at every length
            e.start([e.tokenizer.get_bos_token_id()] * (length + 1), keys, 1, 0.0, None, 1.0, e.max_len,
                    reuse=(e.row_cache(self.state, 0), 1))
            length *= 2
        for attend_len in e.attend_buckets:  # every decode program (on idle rows: nothing is emitted)
            self.state, _ = e.decode(e.params, self.state, e.pause_tokens, steps=self.chunk, attend_len=attend_len)
        self.stats = {"requests_served": 0, "tokens_generated": 0, "prompt_tokens_reused": 0}
        self.parked = [None] * self.n_slots
        return ran

    def tick(self) -> bool:
        """One round: admit what fits, drop the cancelled, run the tool, one decode call, deliver the tokens.
        Returns False when there was nothing to decode."""
        e = self.engine
        self._admit_waiting()
        self._release_cancelled()
        if self.busy_slots() == 0:
            return False
        self._resume_tool_calls()
        # attention reads the cache up to the longest row after this chunk (a bucket), not the whole cache
        longest = max(len(s.history) for s in self.slots if s is not None) + self.chunk
        self.state, out = e.decode(e.params, self.state, e.pause_tokens, steps=self.chunk,
                                   attend_len=e.attend_len(longest))
        self._deliver(jax.tree.map(np.asarray, out))
        return True

    def fail(self, message: str):
        """Tell every request in flight that it failed; start again from an empty state (the old buffers may have
        been donated to the call that failed)."""
        for request in {s.request for s in self.slots if s is not None} | ({self._admitting} - {None}):
            request.put(Failed(message))
        self.slots, self._admitting, self.parked = [None] * self.n_slots, None, [None] * self.n_slots
        self.state = DecodeState.empty(self.engine.config, self.n_slots, self.engine.max_len, self.engine.dtype)

    # ---- the steps of a tick
    def _admit_waiting(self):
        e = self.engine
        with self.waiting.mutex:  # cancelled requests leave the queue wherever they are
            for request in [r for r in self.waiting.queue if r.cancelled]:
                self.waiting.queue.remove(request)
        while not self.waiting.empty():
            request = self.waiting.queue[0]
            free = [i for i, s in enumerate(self.slots) if s is None]
            if len(free) < request.n:
                break
            self._admitting = self.waiting.get_nowait()
            # one key per sample, derived for a power-of-two count of rows (Engine.start's padding)
            keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(request.seed),
                                                            jnp.arange(bucket(request.n, minimum=1)))
            request.slots, reuse = self._choose_slots(request, free)
            row_cache, prefilled, info = e.start(request.tokens, keys, request.max_tokens, request.temperature,
                                                 request.top_k, request.top_p, e.max_len, request.bias,
                                                 request.presence, request.frequency, reuse)
            for i, slot in enumerate(request.slots):
                self.state = e.admit(self.state, row_cache, prefilled, i, slot)
            self._admitting = None
            first = np.asarray(prefilled.last)
            logprob, top_ids, top_lp = (np.asarray(x) for x in info)
            for i, slot in enumerate(request.slots):
                token = int(first[i])
                self.slots[slot] = Slot(request, i, list(request.tokens) + [token], token == e.python_end)
                self._emit(request, Token(i, token, False, float(logprob[i]), _top(top_ids[i], top_lp[i])))
            self._free_finished(request)

    def _choose_slots(self, request, free: list[int]):
        """(slots for the request's samples, reuse for Engine.start). A one-sample request whose prompt starts with
        what a free slot's cache still holds (the same conversation's earlier turns) goes there and prefills only
        the rest; otherwise the slots freed longest ago are taken, so recent conversations stay parked."""
        e = self.engine

        def held(slot) -> int:  # how many of the prompt's first tokens the slot's cache row holds
            parked = self.parked[slot]
            if parked is None or parked[1] != e.weights_version:
                return 0
            tokens, n = parked[0], min(len(parked[0]), len(request.tokens) - 1)  # the last token is always run
            return next((i for i in range(n) if tokens[i] != request.tokens[i]), n)

        if request.n == 1:
            best = max(free, key=held)
            if held(best) >= MIN_REUSE:
                n = held(best)
                self.stats["prompt_tokens_reused"] += n
                self.parked[best] = None
                return [best], (e.row_cache(self.state, best), n)
        order = sorted(free, key=lambda s: -1 if self.parked[s] is None else self.parked[s][2])
        for slot in order[:request.n]:
            self.parked[slot] = None
        return order[:request.n], None

    def _release_cancelled(self):
        for request in {s.request for s in self.slots if s is not None and s.request.cancelled}:
            for i in range(request.n):
                self._finish(request, i, "cancelled")
            self._free_finished(request)

    def _resume_tool_calls(self):
        """Rows paused on <|python_end|>: evaluate the expression since the last <|python_start|> and force
        <|output_start|> result <|output_end|> into the row (nothing when the calculator refuses it)."""
        calls = [i for i, s in enumerate(self.slots) if s is not None and s.waiting_for_tool]
        if not calls:
            return
        e, st = self.engine, self.state
        forced, n_forced = np.asarray(st.forced).copy(), np.asarray(st.n_forced).copy()
        forced_at, active, budget = np.asarray(st.forced_at).copy(), np.asarray(st.active).copy(), np.asarray(st.budget)
        for i in calls:
            slot = self.slots[i]
            slot.waiting_for_tool = False
            starts = [j for j, t in enumerate(slot.history) if t == e.python_start]
            result = use_calculator(e.tokenizer.decode(slot.history[starts[-1] + 1:-1])) if starts else None
            inject = [] if result is None else e.tokenizer.encode(str(result))[:FORCED_SLOTS - 2]
            inject = [e.output_start] + inject + [e.output_end] if result is not None else []
            forced[i, :len(inject)], n_forced[i], forced_at[i] = inject, len(inject), 0
            active[i] = budget[i] > 0
        self.state = st.replace(active=jnp.asarray(active), forced=jnp.asarray(forced),
                                n_forced=jnp.asarray(n_forced), forced_at=jnp.asarray(forced_at))

    def _deliver(self, out):
        e = self.engine
        for i, slot in enumerate(self.slots):
            if slot is None:
                continue
            for step, t in enumerate(out["tokens"][i]):
                if t >= 0:
                    forced = bool(out["forced"][i, step])
                    slot.history.append(int(t))
                    slot.waiting_for_tool = int(t) == e.python_end and not forced
                    self._emit(slot.request, Token(slot.sample, int(t), forced, float(out["logprob"][i, step]),
                                                   _top(out["top_ids"][i, step], out["top_logprobs"][i, step])))
        for request in {s.request for s in self.slots if s is not None}:
            self._free_finished(request)

    # ---- requests
    def _emit(self, request, token: Token):
        if token.sample in request.finished:
            return
        if token.id in self.engine.stops:
            self._finish(request, token.sample, "stop", token.id)
            return
        request.put(token)
        self.stats["tokens_generated"] += 1

    def _finish(self, request, sample, reason, token=None):
        if sample not in request.finished:
            request.finished.add(sample)
            request.put(Finished(sample, reason, token))
            if len(request.finished) == request.n:
                self.stats["requests_served"] += 1

    def _free_finished(self, request):
        """Free the slots of samples that are finished, or out of budget (finish reason 'length')."""
        budget = np.asarray(self.state.budget)
        free = []
        for i, slot in enumerate(request.slots):
            s = self.slots[slot]
            if s is None or s.request is not request:
                continue
            if i not in request.finished and budget[slot] <= 0 and not s.waiting_for_tool:
                self._finish(request, i, "length")
            if i in request.finished:
                # its cache row keeps every token but the last emitted one (never fed back): the next turn of the
                # same conversation can start from there
                self.parked[slot] = (s.history[:-1], self.engine.weights_version, next(self._freed))
                self.slots[slot] = None
                free.append(slot)
        if free:  # (a mask of every slot: an index list of each new length would compile eager ops anew)
            keep = np.ones(self.n_slots, bool)
            keep[free] = False
            self.state = self.state.replace(active=self.state.active & keep)


class BatchedEngine(SlotLoop):
    """The slot loop on a thread of its own (the chat server): requests come from any thread."""

    def __init__(self, engine, slots: int = 8, max_waiting: int = 64, chunk: int = 8):
        super().__init__(engine, slots, max_waiting, chunk)
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def submit(self, request: Request) -> Request:
        super().submit(request)
        self._wake.set()
        return request

    def _loop(self):
        while not self._stop:
            try:
                if not self.tick():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
            except Exception as error:  # never let one bad batch take the server down
                self.fail(f"engine error: {type(error).__name__}: {error}")


def _top(ids, logprobs) -> tuple:
    return tuple((int(i), float(lp)) for i, lp in zip(ids, logprobs))
