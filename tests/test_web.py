"""The HTTP server against a tiny random model: endpoints, formats, validation, concurrency, disconnects, 503."""
import functools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from flax import nnx

from conftest import randomize, tiny_config
from nanochat_jax.inference.frontend import ReplyText, prompt_for_reply
from nanochat_jax.inference.engine import Engine
from nanochat_jax.model.gpt import GPT
from nanochat_jax.inference.scheduler import Request
from serve.service import ChatService
from serve.web import create_app

DEFAULTS = {"temperature": 0.8, "top_k": 50, "max_tokens": 64}
TIMEOUT = httpx.Timeout(120.0)  # generous: compiles run in the first requests, and CI machines are busy
get = functools.partial(httpx.get, timeout=TIMEOUT)
post = functools.partial(httpx.post, timeout=TIMEOUT)
stream = functools.partial(httpx.stream, timeout=TIMEOUT)
HELLO = {"messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture(scope="module")
def engine(tokenizer):
    model = randomize(GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=512), rngs=nnx.Rngs(0)),
                      std=0.4)
    return Engine(model, tokenizer)


def serve(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def url(engine, tokenizer):
    scheduler = engine.scheduler(slots=2, max_waiting=16).start()
    server, thread, base = serve(create_app(ChatService(scheduler, tokenizer, "tiny", DEFAULTS)))
    assert post(base + "/v1/chat/completions", json=HELLO | {"max_tokens": 2}).status_code == 200  # warm up
    yield base
    server.should_exit = True
    thread.join(5)
    scheduler.stop()


def sse(lines):
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def test_pages_and_metadata(url):
    page = get(url + "/")
    assert page.status_code == 200 and "<textarea" in page.text and "/chat/completions" in page.text
    assert get(url + "/health").json()["status"] == "ok"
    assert get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
    stats = get(url + "/stats").json()
    assert {"requests_served", "tokens_generated", "queue_length", "slots_busy"} <= set(stats)


def test_nanochat_stream_matches_the_engine(url, engine, tokenizer):
    with stream("POST", url + "/chat/completions", json=HELLO | {"temperature": 0, "max_tokens": 20}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["token"] for e in events[:-1])
    ids, _ = prompt_for_reply(tokenizer, HELLO["messages"], 512, 20)
    seqs, _ = engine.generate_batch(ids, max_tokens=20, temperature=0.0)
    reply = ReplyText(tokenizer)
    for t in seqs[0][len(ids):]:
        reply.add(t)
    assert text == reply.text()


def test_openai_completions(url):
    body = HELLO | {"max_tokens": 5, "n": 2, "seed": 7, "temperature": 1.0}
    a, b = post(url + "/v1/chat/completions", json=body).json(), \
        post(url + "/v1/chat/completions", json=body).json()
    assert a["object"] == "chat.completion" and len(a["choices"]) == 2
    assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]
    assert a["usage"]["completion_tokens"] <= 10 and a["usage"]["prompt_tokens"] > 0
    assert a["usage"]["total_tokens"] == a["usage"]["prompt_tokens"] + a["usage"]["completion_tokens"]
    assert all(c["finish_reason"] in ("stop", "length") for c in a["choices"])

    single = post(url + "/v1/chat/completions", json=HELLO | {"max_tokens": 12, "seed": 1}).json()
    text = single["choices"][0]["message"]["content"]
    with stream("POST", url + "/v1/chat/completions",
                      json=HELLO | {"max_tokens": 12, "seed": 1, "stream": True}) as r:
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    if len(text) > 3:  # a stop string cuts the reply there
        cut = post(url + "/v1/chat/completions",
                         json=HELLO | {"max_tokens": 12, "seed": 1, "stop": [text[2:4]]}).json()["choices"][0]
        assert cut["message"]["content"] == text[:text.find(text[2:4])] and cut["finish_reason"] == "stop"
        with stream("POST", url + "/v1/chat/completions",
                          json=HELLO | {"max_tokens": 12, "seed": 1, "stop": [text[2:4]], "stream": True}) as r:
            streamed = [json.loads(e) for e in sse(r.iter_lines())[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == cut["message"]["content"]
        assert [c["choices"][0]["finish_reason"] for c in streamed].count("stop") == 1  # one finish per choice


def test_completions_refuse_token_ids_outside_the_vocabulary(url):
    for prompt in ([99999], [-1], [[1, 2], [3, 10**6]]):
        r = post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert "token ids must be in 0.." in r.json()["error"]["message"]


@pytest.mark.parametrize("body,message", [
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 0}, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, "bogus"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": "  "}]}, "empty content"),
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "too long"),
    ({"messages": [{"role": "user", "content": "x" * 7000}, {"role": "assistant", "content": "y" * 7000}] * 3
      + [{"role": "user", "content": "z" * 7000}]}, "conversation is too long"),
    ({"messages": [{"role": "user", "content": "a"}] * 501}, "too many messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "last message"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, "decode slots"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**63}, "seed"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(url, body, message):
    for path in ("/v1/chat/completions", "/chat/completions"):
        if path == "/chat/completions" and any(k in body for k in ("n", "stop")):
            continue
        r = post(url + path, json=body)
        assert r.status_code == 400, (path, r.text)
        assert message in r.json()["error"]["message"], r.text
    assert post(url + "/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"}).status_code == 400
    assert post(url + "/v1/chat/completions", json=HELLO | {"model": "gpt-9"}).status_code == 404
    assert post(url + "/v1/chat/completions", json=HELLO | {"max_tokens": 2}).status_code == 200


def test_concurrent_requests_share_the_slots(url):
    def one(seed):
        return post(url + "/v1/chat/completions", json=HELLO | {"max_tokens": 16, "seed": seed}, timeout=120)
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(one, range(6)))
    assert all(r.status_code == 200 for r in replies)
    alone = one(3).json()["choices"][0]["message"]["content"]
    assert replies[3].json()["choices"][0]["message"]["content"] == alone  # seeded: independent of batch-mates
    assert get(url + "/stats").json()["slots_busy"] == 0


def test_client_disconnect_frees_the_slot(url):
    before = get(url + "/stats").json()["tokens_generated"]
    with stream("POST", url + "/chat/completions", json=HELLO | {"max_tokens": 4000, "temperature": 1.0}) as r:
        next(r.iter_lines())
    deadline = time.time() + 20
    while get(url + "/stats").json()["slots_busy"] and time.time() < deadline:
        time.sleep(0.05)
    stats = get(url + "/stats").json()
    assert stats["slots_busy"] == 0
    assert stats["tokens_generated"] - before < 400  # it stopped early, not at the end of the budget


def test_full_queue_gets_503(engine, tokenizer):
    scheduler = engine.scheduler(slots=1, max_waiting=1)  # not started: nothing leaves the queue
    scheduler.submit(Request([1, 2, 3], 1, 4, 0.0, None, 1.0, 0))
    server, thread, base = serve(create_app(ChatService(scheduler, tokenizer, "tiny", DEFAULTS)))
    try:
        r = post(base + "/v1/chat/completions", json=HELLO)
        assert r.status_code == 503 and "busy" in r.json()["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(5)


def test_official_openai_client(url):
    openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=HELLO["messages"], max_tokens=8, seed=2)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="tiny", messages=HELLO["messages"], max_tokens=8, seed=2,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=HELLO["messages"], temperature=9)


