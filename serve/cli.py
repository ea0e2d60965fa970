"""Chat with a model in the terminal.

    python -m serve.cli                       # the latest SFT model; 'clear' starts over, 'quit' leaves
    python -m serve.cli -i base -p "The capital of France is"   # answer once (question and reply) and exit

Replies stream, tool calls inline. Ctrl-C during a reply stops it (keeping what was said), at the prompt it leaves (as
Ctrl-D does); a conversation longer than the model's context loses its oldest exchanges."""
import argparse
import contextlib
import signal
import sys
import time

with contextlib.suppress(ImportError):  # (not on every platform)
    import readline  # noqa: F401 - line editing and history for input()

from nanochat_jax.inference.frontend import ReplyText, prompt_for_reply, reply_parts
from nanochat_jax.training.checkpoint import STAGE_DIRS, load_stage
from nanochat_jax.common import use_compilation_cache
from nanochat_jax.inference.programs import MAX_TOP_K
from nanochat_jax.inference.engine import Engine


def stream_reply(engine, tokenizer, prompt_ids, max_tokens, temperature, top_k, seed, header: str = ""):
    """Prints `header`, then the reply as it comes; returns its token ids. From before the header, Ctrl-C only sets
    a flag checked between tokens: an exception could be swallowed in a callback."""
    reply, shown, stop, text = [], "", [], ReplyText(tokenizer)
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    except ValueError:  # (not the main thread: Ctrl-C stays an exception)
        previous = None
    print(header, end="", flush=True)
    tokens = engine.generate(prompt_ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed)
    try:
        for column, _ in tokens:
            if stop or column[0] in engine.stops:
                break
            reply.append(column[0])
            now = text.add(column[0])  # (tool calls as <<expression=result>>, never a special token's name)
            if not now.endswith("\ufffd"):  # hold back half a multi-byte character
                print(now[len(shown):], end="", flush=True)
                shown = now
    except KeyboardInterrupt:
        stop.append(True)
    finally:
        tokens.close()
        print(text.text().rstrip("\ufffd")[len(shown):] + (" (stopped)" if stop else ""), flush=True)
        if previous is not None:  # only now: a Ctrl-C until the reply's last line is out still stops the reply
            signal.signal(signal.SIGINT, previous)
    return reply


def load_engine(args, parser):
    """The model of -i/-g/-s, its tokenizer, checkpoint meta and Engine; a missing checkpoint: one line, exit 1."""
    use_compilation_cache()  # a second start reads the programs back instead of compiling them
    try:
        model, tokenizer, meta = load_stage(args.source, args.model_tag, args.step)
    except FileNotFoundError as e:
        parser.exit(1, f"{e}\n")
    return model, tokenizer, meta, Engine(model, tokenizer, compute_dtype_weights=True)


def questions():
    """What the user types (None for 'clear'), until 'quit', Ctrl-C or Ctrl-D."""
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.lower() in ("quit", "exit"):
            return
        if text:
            yield None if text.lower() == "clear" else text


def main(argv=None):
    parser = argparse.ArgumentParser(description="chat with a nanochat-jax model")
    parser.add_argument("-i", "--source", default="sft", choices=sorted(STAGE_DIRS), help="which stage's model")
    parser.add_argument("-g", "--model-tag", default=None, help="e.g. d20 (default: the newest complete checkpoint)")
    parser.add_argument("-s", "--step", type=int, default=None, help="default: the latest")
    parser.add_argument("-p", "--prompt", default="", help="answer this once and exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6)
    parser.add_argument("-k", "--top-k", type=int, default=50)
    parser.add_argument("-m", "--max-tokens", type=int, default=512, help="longest reply")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 1 <= args.top_k <= MAX_TOP_K or args.max_tokens < 1:
        parser.error(f"--temperature must be >= 0, --top-k in 1..{MAX_TOP_K}, --max-tokens >= 1")
    model, tokenizer, meta, engine = load_engine(args, parser)
    context, t0 = model.config.sequence_len, time.time()
    print(f"compiling the engine for prompts up to {context} tokens ...", end=" ", flush=True, file=sys.stderr)
    engine.warm_up()  # now, so that no reply waits on the compiler
    print(f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    max_tokens = min(args.max_tokens, context // 2)
    if not args.prompt:
        print(f"nanochat-jax: {args.source} model, step {meta['step']}. 'clear' starts over, 'quit' leaves.")
    messages, turn = [], 0
    for text in ([args.prompt] if args.prompt else questions()):
        if text is None:
            messages = []
            print("(new conversation)")
            continue
        messages.append({"role": "user", "content": text})
        try:
            prompt_ids, dropped = prompt_for_reply(tokenizer, messages, context, max_tokens)
        except ValueError as e:
            messages.pop()
            print(f"(not sent: {e})")
            if args.prompt:
                raise SystemExit(1)
            continue
        if dropped:
            messages = messages[dropped:]
            print(f"(the conversation outgrew the {context}-token context: dropped the oldest {dropped} messages)")
        if args.prompt:
            print(f"User: {text}")
        reply = stream_reply(engine, tokenizer, prompt_ids, max_tokens, args.temperature, args.top_k, seed=turn,
                             header="Assistant: " if args.prompt else "\nAssistant: ")
        if reply:
            messages.append({"role": "assistant", "content": reply_parts(tokenizer, reply)})
        else:  # stopped before a word: as if the question had not been asked
            messages.pop()
        turn += 1


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # (while the model loads)
        print()
        sys.exit(130)
