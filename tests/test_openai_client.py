"""The server through OpenAI's own Python client (sync, async, streaming): chat and legacy completions with the
fields real clients send, logprobs, penalties, logit_bias, usage in streams, and OpenAI-style errors."""
import asyncio
import math
import threading
import time

import openai
import pytest
import uvicorn
from flax import nnx

from conftest import randomize, tiny_config
from nanochat_jax.inference.engine import Engine
from nanochat_jax.model.gpt import GPT
from serve.service import ChatService
from serve.web import create_app

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(tokenizer):
    model = randomize(GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=256), rngs=nnx.Rngs(0)),
                      std=0.4)
    scheduler = Engine(model, tokenizer).scheduler(slots=4, max_waiting=32).start()
    app = create_app(ChatService(scheduler, tokenizer, "tiny", {"temperature": 0.8, "top_k": 50, "max_tokens": 8}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    client = openai.OpenAI(base_url=base, api_key="unused", timeout=120.0, max_retries=0)
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)  # warm up: the first call compiles
    yield client, base, tokenizer
    server.should_exit = True
    thread.join(10)
    scheduler.stop()


def test_chat_with_the_fields_clients_send(server):
    client, _, _ = server
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "developer", "content": "be brief"},
                                {"role": "user", "content": [{"type": "text", "text": "hello "},
                                                             {"type": "text", "text": "there"}]}],
        max_tokens=6, temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0, user="someone", n=1,
        response_format={"type": "text"}, seed=3, top_p=1.0, stop=None, logit_bias={}, store=False)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 6
    same = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0.0)
    again = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0.0)
    assert same.choices[0].message.content == again.choices[0].message.content
    assert client.models.retrieve("tiny").id == "tiny" and [m.id for m in client.models.list()] == ["tiny"]


def test_logprobs_are_the_model_s(server):
    client, _, tokenizer = server
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0.0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        best = entry.top_logprobs[0]
        assert math.isclose(entry.logprob, best.logprob, abs_tol=1e-5)  # greedy: the sampled token is the top one
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_streaming_with_usage_and_logprobs(server):
    client, _, _ = server
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0.0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 logprobs=True, top_logprobs=2))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0.0)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(streamed) == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_async_client(server):
    _, base, _ = server

    async def main():
        client = openai.AsyncOpenAI(base_url=base, api_key="unused", timeout=120.0, max_retries=0)
        replies = await asyncio.gather(*[client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4,
                                                                        seed=i, temperature=1.0) for i in range(4)])
        stream = await client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, stream=True)
        pieces = [c async for c in stream]
        await client.close()
        return replies, pieces
    replies, pieces = asyncio.run(main())
    assert len(replies) == 4 and all(r.choices[0].message.content is not None for r in replies)
    assert pieces and pieces[0].choices[0].delta.role == "assistant"


def test_logit_bias_and_penalties_change_the_reply(server):
    client, _, tokenizer = server
    greedy = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0.0,
                                            logprobs=True)
    first = greedy.choices[0].logprobs.content[0]
    first_id = tokenizer.encode(first.token)[0] if first.token else None
    banned = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0.0,
                                            logprobs=True, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.content[0].token != first.token
    t = tokenizer.encode("the")[0]
    piece = tokenizer.decode([t])
    forced = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0.0,
                                            logit_bias={str(t): 12})
    assert forced.choices[0].message.content == piece * 8  # the bias outweighs every other logit
    penalized = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0.0,
                                               logit_bias={str(t): 12}, frequency_penalty=2.0, presence_penalty=2.0)
    text = penalized.choices[0].message.content
    assert text.startswith(piece) and text != piece * 8  # each repeat costs 2 more: the bias runs out


def test_legacy_completions_serve_a_base_model(server):
    client, _, tokenizer = server
    out = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=5,
                                    temperature=0.0, logprobs=2, echo=True)
    choice = out.choices[0]
    assert choice.text.startswith("The capital of France is") and out.object == "text_completion"
    lp = choice.logprobs
    prompt_tokens = len(tokenizer.encode("The capital of France is"))
    assert len(lp.tokens) == prompt_tokens + out.usage.completion_tokens
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    plain = client.completions.create(model="tiny", prompt=["one", "two"], max_tokens=3, temperature=0.0, n=2)
    assert sorted(c.index for c in plain.choices) == [0, 1, 2, 3]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The capital of France is", max_tokens=5, temperature=0.0, stream=True) if c.choices)
    assert "The capital of France is" + streamed == choice.text


@pytest.mark.parametrize("kwargs,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages.0.content.0"),
    ({"model": "gpt-4o"}, "model"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"logit_bias": {"999999": 5}}, None),
])
def test_what_is_refused_is_named(server, kwargs, param):
    client, _, _ = server
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(**({"model": "tiny", "messages": HELLO, "max_tokens": 2} | kwargs))
    error = raised.value.body
    assert raised.value.status_code in (400, 404) and error["message"]
    assert {"message", "type", "param", "code"} <= set(error)
    if param:
        assert error["param"] == param, error
