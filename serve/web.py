"""Chat over HTTP: a web UI, nanochat's streaming endpoint and an OpenAI-compatible API, on one scheduler.

    python -m serve.web --host 127.0.0.1 --port 8000            # the latest SFT model; open http://127.0.0.1:8000
    python -m serve.web -i base -g d20 --slots 16

GET / (the page), POST /chat/completions (nanochat's SSE: data: {"token": ...} ... data: [DONE]), OpenAI's API under
/v1 (serve/openai_api.py), GET /health, GET /stats; errors in OpenAI's body. Safe to expose (serve/guard.py)."""
import argparse
import html
import json
import os
import socket
import sys
import time
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat_jax.inference.frontend import ReplyText
from nanochat_jax.inference.programs import MAX_TOP_K
from nanochat_jax.inference.scheduler import Failed, Token
from serve import openai_api
from serve.guard import Guard, GuardedH11Protocol, is_loopback, openai_error
from serve.openai_api import MAX_MAX_TOKENS, Choice, Strict
from serve.service import APIError, ChatService

UI_PATH = os.path.join(os.path.dirname(__file__), "ui.html")
FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" '
           'fill="#0a66c2"/><text x="16" y="22" font-size="16" text-anchor="middle" fill="#fff" '
           'font-family="sans-serif">nc</text></svg>')


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Strict):
    messages: list[Message]
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K)
    max_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS)


async def api_error(_, error: APIError):
    return JSONResponse(openai_error(error.status, error.message, param=error.param, code=error.code), error.status)


async def invalid(_, error: RequestValidationError):
    errors = error.errors()
    if any(e.get("type") == "json_invalid" for e in errors):  # (its loc is a character offset, not a field)
        reason = errors[0].get("ctx", {}).get("error", errors[0]["msg"])
        return JSONResponse(openai_error(400, f"the request body is not valid JSON: {reason}"), 400)
    reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
    param = ".".join(str(p) for p in errors[0]["loc"][1:]) or None if errors else None
    return JSONResponse(openai_error(400, reasons, param=param), 400)


async def http_error(_, error: StarletteHTTPException):
    status = error.status_code
    message = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(status, str(error.detail))
    return JSONResponse(openai_error(status, message), status, headers=getattr(error, "headers", None))


async def server_error(_, error: Exception):
    return JSONResponse(openai_error(500, f"internal error: {type(error).__name__}"), 500)


async def ui(http: HTTPRequest):
    return HTMLResponse(http.app.state.page)


async def favicon():
    return Response(FAVICON, media_type="image/svg+xml", headers={"cache-control": "max-age=86400"})


async def health(http: HTTPRequest):
    return {"status": "ok", "ready": True, "model": http.app.state.service.model_name}


async def stats(http: HTTPRequest):
    return http.app.state.service.stats()


async def chat(body: ChatRequest, http: HTTPRequest):
    """nanochat's SSE (a notice first when old messages were dropped to fit the context)."""
    service = http.app.state.service
    max_tokens = body.max_tokens or service.defaults["max_tokens"]
    ids, dropped = await service.prompt(body.messages, max_tokens, drop_old=True)
    temperature = service.defaults["temperature"] if body.temperature is None else body.temperature
    request = service.submit(ids, 1, max_tokens, temperature, body.top_k or service.defaults["top_k"], 1.0, None)

    async def stream():
        try:
            if dropped:
                yield f"data: {json.dumps({'notice': f'dropped the oldest {dropped} messages to fit the context'})}\n\n"
            reply = Choice(0, service.tokenizer, ReplyText, [])  # (never half a character)
            async for event in service.events(request, http):
                if isinstance(event, Failed):
                    yield f"data: {json.dumps({'error': event.message})}\n\n"
                if not isinstance(event, Token):
                    break
                if new := reply.add(event):
                    yield f"data: {json.dumps({'token': new}, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # done, failed or the client left: free the slot now
            request.cancel()

    return StreamingResponse(stream(), media_type="text/event-stream")


