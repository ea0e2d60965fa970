"""The scheduler, the one owner of the decode state: the CLI, `Engine`, the evals and the server submit requests to it
and read their events (Token, Finished, Failed, Scored) from `request.events`, a queue.Queue, from any thread.
Requests are prefilled into free slots of one DecodeState and decoded together; between calls a row paused on
<|python_end|> gets the tool's tokens forced into it. Each row samples with its own key (seed, sample index): a seeded
reply does not depend on the batch. A freed slot keeps its cache row for the conversation's next turn."""
import itertools
import queue
import threading
from contextlib import suppress
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.common import bucket
from nanochat_jax.inference.programs import FORCED_SLOTS, top_pairs

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


@dataclass(frozen=True)
class Scored:
    scores: list  # per token after the first: (log-probability, ((id, log-probability), ...) the likeliest)


@dataclass(eq=False, kw_only=True)  # compared and hashed by identity
class Submission:
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    listener: object = None  # called (from the scheduler's thread) after each event: e.g. to wake an asyncio task
    wake: object = None  # the server's asyncio.Event for this request

    def cancel(self):
        self.cancelled = True

    def put(self, event):
        self.events.put(event)
        if self.listener is not None:
            with suppress(RuntimeError):  # (the listener's event loop has closed: nobody is waiting any more)
                self.listener()


@dataclass(eq=False)
class Request(Submission):
    """Sampling from a prompt: Token ... then Finished per sample, or Failed."""
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
    slots: list[int] = field(default_factory=list)
    finished: set = field(default_factory=set)

    def settings(self) -> tuple:  # Programs.check_request's and Programs.start's arguments after max_tokens
        return self.temperature, self.top_k, self.top_p, self.bias, self.presence, self.frequency


@dataclass(eq=False)
class ScoreRequest(Submission):
    """The model's view of a text: one Scored event, or Failed."""
    tokens: list[int]


@dataclass
class Slot:
    request: Request
    sample: int
    history: list[int]  # the row's tokens so far (for the tool)
    waiting_for_tool: bool = False


