"""OpenAI's API as its clients use it: /v1/chat/completions, /v1/completions (the legacy text endpoint, so a base
model can be served and evaluated by standard harnesses), /v1/models and /v1/models/{id}.

Implemented: n, seed, temperature, top_p, top_k, stop, max_(completion_)tokens, stream (stream_options.include_usage),
presence/frequency_penalty, logit_bias, logprobs / top_logprobs (the model's, before any sampling setting), echo.
Accepted as no-ops: user, response_format text, the developer role (as system), text parts, the settings in NEUTRAL.
Refused with a 400 naming the field: non-text content, tools, JSON modes, audio, suffix, best_of > 1, unknown fields."""
import asyncio
import json
import time
import uuid
from functools import partial
from itertools import accumulate
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from nanochat_jax.inference.frontend import ReplyText
from nanochat_jax.inference.programs import MAX_TOP_K, TOP_LOGPROBS
from nanochat_jax.inference.scheduler import Failed, Finished, Token
from serve.guard import openai_error
from serve.service import APIError

MAX_MAX_TOKENS = 4096
# the values each setting is accepted with (None: any)
NEUTRAL = {"store": (None, False), "service_tier": (None, "auto", "default"), "parallel_tool_calls": None,
           "metadata": None, "modalities": (None, ["text"]), "reasoning_effort": None, "prediction": None,
           "web_search_options": None, "audio": (None,), "tool_choice": (None, "none"), "function_call": (None, "none")}


class Strict(BaseModel):  # a request body: unknown fields are refused
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class Sampling(Strict):  # what both endpoints share
    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # accepted when neutral (see NEUTRAL), refused otherwise
    store: Any = None
    service_tier: Any = None
    metadata: Any = None
    parallel_tool_calls: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops


class ChatBody(Sampling):
    messages: list[dict]
    max_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    response_format: dict | None = None
    tools: list | None = None
    functions: list | None = None
    tool_choice: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    reasoning_effort: Any = None
    prediction: Any = None
    web_search_options: Any = None


class CompletionBody(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1, le=MAX_MAX_TOKENS)
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def unsupported(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def check_model(service, model):
    if model not in (None, service.model_name):
        raise APIError(404, f"unknown model {model!r}; this server serves {service.model_name!r}", param="model",
                       code="model_not_found")


def refuse_unsupported(service, body, chat: bool):
    check_model(service, body.model)
    for name, allowed in NEUTRAL.items():
        if name in body.model_fields_set and allowed is not None and getattr(body, name) not in allowed:
            raise unsupported(f"{name}={getattr(body, name)!r} is not supported by this server", name)
    if chat and (body.tools or body.functions):
        name = "tools" if body.tools else "functions"
        raise unsupported(f"{name} (function calling) is not supported: this model's only tool is its built-in "
                          "calculator", name)
    if chat and (kind := (body.response_format or {}).get("type", "text")) != "text":
        raise unsupported(f"response_format {kind!r} is not supported: only text", "response_format")
    if not chat and body.suffix:
        raise unsupported("suffix (insertion) is not supported", "suffix")
    if not chat and body.best_of not in (None, 1):
        raise unsupported("best_of other than 1 is not supported", "best_of")


def chat_messages(raw: list[dict]) -> list[dict]:
    """OpenAI messages -> nanochat's {"role", "content"}; anything else is refused with the field that holds it."""
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param=f"messages.{i}")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role {role!r} is not supported (system, developer, user, assistant)",
                           param=f"messages.{i}.role")
        for key in m:
            if key not in ("role", "content", "name"):
                detail = "tool calls are not supported" if key in ("tool_calls", "function_call") else "unknown field"
                raise APIError(400, f"messages[{i}].{key}: {detail}", param=f"messages.{i}.{key}")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported, not {kind!r}",
                                   param=f"messages.{i}.content.{j}", code="unsupported_content")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages.{i}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def logit_bias(body) -> dict:
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            bias[int(key)] = float(value)
        except ValueError:
            raise APIError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias") from None
    return bias


def prompts_of(tokenizer, body) -> list[list[int]]:
    """The prompts (a text, texts, token ids or lists of them), each after a BOS."""
    p, bos = body.prompt, tokenizer.get_bos_token_id()
    if isinstance(p, str):
        p = [p]
    if not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        p = [p]
    vocab = tokenizer.get_vocab_size()
    for x in p:
        if isinstance(x, list) and not all(0 <= t < vocab for t in x):
            raise APIError(400, f"prompt: token ids must be in 0..{vocab - 1}", param="prompt")
    return [[bos] + (list(x) if isinstance(x, list) else tokenizer.encode(x)) for x in p]


