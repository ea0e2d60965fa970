"""OpenAI's API as its clients use it: /v1/chat/completions, /v1/completions (the legacy text endpoint, so a base
model can be served and evaluated by standard harnesses), /v1/models and /v1/models/{id}.

Implemented: n, seed, temperature, top_p (and top_k), stop, max_tokens / max_completion_tokens, stream with
stream_options.include_usage (a last chunk with the usage), presence_penalty and frequency_penalty, logit_bias, and
logprobs / top_logprobs (computed on the device with the sampled token: the model's log-probabilities before any
sampling setting); on /v1/completions also echo and logprobs (with echo, the prompt's own tokens are scored too).
Accepted as the no-ops they are here: user, response_format {"type": "text"}, the developer role (as system), content
as a list of text parts, tool_choice "none", store/metadata/service_tier/parallel_tool_calls and other neutral
settings. Refused with a 400 naming the field: images and other non-text content, tools and functions, JSON modes,
audio output, suffix, best_of > 1; any field OpenAI does not define.
"""
import asyncio
import json
import time
import uuid
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
NEUTRAL = {"store": (None, False), "service_tier": (None, "auto", "default"), "parallel_tool_calls": None,
           "metadata": None, "modalities": (None, ["text"]), "reasoning_effort": None, "prediction": None,
           "web_search_options": None, "audio": (None,), "tool_choice": (None, "none"), "function_call": (None, "none")}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None


class Sampling(BaseModel):
    """What both endpoints share."""
    model_config = ConfigDict(extra="forbid")
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


def refuse_unsupported(body, chat: bool):
    for name, allowed in NEUTRAL.items():
        if name in body.model_fields_set:
            value = getattr(body, name)
            if allowed is not None and value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
                raise APIError(400, f"{name}={value!r} is not supported by this server", param=name,
                               code="unsupported_parameter")
    if chat:
        if body.tools or body.functions:
            name = "tools" if body.tools else "functions"
            raise APIError(400, f"{name} (function calling) is not supported: this model's only tool is its "
                                "built-in calculator", param=name, code="unsupported_parameter")
        kind = (body.response_format or {}).get("type", "text")
        if kind != "text":
            raise APIError(400, f"response_format {kind!r} is not supported: only text", param="response_format",
                           code="unsupported_parameter")
    else:
        if body.suffix:
            raise APIError(400, "suffix (insertion) is not supported", param="suffix", code="unsupported_parameter")
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of other than 1 is not supported", param="best_of",
                           code="unsupported_parameter")


def chat_messages(raw: list[dict]) -> list[dict]:
    """OpenAI messages -> nanochat's {"role", "content"} (developer as system; text parts joined); anything else
    is refused with the field that holds it."""
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
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported, not {kind!r}",
                                   param=f"messages.{i}.content.{j}", code="unsupported_content")
                texts.append(part["text"])
            content = "".join(texts)
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


class Choice:
    """One sample's reply as it grows: the text safe to send (never past a stop string, never half a character,
    nothing that might still become a stop string), its finish reason and its tokens' logprob entries."""

    def __init__(self, index, tokenizer, render, stops):
        self.index, self.tokenizer, self.stops = index, tokenizer, stops
        self.reply = render(tokenizer)  # ReplyText (chat: the reply as the page shows it) or PlainText
        self.sent, self.reason, self.tokens, self.logprobs = "", None, 0, []
        self.hold = max((len(s) for s in stops), default=1) - 1

    def add(self, token: Token | None) -> str:
        """A token (None: the sample finished); returns the newly sendable text."""
        if token is not None:
            self.tokens += 1
            self.reply.add(token.id)
            self.logprobs.append(token)
        text = self.reply.text()
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            text, self.reason = text[:cut], "stop"
        elif token is None:  # the end: a last character cut short by the token limit is not sent in halves
            text = text.rstrip("\ufffd")
        else:
            text = text[:len(text) - self.hold] if self.hold else text
            if text.endswith("\ufffd"):
                return ""
        new = text[len(self.sent):] if len(text) > len(self.sent) else ""
        self.sent += new
        return new