class Scheduler:
    def __init__(self, programs, tool, slots: int = 8, max_waiting: int = 64, chunk: int = 8,
                 busy_rows_only: bool = True):
        """tool: a Calculator. busy_rows_only: a decode call covers the busy rows only (a server's), else every slot."""
        self.programs, self.tool, self.n_slots, self.chunk = programs, tool, slots, chunk
        self.row_counts = [1 << i for i in range((slots - 1).bit_length()) if busy_rows_only] + [slots]
        self.waiting, self.scoring = queue.Queue(max_waiting), queue.Queue(max_waiting)
        self.slots: list[Slot | None] = [None] * slots
        self.stats = {"requests_served": 0, "tokens_generated": 0, "prompt_tokens_reused": 0}
        self.state = programs.empty(slots)
        self._admitting = None  # the request being prefilled (told if that fails)
        self.parked = [None] * slots  # per free slot: (the tokens its cache row holds, weights version, when freed)
        self._freed = itertools.count()
        self._wake, self._stop, self._thread = threading.Event(), False, None

    def submit(self, request):
        """Queue a Request or a ScoreRequest (checked first: ValueError; QueueFull when the queue is full)."""
        p = self.programs
        if isinstance(request, ScoreRequest):
            if not 1 <= len(request.tokens) <= p.config.sequence_len:
                raise ValueError(f"a text to score has 1..{p.config.sequence_len} tokens")
            target = self.scoring
        else:
            if request.n > self.n_slots:
                raise ValueError(f"n={request.n} is more than the {self.n_slots} decode slots")
            request.max_tokens = p.check_request(request.tokens, request.max_tokens, *request.settings())
            target = self.waiting
        try:
            target.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"the queue is full ({target.maxsize} waiting requests)") from None
        self._wake.set()
        return request

    def busy_slots(self) -> int:
        return sum(s is not None for s in self.slots)

    def idle(self) -> bool:
        return not self.busy_slots() and self.waiting.empty() and self.scoring.empty()

    def start(self):
        self._thread = threading.Thread(target=self._serve, name="nanochat-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _serve(self):
        while not self._stop:
            try:
                if not self.tick():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
            except Exception as error:  # never let one bad batch take the server down
                self.fail(f"engine error: {type(error).__name__}: {error}")

    def warm_up(self) -> int:
        """Compile every program a server runs, before `start()`; returns how many prompts it ran."""
        p = self.programs
        lengths = [16 << i for i in range(p.max_len.bit_length())]  # 16, 32, ... up to max_len and past it
        prompts = sorted({min(n, p.config.sequence_len - 1) for n in lengths})
        for n in prompts:
            self.parked = [None] * self.n_slots  # a fresh prefill each time (the last prompt is a prefix of this one)
            request = self.submit(Request([p.bos] * n, 1, 1, 0.0, None, 1.0, 0))
            while len(request.finished) < request.n and self.tick():
                pass
        keys = jax.random.split(jax.random.key(0), 1)
        for n in (n for n in lengths if n < p.max_len):  # a later turn's new tokens onto a parked row
            p.start([p.bos] * (n + 1), keys, 1, 0.0, None, 1.0, reuse=(p.row_cache(self.state, 0), 1))
        for attend_len in p.attend_buckets:  # every decode program, on idle rows: nothing is emitted
            for rows in self.row_counts:
                self._decode([], rows, attend_len)
        self.stats = dict.fromkeys(self.stats, 0)
        self.parked = [None] * self.n_slots
        return len(prompts)

    def tick(self) -> bool:
        """One round: scores, admission, cancellations, tool calls, one decode call, delivery; False when idle."""
        scored = self._score_waiting()
        self.admit()
        self._release_cancelled()
        busy = [i for i, s in enumerate(self.slots) if s is not None]
        if not busy:
            return scored
        self._resume_tool_calls()
        # attention reads the cache up to the longest row after this chunk (a bucket), not the whole cache
        longest = max(len(self.slots[i].history) for i in busy) + self.chunk
        rows = next(r for r in self.row_counts if r >= len(busy))
        out = jax.tree.map(np.asarray, self._decode(busy, rows, self.programs.attend_len(longest)))
        if rows == self.n_slots:  # (a call over every row: keep the busy ones, in order)
            out = {k: v[busy] for k, v in out.items()}
        self._deliver(busy, out)
        return True

    def fail(self, message: str):
        """Fail every request in flight; start from an empty state (the failed call may have consumed the old one)."""
        for request in {s.request for s in self.slots if s is not None} | ({self._admitting} - {None}):
            request.put(Failed(message))
        self.slots, self._admitting, self.parked = [None] * self.n_slots, None, [None] * self.n_slots
        self.state = self.programs.empty(self.n_slots)

    def _decode(self, busy: list[int], rows: int, attend_len: int):
        p, static = self.programs, dict(steps=self.chunk, attend_len=attend_len)
        if rows == self.n_slots:  # every row: no copies in and out
            self.state, out = p.decode(p.params, self.state, p.pause_tokens, **static)
        else:
            free = [i for i in range(self.n_slots) if i not in busy]
            index = np.asarray(busy + free[:rows - len(busy)], np.int32)  # padding: free rows, written back unchanged
            real = np.arange(rows) < len(busy)
            self.state, out = p.decode_rows(p.params, self.state, index, real, p.pause_tokens, **static)
        return out

    def _score_waiting(self) -> bool:
        done = not self.scoring.empty()
        while not self.scoring.empty():
            request = self.scoring.get_nowait()
            if not request.cancelled:
                request.put(Scored(self.programs.score(request.tokens)))
        return done

    def admit(self):
        """Prefill the waiting requests that fit into free slots; their first tokens are out at once."""
        p = self.programs
        with self.waiting.mutex:  # cancelled requests leave the queue wherever they are
            for request in [r for r in self.waiting.queue if r.cancelled]:
                self.waiting.queue.remove(request)
        while not self.waiting.empty():
            request = self.waiting.queue[0]
            free = [i for i, s in enumerate(self.slots) if s is None]
            if len(free) < request.n:
                break
            self._admitting = self.waiting.get_nowait()
            # one key per sample, derived for a power-of-two count of rows (Programs.start's padding)
            rows = np.arange(bucket(request.n, minimum=1), dtype=np.int32)
            keys = p.sample_keys(jax.random.key(request.seed), rows)
            request.slots, reuse = self._choose_slots(request, free)
            row_cache, prefilled, info = p.start(request.tokens, keys, request.max_tokens, *request.settings(), reuse)
            for i, index in enumerate(request.slots):
                self.state = p.admit(self.state, row_cache, prefilled, i, index)
            self._admitting = None
            first = np.asarray(prefilled.last)
            logprob, top_ids, top_lp = (np.asarray(x) for x in info)
            for i, index in enumerate(request.slots):
                slot = self.slots[index] = Slot(request, i, list(request.tokens))
                self._emit(slot, Token(i, int(first[i]), False, float(logprob[i]), top_pairs(top_ids[i], top_lp[i])))
            self._free_finished(request)

    def _choose_slots(self, request, free: list[int]):
        """(slots, reuse for Programs.start): a one-sample request goes to the free slot whose cache holds its
        prompt's start (the conversation's earlier turns), else to the slots freed longest ago (others stay parked)."""
        p = self.programs

        def held(slot) -> int:  # how many of the prompt's first tokens the slot's cache row holds
            parked = self.parked[slot]
            if parked is None or parked[1] != p.weights_version:
                return 0
            tokens, n = parked[0], min(len(parked[0]), len(request.tokens) - 1)  # the last token is always run
            return next((i for i in range(n) if tokens[i] != request.tokens[i]), n)

        if request.n == 1:
            best = max(free, key=held)
            if (n := held(best)) >= MIN_REUSE:
                self.stats["prompt_tokens_reused"] += n
                self.parked[best] = None
                return [best], (p.row_cache(self.state, best), n)
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
        """Rows paused on <|python_end|>: force the tool's tokens into the row (none when it refuses)."""
        calls = [i for i, s in enumerate(self.slots) if s is not None and s.waiting_for_tool]
        if not calls:
            return
        rows = {f: np.array(getattr(self.state, f)) for f in ("forced", "n_forced", "forced_at", "active")}  # copies
        budget = np.asarray(self.state.budget)
        for i in calls:
            self.slots[i].waiting_for_tool = False
            inject = self.tool.result_tokens(self.slots[i].history)[:FORCED_SLOTS]
            rows["forced"][i, :len(inject)], rows["n_forced"][i], rows["forced_at"][i] = inject, len(inject), 0
            rows["active"][i] = budget[i] > 0
        self.state = self.state.replace(**{f: jnp.asarray(a) for f, a in rows.items()})

    def _deliver(self, busy: list[int], out):
        for row, i in enumerate(busy):  # out's rows are the busy slots, in order
            slot = self.slots[i]
            for step in np.flatnonzero(out["tokens"][row] >= 0):
                at = row, step
                top = top_pairs(out["top_ids"][at], out["top_logprobs"][at])
                self._emit(slot, Token(slot.sample, int(out["tokens"][at]), bool(out["forced"][at]),
                                       float(out["logprob"][at]), top))
        for request in {s.request for s in self.slots if s is not None}:
            self._free_finished(request)

    def _emit(self, slot: Slot, token: Token):
        slot.history.append(token.id)
        slot.waiting_for_tool = token.id == self.programs.python_end and not token.forced
        if token.sample in slot.request.finished:
            return
        if token.id in self.programs.stops:
            self._finish(slot.request, token.sample, "stop", token.id)
        else:
            slot.request.put(token)
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
                self.parked[slot] = (s.history[:-1], self.programs.weights_version, next(self._freed))
                self.slots[slot] = None
                free.append(slot)
        if free:  # (a mask of every slot: an index list of each new length would compile eager ops anew)
            keep = np.ones(self.n_slots, bool)
            keep[free] = False
            self.state = self.state.replace(active=self.state.active & keep)