class Choice:
    """One sample's reply as it grows: the text safe to send (never past a stop string, never half a character,
    nothing that might still become a stop string), its finish reason and its tokens (with their logprobs)."""

    def __init__(self, index, tokenizer, render, stops):
        self.index, self.stops = index, stops
        self.reply = render(tokenizer)  # ReplyText (chat: the reply as the page shows it) or PlainText
        self.sent, self.reason, self.logprobs = "", None, []
        self.hold = max((len(s) for s in stops), default=1) - 1

    def add(self, token: Token | None) -> str:
        """A token (None: the sample finished); returns the newly sendable text."""
        if token is not None:
            self.reply.add(token.id)
            self.logprobs.append(token)
        text = self.reply.text()
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            text, self.reason = text[:cut], "stop"
        elif token is None:  # the end: a last character cut short by the token limit is not sent in halves
            text = text.rstrip("\ufffd")
        else:
            text = text[:len(text) - self.hold]
            if text.endswith("\ufffd"):
                return ""
        new = text[len(self.sent):]
        self.sent += new
        return new


PlainText = partial(ReplyText, plain=True)  # a completion's text: every token as the tokenizer decodes it


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.enc.decode_single_token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer, tokens: list[Token], top: int) -> list[dict]:
    def entry(token_id, logprob):
        text, raw = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}
    return [entry(t.id, t.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in t.top[:top]]} for t in tokens]


def legacy_logprobs(tokenizer, tokens: list[Token], top: int, offset: int) -> dict:
    """OpenAI's completions logprobs of the tokens (a prompt's first has neither logprob nor alternatives: None)."""
    texts = [token_text(tokenizer, t.id)[0] for t in tokens]
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.top is None else {token_text(tokenizer, a)[0]: alp for a, alp in t.top[:top]}
                             for t in tokens],
            "text_offset": list(accumulate(map(len, texts), initial=offset))[:-1]}  # where each token starts


def sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


async def run(service, requests, groups, http):
    """Drives the requests' events into their groups of choices; yields (choice, new text, new tokens) whenever a
    choice has something to send; choice.reason is set in the last one of each choice."""
    events: asyncio.Queue = asyncio.Queue()

    async def pump(request, group):
        try:
            async for event in service.events(request, http):
                await events.put((group, event))
        finally:
            await events.put((group, None))

    tasks = [asyncio.create_task(pump(r, g)) for r, g in zip(requests, groups)]
    open_ = len(tasks)
    try:
        while open_:
            group, event = await events.get()
            if event is None:
                open_ -= 1
            elif isinstance(event, Failed):
                raise APIError(500, event.message)
            elif (choice := group[event.sample]).reason is not None:
                continue  # (cut by a stop string: the rest of the sample is not sent)
            elif isinstance(event, Finished):
                new = choice.add(None)
                choice.reason = choice.reason or ("length" if event.reason == "length" else "stop")
                yield choice, new, []
            else:
                yield choice, choice.add(event), [event]  # (with its reason set when a stop string cut it)
    finally:
        for t in tasks:
            t.cancel()
        for r in requests:
            r.cancel()


class Answer:
    """One call's choices, a group of n per prompt, returned whole or streamed; the subclasses shape the choices."""
    render, prefix, kind, chunk_kind = ReplyText, "", "", ""

    def __init__(self, service, body, prompts):
        self.service, self.body, self.prompts = service, body, prompts
        self.flat = [Choice(i, service.tokenizer, self.render, body.stop or []) for i in range(len(prompts) * body.n)]
        self.groups = [self.flat[k:k + body.n] for k in range(0, len(self.flat), body.n)]  # a group per prompt
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())
        self.want_usage = bool(body.stream_options and body.stream_options.include_usage)

    def envelope(self, kind: str, choices: list) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.service.model_name,
                "choices": choices}

    def usage(self) -> dict:
        prompt, completion = sum(len(ids) for ids in self.prompts), sum(len(c.logprobs) for c in self.flat)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk(self, choices: list, usage: dict | None = None) -> str:
        out = self.envelope(self.chunk_kind, choices)
        return sse(out | {"usage": usage} if self.want_usage else out)

    async def stream(self, requests, http):
        """The SSE lines; an error after the headers went out is reported in the stream; then [DONE]."""
        try:
            for line in self.head():
                yield line
            async for c, new, tokens in run(self.service, requests, self.groups, http):
                lp = self.logprobs(c, tokens) if tokens else None
                if new or lp or c.reason:
                    yield self.chunk([self.part(c, new, lp, c.reason)])
            if self.want_usage:
                yield self.chunk([], self.usage())
        except APIError as error:
            yield sse(openai_error(500, error.message))
        yield "data: [DONE]\n\n"

    async def respond(self, requests, http):
        if self.body.stream:
            return StreamingResponse(self.stream(requests, http), media_type="text/event-stream")
        async for _ in run(self.service, requests, self.groups, http):
            pass
        return self.envelope(self.kind, [self.whole(c) for c in self.flat]) | {"usage": self.usage()}


