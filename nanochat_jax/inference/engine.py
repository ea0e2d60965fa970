"""Inference engine, nanochat's interface: KV-cached sampling with the calculator tool, a client of the scheduler.

    sequences, masks = Engine(model, tokenizer).generate_batch(prompt_ids, num_samples=4)  # streamed: generate()

A row that emits <|python_end|> gets the calculator's result forced into it (mask 0); a row ends at <|assistant_end|>,
<|bos|>, its token budget or the end of its cache."""
from nanochat_jax.common import bucket
from nanochat_jax.inference.calculator import Calculator
from nanochat_jax.inference.programs import FORCED_SLOTS, Programs
from nanochat_jax.inference.scheduler import Failed, Request, Scheduler, ScoreRequest, Token

# read through to the programs (the model's side): what callers of an Engine use
_PROGRAMS = ("graphdef", "params", "config", "dtype", "stops", "max_len", "attend_len", "attend_buckets", "start",
             "decode", "use")


def _drain(request):
    """The request's events so far; RuntimeError when it failed."""
    while not request.events.empty():
        event = request.events.get_nowait()
        if isinstance(event, Failed):
            raise RuntimeError(event.message)
        yield event


class Engine:
    def __init__(self, model, tokenizer, chunk: int = 16, compute_dtype_weights: bool = False):
        """compute_dtype_weights: weights kept in the compute dtype (bf16 on GPU/TPU), not cast at every matmul."""
        self.programs = Programs(model, tokenizer, compute_dtype_weights)
        self.chunk, self.tool = chunk, Calculator(tokenizer, FORCED_SLOTS)
        self.kept = {}  # slot count -> the idle Scheduler kept between calls (see scheduler_for)

    def __getattr__(self, name):
        if name in _PROGRAMS:
            return getattr(self.programs, name)
        raise AttributeError(f"'Engine' object has no attribute {name!r}")

    def scheduler(self, slots: int = 8, max_waiting: int = 64, chunk: int | None = None, busy_rows_only: bool = True):
        """A new scheduler over this engine's programs and tool (the server's: `.warm_up()`, then `.start()`)."""
        return Scheduler(self.programs, self.tool, slots, max_waiting, chunk or self.chunk, busy_rows_only)

    def scheduler_for(self, slots: int) -> Scheduler:
        """The kept scheduler with `slots` slots (a new one while it is busy): a chat's next turn reuses its rows."""
        kept = self.kept.get(slots)
        if kept is None or not kept.idle():
            kept = self.kept[slots] = self.scheduler(slots, busy_rows_only=False)  # (no compiles mid-eval)
        return kept

    def warm_up(self) -> int:
        return self.scheduler_for(1).warm_up()

    def score(self, tokens) -> list[tuple[float, tuple]]:
        """For each token after the first: (its log-probability given those before it, the likeliest tokens there)."""
        scheduler = self.scheduler_for(1)
        request = scheduler.submit(ScoreRequest(tokens=list(tokens)))
        scheduler.tick()
        return next(_drain(request)).scores

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Streams (token_column, mask_column): one token per sample per step (mask 1 sampled, 0 forced by the
        tool). A finished sample repeats its stop token with mask 0 until all have finished."""
        scheduler = self.scheduler_for(num_samples)
        request = scheduler.submit(Request(list(tokens), num_samples, max_tokens, temperature, top_k, 1.0, seed))
        queues, emitted = [[] for _ in range(num_samples)], 0  # per sample: (token, mask) not yet yielded
        scheduler.admit()  # the prefill: the first column is out before any decode call
        try:
            while True:
                for event in _drain(request):
                    if isinstance(event, Token):
                        queues[event.sample].append((event.id, 0 if event.forced else 1))
                    elif event.token is not None:  # (Finished by its stop token)
                        queues[event.sample].append((event.token, 1))
                finished = len(request.finished) == num_samples
                while all(queues):  # a full column is ready
                    column = [q.pop(0) for q in queues]
                    yield [t for t, _ in column], [m for _, m in column]
                    emitted += 1
                    for i, (t, _) in enumerate(column):
                        if t in self.stops and not queues[i]:
                            queues[i].append((t, 0))  # a finished sample repeats its stop token
                    if emitted >= request.max_tokens or finished and all(t in self.stops for t, _ in column):
                        return
                if finished and request.events.empty():
                    return  # (out of budget or cache: no full column will come)
                scheduler.tick()
        finally:
            request.cancel()

    def complete_many(self, prompts, num_samples=1, max_tokens=None, temperature=0.0, top_k=None, seeds=None,
                      rows: int = 32, keep_stop: bool = False):
        """Per prompt, num_samples completions (no prompt, no stop token unless keep_stop), `rows` rows decoded side
        by side; prompt i's are those it gets alone with seed seeds[i] (up to float rounding in batched matmuls)."""
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        completions = self._complete(prompts, num_samples, max_tokens, temperature, top_k, seeds, rows, keep_stop)
        return [[[t for t, _ in sample] for sample in prompt] for prompt in completions]

    def _complete(self, prompts, num_samples, max_tokens, temperature, top_k, seeds, rows, keep_stop):
        """complete_many's (token, mask) pairs: mask 0 where the tool forced the token."""
        budgets = [self.programs.check_request(p, max_tokens, temperature, top_k) for p in prompts]
        scheduler = self.scheduler_for(max(num_samples, bucket(rows // num_samples, minimum=1) * num_samples))
        capacity = scheduler.n_slots // num_samples
        completions = [[[] for _ in range(num_samples)] for _ in prompts]
        in_flight, next_prompt = {}, 0
        try:
            while next_prompt < len(prompts) or in_flight:
                while next_prompt < len(prompts) and len(in_flight) < capacity:
                    request = Request(list(prompts[next_prompt]), num_samples, budgets[next_prompt], temperature,
                                      top_k, 1.0, seeds[next_prompt])
                    in_flight[scheduler.submit(request)] = next_prompt
                    next_prompt += 1
                scheduler.tick()
                for request, i in list(in_flight.items()):
                    for event in _drain(request):
                        if isinstance(event, Token):
                            completions[i][event.sample].append((event.id, 0 if event.forced else 1))
                        elif keep_stop and event.token is not None:  # (Finished by its stop token)
                            completions[i][event.sample].append((event.token, 1))
                    if len(request.finished) == num_samples:
                        del in_flight[request]
        finally:
            for request in in_flight:
                request.cancel()
        return completions

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """(sequences, masks): each the prompt followed by its completion, without the final stop token."""
        samples = self._complete([list(tokens)], num_samples, max_tokens, temperature, top_k, [seed],
                                 rows=num_samples, keep_stop=False)[0]
        return ([list(tokens) + [t for t, _ in s] for s in samples],
                [[0] * len(tokens) + [m for _, m in s] for s in samples])