def create_app(service: ChatService, api_key: str | None = None, allowed_hosts: set[str] | None = None,
               max_body: int = 1 << 20, docs: bool = False) -> FastAPI:
    """The app over one ChatService. allowed_hosts: the Host names it answers to (None: any); api_key: required on
    everything but /health; docs: serve /docs and /openapi.json."""
    app = FastAPI(title="nanochat-jax", docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts, max_body=max_body)
    app.state.service = service
    with open(UI_PATH, encoding="utf-8") as f:  # the empty page says what it serves
        app.state.page = f.read().replace("{{MODEL}}", html.escape(service.model_name))
    for kind, handler in ((APIError, api_error), (RequestValidationError, invalid),
                          (StarletteHTTPException, http_error), (Exception, server_error)):
        app.add_exception_handler(kind, handler)
    app.add_api_route("/", ui, response_class=HTMLResponse)
    for method, path, handler in (("GET", "/favicon.svg", favicon), ("GET", "/favicon.ico", favicon),
                                  ("GET", "/health", health), ("GET", "/stats", stats),
                                  ("POST", "/chat/completions", chat), ("GET", "/v1/models", openai_api.models),
                                  ("GET", "/v1/models/{model_id:path}", openai_api.model),
                                  ("POST", "/v1/chat/completions", openai_api.chat_completions),
                                  ("POST", "/v1/completions", openai_api.completions)):
        app.add_api_route(path, handler, methods=[method])
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description="serve a nanochat-jax model over HTTP")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"])
    parser.add_argument("-g", "--model-tag", default=None)
    parser.add_argument("-s", "--step", type=int, default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=8000)
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default temperature")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k")
    parser.add_argument("-m", "--max-tokens", type=int, default=512, help="default longest reply")
    parser.add_argument("--slots", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max-waiting", type=int, default=64, help="queued requests beyond which the server says 503")
    parser.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on the API and the page (default: $NANOCHAT_API_KEY)")
    parser.add_argument("--allowed-hosts", help="comma-separated Host names to answer to (loopback default: localhost)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 beyond)")
    parser.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    args = parser.parse_args(argv)
    if not 0 <= args.temperature <= 2 or not 1 <= args.top_k <= MAX_TOP_K or not 1 <= args.max_tokens <= MAX_MAX_TOKENS:
        parser.error(f"--temperature in 0..2, --top-k in 1..{MAX_TOP_K}, --max-tokens in 1..{MAX_MAX_TOKENS}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: a port is 0..65535 (0: any free one)")
    if args.slots < 1 or args.max_waiting < 1 or args.max_body_bytes < 1024:
        parser.error("--slots and --max-waiting must be positive, --max-body-bytes at least 1024")
    if args.api_key is not None and len(args.api_key) < 8:
        parser.error("--api-key must be at least 8 characters")
    allowed = set(args.allowed_hosts.split(",")) if args.allowed_hosts else None
    if allowed is None and is_loopback(args.host):
        allowed = {"localhost", "127.0.0.1", "::1"}
    if not is_loopback(args.host) and args.api_key is None:
        print(f"WARNING: serving on {args.host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr, flush=True)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # before the model loads: a port in use is one line and exit code 1, not a crash minutes later
        sock.bind((args.host, args.port))
    except OSError as e:
        parser.exit(1, f"cannot listen on {args.host}:{args.port}: {e.strerror}\n")

    try:  # Ctrl-C while loading, compiling or serving: one line, not a KeyboardInterrupt traceback
        serve(args, parser, sock, allowed)
    except KeyboardInterrupt:
        parser.exit(130, "serve.web: stopped (Ctrl-C)\n")


def serve(args, parser, sock, allowed):
    import uvicorn

    from serve.cli import load_engine
    model, tokenizer, meta, engine = load_engine(args, parser)
    scheduler = engine.scheduler(args.slots, args.max_waiting)
    print(f"compiling the engine for prompts up to {model.config.sequence_len} tokens ...", flush=True)
    t0 = time.time()
    scheduler.warm_up()  # (so the first clients do not wait on compiles, nor stall the event loop)
    print(f"compiled in {time.time() - t0:.0f}s", flush=True)
    scheduler.start()
    name = f"nanochat-jax-{args.source}-d{model.config.n_layer}"
    service = ChatService(scheduler, tokenizer, name, {"temperature": args.temperature, "top_k": args.top_k,
                                                       "max_tokens": args.max_tokens})
    app = create_app(service, api_key=args.api_key, allowed_hosts=allowed, max_body=args.max_body_bytes,
                     docs=args.docs)
    print(f"serving {name} (step {meta['step']}) at http://{args.host}:{args.port}"
          + (" (API key required)" if args.api_key else ""), flush=True)
    print("tool calls: the calculator (arithmetic and str.count, evaluated from the syntax tree: no model-written "
          "code is executed, so no sandbox is needed)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, http=GuardedH11Protocol, log_level="warning", timeout_keep_alive=5))
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()


if __name__ == "__main__":
    main()
