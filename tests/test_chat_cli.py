import numpy as np
import pytest
from flax import nnx

from conftest import randomize, run_module, tiny_config
from nanochat_jax.inference.frontend import prompt_for_reply, reply_parts
from nanochat_jax.training.checkpoint import Checkpointer, model_meta
from nanochat_jax.model.gpt import GPT


def conversation(n_exchanges, words=3):
    messages = [{"role": "system", "content": "be brief"}]
    for i in range(n_exchanges):
        messages += [{"role": "user", "content": f"question {i} " + "word " * words},
                     {"role": "assistant", "content": f"answer {i}"}]
    return messages + [{"role": "user", "content": "last question"}]


def test_prompt_fits_by_dropping_oldest_exchanges(tokenizer):
    messages = conversation(6)
    full, dropped = prompt_for_reply(tokenizer, messages, context=10_000, reply_room=10)
    assert dropped == 0 and full[-1] == tokenizer.encode_special("<|assistant_start|>")
    ids, dropped = prompt_for_reply(tokenizer, messages, context=len(full) - 5, reply_room=10)
    assert dropped > 0 and dropped % 2 == 0 and len(ids) + 10 <= len(full) - 5
    expected, _ = prompt_for_reply(tokenizer, messages[:1] + messages[1 + dropped:], 10_000, 10)
    assert ids == expected  # the system message stays, the oldest exchanges go
    with pytest.raises(ValueError, match="does not fit the model's context of 20"):
        prompt_for_reply(tokenizer, [{"role": "user", "content": "word " * 50}], context=20, reply_room=5)


def test_reply_parts(tokenizer):
    S = tokenizer.encode_special
    e = tokenizer.encode
    tokens = e("let me see") + [S("<|python_start|>")] + e("2+2") + [S("<|python_end|>")] + \
        [S("<|output_start|>")] + e("4") + [S("<|output_end|>")] + e(" it is 4")
    assert reply_parts(tokenizer, tokens) == [{"type": "text", "text": "let me see"}, {"type": "python", "text": "2+2"},
                                              {"type": "python_output", "text": "4"},
                                              {"type": "text", "text": " it is 4"}]
    assert reply_parts(tokenizer, e("plain")) == "plain"


def save_sft(base, tokenizer, model) -> dict:
    """An SFT checkpoint of `model` under `base` (the environment that points the CLI at it)."""
    ckpt = Checkpointer(str(base / "chatsft_checkpoints" / "d2"))
    ckpt.save_tokenizer(tokenizer)
    ckpt.save(3, {"params": nnx.to_pure_dict(nnx.state(model))}, model_meta(model.config, 3))
    ckpt.wait()
    return {"NANOCHAT_BASE_DIR": str(base)}


@pytest.fixture
def sft_checkpoint(tmp_path, tokenizer):
    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=48)
    model = randomize(GPT(cfg, rngs=nnx.Rngs(0)), std=0.3)
    return save_sft(tmp_path, tokenizer, model)


def test_reply_text_shows_tool_calls_and_never_a_special_token(tokenizer):
    """What the CLI and the page show of a reply: <<expression=result>> for a tool call; a stray special token
    (here <|user_start|> and <|python_end|> out of place) shows as nothing, never by its raw name."""
    from nanochat_jax.inference.frontend import ReplyText
    sp = tokenizer.encode_special
    tokens = (tokenizer.encode("twelve is ") + [sp("<|python_start|>")] + tokenizer.encode("7+5")
              + [sp("<|python_end|>"), sp("<|output_start|>")] + tokenizer.encode("12") + [sp("<|output_end|>")]
              + [sp("<|user_start|>")] + tokenizer.encode(" done"))
    reply, shown = ReplyText(tokenizer), []
    for t in tokens:  # each step's text extends the one before: what streaming writes is consistent
        shown.append(reply.add(t))
    assert reply.text() == "twelve is <<7+5=12>> done"
    assert all(b.startswith(a) for a, b in zip(shown, shown[1:]))
    specials = ReplyText(tokenizer)
    for name in ("<|bos|>", "<|assistant_start|>"):
        specials.add(sp(name))
    assert "<|" not in specials.text()


def test_a_stream_cut_by_the_token_limit_ends_on_a_whole_character(tokenizer):
    """/v1/completions: the last token is the first byte of a three-byte character; the stream's end leaves it
    out rather than sending U+FFFD."""
    from serve.openai_api import Choice, PlainText
    from nanochat_jax.inference.scheduler import Token
    first_byte = tokenizer.enc.encode_single_token("東".encode()[:1])
    choice = Choice(0, tokenizer, PlainText, [])
    sent = "".join(choice.add(Token(0, t, False, 0.0, ())) for t in tokenizer.encode("x = ") + [first_byte])
    sent += choice.add(None)
    assert sent == "x = " and "\ufffd" not in sent