class ChatAnswer(Answer):
    prefix, kind, chunk_kind = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def logprobs(self, c: Choice, tokens: list[Token]):
        top = self.body.top_logprobs or 0
        return {"content": chat_logprobs(self.service.tokenizer, tokens, top)} if self.body.logprobs else None

    def head(self):
        return [self.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for c in self.flat]

    def part(self, c: Choice, new: str, lp, reason):
        return {"index": c.index, "delta": {"content": new} if new else {}, "logprobs": lp, "finish_reason": reason}

    def whole(self, c: Choice):
        return {"index": c.index, "message": {"role": "assistant", "content": c.sent},
                "logprobs": self.logprobs(c, c.logprobs), "finish_reason": c.reason or "stop"}


class TextAnswer(Answer):
    """With echo, each choice starts with its prompt (with logprobs: its tokens as the scheduler scored them)."""
    render, prefix, kind, chunk_kind = PlainText, "cmpl", "text_completion", "text_completion"

    def __init__(self, service, body, prompts, prompt_scores):
        super().__init__(service, body, prompts)
        self.echo = [service.tokenizer.decode(ids[1:]) if body.echo else "" for ids in prompts]
        self.prompt_scores = prompt_scores

    def logprobs(self, c: Choice, tokens: list[Token], with_prompt=False):
        tokenizer, top, k = self.service.tokenizer, self.body.logprobs, c.index // self.body.n
        if top is None:
            return None
        lp = legacy_logprobs(tokenizer, tokens, top, len(self.echo[k]))
        if with_prompt and self.prompt_scores is not None:  # (no score for the first token, as in OpenAI's)
            scored = zip(self.prompts[k][1:], [(None, None)] + self.prompt_scores[k])
            head = legacy_logprobs(tokenizer, [Token(0, t, False, *score) for t, score in scored], top, 0)
            lp = {key: head[key] + lp[key] for key in lp}
        return lp

    def head(self):
        if not self.body.echo:
            return []
        return [self.chunk([self.part(c, self.echo[c.index // self.body.n], self.logprobs(c, [], True), None)])
                for c in self.flat]

    def part(self, c: Choice, text: str, lp, reason):
        return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": reason}

    def whole(self, c: Choice):
        text = self.echo[c.index // self.body.n] + c.sent
        return self.part(c, text, self.logprobs(c, c.logprobs, True), c.reason or "stop")


def model_card(service):
    return {"id": service.model_name, "object": "model", "created": 0, "owned_by": "nanochat-jax"}


async def models(http: HTTPRequest):
    return {"object": "list", "data": [model_card(http.app.state.service)]}


async def model(model_id: str, http: HTTPRequest):
    check_model(http.app.state.service, model_id)
    return model_card(http.app.state.service)


def submit(service, body, ids, max_tokens: int, default_temperature: float):
    temperature = default_temperature if body.temperature is None else body.temperature
    return service.submit(ids, body.n, max_tokens, temperature, body.top_k, body.top_p or 1.0, body.seed,
                          logit_bias(body), body.presence_penalty, body.frequency_penalty)


async def chat_completions(body: ChatBody, http: HTTPRequest):
    service = http.app.state.service
    refuse_unsupported(service, body, chat=True)
    max_tokens = body.max_completion_tokens or body.max_tokens or service.defaults["max_tokens"]
    ids, _ = await service.prompt(chat_messages(body.messages), max_tokens, drop_old=False)
    request = submit(service, body, ids, max_tokens, service.defaults["temperature"])
    return await ChatAnswer(service, body, [ids]).respond([request], http)


async def completions(body: CompletionBody, http: HTTPRequest):
    service = http.app.state.service
    refuse_unsupported(service, body, chat=False)
    prompts = await run_in_threadpool(prompts_of, service.tokenizer, body)
    echo_scores = body.echo and body.logprobs is not None
    prompt_scores = [await service.score(ids, http) for ids in prompts] if echo_scores else None
    requests = []
    try:
        for ids in prompts:
            requests.append(submit(service, body, ids, body.max_tokens, 1.0))
    except APIError:
        for r in requests:
            r.cancel()
        raise
    return await TextAnswer(service, body, prompts, prompt_scores).respond(requests, http)
