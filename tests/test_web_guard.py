"""The server is safe to expose: OpenAI error bodies on every failure, a capped body, deadlines for slow clients,
Bearer auth, a Host allow-list, no /docs, prompts rendered off the event loop, a port in use is one line."""
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from flax import nnx

from conftest import randomize, tiny_config
from nanochat_jax.inference.engine import Engine
from nanochat_jax.model.gpt import GPT
from serve.guard import GuardedH11Protocol
from serve.service import ChatService
from serve.web import create_app

KEY = "s3cret-test-key"
HELLO = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
TIMEOUT = httpx.Timeout(120.0)  # generous: a first request compiles the engine, and CI machines are busy
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class QuickDeadlines(GuardedH11Protocol):
    header_timeout = 1.0
    body_timeout = 1.0


@pytest.fixture(scope="module")
def batched(tokenizer):
    model = randomize(GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=256), rngs=nnx.Rngs(0)),
                      std=0.4)
    scheduler = Engine(model, tokenizer).scheduler(slots=2, max_waiting=64).start()
    yield scheduler
    scheduler.stop()


def start(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", http=QuickDeadlines))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


@pytest.fixture(scope="module")
def guarded(batched, tokenizer):
    app = create_app(ChatService(batched, tokenizer, "tiny", {"temperature": 0.0, "top_k": 50, "max_tokens": 8}),
                     api_key=KEY, allowed_hosts={"localhost", "127.0.0.1", "::1"}, max_body=4096)
    server, thread, port = start(app)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT,
                          headers={"authorization": f"Bearer {KEY}"})
    assert client.post("/v1/chat/completions", json=HELLO).status_code == 200  # warm up (compiles)
    yield client, port
    client.close()
    server.should_exit = True
    thread.join(10)


def is_openai_error(response, status, code=None):
    body = response.json()
    assert response.status_code == status, (response.status_code, body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and (code is None or body["error"]["code"] == code), body
    return body["error"]


def test_every_error_has_openai_s_body(guarded):
    client, _ = guarded
    is_openai_error(client.get("/nope"), 404)
    is_openai_error(client.get("/v1/chat/completions"), 405)
    for path in ("/v1/chat/completions", "/v1/completions", "/chat/completions"):  # no field to name: no param
        error = is_openai_error(client.post(path, content=b"{not json", headers={"content-type": "application/json"}),
                                400)
        assert error["param"] is None and error["message"].startswith("the request body is not valid JSON"), error
    assert is_openai_error(client.post("/v1/chat/completions", json={"messages": 5}), 400)["param"] == "messages"
    is_openai_error(client.post("/v1/chat/completions", json=HELLO | {"model": "gpt-9"}), 404, "model_not_found")
    for path in ("/docs", "/openapi.json", "/redoc"):  # off unless --docs
        is_openai_error(client.get(path), 404)


def test_the_body_is_capped_before_it_is_read(guarded):
    client, _ = guarded
    big = {"messages": [{"role": "user", "content": "x" * 10000}]}
    is_openai_error(client.post("/v1/chat/completions", json=big), 413, "request_too_large")

    def chunks():  # no Content-Length: chunked, and larger than the cap
        for _ in range(10):
            yield b" " * 1000
    is_openai_error(client.post("/v1/chat/completions", content=chunks(),
                                headers={"content-type": "application/json"}), 413, "request_too_large")
    assert client.get("/health").status_code == 200


def test_the_api_key(guarded):
    client, port = guarded
    bare = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT)
    is_openai_error(bare.post("/v1/chat/completions", json=HELLO), 401, "invalid_api_key")
    is_openai_error(bare.get("/"), 401, "invalid_api_key")
    is_openai_error(bare.get("/v1/models", headers={"authorization": "Bearer wrong-key-123"}), 401)
    assert bare.get("/health").status_code == 200
    opened = bare.get("/?key=" + KEY, follow_redirects=True)  # the page, opened with its key once: a cookie, then the page
    assert opened.status_code == 200 and "<textarea" in opened.text and "?key" not in str(opened.url)
    assert bare.post("/v1/chat/completions", json=HELLO).status_code == 200  # (the cookie, same-site)
    bare.close()


def test_host_names_other_than_its_own_are_refused(guarded):
    client, port = guarded
    error = is_openai_error(client.get("/v1/models", headers={"host": "attacker.example"}), 400, "host_not_allowed")
    assert error["param"] == "Host"
    assert client.get("/v1/models", headers={"host": f"localhost:{port}"}).status_code == 200


def _closed_within(sock, seconds) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True


def test_slow_and_idle_connections_are_cut(guarded):
    _, port = guarded
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow_headers = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow_headers.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
    slow_body = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n"
                      b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n{\"messa")
    for sock in (idle, slow_headers, slow_body):
        assert _closed_within(sock, 30), "the server kept a slow connection open"
        sock.close()


def test_prompts_are_rendered_off_the_event_loop(guarded, monkeypatch):
    client, _ = guarded
    import serve.service
    threads = []
    real = serve.service.prompt_for_reply

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)
    monkeypatch.setattr(serve.service, "prompt_for_reply", spy)
    assert client.post("/v1/chat/completions", json=HELLO).status_code == 200
    assert threads and all("AnyIO" in t or "worker" in t.lower() or "Thread" in t for t in threads), threads
    assert all(t != "MainThread" and not t.startswith("uvicorn") for t in threads)


def test_health_answers_while_64_clients_wait(guarded):
    client, port = guarded
    long = {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 60}
                         for i in range(9)], "max_tokens": 4}
    results = []

    def ask():
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT,
                          headers={"authorization": f"Bearer {KEY}"}) as c:
            results.append(c.post("/chat/completions", json=long).status_code)
    workers = [threading.Thread(target=ask) for _ in range(64)]
    for w in workers:
        w.start()
    health = [client.get("/health").status_code for _ in range(5)]
    for w in workers:
        w.join(300)
    assert health == [200] * 5 and len(results) == 64 and set(results) <= {200, 503}, results


def test_a_port_in_use_is_one_line_and_exit_code_1(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    try:
        result = subprocess.run([sys.executable, "-m", "serve.web", "--port", str(port)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
        exposed = subprocess.run([sys.executable, "-m", "serve.web", "--host", "0.0.0.0", "--port", str(port)],
                                 cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert "WARNING" in exposed.stderr and "--api-key" in exposed.stderr
    finally:
        taken.close()
