"""The chat service every HTTP endpoint uses: the model's name, tokenizer and defaults; conversations checked against
nanochat's limits and rendered off the event loop; requests submitted to the one scheduler, their events awaited."""
import asyncio
import random

from starlette.concurrency import run_in_threadpool

from nanochat_jax.inference.frontend import prompt_for_reply
from nanochat_jax.inference.scheduler import Failed, Finished, QueueFull, Request, Scored, ScoreRequest

MAX_MESSAGES, MAX_MESSAGE_CHARS, MAX_TOTAL_CHARS = 500, 8000, 32000


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ChatService:
    def __init__(self, scheduler, tokenizer, model_name: str, defaults: dict):
        """defaults: the temperature, top_k and max_tokens of requests that name none."""
        self.scheduler, self.tokenizer, self.model_name, self.defaults = scheduler, tokenizer, model_name, defaults
        self.context = scheduler.programs.config.sequence_len

    def _render(self, messages: list, max_tokens: int, drop_old: bool):
        """nanochat's limits on a conversation (Message models or {"role", "content"} dicts), then its prompt."""
        messages = [m if isinstance(m, dict) else {"role": m.role, "content": m.text()} for m in messages]
        if not messages:
            raise APIError(400, "at least one message is required")
        if len(messages) > MAX_MESSAGES:
            raise APIError(400, f"too many messages: at most {MAX_MESSAGES}")
        for i, m in enumerate(messages):
            if not m["content"].strip():
                raise APIError(400, f"message {i} has empty content")
            if len(m["content"]) > MAX_MESSAGE_CHARS:
                raise APIError(400, f"message {i} is too long: at most {MAX_MESSAGE_CHARS} characters")
        if sum(len(m["content"]) for m in messages) > MAX_TOTAL_CHARS:
            raise APIError(400, f"the conversation is too long: at most {MAX_TOTAL_CHARS} characters")
        if messages[-1]["role"] != "user":
            raise APIError(400, "the last message must be from the user", param="messages")
        try:
            ids, dropped = prompt_for_reply(self.tokenizer, messages, self.context, min(max_tokens, self.context // 2))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if dropped and not drop_old:
            raise APIError(400, f"the conversation does not fit the model's context of {self.context} tokens",
                           param="messages", code="context_length_exceeded")
        return ids, dropped

    async def prompt(self, messages: list, max_tokens: int, drop_old: bool):
        """(prompt ids, how many old messages were dropped to fit): validation and the chat template."""
        return await run_in_threadpool(self._render, messages, max_tokens, drop_old)

    def _listen(self, request):
        loop, wake = asyncio.get_running_loop(), asyncio.Event()
        request.wake, request.listener = wake, lambda: loop.call_soon_threadsafe(wake.set)
        try:
            return self.scheduler.submit(request)
        except QueueFull as e:
            raise APIError(503, f"server busy: {e}; retry shortly") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def submit(self, ids, n, max_tokens, temperature, top_k, top_p, seed, bias=None, presence=0.0, frequency=0.0):
        return self._listen(Request(ids, n, max_tokens, temperature, top_k, top_p,
                                    random.randint(0, 2**31 - 1) if seed is None else seed, bias or {}, presence,
                                    frequency))

    async def events(self, request, http):
        """The request's events until each sample has Finished (a score: Scored), or Failed, waiting on the
        scheduler's wake-ups; cancels the request when the client goes away (its slots free at the next round)."""
        done, count = 0, getattr(request, "n", 1)
        try:
            while done < count:
                request.wake.clear()  # (before looking: an event put after the look sets it again)
                if request.events.empty():
                    try:
                        await asyncio.wait_for(request.wake.wait(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            return
                    continue
                event = request.events.get_nowait()
                yield event
                if isinstance(event, Failed):
                    return
                done += isinstance(event, (Finished, Scored))
        finally:
            request.cancel()

    async def score(self, ids, http) -> list:
        """The prompt's own tokens scored by the model (echo with logprobs), between the scheduler's rounds."""
        async for event in self.events(self._listen(ScoreRequest(list(ids))), http):
            if isinstance(event, Failed):
                raise APIError(500, event.message)
            return event.scores
        raise APIError(499, "the client went away")

    def stats(self) -> dict:
        s = self.scheduler
        return {**s.stats, "queue_length": s.waiting.qsize(), "slots_busy": s.busy_slots(), "slots": s.n_slots}
