"""Load a chat server with concurrent clients streaming /v1/chat/completions: requests/s, time to first token, latency,
tokens/s, while /health is timed every 50 ms (the event loop should never wait on the engine).

    python -m serve.web --port 8000 & python -m scripts.bench_serve --clients 16 --requests 64 --max-tokens 128
    python -m scripts.bench_serve --conversation 10 --max-tokens 64   # each turn resends all before: TTFT must not grow
    python -m scripts.bench_serve --api nanochat --url http://127.0.0.1:8001 --clients 8 --requests 8  # its chat_web
    python -m scripts.bench_serve --random-depth 4 --tokenizer DIR  # in-process: 1 client, 8, generate(), stops banned
"""
import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def one_request(url: str, index: int, max_tokens: int, history: int = 0, messages=None, body=None, text=None,
                api: str = "openai"):
    """(time to first token, latency, streamed pieces, the reply's text); api "nanochat": its /chat/completions."""
    import httpx
    earlier = [{"role": role, "content": f"{role} turn {i}: " + "some words here " * 18}
               for i in range(history) for role in ("user", "assistant")]
    messages = messages or earlier + [{"role": "user", "content": text or f"Tell me about the number {index}."}]
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 1.0, "stream": True, "seed": index,
            **(body or {})}
    t0, first, pieces = time.time(), None, []  # one streamed piece is about one token
    path = "/v1/chat/completions" if api == "openai" else "/chat/completions"
    with httpx.stream("POST", url + path, json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            piece = event["choices"][0]["delta"].get("content") if api == "openai" else event.get("token")
            if piece:
                first = first or time.time() - t0
                pieces.append(piece)
    return first or time.time() - t0, time.time() - t0, len(pieces), "".join(pieces)


def conversation(url: str, turns: int, max_tokens: int):
    messages, ttfts = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Turn {turn}: tell me more about the number {turn}, please."})
        first, _, _, reply = one_request(url, turn, max_tokens, messages=messages)
        messages.append({"role": "assistant", "content": reply or "ok"})
        ttfts.append(first)
        print(f"turn {turn + 1:2d}: time to first token {first * 1000:6.0f} ms", flush=True)
    print(f"turn 1 {ttfts[0] * 1000:.0f} ms | turn {turns} {ttfts[-1] * 1000:.0f} ms")


def in_process(depth: int, tokenizer_dir: str, rounds: int, chunk: int, max_tokens: int = 128):
    import uvicorn
    from flax import nnx

    from nanochat_jax.data.tokenizer import Tokenizer
    from nanochat_jax.inference.engine import Engine
    from nanochat_jax.model.gpt import GPT, GPTConfig
    from serve.service import ChatService
    from serve.web import create_app
    tok = Tokenizer.load(tokenizer_dir)
    heads = max(1, depth * 64 // 128)
    config = GPTConfig(sequence_len=2048, vocab_size=tok.get_vocab_size(), n_layer=depth, n_head=heads,
                       n_kv_head=heads, n_embd=64 * depth)
    engine = Engine(GPT(config, rngs=nnx.Rngs(0)), tok, chunk=chunk, compute_dtype_weights=True)
    scheduler = engine.scheduler(8, 64)
    scheduler.warm_up()
    engine.warm_up()  # (its own one-slot scheduler, for the comparison)
    scheduler.start()
    app = create_app(ChatService(scheduler, tok, f"d{depth}", {"temperature": 1.0, "top_k": 50, "max_tokens": 128}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    bias = {str(tok.encode_special("<|assistant_end|>")): -100, str(tok.get_bos_token_id()): -100}
    text = "Tell me about the number {}. " + "some words here " * 20
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": text.format(3)},
                                                     {"role": "assistant", "content": ""}]})
    run = lambda i: one_request(url, i, max_tokens, body={"logit_bias": bias}, text=text.format(i))  # noqa: E731
    run(0)

    def clients(n: int, requests: range) -> tuple:
        """n clients sharing the requests: tokens/s over them all, and the median time to first token in ms."""
        t0 = time.time()
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(run, requests))
        return sum(x[2] for x in results) / (time.time() - t0), 1000 * np.median([x[0] for x in results])

    rows = []
    for r in range(rounds):
        single, many = clients(1, range(100 * r, 100 * r + 3)), clients(8, range(100 * r + 10, 100 * r + 18))
        t0, first, n = time.time(), None, 0
        for _ in engine.generate(prompt, max_tokens=max_tokens, temperature=1.0, seed=r):
            first, n = first or time.time() - t0, n + 1
        rows.append((*single, *many, n / (time.time() - t0), 1000 * first))  # (tokens/s, ms to the first) x 3
        print("round {}: 1 client {:.0f} tokens/s (first token {:.0f} ms) | 8 clients {:.0f} tokens/s ({:.0f} ms) | "
              "Engine.generate {:.0f} tokens/s ({:.0f} ms)".format(r, *rows[-1]), flush=True)
    m = np.median(np.array(rows), axis=0)
    print(f"median: 1 client {m[0]:.0f} tokens/s, first token {m[1]:.0f} ms | 8 clients {m[2]:.0f} tokens/s, "
          f"{m[3]:.0f} ms | Engine.generate {m[4]:.0f} tokens/s, {m[5]:.0f} ms | 1 client / generate {m[0] / m[4]:.2f}")
    server.should_exit = True
    scheduler.stop()


def main():
    parser = argparse.ArgumentParser(description="benchmark a running chat server")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--api", choices=["openai", "nanochat"], default="openai", help="nanochat: its chat_web server")
    parser.add_argument("--history", type=int, default=0, help="earlier exchanges in every conversation")
    parser.add_argument("--conversation", type=int, default=0, help="one conversation of this many turns instead")
    parser.add_argument("--random-depth", type=int, default=0, help="serve random weights of this depth in-process")
    parser.add_argument("--tokenizer", default=None, help="with --random-depth: a tokenizer directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=16, help="with --random-depth: tokens per decode call")
    args = parser.parse_args()
    if args.random_depth:
        return in_process(args.random_depth, args.tokenizer, args.rounds, args.chunk)
    if args.conversation:
        return conversation(args.url, args.conversation, args.max_tokens)
    import httpx
    health, done = [], threading.Event()

    def probe():
        while not done.is_set():
            t = time.time()
            httpx.get(args.url + "/health", timeout=60)
            health.append(time.time() - t)
            time.sleep(0.05)
    prober = threading.Thread(target=probe, daemon=True)
    t0 = time.time()
    prober.start()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(lambda i: one_request(args.url, i, args.max_tokens, args.history, api=args.api),
                                range(args.requests)))
    wall = time.time() - t0
    done.set()
    prober.join()
    ttft, latency, tokens = (np.array(x) for x in list(zip(*results))[:3])
    print(f"{args.requests} requests, {args.clients} clients, {wall:.1f}s: {args.requests / wall:.2f} requests/s, "
          f"{tokens.sum() / wall:,.0f} tokens/s\n"
          f"time to first token p50 {np.percentile(ttft, 50) * 1000:.0f} ms, p99 {np.percentile(ttft, 99) * 1000:.0f}"
          f" ms | latency p50 {np.percentile(latency, 50):.2f} s, p99 {np.percentile(latency, 99):.2f} s\n"
          f"/health during the run: p50 {np.percentile(health, 50) * 1000:.1f} ms, p99 "
          f"{np.percentile(health, 99) * 1000:.1f} ms, max {max(health) * 1000:.1f} ms ({len(health)} probes)")


if __name__ == "__main__":
    main()
