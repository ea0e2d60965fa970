"""Load a running chat server with concurrent clients: requests/s, time to first token, latency, tokens/s.

    python -m serve.web --port 8000 &
    python -m scripts.bench_serve --url http://127.0.0.1:8000 --clients 16 --requests 64 --max-tokens 128

Each client streams /v1/chat/completions requests one after another; the prompt varies per request (--history N
puts N earlier exchanges before it: long conversations to render). Meanwhile /health is asked every 50 ms and its
latency reported: the event loop should never wait on the engine or on prompt rendering.

    python -m scripts.bench_serve --url http://127.0.0.1:8000 --conversation 10 --max-tokens 64

holds one conversation of 10 turns instead (each turn sends the whole conversation so far, the replies included)
and prints the time to first token of every turn: with the server's prefix reuse it should not grow with the turns.
"""
import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def one_request(url: str, index: int, max_tokens: int, history: int = 0, messages=None):
    """(time to first token, latency, streamed pieces, the reply's text)."""
    import httpx
    earlier = [{"role": role, "content": f"{role} turn {i}: " + "some words here " * 18}
               for i in range(history) for role in ("user", "assistant")]
    messages = messages or earlier + [{"role": "user", "content": f"Tell me about the number {index}."}]
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 1.0, "stream": True, "seed": index}
    t0, first, tokens, text = time.time(), None, 0, ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                first = first or time.time() - t0
                tokens += 1  # one streamed piece is about one token
                text += delta["content"]
    return first or time.time() - t0, time.time() - t0, tokens, text


def conversation(url: str, turns: int, max_tokens: int):
    messages, ttfts = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Turn {turn}: tell me more about the number {turn}, please."})
        first, _, _, reply = one_request(url, turn, max_tokens, messages=messages)
        messages.append({"role": "assistant", "content": reply or "ok"})
        ttfts.append(first)
        print(f"turn {turn + 1:2d}: time to first token {first * 1000:6.0f} ms", flush=True)
    print(f"turn 1 {ttfts[0] * 1000:.0f} ms | turn {turns} {ttfts[-1] * 1000:.0f} ms")


def main():
    parser = argparse.ArgumentParser(description="benchmark a running chat server")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--history", type=int, default=0, help="earlier exchanges in every conversation")
    parser.add_argument("--conversation", type=int, default=0, help="one conversation of this many turns instead")
    args = parser.parse_args()
    if args.conversation:
        return conversation(args.url, args.conversation, args.max_tokens)
    import threading

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
        results = list(pool.map(lambda i: one_request(args.url, i, args.max_tokens, args.history),
                                range(args.requests)))
    wall = time.time() - t0
    done.set()
    prober.join()
    ttft, latency, tokens = (np.array(x) for x in list(zip(*results))[:3])
    print(f"{args.requests} requests, {args.clients} clients, {wall:.1f}s: {args.requests / wall:.2f} requests/s, "
          f"{tokens.sum() / wall:,.0f} tokens/s\n"
          f"time to first token p50 {np.percentile(ttft, 50) * 1000:.0f} ms, p99 {np.percentile(ttft, 99) * 1000:.0f} ms"
          f" | latency p50 {np.percentile(latency, 50):.2f} s, p99 {np.percentile(latency, 99):.2f} s\n"
          f"/health during the run: p50 {np.percentile(health, 50) * 1000:.1f} ms, p99 "
          f"{np.percentile(health, 99) * 1000:.1f} ms, max {max(health) * 1000:.1f} ms ({len(health)} probes)")


if __name__ == "__main__":
    main()