class PlainText:
    """A completion's text, decoded as it grows (whole characters settle; only the unfinished tail is decoded
    again)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.settled, self.tail = tokenizer, "", []

    def add(self, token: int):
        self.tail.append(token)
        text = self.tokenizer.decode(self.tail)
        if not text.endswith("\ufffd"):
            self.settled, self.tail = self.settled + text, []

    def text(self) -> str:
        return self.settled + self.tokenizer.decode(self.tail)


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    try:
        raw = tokenizer.enc.decode_single_token_bytes(token_id)
    except (AttributeError, KeyError):
        raw = tokenizer.decode([token_id]).encode()
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer, tokens: list[Token], top: int) -> list[dict]:
    entries = []
    for t in tokens:
        text, raw = token_text(tokenizer, t.id)
        alternatives = []
        for i, lp in t.top[:top]:
            alt, alt_raw = token_text(tokenizer, i)
            alternatives.append({"token": alt, "logprob": lp, "bytes": alt_raw})
        entries.append({"token": text, "logprob": t.logprob, "bytes": raw, "top_logprobs": alternatives})
    return entries


def check_model(service, model):
    if model not in (None, service.model_name):
        raise APIError(404, f"unknown model {model!r}; this server serves {service.model_name!r}", param="model",
                       code="model_not_found")


def model_card(service):
    return {"id": service.model_name, "object": "model", "created": 0, "owned_by": "nanochat-jax"}


async def models(http: HTTPRequest):
    return {"object": "list", "data": [model_card(http.app.state.service)]}


async def model(model_id: str, http: HTTPRequest):
    check_model(http.app.state.service, model_id)
    return model_card(http.app.state.service)


async def run(service, requests, choices, http):
    """Drives the requests' events into their choices; yields (choice, new text, logprob tokens) whenever a choice
    has something to send, and (choice, "", []) with choice.reason set when it finishes."""
    queue_: asyncio.Queue = asyncio.Queue()

    async def pump(request, group):
        try:
            async for event in service.events(request, http):
                await queue_.put((group, event))
        finally:
            await queue_.put((group, None))

    tasks = [asyncio.create_task(pump(r, g)) for r, g in zip(requests, choices)]
    open_ = len(tasks)
    try:
        while open_:
            group, event = await queue_.get()
            if event is None:
                open_ -= 1
                continue
            if isinstance(event, Failed):
                raise APIError(500, event.message)
            choice = group[event.sample]
            if choice.reason is not None:
                continue
            if isinstance(event, Finished):
                new = choice.add(None)
                choice.reason = choice.reason or ("length" if event.reason == "length" else "stop")
                yield choice, new, []
                continue
            before = len(choice.logprobs)
            new = choice.add(event)
            yield choice, new, choice.logprobs[before:]
            if choice.reason is not None:
                yield choice, "", []
    finally:
        for t in tasks:
            t.cancel()
        for r in requests:
            r.cancel()


def usage(prompt_tokens: int, choices):
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


async def sse_stream(chunks, head=()):
    """A stream of SSE lines from `head` and then the async `chunks`; an error after the headers went out is
    reported in the stream; then [DONE]."""
    try:
        for line in head:
            yield line
        async for line in chunks:
            yield line
    except APIError as error:
        yield sse(openai_error(500, error.message))
    yield "data: [DONE]\n\n"


async def chat_completions(body: ChatBody, http: HTTPRequest):
    service = http.app.state.service
    check_model(service, body.model)
    refuse_unsupported(body, chat=True)
    max_tokens = body.max_completion_tokens or body.max_tokens or service.defaults["max_tokens"]
    ids, _ = await service.prompt(chat_messages(body.messages), max_tokens, drop_old=False)
    temperature = service.defaults["temperature"] if body.temperature is None else body.temperature
    request = service.submit(ids, body.n, max_tokens, temperature, body.top_k, body.top_p or 1.0, body.seed,
                             logit_bias(body), body.presence_penalty, body.frequency_penalty)
    cid, created, tokenizer = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), service.tokenizer
    choices = [Choice(i, tokenizer, ReplyText, body.stop or []) for i in range(body.n)]
    top = body.top_logprobs or 0
    want_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choice_dicts, usage_=None):
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": service.model_name,
               "choices": choice_dicts}
        return sse(out | {"usage": usage_} if want_usage else out)

    async def chunks():
        async for c, new, tokens in run(service, [request], [choices], http):
            lp = {"content": chat_logprobs(tokenizer, tokens, top)} if body.logprobs and tokens else None
            if new or lp or c.reason:
                yield chunk([{"index": c.index, "delta": {"content": new} if new else {}, "logprobs": lp,
                              "finish_reason": c.reason}])
        if want_usage:
            yield chunk([], usage(len(ids), choices))

    if body.stream:
        head = [chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}]) for c in choices]
        return StreamingResponse(sse_stream(chunks(), head), media_type="text/event-stream")
    async for _ in run(service, [request], [choices], http):
        pass
    return {"id": cid, "object": "chat.completion", "created": created, "model": service.model_name,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.sent},
                         "logprobs": {"content": chat_logprobs(tokenizer, c.logprobs, top)} if body.logprobs
                         else None, "finish_reason": c.reason or "stop"} for c in choices],
            "usage": usage(len(ids), choices)}


def prompts_of(tokenizer, body) -> list[list[int]]:
    p, bos = body.prompt, tokenizer.get_bos_token_id()
    if isinstance(p, str):
        texts = [p]
    elif p and all(isinstance(x, int) for x in p):
        return [[bos] + list(p)]
    elif p and all(isinstance(x, list) for x in p):
        return [[bos] + list(x) for x in p]
    else:
        texts = list(p)
    if not texts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    return [[bos] + tokenizer.encode(t) for t in texts]


def legacy_logprobs(tokenizer, tokens: list[int], scores, top: int, offset: int):
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, t in enumerate(tokens):
        text, _ = token_text(tokenizer, t)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        lp, alternatives = scores[i]
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if alternatives is None else
                                   {token_text(tokenizer, a)[0]: alp for a, alp in alternatives[:top]})
    return out


class Completion:
    """One /v1/completions call: its prompts, a group of n choices per prompt, and the logprobs of each (with echo,
    the prompt's own tokens first, scored by the scheduler)."""

    def __init__(self, service, body, prompts, prompt_scores):
        self.service, self.body, self.prompts, self.prompt_scores = service, body, prompts, prompt_scores
        self.texts = [service.tokenizer.decode(ids[1:]) for ids in prompts]
        self.groups = [[Choice(k * body.n + i, service.tokenizer, PlainText, body.stop or []) for i in range(body.n)]
                       for k in range(len(prompts))]
        self.flat = [c for g in self.groups for c in g]
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def logprobs(self, c: Choice, tokens: list[Token], with_prompt: bool):
        body, tokenizer = self.body, self.service.tokenizer
        if body.logprobs is None:
            return None
        k = c.index // body.n
        lp = legacy_logprobs(tokenizer, [t.id for t in tokens], [(t.logprob, t.top) for t in tokens],
                             body.logprobs, len(self.texts[k]) if body.echo else 0)
        if with_prompt and self.prompt_scores is not None:
            ids = self.prompts[k][1:]
            head = legacy_logprobs(tokenizer, ids, [(None, None)] + self.prompt_scores[k][:len(ids) - 1],
                                   body.logprobs, 0)
            lp = {key: head[key] + lp[key] for key in lp}
        return lp

    def usage(self):
        return usage(sum(len(ids) for ids in self.prompts), self.flat)

    def chunk(self, index, text, reason, lp, usage_=None):
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.service.model_name,
               "choices": [] if index is None else [{"index": index, "text": text, "logprobs": lp,
                                                    "finish_reason": reason}]}
        return sse(out | {"usage": usage_} if self.body.stream_options and self.body.stream_options.include_usage
                   else out)

    async def chunks(self, requests, http):
        if self.body.echo:
            for c in self.flat:
                yield self.chunk(c.index, self.texts[c.index // self.body.n], None, self.logprobs(c, [], True))
        async for c, new, tokens in run(self.service, requests, self.groups, http):
            lp = self.logprobs(c, tokens, False) if tokens else None
            if new or lp or c.reason:
                yield self.chunk(c.index, new, c.reason, lp)
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield self.chunk(None, "", None, None, self.usage())

    def whole(self):
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.service.model_name,
                "choices": [{"index": c.index, "text": (self.texts[c.index // self.body.n] if self.body.echo else "")
                             + c.sent, "logprobs": self.logprobs(c, c.logprobs, True),
                             "finish_reason": c.reason or "stop"} for c in self.flat],
                "usage": self.usage()}


async def completions(body: CompletionBody, http: HTTPRequest):
    service = http.app.state.service
    check_model(service, body.model)
    refuse_unsupported(body, chat=False)
    prompts = await run_in_threadpool(prompts_of, service.tokenizer, body)
    prompt_scores = None
    if body.echo and body.logprobs is not None:
        prompt_scores = [await service.score(ids, http) for ids in prompts]
    temperature = 1.0 if body.temperature is None else body.temperature
    requests = []
    try:
        for ids in prompts:
            requests.append(service.submit(ids, body.n, body.max_tokens, temperature, body.top_k, body.top_p or 1.0,
                                           body.seed, logit_bias(body), body.presence_penalty,
                                           body.frequency_penalty))
    except APIError:
        for r in requests:
            r.cancel()
        raise
    completion = Completion(service, body, prompts, prompt_scores)
    if body.stream:
        return StreamingResponse(sse_stream(completion.chunks(requests, http)), media_type="text/event-stream")
    async for _ in run(service, requests, completion.groups, http):
        pass
    return completion.whole()


def add_routes(app):
    """OpenAI's endpoints, over the ChatService in app.state.service."""
    app.add_api_route("/v1/models", models)
    app.add_api_route("/v1/models/{model_id:path}", model)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