def headless_chromium():
    import shutil
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("no system Chromium/chromedriver (.ci/run installs the Debian packages chromium, chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)


def test_chat_page_in_a_headless_browser(url):
    """The real page in Chromium: a streamed reply; a refused send that leaves the conversation as it was (its text
    back in the box) and the next send working; Stop freeing the server's slot; New chat; the favicon."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser = headless_chromium()
    wait = WebDriverWait(browser, 120)
    css = lambda selector: browser.find_elements(By.CSS_SELECTOR, selector)  # noqa: E731
    idle = lambda b: b.find_element(By.ID, "send").text == "Send"  # noqa: E731
    try:
        browser.get(url + "/")
        assert browser.find_element(By.CSS_SELECTOR, "link[rel=icon]").get_attribute("href").endswith("/favicon.svg")
        assert get(url + "/favicon.svg").status_code == 200
        box = browser.find_element(By.ID, "input")
        one_line = box.size["height"]
        box.send_keys("hello there")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: idle(b) and css(".msg.assistant") and b.find_element(By.ID, "regen").is_enabled())
        assert [m.text for m in css(".msg.user")] == ["hello there"] and css(".msg.assistant")[0].text.strip()
        first_reply = css(".msg.assistant")[0].text

        # a send the server refuses (too long): an error shows, the conversation and the text come back
        browser.execute_script("const i = document.getElementById('input'); i.value = 'word '.repeat(2000);"
                               "i.dispatchEvent(new Event('input'));")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: idle(b) and css(".error"))
        assert "too long" in css(".error")[0].text
        assert [m.text for m in css(".msg.user")] == ["hello there"] and css(".msg.assistant")[0].text == first_reply
        assert box.get_attribute("value").startswith("word word")
        browser.execute_script("document.getElementById('input').value = ''")
        box.send_keys("and again")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: idle(b) and len(css(".msg.assistant")) == 2)
        assert [m.text for m in css(".msg.user")] == ["hello there", "and again"]
        assert box.get_attribute("value") == "" and box.size["height"] == one_line

        # Stop: the reply ends at once and the server frees its slot
        box.send_keys("tell me a long story")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: b.find_element(By.ID, "send").text == "Stop")
        browser.find_element(By.ID, "send").click()
        wait.until(idle)
        deadline = time.time() + 60
        while get(url + "/stats").json()["slots_busy"] and time.time() < deadline:
            time.sleep(0.05)
        assert get(url + "/stats").json()["slots_busy"] == 0
        assert len(css(".msg.user")) == len(css(".msg.assistant"))  # still a whole conversation

        browser.find_element(By.ID, "new").click()
        assert not css(".msg") and box.get_attribute("value") == ""
    finally:
        browser.quit()


def test_the_page_when_the_server_misbehaves():
    """The real page against a scripted server (no model): a reply that streams on and is stopped is marked as
    stopped; a server that freezes mid-reply is given up on after ?stall= seconds, said so, and the message is back
    in the box; a connection dropped mid-reply reads as such; the empty page names the model it serves; a one-line
    box has no scrollbar; at 390 px wide the placeholder fits."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, StreamingResponse
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from serve.web import UI_PATH

    app, script = FastAPI(), {"mode": "slow"}
    page = open(UI_PATH, encoding="utf-8").read().replace("{{MODEL}}", "scripted-d0")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.post("/chat/completions")
    async def chat():
        async def stream():
            yield 'data: {"token": "Once"}\n\n'
            if script["mode"] == "drop":
                raise RuntimeError("the connection drops here")  # uvicorn cuts the response off mid-body
            while True:  # slow: a word every 0.2 s; freeze: nothing more, ever
                await asyncio.sleep(0.2 if script["mode"] == "slow" else 3600)
                yield 'data: {"token": " upon"}\n\n'
        return StreamingResponse(stream(), media_type="text/event-stream")

    server, thread, base = serve(app)
    browser = headless_chromium()
    wait = WebDriverWait(browser, 60)
    css = lambda selector: browser.find_elements(By.CSS_SELECTOR, selector)  # noqa: E731
    idle = lambda b: b.find_element(By.ID, "send").text == "Send"  # noqa: E731
    try:
        browser.set_window_size(390, 800)
        browser.get(base + "/?stall=2")
        assert "scripted-d0" in css(".notice")[0].text and "scripted-d0" in browser.find_element(By.ID, "model").text
        box = browser.find_element(By.ID, "input")
        fits = browser.execute_script(
            "const b = arguments[0], s = getComputedStyle(b), c = document.createElement('canvas').getContext('2d');"
            "c.font = s.font; return [c.measureText(b.placeholder).width, b.clientWidth - parseFloat(s.paddingLeft)"
            " - parseFloat(s.paddingRight), b.scrollHeight <= b.clientHeight, s.overflowY];", box)
        assert fits[0] <= fits[1] and fits[2] and fits[3] == "hidden", fits
        box.send_keys("one line")
        assert browser.execute_script("return getComputedStyle(arguments[0]).overflowY", box) == "hidden"
        box.clear()

        box.send_keys("tell me")  # stopped mid-reply: marked so
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: "upon" in css(".msg.assistant")[-1].text)
        browser.find_element(By.ID, "send").click()
        wait.until(idle)
        assert css(".msg.assistant")[-1].text.endswith("(stopped)") and not css(".error")

        for mode, said in (("freeze", "the server stopped answering (nothing for 2 s)"),
                           ("drop", "the connection to the server was lost during the reply")):
            script["mode"] = mode
            box.send_keys(f"now {mode}")
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: idle(b) and css(".error"))
            assert said in css(".error")[-1].text, css(".error")[-1].text
            assert box.get_attribute("value") == f"now {mode}"  # back in the box, to send again
            assert len(css(".msg.user")) == len(css(".msg.assistant")) == 1  # the conversation as it was
            browser.execute_script("arguments[0].value = ''", box)
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(5)
