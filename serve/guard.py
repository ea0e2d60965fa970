"""What makes the chat server safe to expose: OpenAI-style errors, a capped request body, connection deadlines,
Bearer-key auth, and a Host allow-list against DNS rebinding.

`Guard` (ASGI middleware, outermost) checks the Host (bound to loopback, only localhost names reach the app), the API
key (Bearer, or the cookie the page sets after `/?key=KEY`) and the body (413 before more than `max_body` bytes are
read, whatever Content-Length says). `GuardedH11Protocol` closes connections slow to send their request: uvicorn
alone waits forever for a client that connects and sends nothing, or one byte at a time."""
import hmac
import ipaddress
import json
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

COOKIE = "nanochat_key"
OPEN_PATHS = ("/health", "/favicon.ico", "/favicon.svg")  # no key needed (nothing in them is private)
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 503: "server_busy"}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}}


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(value: str) -> str:
    """The name part of a Host header: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


async def _send(send, status: int, body: bytes, headers: list):
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send, status: int, message: str, headers=(), **fields):
    body = json.dumps(openai_error(status, message, **fields)).encode()
    await _send(send, status, body, [(b"content-type", b"application/json"), *headers])


class Guard:
    def __init__(self, app, api_key: str | None = None, allowed_hosts: set[str] | None = None,
                 max_body: int = 1 << 20):
        self.app, self.api_key, self.max_body = app, api_key, max_body
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.allowed_hosts is not None and _host_name(headers.get("host", "")).lower() not in self.allowed_hosts:
            return await _send_error(send, 400, "this server answers only to its own host names (a DNS-rebinding "
                                     "guard); start it with --allowed-hosts to add one", param="Host",
                                     code="host_not_allowed")
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if scope["path"] == "/" and self._matches(query.get("key", [""])[0]):  # the page, opened with its key
                cookie = f"{COOKIE}={self.api_key}; HttpOnly; SameSite=Strict; Path=/"
                return await _send(send, 303, b"", [(b"location", b"/"), (b"set-cookie", cookie.encode("latin-1"))])
            if not self._authorized(headers):
                return await _send_error(send, 401, "a valid API key is required: send 'Authorization: Bearer <key>' "
                                         "(or open the page as /?key=<key>)", [(b"www-authenticate", b"Bearer")],
                                         code="invalid_api_key")
        too_large = f"the request body is larger than {self.max_body} bytes"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _send_error(send, 413, too_large, code="request_too_large")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body:
                    return await _send_error(send, 413, too_large, code="request_too_large")
            first = [{"type": "http.request", "body": body, "more_body": False}]

            async def replay():  # the body, already read (and capped), as one message; then the real channel
                return first.pop() if first else await receive()
            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    def _matches(self, key: str) -> bool:
        return bool(key) and hmac.compare_digest(key.encode(), self.api_key.encode())

    def _authorized(self, headers: dict) -> bool:
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and self._matches(auth[7:].strip()):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is no key
            return False
        return COOKIE in cookie and self._matches(cookie[COOKIE].value)


class GuardedH11Protocol(H11Protocol):
    header_timeout = 10.0  # seconds to send a request's headers (after connecting, or after the last response)
    body_timeout = 30.0  # seconds to send its body

    def connection_made(self, transport):
        super().connection_made(transport)
        self._deadline, self._phase = None, None
        self._arm("headers", self.header_timeout)

    def _arm(self, phase, seconds=0.0):  # phase None: no deadline
        if self._deadline is not None:
            self._deadline.cancel()
        self._phase = phase
        self._deadline = None if phase is None else self.loop.call_later(seconds, self._too_slow)

    def _too_slow(self):
        if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self.transport.close()  # (a client still sending its request; responses in flight are left alone)

    def data_received(self, data):
        super().data_received(data)
        phase = {h11.IDLE: "headers", h11.SEND_BODY: "body"}.get(self.conn.their_state)
        if phase != self._phase:
            self._arm(phase, self.header_timeout if phase == "headers" else self.body_timeout)

    def on_response_complete(self):
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm("headers", self.header_timeout + self.timeout_keep_alive)

    def connection_lost(self, exc):
        self._arm(None)
        super().connection_lost(exc)