def test_cli_prompt_and_interactive(sft_checkpoint):
    once = run_module("serve.cli", "-p", "hello", "-t", "0", "-m", "8", env=sft_checkpoint, check=True)
    assert once.stdout.strip()
    session = "hi\n" + "word " * 100 + "\n" + "again\n" * 4 + "clear\nagain\nquit\n"
    result = subprocess_input(["-m", "8"], session, sft_checkpoint)
    assert result.returncode == 0, result.stderr
    assert "(not sent: the message is" in result.stdout and "(new conversation)" in result.stdout
    assert "outgrew the 48-token context" in result.stdout  # five exchanges of up to 16 tokens overflow 48


def subprocess_input(args, stdin, env):
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT
    return subprocess.run([sys.executable, "-m", "serve.cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO_ROOT, env=os.environ | env, timeout=300)


def test_cli_without_checkpoint(tmp_path):
    result = run_module("serve.cli", "-p", "hi", env={"NANOCHAT_BASE_DIR": str(tmp_path)})
    assert result.returncode == 1 and "no checkpoints in" in result.stderr and "import_nanochat" in result.stderr


def test_cli_question_and_reply_with_p(sft_checkpoint):
    once = run_module("serve.cli", "-p", "hello", "-t", "0", "-m", "8", env=sft_checkpoint, check=True)
    lines = once.stdout.strip().splitlines()
    assert lines[0] == "User: hello" and lines[1].startswith("Assistant: ")


@pytest.fixture
def long_reply_checkpoint(tmp_path, tokenizer):
    """A model whose replies run long (256 tokens: its stop tokens' logits are 0 among random ones) and slow enough
    (4 layers, 256 wide: about a second on a CPU) for a Ctrl-C to land in one, now that no reply waits on the
    compiler."""
    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=512, n_layer=4, n_embd=256, n_head=2,
                      n_kv_head=2)
    model = randomize(GPT(cfg, rngs=nnx.Rngs(0)), std=0.3)
    stops = [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]
    kernel = np.array(model.lm_head.kernel[...])
    kernel[..., stops] = 0.0
    model.lm_head.kernel[...] = kernel
    return save_sft(tmp_path, tokenizer, model)


def test_cli_in_a_terminal(long_reply_checkpoint):
    """Through a pty, as a person types: Ctrl-C during a reply stops that reply and the conversation goes on;
    readline recalls the last line with the up arrow; Ctrl-C at the prompt leaves cleanly."""
    import os
    import pty
    import select
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO_ROOT
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "-m", "256", "-t", "1.0"], stdin=slave, stdout=slave,
                            stderr=slave, cwd=REPO_ROOT, env=os.environ | long_reply_checkpoint,
                            start_new_session=True)
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout=300):
        nonlocal seen
        deadline = time.time() + timeout
        while marker not in seen:
            assert time.time() < deadline, f"no {marker!r} in {seen[-500:]!r}"
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
        assert marker in seen, seen[-500:]

    def type_(data: bytes):
        os.write(master, data)

    try:
        read_until(b"User: ")
        type_(b"hello\r")
        read_until(b"Assistant: ")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C while it answers (256 tokens: a second or more)
        read_until(b"(stopped)")
        read_until(b"User: ", timeout=60)
        start = len(seen)
        type_(b"clear\r")
        read_until(b"(new conversation)")
        type_(b"\x1b[A\r")  # the up arrow: readline brings back "clear"
        deadline = time.time() + 60
        while seen[start:].count(b"(new conversation)") < 2 and time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                seen += os.read(master, 4096)
        assert seen[start:].count(b"(new conversation)") == 2, seen[start:]
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at the prompt: leave
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        assert proc.wait(timeout=10) == 0, seen[-800:]
        assert b"Traceback" not in seen
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_ctrl_c_stops_the_web_server_with_one_line(sft_checkpoint):
    """SIGINT to serve.web, once it serves (and once while it is still compiling): it shuts down with one line and
    exit code 130, no KeyboardInterrupt traceback."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from conftest import REPO_ROOT
    for when in ("serving", "compiling"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "serve.web", "--port", str(port), "--slots", "1"],
                                cwd=REPO_ROOT, env=os.environ | sft_checkpoint, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        marker = "serving nanochat-jax" if when == "serving" else "compiling the engine"
        deadline, seen = time.time() + 300, ""
        while marker not in seen and time.time() < deadline and proc.poll() is None:
            seen += proc.stdout.readline()
        assert marker in seen, seen
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, (proc.returncode, err[-2000:])
        assert "Traceback" not in err and err.strip().splitlines()[-1] == "serve.web: stopped (Ctrl-C)", err[-2000:]
